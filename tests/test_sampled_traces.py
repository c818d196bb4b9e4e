"""Sampled-token traces (schema v2): the teacher's draws, writing, validating and batching the
columns, projection, and refusing teachers that do not see their whole distribution."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_traces import VOCAB, meta, valid_rows

from bitnet_kde.data.datamodule import KDTraceDataModule, TraceDataset, collate_traces
from bitnet_kde.data.stream import TraceIndex
from bitnet_kde.kd.collect import TraceCollector
from bitnet_kde.kd.projection import _merge_samples, project_identity
from bitnet_kde.kd.traces import TraceValidationError, check_run_match, read_traces, table_metadata, write_trace_shard
from bitnet_kde.losses import DistillationLoss, LossConfig, kd_sampled_loss
from bitnet_kde.teachers import SampledTraceConfig, Teacher, TeacherError, TeacherSequence
from bitnet_kde.teachers.local import draw_samples

P = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])


def test_draws_follow_the_teacher_and_the_proposal():
    g = torch.Generator().manual_seed(0)
    ((ids, counts, logq),) = draw_samples(P.log(), SampledTraceConfig(n=20000), [g])
    assert logq is None and sum(counts) == 20000 and ids == sorted(set(ids))
    freq = torch.zeros(5, dtype=torch.float64)
    freq[ids] = torch.tensor(counts, dtype=torch.float64) / 20000
    assert torch.allclose(freq, P[0].double(), atol=0.015)
    # beta = 0.5: q ∝ sqrt(p), log(q / p) stored per drawn id
    ((ids, counts, logq),) = draw_samples(P.log(), SampledTraceConfig(n=50, beta=0.5), [g])
    q = P[0].sqrt() / P[0].sqrt().sum()
    assert logq == pytest.approx((q.log() - P[0].log())[ids].tolist(), abs=1e-5)
    # hybrid: never a head id; the tail is renormalized, so log(q / p) is relative to the tail
    head = torch.tensor([[0, 1]])
    ((ids, counts, logq),) = draw_samples(P.log(), SampledTraceConfig(n=200, hybrid=True), [g], head)
    assert set(ids) <= {2, 3, 4} and sum(counts) == 200 and logq is None


def test_each_chunk_and_prompt_draws_from_its_own_seed():
    """Shards must not repeat each other's draws: identical distributions in two chunks (or two
    prompts of a batch) get different draws, and the same settings give the same draws again."""
    rows = [{"id": f"p{i}", "prompt": "hi", "category": "qa", "split": "train"} for i in range(2)]
    col = TraceCollector(TopKOnlyTeacher(), prompts={"source": rows}, progress=False, rs={"n": 8, "seed": 3})
    seeds = [col.chunk_draws(c).seed for c in range(3)]
    assert len(set(seeds)) == 3 and 3 not in seeds
    assert seeds == [TraceCollector(TopKOnlyTeacher(), rs={"n": 8, "seed": 3}).chunk_draws(c).seed for c in range(3)]
    assert col.chunk_draws(1).as_dict() == {**col.rs.as_dict(), "seed": seeds[1]}
    # draws of a row depend on its own generator only: same seed, same draws, whatever it is batched with
    cfg = SampledTraceConfig(n=16)
    logp = P.log().expand(3, -1)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]
    a = draw_samples(logp, cfg, gens(cfg.seed_of(0), cfg.seed_of(1), cfg.seed_of(0)))
    assert a[0] == a[2] and a[0] != a[1]
    assert draw_samples(logp[:1], cfg, gens(cfg.seed_of(1)))[0] == a[1]


def sampled_rows() -> list[dict]:
    """`valid_rows` with draws at every KD-valid position (hand-made, N = 4)."""
    rows = valid_rows()
    for r in rows:
        n = len(r["input_ids"])
        r["rs_ids"] = [[c, (c + 1) % VOCAB] if v else [] for c, v in zip(r["input_ids"][1:] + [0], r["kd_valid"])]
        r["rs_counts"] = [[3, 1] if v else [] for v in r["kd_valid"]]
        r["rs_logq"] = [[0.25, -0.5] if v else [] for v in r["kd_valid"]]
        assert len(r["rs_ids"]) == n
    return rows


def test_v2_round_trip_batches_and_trains(tmp_path):
    path = write_trace_shard(sampled_rows(), tmp_path / "a.parquet", meta())
    table = read_traces(path, vocab_size=VOCAB)
    assert table.schema.metadata[b"bitnet_kde.schema_version"] == b"2"
    assert table.column("rs_counts").to_pylist() == [r["rs_counts"] for r in sampled_rows()]
    ds = TraceDataset(table, max_seq_len=16)
    batch = collate_traces([ds[i] for i in range(len(ds))])
    assert batch["rs_ids"].shape == batch["rs_counts"].shape == batch["rs_logq"].shape == (3, 5, 2)
    assert batch["rs_counts"][1, 2].tolist() == [0, 0]          # row 1 has 3 positions: padding has count 0
    assert batch["rs_ids"][0, 0].tolist() == [2, 3] and batch["rs_counts"][0, 0].tolist() == [3, 1]
    logits = torch.randn(3, 5, VOCAB, dtype=torch.float64)
    out = DistillationLoss(LossConfig(other="rs"))(logits, batch)
    kd_mask = batch["loss_mask"] & batch["kd_valid"]
    want = kd_sampled_loss(logits, batch["rs_ids"], batch["rs_counts"], kd_mask, rs_logq=batch["rs_logq"])
    assert float(out["kd"]) == pytest.approx(float(want)) and math.isfinite(float(out["loss"]))


def test_v1_shards_still_load_without_sampled_columns(tmp_path):
    path = write_trace_shard(valid_rows(), tmp_path / "a.parquet", meta())
    table = read_traces(path, vocab_size=VOCAB)
    assert table.schema.metadata[b"bitnet_kde.schema_version"] == b"1" and "rs_ids" not in table.column_names
    batch = collate_traces([TraceDataset(table, 16)[0]])
    assert "rs_ids" not in batch
    with pytest.raises(ValueError, match="needs sampled traces"):
        DistillationLoss(LossConfig(other="hybrid"))(torch.randn(1, 4, VOCAB), batch)


@pytest.mark.parametrize("field, value, problem", [
    ("rs_ids", [[2, 2]], "listed twice"),
    ("rs_counts", [[0, 1]], "count 0 < 1"),
    ("rs_logq", [[math.nan, 0.0]], "not finite"),
    ("rs_ids", [[2, VOCAB]], f"outside \\[0, {VOCAB}\\)"),
    ("rs_counts", [[1]], "1 values for 2 rs_ids"),
    ("rs_counts", [[3, None]], "element 1 is null"),
    ("rs_ids", [[None, 3]], "element 0 is null"),
    ("rs_logq", [[0.5, None]], "element 1 is null"),
    ("rs_ids", [None], "is null \\(a position without draws holds an empty list\\)"),
    ("rs_counts", [None], "is null"),
    ("rs_logq", [None], "is null"),
])
def test_bad_sampled_columns_are_refused_by_name(tmp_path, field, value, problem):
    rows = sampled_rows()
    rows[0][field] = value + rows[0][field][1:]
    path = write_trace_shard(rows, tmp_path / "a.parquet", meta())
    with pytest.raises(TraceValidationError, match=f"row 0 \\(id='r0'\\), field '{field}': position 0.*{problem}"):
        read_traces(path, vocab_size=VOCAB)


def test_identity_projection_keeps_the_draws_and_strings_merge_keeps_weights():
    seq = TeacherSequence(prompt="p", text="ab", tokens=["a", "b"], topk_tokens=[["a"], ["b"]],
                          topk_logprobs=[[-0.1], [-0.2]], token_ids=[7, 8], topk_ids=[[7], [8]],
                          rs_ids=[[7, 9], [8]], rs_counts=[[3, 1], [4]], rs_tokens=[["a", "c"], ["b"]])
    row = project_identity([1, 2], seq)
    assert row.rs_ids == [[], [7, 9], [8], []] and row.rs_counts == [[], [3, 1], [4], []]
    assert row.rs_logq is None and "rs_logq" not in row.columns()
    # three draws land on student id 5 (one with weight exp(0.5)), one on Other (-1): dropped
    ids, counts, logq = _merge_samples([5, 5, -1, 6], [2, 1, 1, 1], [0.0, -0.5, 0.0, 0.3])
    assert ids == [5, 6] and counts == [3, 1]
    assert 3 * math.exp(-logq[0]) == pytest.approx(2 + math.exp(0.5))
    assert logq[1] == pytest.approx(0.3)


class TopKOnlyTeacher(Teacher):
    """An API-like teacher: top candidates only."""

    provider, model = "openai", "some-model"

    def generate(self, prompts, sampling):
        raise AssertionError("must be refused before any request")


def test_sampled_traces_from_an_api_teacher_are_refused(tmp_path):
    rows = [{"id": "p0", "prompt": "hi", "category": "qa", "split": "train"}]
    col = TraceCollector(TopKOnlyTeacher(), student_tokenizer="smollm2", prompts={"source": rows}, progress=False,
                         rs={"n": 8})
    with pytest.raises(TeacherError, match="collection.rs.n=8: sampled traces need the teacher's full.*local teacher"):
        col.check_sampled(col.teacher())
    plain = TraceCollector(TopKOnlyTeacher(), prompts={"source": rows}, progress=False)
    assert plain.rs.n == 0 and "rs" not in plain._rs_identity()   # Top-K-only sets keep their content ids
    plain.check_sampled(plain.teacher())


@pytest.mark.slow
def test_local_teacher_collects_sampled_traces(tmp_path):
    """The embedded teacher writes v2 shards whose draws add up to N at every KD-valid position,
    whose hybrid draws avoid the Top-K, and whose chunks do not repeat each other's draws."""
    from bitnet_kde.teachers.local import LocalHFTeacher

    teacher = LocalHFTeacher.smollm2(batch_size=2)
    rows = [{"id": f"p{i}", "prompt": p, "category": "qa", "split": "train"}
            for i, p in enumerate(["List three fruits.", "Name a colour.", "List three fruits."])]
    for rs in ({"n": 6}, {"n": 6, "beta": 0.5, "hybrid": True}):
        d = tmp_path / str(len(rs))
        col = TraceCollector(teacher, prompts={"source": rows}, chunk_size=2, progress=False,
                             sampling={"max_new_tokens": 5, "top_k": 4}, rs=rs)
        col.write(d)
        table = read_traces(d, vocab_size=49152)
        assert ("rs_logq" in table.column_names) == ("beta" in rs)
        for row in table.to_pylist():
            for t, v in enumerate(row["kd_valid"]):
                assert sum(row["rs_counts"][t]) == (6 if v else 0)
                if rs.get("hybrid"):
                    assert not set(row["rs_ids"][t]) & set(row["topk_ids"][t])
        # greedy decoding: the same prompt in chunks 0 and 1 has the same completion (and, up to the
        # float noise of padding, the same distributions), but draws of its own
        first, again = (r for r in table.to_pylist() if r["prompt"] == "List three fruits.")
        assert first["input_ids"] == again["input_ids"]
        assert (first["rs_ids"], first["rs_counts"]) != (again["rs_ids"], again["rs_counts"])
        ds = TraceDataset(table, 64)
        batch = collate_traces([ds[i] for i in range(len(ds))])
        assert np.isfinite(float(DistillationLoss(LossConfig(other="hybrid" if rs.get("hybrid") else "rs"))(
            torch.randn(*batch["input_ids"].shape, 49152), batch)["loss"]))


