"""Synthetic bigram traces and the KD trace DataModule (splits, batches, masks, padding)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet_kde.data import KDTraceDataModule, TraceDataset, collate_traces, split_of
from bitnet_kde.kd.synthetic import BigramTraceSource
from bitnet_kde.kd.traces import OTHER_FLOOR, TraceValidationError, list_shards, read_traces

VOCAB, K, N = 64, 5, 40
PROMPT, COMPLETION = (2, 4), (8, 16)


def bigram(**kw) -> BigramTraceSource:
    args = dict(vocab_size=VOCAB, k=K, num_sequences=N, completion_len=COMPLETION, prompt_len=PROMPT)
    args.update(kw)
    return BigramTraceSource(**args)


def datamodule(trace_dir, source=None, **kw) -> KDTraceDataModule:
    args = dict(vocab_size=VOCAB, source=source, batch_size=4, num_workers=0, val_fraction=0.25, max_seq_len=64)
    args.update(kw)
    return KDTraceDataModule(str(trace_dir), **args)


def served(loader) -> list[str]:
    """Row ids of one pass over a loader, in order."""
    return [i for b in loader for i in b["ids"]]


def split_ids(dm) -> tuple[list[str], list[str]]:
    return served(dm.train_dataloader()), served(dm.val_dataloader())


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bigram")
    shards = bigram(shard_rows=16).write(d)
    assert [p.name for p in shards] == [p.name for p in list_shards(d)] and len(shards) == 3
    return d


@pytest.fixture(scope="module")
def table(traces):
    return read_traces(traces, vocab_size=VOCAB, k_max=K)


@pytest.fixture(scope="module")
def rows_by_id(table) -> dict[str, dict]:
    return {r["id"]: r for r in table.to_pylist()}


# ----------------------------------------------------------------------------- BigramTraceSource


def test_bigram_traces_validate_and_have_the_requested_shape(traces, table):
    assert table.num_rows == N
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == N
    meta = table.schema.metadata
    assert meta[b"bitnet_kde.schema_version"] == b"1"
    assert meta[b"bitnet_kde.k"] == b"5" and meta[b"bitnet_kde.vocab_size"] == b"64"
    assert meta[b"bitnet_kde.teacher_provider"] == b"synthetic"
    for r in table.to_pylist():
        n, cs = len(r["input_ids"]), r["completion_start"]
        assert PROMPT[0] <= cs <= PROMPT[1]
        assert COMPLETION[0] <= n - cs <= COMPLETION[1]
        assert all(0 <= t < VOCAB for t in r["input_ids"])
        assert r["kd_valid"] == [True] * (n - 1) + [False]
        assert [len(c) for c in r["topk_ids"]] == [K] * (n - 1) + [0]
        assert r["other_logprob"][-1] == 0.0
        assert r["teacher_text"] == " ".join(map(str, r["input_ids"][cs:]))
    manifest = json.loads((traces / "manifest.json").read_text())
    assert manifest["rows"] == N and [s["rows"] for s in manifest["shards"]] == [16, 16, 8]
    assert manifest["trace_set"] == bigram().trace_set_id


def test_is_complete(traces, tmp_path):
    assert bigram().is_complete(traces)
    assert bigram(shard_rows=7).is_complete(traces)  # shard layout is not part of the content
    assert not bigram(seed=1).is_complete(traces)
    assert not bigram(k=4).is_complete(traces)
    assert not bigram().is_complete(tmp_path)
    # a shard listed in the manifest went missing -> incomplete
    copy = tmp_path / "copy"
    shutil.copytree(traces, copy)
    list_shards(copy)[1].unlink()
    assert not bigram().is_complete(copy)


def test_writing_is_deterministic(table, tmp_path):
    bigram(shard_rows=100).write(tmp_path)
    again = read_traces(tmp_path)
    assert again.to_pylist() == table.to_pylist()
    assert bigram(seed=1).write(tmp_path / "s1") and \
        read_traces(tmp_path / "s1").column("id").to_pylist() != table.column("id").to_pylist()


def test_topk_and_other_match_the_teacher_table(table):
    t = bigram()
    lp = t.log_probs()
    assert lp.shape == (VOCAB, VOCAB)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(VOCAB, dtype=torch.float64))
    top_lp, top_ids = lp.topk(K, dim=-1)
    mass = top_lp.exp().sum(-1)
    exact_other = torch.log1p(-mass).clamp(min=OTHER_FLOOR)
    checked_floor = 0
    for r in table.to_pylist():
        seq = r["input_ids"]
        for j, tok in enumerate(seq[:-1]):
            assert r["topk_ids"][j] == top_ids[tok].tolist()
            np.testing.assert_allclose(r["topk_logprobs"][j], top_lp[tok].numpy(), rtol=1e-6, atol=1e-6)
            assert r["other_logprob"][j] == pytest.approx(float(exact_other[tok]), rel=1e-6, abs=1e-6)
            # recomputed from the float32 values in the file
            file_mass = sum(math.exp(v) for v in r["topk_logprobs"][j])
            if 1 - file_mass > 1e-3:
                assert r["other_logprob"][j] == pytest.approx(math.log(1 - file_mass), rel=1e-4)
            else:
                checked_floor += 1
                assert r["other_logprob"][j] <= math.log(1e-3)
                assert r["other_logprob"][j] >= OTHER_FLOOR
            # the next token was sampled from the teacher: it has non-negligible probability
            assert lp[tok, seq[j + 1]] > -40
    assert checked_floor < 0.5 * sum(len(s) for s in table.column("input_ids").to_pylist())


def test_other_floor_when_topk_hold_all_mass(tmp_path):
    """k = vocab: the top-K hold all the mass; Other is the documented floor, not -inf."""
    t = BigramTraceSource(vocab_size=8, k=8, num_sequences=3, prompt_len=(1, 2), completion_len=(3, 4))
    t.write(tmp_path)
    tab = read_traces(tmp_path, vocab_size=8, k_max=8)
    for r in tab.to_pylist():
        assert r["other_logprob"][:-1] == [OTHER_FLOOR] * (len(r["input_ids"]) - 1)


# ----------------------------------------------------------------------------- prepare_data


class CountingSource(BigramTraceSource):
    def __init__(self, **kw):
        args = dict(vocab_size=VOCAB, k=K, num_sequences=N, completion_len=COMPLETION, prompt_len=PROMPT)
        args.update(kw)
        super().__init__(**args)
        self.writes = 0

    def write(self, trace_dir):
        self.writes += 1
        return super().write(trace_dir)


def test_prepare_data_writes_once_then_reuses(tmp_path):
    d = tmp_path / "traces"
    src = CountingSource()
    datamodule(d, src).prepare_data()
    assert src.writes == 1
    files = sorted(p.name for p in d.iterdir())
    assert "manifest.json" in files and len(list_shards(d)) == 1
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    datamodule(d, src).prepare_data()
    datamodule(d, CountingSource()).prepare_data()
    assert src.writes == 1
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps


def test_prepare_data_without_source_or_traces(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for d in (empty, tmp_path / "missing"):
        with pytest.raises(FileNotFoundError) as ei:
            datamodule(d).prepare_data()
        msg = str(ei.value)
        assert str(d) in msg and "*.parquet" in msg and "run collection first" in msg


def test_prepare_data_without_source_accepts_existing_traces(traces):
    dm = datamodule(traces)
    dm.prepare_data()  # no error, nothing written
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == N


def test_changed_source_in_same_dir_trains_only_on_new_traces(tmp_path):
    """A source with other settings (here: seed) pointed at a folder holding an older trace set
    must not train on the union of both sets."""
    d = tmp_path / "traces"
    datamodule(d, bigram(seed=0)).prepare_data()
    new = bigram(seed=1)
    dm = datamodule(d, new)
    dm.prepare_data()
    dm.setup("fit")
    assert new.is_complete(d)
    assert len(dm.train_set) + len(dm.val_set) == N
    new_ids = set(read_traces(d).column("id").to_pylist())
    train, val = split_ids(dm)
    assert set(train) | set(val) == new_ids


# ----------------------------------------------------------------------------- split


def test_split_by_id_hash(traces, table):
    dm = datamodule(traces)
    dm.setup("fit")
    train_order, val_order = split_ids(dm)
    train, val = set(train_order), set(val_order)
    all_ids = set(table.column("id").to_pylist())
    assert train.isdisjoint(val)
    assert train | val == all_ids
    assert len(train_order) == len(train) == len(dm.train_set) and len(val_order) == len(val) == len(dm.val_set)
    assert val == {i for i in all_ids if split_of(i, 0.25) == "val"}
    assert 0 < len(val) < N // 2  # roughly a quarter of 40
    # validation keeps file order; a fresh datamodule gives the identical split, in the same order
    assert val_order == [i for i in table.column("id").to_pylist() if i in val]
    dm2 = datamodule(traces)
    dm2.setup("fit")
    assert split_ids(dm2) == (train_order, val_order)


def test_split_is_independent_of_shard_layout_and_order(traces, tmp_path):
    # the same trace set, one shard per 7 rows, shard names in reverse order of the rows
    other = tmp_path / "other"
    bigram(shard_rows=7).write(other)
    shards = list_shards(other)
    assert len(shards) == 6
    for i, s in enumerate(shards):
        s.rename(other / f"z{len(shards) - i}.parquet")
    (other / "manifest.json").unlink()  # without a manifest every *.parquet is read, by name
    assert read_traces(other).column("id").to_pylist() != read_traces(traces).column("id").to_pylist()
    a, b = datamodule(traces), datamodule(other)
    a.setup()
    b.setup()
    (a_train, a_val), (b_train, b_val) = split_ids(a), split_ids(b)
    assert set(a_train) == set(b_train) and set(a_val) == set(b_val)


def test_split_of_is_a_pure_function_of_id():
    assert split_of("abc", 0.0) == "train" and split_of("abc", 1.0) == "val"
    ids = [f"row-{i}" for i in range(2000)]
    frac = np.mean([split_of(i, 0.3) == "val" for i in ids])
    assert 0.25 < frac < 0.35
    # monotone in val_fraction: a row in val stays in val when the fraction grows
    assert all(split_of(i, 0.5) == "val" for i in ids if split_of(i, 0.3) == "val")


@pytest.mark.parametrize("val_fraction", [0.0, 1e-9, 1.0])
def test_empty_split_is_an_error(traces, val_fraction):
    dm = datamodule(traces, val_fraction=val_fraction)
    with pytest.raises(ValueError, match="both need at least one") as ei:
        dm.setup("fit")
    assert str(traces) in str(ei.value) and f"val_fraction={val_fraction}" in str(ei.value)


# ----------------------------------------------------------------------------- batches


def _check_batch_against_table(batch, ids, rows_by_id, max_seq_len):
    b, t = batch["input_ids"].shape
    assert b == len(ids)
    lengths = [min(len(rows_by_id[i]["input_ids"]), max_seq_len) for i in ids]
    assert t == max(lengths)
    for k, i in enumerate(ids):
        r, n = rows_by_id[i], lengths[k]
        cs = r["completion_start"]
        assert batch["input_ids"][k, :n].tolist() == r["input_ids"][:n]
        expected_loss = [cs - 1 <= p <= n - 2 for p in range(t)]
        assert batch["loss_mask"][k].tolist() == expected_loss
        assert batch["kd_valid"][k].tolist() == [e and r["kd_valid"][p] for p, e in enumerate(expected_loss)]
        assert batch["topk_ids"][k, :n].tolist() == [c + [0] * (K - len(c)) for c in r["topk_ids"][:n]]
        lp = batch["topk_logprobs"][k, :n]
        for p in range(n):
            kk = len(r["topk_logprobs"][p])
            assert lp[p, :kk].tolist() == r["topk_logprobs"][p]
            assert torch.isneginf(lp[p, kk:]).all()
        assert batch["other_logprob"][k, :n].tolist() == r["other_logprob"][:n]
        # right padding
        assert (batch["input_ids"][k, n:] == 0).all()
        assert not batch["loss_mask"][k, n:].any() and not batch["kd_valid"][k, n:].any()
        assert torch.isneginf(batch["topk_logprobs"][k, n:]).all()
        assert (batch["topk_ids"][k, n:] == 0).all()
        assert (batch["other_logprob"][k, n:] == 0).all()
        assert not batch["format_mask"][k].any()


def test_batch_shapes_and_dtypes(traces):
    dm = datamodule(traces)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    b, t = batch["input_ids"].shape
    assert b == 4 and 10 <= t <= 20
    expected = {"input_ids": ((b, t), torch.long), "loss_mask": ((b, t), torch.bool),
                "kd_valid": ((b, t), torch.bool), "format_mask": ((b, t), torch.bool),
                "topk_ids": ((b, t, K), torch.long), "topk_logprobs": ((b, t, K), torch.float32),
                "other_logprob": ((b, t), torch.float32)}
    assert set(batch) == set(expected) | {"ids"} and len(batch["ids"]) == b
    for name, (shape, dtype) in expected.items():
        assert tuple(batch[name].shape) == shape, name
        assert batch[name].dtype == dtype, name


def test_val_batches_equal_table_rows(traces, rows_by_id):
    dm = datamodule(traces, val_batch_size=3)
    dm.setup("fit")
    seen = []
    for batch in dm.val_dataloader():
        assert len(batch["ids"]) <= 3
        _check_batch_against_table(batch, batch["ids"], rows_by_id, max_seq_len=64)
        seen += batch["ids"]
    assert seen == [i for i in rows_by_id if split_of(i, 0.25) == "val"]  # file order
    # padding actually happened somewhere (rows have different lengths)
    assert len({len(rows_by_id[i]["input_ids"]) for i in seen}) > 1


def test_collate_pads_mixed_lengths(table, rows_by_id):
    ids = table.column("id").to_pylist()
    ds = TraceDataset(table, max_seq_len=64)
    order = sorted(range(N), key=lambda i: len(rows_by_id[ids[i]]["input_ids"]))
    pick = [order[0], order[-1], order[N // 2]]  # shortest, longest, middle
    batch = collate_traces([ds[i] for i in pick])
    assert batch["input_ids"].shape[1] == len(rows_by_id[ids[order[-1]]]["input_ids"])
    _check_batch_against_table(batch, [ids[i] for i in pick], rows_by_id, max_seq_len=64)


def test_truncation_and_tokens_per_epoch(traces, rows_by_id):
    msl = 12
    lens = [len(r["input_ids"]) for r in rows_by_id.values()]
    assert min(lens) < msl < max(lens)  # some rows are truncated, some are not
    dm = datamodule(traces, max_seq_len=msl, batch_size=5)
    dm.setup("fit")
    assert dm.index.truncated == sum(n > msl for n in lens)
    train = [i for i in rows_by_id if split_of(i, 0.25) == "train"]
    expected = sum(max(min(len(rows_by_id[i]["input_ids"]), msl) - rows_by_id[i]["completion_start"], 0)
                   for i in train)
    assert dm.train_tokens_per_epoch() == expected
    # the loss-bearing positions served in one epoch are exactly that many, each row as in the table
    total, seen = 0, []
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[1] <= msl
        _check_batch_against_table(batch, batch["ids"], rows_by_id, max_seq_len=msl)
        total += int(batch["loss_mask"].sum())
        seen += batch["ids"]
    assert sorted(seen) == sorted(train)
    assert total == expected
    batch = next(iter(dm.val_dataloader()))
    _check_batch_against_table(batch, batch["ids"], rows_by_id, max_seq_len=msl)


def test_truncation_before_completion_leaves_no_loss(traces, rows_by_id):
    dm = datamodule(traces, max_seq_len=2, val_fraction=0.25)
    dm.setup()
    # completion_start >= 2 for every row: nothing left to learn from
    assert dm.train_tokens_per_epoch() == 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 2)
    assert not batch["loss_mask"].any() and not batch["kd_valid"].any()


def test_setup_is_idempotent(traces):
    dm = datamodule(traces)
    dm.setup("fit")
    train = dm.train_set
    dm.setup("validate")
    assert dm.train_set is train


def test_vocab_and_k_max_are_checked_on_setup(traces):
    # from the footers' metadata when the run starts, before any row group is streamed
    with pytest.raises(TraceValidationError, match="vocabulary of 64 ids.*vocab_size=10"):
        datamodule(traces, vocab_size=10).setup()
    with pytest.raises(TraceValidationError, match="K=5 candidates.*data.k_max=4"):
        datamodule(traces, k_max=4).setup()


def test_dataloader_with_two_workers(traces):
    dm = datamodule(traces, num_workers=2, batch_size=8)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(dm.train_set)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == dm.train_tokens_per_epoch()
    for b in batches:
        assert b["topk_ids"].shape[-1] == K and b["topk_logprobs"].dtype == torch.float32
        assert torch.isfinite(b["topk_logprobs"][b["kd_valid"]]).all()
    # shuffled: a second epoch still covers every row once
    assert sum(b["input_ids"].shape[0] for b in loader) == len(dm.train_set)
