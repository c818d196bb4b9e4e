"""Evaluation metrics against hand-computed values, QEI, and the eval stage end to end."""

from __future__ import annotations

import math

import pytest
import torch

from bitnet_kde.eval.metrics import (
    TokenTotals,
    group_totals,
    json_valid,
    normalize_answer,
    parse_json_answer,
    qei,
    token_sums,
)


def batch_of(topk_ids, topk_lp, other_lp, input_ids, loss_mask, kd_valid):
    return {
        "topk_ids": torch.tensor(topk_ids), "topk_logprobs": torch.tensor(topk_lp, dtype=torch.float32),
        "other_logprob": torch.tensor(other_lp, dtype=torch.float32), "input_ids": torch.tensor(input_ids),
        "loss_mask": torch.tensor(loss_mask), "kd_valid": torch.tensor(kd_valid),
    }


def test_identical_distributions_have_zero_kl_and_full_agreement():
    # V = 4; the teacher's top-2 + Other equal the student's softmax exactly.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(1, 3, 4).clone()
    other = math.log(0.2)
    b = batch_of([[[0, 1]] * 3], [[[math.log(0.5), math.log(0.3)]] * 3], [[other] * 3],
                 [[2, 0, 1]], [[True, True, False]], [[True, True, False]])
    (t,) = token_sums(logits, b)
    assert t.kl == pytest.approx(0.0, abs=1e-6)
    assert (t.agree, t.kd_positions, t.tokens) == (2.0, 2, 2)
    # NLL of the actual next tokens 0 and 1 (positions 0 and 1 predict ids[1], ids[2])
    assert t.nll == pytest.approx(-math.log(0.5) - math.log(0.3), rel=1e-6)
    m = t.as_metrics()
    assert m["perplexity"] == pytest.approx(math.exp((-math.log(0.5) - math.log(0.3)) / 2), rel=1e-6)


def test_kl_and_agreement_by_hand():
    # Student uniform over V = 4; teacher top-1 = id 3 with p 0.7, Other 0.3.
    logits = torch.zeros(1, 2, 4)
    b = batch_of([[[3], [3]]], [[[math.log(0.7)], [math.log(0.7)]]], [[math.log(0.3), math.log(0.3)]],
                 [[1, 3]], [[True, False]], [[True, False]])
    (t,) = token_sums(logits, b)
    # buckets: teacher (0.7, 0.3), student (0.25, 0.75)
    expected = 0.7 * math.log(0.7 / 0.25) + 0.3 * math.log(0.3 / 0.75)
    assert t.kl == pytest.approx(expected, rel=1e-5)
    # argmax of an all-equal row is id 0, not the teacher's 3
    assert t.agree == 0.0 and t.kd_positions == 1
    assert t.nll == pytest.approx(math.log(4), rel=1e-6)


def test_known_top1_agreement_and_unsorted_candidates():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 0.0, 9.0], [1.0, 0.0, 0.0]]])
    # candidates listed out of order: the teacher's best is the slot with the highest logprob
    lp = [[[-2.0, -0.2], [-0.1, -3.0], [-1.5, -0.4], [-0.3, -2.0]]]
    ids = [[[0, 1], [0, 2], [1, 2], [0, 1]]]
    b = batch_of(ids, lp, [[-5.0] * 4], [[0, 0, 0, 0]], [[True] * 4], [[True, True, True, False]])
    (t,) = token_sums(logits, b)
    # position 0: teacher best id 1, student argmax 1 -> agree; 1: 0 vs 0 agree; 2: 2 vs 2 agree;
    # position 3 is not KD-valid and is not counted
    assert (t.agree, t.kd_positions, t.tokens) == (3.0, 3, 4)


def test_masked_positions_contribute_nothing_even_with_garbage():
    logits = torch.randn(2, 3, 5)
    b = batch_of([[[0], [1], [2]], [[3], [4], [0]]], [[[float("nan")], [-0.1], [-0.2]], [[-0.3], [-0.4], [-0.5]]],
                 [[float("-inf"), -1.0, -1.0], [-1.0, -1.0, -1.0]], [[0, 1, 2], [3, 4, 0]],
                 [[False, True, True], [False, False, False]], [[False, True, True], [False, False, False]])
    a, z = token_sums(logits, b)
    assert math.isfinite(a.kl) and a.kd_positions == 2
    assert (z.kl, z.agree, z.nll, z.kd_positions, z.tokens) == (0.0, 0.0, 0.0, 0, 0)
    assert z.as_metrics()["kl"] is None and z.as_metrics()["perplexity"] is None