def draws_meta(**rs) -> dict[str, str]:
    """Shard metadata of traces collected with these `collection.rs` settings."""
    return meta(rs=json.dumps({"n": 4, "beta": 1.0, "seed": 0, "hybrid": False, **rs}))


@pytest.mark.parametrize("variant, hybrid, problem", [
    ("rs", True, "tail outside the Top-K only \\(collection.rs.hybrid=true\\).*set loss.other=hybrid"),
    ("hybrid", False, "teacher.s whole distribution \\(collection.rs.hybrid=false\\).*head twice; set loss.other=rs"),
])
def test_draws_made_for_the_other_variant_are_refused_before_training(tmp_path, variant, hybrid, problem):
    write_trace_shard(sampled_rows(), tmp_path / "a.parquet", draws_meta(hybrid=hybrid))
    dm = KDTraceDataModule(str(tmp_path), vocab_size=VOCAB, max_seq_len=16, num_workers=0, loss_other=variant)
    with pytest.raises(TraceValidationError, match=f"{tmp_path}: the traces' draws come from the {problem}"):
        dm.setup("fit")
    for ok in ("bucket", "renormalize", "hybrid" if hybrid else "rs"):
        check_run_match(table_metadata(read_traces(tmp_path)), "here", kd_variant=ok)


