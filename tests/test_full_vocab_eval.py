"""Full-vocabulary KL and calibration of the eval stage, against hand-computed references."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_traces import VOCAB, meta, valid_rows

from bitnet_kde.data.datamodule import TraceDataset
from bitnet_kde.eval.evaluate import HeldOut, full_vocab_section
from bitnet_kde.eval.metrics import CalibrationBins, full_vocab_kl, token_sums
from bitnet_kde.kd.traces import read_traces, write_trace_shard


def test_full_vocab_kl_matches_a_loop_and_ignores_masked_positions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    t[0, 1, 4] = -math.inf                                   # an id the teacher gives no mass
    mask = torch.tensor([[True, True, False], [True, False, True]])
    got = full_vocab_kl(s, t, mask)
    for b in range(2):
        for i in range(3):
            pt = torch.softmax(t[b, i].double(), -1)
            ps = torch.softmax(s[b, i].double(), -1)
            ref = sum(float(pt[v] * (pt[v].log() - ps[v].log())) for v in range(7) if pt[v] > 0)
            assert float(got[b, i]) == pytest.approx(ref if mask[b, i] else 0.0, abs=1e-12)
    assert float(full_vocab_kl(t, t, mask).abs().max()) < 1e-12


def test_expected_calibration_error_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right): bins [0.9, 1.0) and [0.6, 0.7)
    # ECE = (2/3)|0.5 - 0.9| + (1/3)|1 - 0.6| = 0.4
    logits = torch.log(torch.tensor([[[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]]]))
    targets = torch.tensor([[0, 1, 1]])
    bins = CalibrationBins()
    bins.add(logits, targets, torch.ones(1, 3, dtype=torch.bool))
    assert bins.ece() == pytest.approx(0.4)
    assert [(round(c["confidence"], 6), c["accuracy"], c["n"]) for c in bins.curve()] == [(0.6, 1.0, 1), (0.9, 0.5, 2)]
    bins.add(logits, targets, torch.zeros(1, 3, dtype=torch.bool))   # masked positions count for nothing
    assert bins.ece() == pytest.approx(0.4) and CalibrationBins().ece() is None


class Linear(torch.nn.Module):
    """A stand-in causal LM: logits from a per-token table (position t sees token t only)."""

    def __init__(self, seed):
        super().__init__()
        self.table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed))
        self.device = torch.device("cpu")

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def held_out(tmp_path, teacher, projection="identity"):
    table = read_traces(write_trace_shard(valid_rows(), tmp_path / "a.parquet", meta()), vocab_size=VOCAB)
    collector = SimpleNamespace(teacher=lambda: teacher)
    return HeldOut(collector=collector, trace_dir=str(tmp_path), ds=TraceDataset(table, 16), categories=["qa"] * 3,
                   prompts=["p"] * 3, teacher_text=["t"] * 3, traced_by="test/model", projection=projection)


def test_full_vocab_section_with_a_local_teacher_and_without_one(tmp_path):
    student = Linear(1)
    teacher = SimpleNamespace(full_distribution=True, lm=Linear(2))
    data = held_out(tmp_path, teacher)
    out = full_vocab_section(lambda ids: student(ids).logits, data, batch_size=2)
    # reference: every KD-valid position of every row, one row at a time
    kl = bucket = n = 0
    for i in range(len(data.ds)):
        row = data.ds[i]
        ids = torch.from_numpy(row["input_ids"]).unsqueeze(0)
        mask = torch.from_numpy(row["loss_mask"] & row["kd_valid"]).unsqueeze(0)
        kl += float(full_vocab_kl(student.table[ids], teacher.lm.table[ids], mask).sum())
        batch = {k: torch.from_numpy(v).unsqueeze(0) for k, v in row.items()}
        bucket += token_sums(student.table[ids], batch)[0].kl
        n += int(mask.sum())
    assert out["kd_positions"] == n == 6
    assert out["kl_full_vocab"] == pytest.approx(kl / n) and out["kl_bucket"] == pytest.approx(bucket / n)
    assert 0 <= out["ece_top1"] <= 1 and "note" not in out

    api = full_vocab_section(lambda ids: student(ids).logits,
                             held_out(tmp_path, None, projection="strings"), batch_size=2)
    assert api["kl_full_vocab"] is None and api["ece_top1"] == pytest.approx(out["ece_top1"])
    assert "test/model" in api["note"] and "local teacher" in api["note"]