def test_overall_is_token_weighted():
    rows = [("a", TokenTotals(kl=1.0, agree=1, nll=0, kd_positions=1, tokens=1)),
            ("b", TokenTotals(kl=9.0, agree=0, nll=0, kd_positions=3, tokens=3))]
    g = group_totals(rows)
    assert g["a"].as_metrics()["kl"] == 1.0 and g["b"].as_metrics()["kl"] == 3.0
    assert g["overall"].as_metrics()["kl"] == pytest.approx(10 / 4)
    assert g["overall"].as_metrics()["top1_agreement"] == pytest.approx(1 / 4)


@pytest.mark.parametrize("text, ok", [
    ('{"a": [1, 2]}', True),
    ('  [1, 2, 3]\n', True),
    ('```json\n{"languages": ["Python"]}\n```', True),
    ('```\n[1]\n```', True),
    ('Here you go: {"a": 1}', False),
    ('{"a": 1,}', False),
    ('{"a": 1}\nThat is the object.', False),
    ('', False),
])
def test_json_validity(text, ok):
    assert json_valid(text) is ok
    if ok:
        parse_json_answer(text)


def test_exact_match_normalization():
    assert normalize_answer("  The answer is 365. ") == normalize_answer("the answer  is 365")
    assert normalize_answer("365") != normalize_answer("366")
    assert normalize_answer("Paris!") == "paris"


def test_qei_by_hand():
    r = qei("top1_agreement", 0.5, 1.0, 10, 1000, 200.0, 20.0)
    assert r.qei == pytest.approx((0.5 / 1.0) / (10 / 1000)) == pytest.approx(50.0)
    assert r.qei_speed == pytest.approx(50.0 * 200 / 20)
    assert r.notes == []


def test_qei_unknown_terms_give_none_with_a_reason():
    r = qei("json_validity", 0.5, 0.0, 10, 1000, 1.0, 1.0)
    assert r.qei is None and r.qei_speed is None and "teacher json_validity is 0" in r.notes[0]
    r = qei("exact_match", 0.5, 1.0, 10, None, 1.0, 1.0)
    assert r.qei is None and any("teacher weight bytes" in n for n in r.notes)
    r = qei("exact_match", 0.5, 1.0, 10, 100, 1.0, None)
    assert r.qei == pytest.approx(5.0) and r.qei_speed is None
    with pytest.raises(ValueError, match="quality metric"):
        qei("bleu", 0.5, 1.0, 10, 100, 1.0, 1.0)


# --------------------------------------------------------------------------------------------
# the eval stage through `python eval.py`
# --------------------------------------------------------------------------------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from conftest import ROOT, run_train  # noqa: E402


def run_eval(root, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "eval.py"), f"paths.root={root}", *overrides]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"eval.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny student trained a few steps on real SmolLM2 traces, then `python eval.py`."""
    root = tmp_path_factory.mktemp("eval")
    short = "collection.sampling.max_new_tokens=24"  # keeps both teacher collections quick
    run_train(root, "model=tiny", "collection.prompts.limit=16", "data.val_fraction=0.3", "trainer.max_steps=6",
              "trainer.val_check_interval=3", "collection.progress=false", short)
    held_out = ["collection.prompts.categories=[json,qa]", "speed.prompts=2", "speed.max_new_tokens=8", short]
    run_eval(root, *held_out)
    return root, held_out, json.loads((root / "reports" / "evaluation.json").read_text())


def test_eval_report_has_every_metric(evaluated):
    root, _, r = evaluated
    m = r["metrics"]
    assert set(m["per_category"]) == {"json", "qa"}
    assert r["data"]["prompts"]["split"] == ["test"] and r["data"]["rows_per_category"] == {"json": 6, "qa": 6}
    for cat in ("json", "qa"):
        c = m["per_category"][cat]
        assert c["kl"] > 0 and 0 <= c["top1_agreement"] <= 1 and c["perplexity"] > 1 and c["tokens"] > 0
    assert m["per_category"]["json"]["json_validity_n"] == 6 and "exact_match" not in m["per_category"]["json"]
    assert m["per_category"]["qa"]["exact_match_n"] == 6 and "json_validity" not in m["per_category"]["qa"]
    # the teacher's own JSON rate on the same prompts is measured, not assumed
    assert 0 <= m["per_category"]["json"]["teacher_json_validity"] <= 1
    # overall token metrics are token-weighted over the categories
    tok = {c: m["per_category"][c]["kd_positions"] for c in ("json", "qa")}
    kl = sum(m["per_category"][c]["kl"] * tok[c] for c in tok) / sum(tok.values())
    assert m["overall"]["kl"] == pytest.approx(kl, rel=1e-9)
    # held-out prompts never reach training: train collected [train, val] only
    assert all(a["prompt"] for a in r["answers"]) and len(r["answers"]) == 12