def test_sampled_variant_on_traces_without_draws_is_refused_before_training(tmp_path):
    write_trace_shard(valid_rows(), tmp_path / "a.parquet", meta())
    dm = KDTraceDataModule(str(tmp_path), vocab_size=VOCAB, max_seq_len=16, num_workers=0, loss_other="hybrid")
    with pytest.raises(TraceValidationError, match="loss.other=hybrid needs sampled draws.*collection.rs.n > 0 and "
                       "collection.rs.hybrid=true, or set loss.other=bucket"):
        dm.setup("fit")
    # v2 traces made elsewhere (no rs settings in their metadata) are not compared
    v2 = table_metadata(read_traces(write_trace_shard(sampled_rows(), tmp_path / "b" / "b.parquet", meta())))
    assert v2["schema_version"] == "2" and "rs" not in v2
    check_run_match(v2, "here", kd_variant="hybrid")
    with pytest.raises(TraceValidationError, match="bitnet_kde.rs='x' is not the JSON"):
        check_run_match({**v2, "rs": "x"}, "here", kd_variant="rs")


def test_collecting_draws_for_the_other_variant_is_refused_before_any_request(tmp_path):
    rows = [{"id": "p0", "prompt": "hi", "category": "qa", "split": "train"}]
    col = TraceCollector(TopKOnlyTeacher(), prompts={"source": rows}, progress=False, rs={"n": 8})
    dm = KDTraceDataModule(str(tmp_path / "t"), vocab_size=VOCAB, source=col, loss_other="hybrid")
    with pytest.raises(TraceValidationError, match="data.source \\(TraceCollector\\): .*collection.rs.hybrid=true"):
        dm.prepare_data()