def test_eval_qei_speed_memory_and_outputs(evaluated):
    root, _, r = evaluated
    q, mem, speed = r["qei"], r["memory"], r["speed"]
    assert q["quality_metric"] == "top1_agreement" and q["q_teacher"] == 1.0
    assert q["q_student"] == r["metrics"]["overall"]["top1_agreement"]
    assert mem["student_weight_bytes"]["total"] == q["m_student"]
    assert mem["teacher_weight_bytes"] > 100e6  # SmolLM2-135M as loaded (fp32)
    assert q["qei"] == pytest.approx((q["q_student"] / 1.0) / (q["m_student"] / q["m_teacher"]))
    assert speed["student"]["tokens"] == 2 * 8 and speed["student"]["tokens_per_s"] > 0
    assert speed["teacher"]["tokens_per_s"] > 0
    assert q["qei_speed"] == pytest.approx(q["qei"] * q["tps_student"] / q["tps_teacher"])
    # the checkpoint flipped to A4 at 90% of its 6 steps; eval ran in that mode
    assert r["student"]["activation_bits"] == 4
    png = (root / "reports" / "evaluation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tb,) = {p.parent for p in (root / "logs" / "eval").glob("runs/*/tensorboard/events.*")}
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert {"eval/overall/kl", "eval/json/json_validity", "eval/qa/exact_match", "eval/qei/qei"} <= set(
        acc.Tags()["scalars"])
    assert acc.Scalars("eval/overall/kl")[0].value == pytest.approx(r["metrics"]["overall"]["kl"], rel=1e-6)


def test_eval_options_quality_metric_and_activation_bits(evaluated):
    root, held_out, first = evaluated
    # traces are reused (no teacher), the teacher's bytes come from config, Q is exact match
    run_eval(root, *held_out, "activation_bits=8", "quality_metric=exact_match", "speed.measure_teacher=false",
             "teacher_weight_bytes=1000000", "report_path=${paths.report_dir}/a8.json")
    r = json.loads((root / "reports" / "a8.json").read_text())
    assert r["student"]["activation_bits"] == 8
    assert r["metrics"]["overall"]["kl"] != first["metrics"]["overall"]["kl"]  # A8 and A4 differ
    q = r["qei"]
    assert q["quality_metric"] == "exact_match" and q["q_teacher"] == 1.0 and q["m_teacher"] == 1000000
    assert q["q_student"] == r["metrics"]["overall"]["exact_match"]
    assert q["qei"] == pytest.approx(q["q_student"] / (q["m_student"] / 1000000))
    assert q["qei_speed"] is None and any("tokens/s" in n for n in q["notes"])
    assert r["speed"]["teacher"]["tokens_per_s"] is None

    # Q = JSON validity: the teacher's side is its measured rate on the same prompts
    run_eval(root, *held_out, "quality_metric=json_validity", "speed.teacher_tokens_per_s=10", "teacher_weight_bytes=1e6",
             "report_path=${paths.report_dir}/json.json")
    r = json.loads((root / "reports" / "json.json").read_text())
    q, overall = r["qei"], r["metrics"]["overall"]
    assert q["q_teacher"] == overall["teacher_json_validity"] and q["q_student"] == overall["json_validity"]
    assert r["speed"]["teacher"] == {"tokens_per_s": 10.0, "tokens": None, "seconds": None, "source": "config"}
    if q["q_teacher"] == 0:
        assert q["qei"] is None and "teacher json_validity is 0" in q["notes"][0]
    else:
        assert q["qei_speed"] == pytest.approx(q["qei"] * q["tps_student"] / 10.0)


def test_find_checkpoint_takes_the_newest_run_and_says_what_to_do_without_one(tmp_path):
    import os

    from bitnet_kde.eval.evaluate import find_checkpoint

    with pytest.raises(FileNotFoundError, match="train first .*ckpt_path="):
        find_checkpoint(tmp_path / "logs")
    old = tmp_path / "logs/train/runs/a/checkpoints/last.ckpt"
    new = tmp_path / "logs/ablation_kd/runs/b/checkpoints/last.ckpt"
    for i, p in enumerate((new, old)):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (1000 + i * 10, 1000 + i * 10))
    assert find_checkpoint(tmp_path / "logs") == old