def renamed(rows: list[dict], prefix: str) -> list[dict]:
    return [{**r, "id": prefix + r["id"]} for r in rows]


@pytest.mark.parametrize("second, key", [
    (lambda d: write_trace_shard(renamed(valid_rows(), "b"), d / "b.parquet", meta()), "schema_version='1'"),
    (lambda d: write_trace_shard(renamed(sampled_rows(), "b"), d / "b.parquet",
                                 meta(rs=json.dumps({"n": 4, "beta": 0.5, "seed": 0, "hybrid": False}))), "rs="),
])
def test_a_folder_mixing_sampled_settings_or_versions_is_refused_by_name(tmp_path, second, key):
    write_trace_shard(sampled_rows(), tmp_path / "a.parquet", draws_meta())
    second(tmp_path)
    want = f"b.parquet: made for bitnet_kde.{key}.*a.parquet.*different trace sets are mixed"
    with pytest.raises(TraceValidationError, match=want):
        read_traces(tmp_path, vocab_size=VOCAB)
    with pytest.raises(TraceValidationError, match=want):
        TraceIndex.scan(str(tmp_path), val_fraction=0.5, max_seq_len=16, vocab_size=VOCAB)


def test_a_batch_with_sampled_columns_in_some_rows_only_is_refused():
    rows = sampled_rows()
    table = pa.Table.from_pylist(rows)
    items = [dict(TraceDataset(table, 16)[i], id=rows[i]["id"]) for i in range(3)]
    items[1].pop("rs_logq")
    with pytest.raises(TraceValidationError, match="mixes rows with and without the sampled column 'rs_logq' "
                       "\\(without: \\['r1'\\]\\)"):
        collate_traces(items)
    assert collate_traces([items[0], items[2]])["rs_logq"].shape == (2, 5, 2)
