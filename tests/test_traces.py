"""KD trace files (docs/TRACE_FORMAT.md): schema v1 round trip, validation errors, atomic writes, manifest."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bitnet_kde.kd.traces import (
    SCHEMA_VERSION,
    TRACE_SCHEMA,
    TraceValidationError,
    list_shards,
    read_traces,
    trace_metadata,
    write_manifest,
    write_trace_shard,
)

VOCAB = 50
VERSION_META = {b"bitnet_kde.schema_version": b"1"}


def f32(x: float) -> float:
    """x rounded to float32, as it comes back from a float32 Parquet column."""
    return float(np.float32(x))


def other_of(lps: list[float]) -> float:
    return f32(math.log1p(-sum(math.exp(v) for v in lps)))


def make_row(rid: str, input_ids: list[int], completion_start: int, topk: list[list[tuple[int, float]]]) -> dict:
    """One row; `topk[t]` is the (id, logprob) candidates of position t ([] = no teacher there)."""
    lps = [[f32(lp) for _, lp in cands] for cands in topk]
    return {
        "id": rid,
        "prompt": f"prompt {rid}",
        "category": "qa",
        "input_ids": input_ids,
        "completion_start": completion_start,
        "topk_ids": [[i for i, _ in cands] for cands in topk],
        "topk_logprobs": lps,
        "other_logprob": [other_of(lp) if lp else 0.0 for lp in lps],
        "kd_valid": [bool(c) for c in topk],
        "teacher_text": f"completion of {rid}",
    }


def valid_rows() -> list[dict]:
    """3 valid rows over vocab 50: K is 2 at most in row 0 and 2, 3 in row 1; the last position of
    every row has no candidates and kd_valid=False."""
    return [
        make_row("r0", [1, 2, 3, 4], 2,
                 [[(2, -0.5), (5, -1.5)], [(3, -0.1)], [(4, -0.2), (7, -2.0)], []]),
        make_row("r1", [10, 11, 12], 1,
                 [[(11, -0.3), (3, -2.0), (0, -3.0)], [(12, -0.05)], []]),
        make_row("r2", [49, 0, 20, 21, 22], 3,
                 [[(0, -0.7)], [(20, -0.9), (49, -1.2)], [(21, -0.01)], [(22, -0.4), (23, -1.9)], []]),
    ]


def meta(**extra) -> dict[str, str]:
    return trace_metadata(teacher_provider="test", teacher_model="hand-made", k=3,
                          sampling={"temperature": 1.0, "seed": 7}, logprob_mode="exact",
                          tokenizer_name="test-ids", tokenizer_hash="abc123", vocab_size=VOCAB, extra=extra)


def write_raw(rows: list[dict], path: Path, schema: pa.Schema = TRACE_SCHEMA, metadata=VERSION_META) -> Path:
    """Write rows with plain pyarrow (no cast to TRACE_SCHEMA, so malformed tables get through)."""
    table = pa.Table.from_pylist(rows, schema=schema)
    if metadata is not None:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)
    return path


def expect_error(path: Path, field: str, row: int | None = 1, **read_kw) -> str:
    """read_traces(path) must raise TraceValidationError naming the file, the row and the field."""
    read_kw.setdefault("vocab_size", VOCAB)
    with pytest.raises(TraceValidationError) as ei:
        read_traces(path, **read_kw)
    msg = str(ei.value)
    assert str(path) in msg, msg
    assert f"'{field}'" in msg, msg
    if row is not None:
        assert f"row {row} " in msg, msg
        assert f"id='r{row}'" in msg, msg
    return msg


# ----------------------------------------------------------------------------- round trip


def test_valid_rows_pass_the_checks_by_construction():
    rows = valid_rows()
    for r in rows:
        n = len(r["input_ids"])
        assert all(len(r[f]) == n for f in ("topk_ids", "topk_logprobs", "other_logprob", "kd_valid"))
        assert r["kd_valid"][-1] is False and r["topk_ids"][-1] == []
        for lps in r["topk_logprobs"]:
            assert sum(math.exp(v) for v in lps) <= 1
    assert rows[1]["other_logprob"][0] == pytest.approx(math.log(1 - math.exp(-0.3) - math.exp(-2.0) - math.exp(-3.0)),
                                                        rel=1e-6)


def test_write_then_read_round_trips_exact_schema_and_values(tmp_path):
    rows = valid_rows()
    path = write_trace_shard(rows, tmp_path / "shard-0.parquet", meta())
    assert path == tmp_path / "shard-0.parquet"
    table = read_traces(path, vocab_size=VOCAB, k_max=3)
    assert table.schema.equals(TRACE_SCHEMA)
    assert [f.nullable for f in table.schema] == [f.nullable for f in TRACE_SCHEMA]
    assert table.num_rows == 3
    assert table.to_pylist() == rows
    # spot-check a few values independently of the helper
    assert table.column("input_ids")[2].as_py() == [49, 0, 20, 21, 22]
    assert table.column("topk_ids")[1].as_py() == [[11, 3, 0], [12], []]
    assert table.column("topk_logprobs")[0].as_py()[0] == [f32(-0.5), f32(-1.5)]
    assert table.column("kd_valid")[0].as_py() == [True, True, True, False]
    assert table.column("completion_start").to_pylist() == [2, 1, 3]


def test_metadata_carries_schema_version_1(tmp_path):
    path = write_trace_shard(valid_rows(), tmp_path / "s.parquet", meta(note="x"))
    md = read_traces(path).schema.metadata
    assert SCHEMA_VERSION == "1"
    assert md[b"bitnet_kde.schema_version"] == b"1"
    assert md[b"bitnet_kde.k"] == b"3"
    assert md[b"bitnet_kde.vocab_size"] == b"50"
    assert md[b"bitnet_kde.teacher_provider"] == b"test"
    assert md[b"bitnet_kde.teacher_model"] == b"hand-made"
    assert md[b"bitnet_kde.student_tokenizer_hash"] == b"abc123"
    assert md[b"bitnet_kde.note"] == b"x"
    assert json.loads(md[b"bitnet_kde.sampling"]) == {"seed": 7, "temperature": 1.0}
    assert all(k.startswith(b"bitnet_kde.") for k in md)
    # also visible without read_traces, straight from the Parquet footer
    assert pq.read_schema(path).metadata[b"bitnet_kde.schema_version"] == b"1"


def test_reading_a_folder_concatenates_shards_in_name_order(tmp_path):
    rows = valid_rows()
    write_trace_shard(rows[2:], tmp_path / "b.parquet", meta())
    write_trace_shard(rows[:2], tmp_path / "a.parquet", meta())
    (tmp_path / ".a-partial.parquet").write_bytes(b"not parquet")  # a temp name: ignored
    assert [p.name for p in list_shards(tmp_path)] == ["a.parquet", "b.parquet"]
    table = read_traces(tmp_path, vocab_size=VOCAB)
    assert table.num_rows == 3
    assert table.column("id").to_pylist() == ["r0", "r1", "r2"]
    assert table.to_pylist() == rows
    # a list of files is read in the order given
    listed = read_traces([tmp_path / "b.parquet", tmp_path / "a.parquet"])
    assert listed.column("id").to_pylist() == ["r2", "r0", "r1"]


def test_empty_folder_and_missing_file_are_errors(tmp_path):
    with pytest.raises(TraceValidationError, match="no \\*.parquet trace shards"):
        read_traces(tmp_path)
    missing = tmp_path / "nope.parquet"
    with pytest.raises(TraceValidationError, match="not found") as ei:
        read_traces(missing)
    assert str(missing) in str(ei.value)


def test_wider_types_are_accepted_and_cast_to_schema(tmp_path):
    """int64 ids / float64 logprobs / large_string are the same logical types: read and cast to v1."""
    wide = pa.schema([
        pa.field("id", pa.large_string()), pa.field("prompt", pa.string()), pa.field("category", pa.string()),
        pa.field("input_ids", pa.list_(pa.int64())), pa.field("completion_start", pa.int64()),
        pa.field("topk_ids", pa.list_(pa.list_(pa.int64()))),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float64()))),
        pa.field("other_logprob", pa.list_(pa.float64())), pa.field("kd_valid", pa.list_(pa.bool_())),
        pa.field("teacher_text", pa.string()),
    ])
    path = write_raw(valid_rows(), tmp_path / "wide.parquet", schema=wide)
    table = read_traces(path, vocab_size=VOCAB)
    assert table.schema.equals(TRACE_SCHEMA)
    assert table.to_pylist() == valid_rows()


# ----------------------------------------------------------------------------- malformed files


def _bad(tmp_path, mutate, name="bad.parquet") -> Path:
    rows = valid_rows()
    mutate(rows[1])
    return write_raw(rows, tmp_path / name)


def test_valid_raw_file_reads(tmp_path):
    """The raw writer itself produces readable files, so the failures below come from the mutation."""
    path = write_raw(valid_rows(), tmp_path / "ok.parquet")
    assert read_traces(path, vocab_size=VOCAB, k_max=3).to_pylist() == valid_rows()


def test_wrong_column_type(tmp_path):
    schema = TRACE_SCHEMA.set(TRACE_SCHEMA.get_field_index("input_ids"), pa.field("input_ids", pa.list_(pa.string())))
    rows = valid_rows()
    for r in rows:
        r["input_ids"] = [str(t) for t in r["input_ids"]]
    path = write_raw(rows, tmp_path / "strings.parquet", schema=schema)
    msg = expect_error(path, "input_ids", row=None)
    assert "string" in msg and "int32" in msg


def test_wrong_type_bool_column(tmp_path):
    schema = TRACE_SCHEMA.set(TRACE_SCHEMA.get_field_index("kd_valid"), pa.field("kd_valid", pa.list_(pa.int8())))
    rows = valid_rows()
    for r in rows:
        r["kd_valid"] = [int(v) for v in r["kd_valid"]]
    path = write_raw(rows, tmp_path / "int-valid.parquet", schema=schema)
    msg = expect_error(path, "kd_valid", row=None)
    assert "bool" in msg


def test_missing_column(tmp_path):
    schema = TRACE_SCHEMA.remove(TRACE_SCHEMA.get_field_index("kd_valid"))
    rows = valid_rows()
    for r in rows:
        del r["kd_valid"]
    path = write_raw(rows, tmp_path / "no-valid.parquet", schema=schema)
    msg = expect_error(path, "kd_valid", row=None)
    assert "missing column" in msg


@pytest.mark.parametrize("value, words", [(float("nan"), "not finite"), (float("inf"), "not finite"),
                                          (float("-inf"), "not finite"), (0.25, "> 0")])
def test_bad_topk_logprob(tmp_path, value, words):
    def mutate(r):
        r["topk_logprobs"][1] = [value]
    msg = expect_error(_bad(tmp_path, mutate), "topk_logprobs")
    assert words in msg
    assert "position 1" in msg


def test_probabilities_summing_above_one(tmp_path):
    def mutate(r):  # exp(-0.1)+exp(-0.2)+exp(-0.3) = 2.38
        r["topk_logprobs"][0] = [-0.1, -0.2, -0.3]
    msg = expect_error(_bad(tmp_path, mutate), "topk_logprobs")
    assert "sum to" in msg and "position 0" in msg


def test_sum_tolerance_is_1e_4(tmp_path):
    """Σ exp(topk) up to 1 + 1e-4 is float32 rounding and accepted; clearly above is rejected."""
    def just_over(excess):
        def mutate(r):
            r["topk_logprobs"][1] = [math.log((1 + excess) / 2)] * 2
            r["topk_ids"][1] = [12, 13]
            r["other_logprob"][1] = -30.0
        return mutate
    ok = _bad(tmp_path, just_over(5e-5), "ok.parquet")
    assert read_traces(ok, vocab_size=VOCAB).num_rows == 3
    expect_error(_bad(tmp_path, just_over(1e-3), "over.parquet"), "topk_logprobs")


@pytest.mark.parametrize("field, value", [("topk_ids", 50), ("topk_ids", 1000), ("topk_ids", -3),
                                          ("input_ids", 50), ("input_ids", -1)])
def test_token_id_out_of_vocab(tmp_path, field, value):
    def mutate(r):
        if field == "topk_ids":
            r["topk_ids"][0] = [11, value, 0]
        else:
            r["input_ids"][1] = value
    msg = expect_error(_bad(tmp_path, mutate), field)
    assert f"token id {value} outside [0, 50)" in msg


def test_vocab_bound_only_applies_when_given(tmp_path):
    def mutate(r):
        r["topk_ids"][0] = [11, 50, 0]
    path = _bad(tmp_path, mutate)
    assert read_traces(path).num_rows == 3          # no vocab_size: no upper bound
    expect_error(path, "topk_ids", vocab_size=50)
    assert read_traces(path, vocab_size=51).num_rows == 3


@pytest.mark.parametrize("field", ["topk_ids", "topk_logprobs", "other_logprob", "kd_valid"])
def test_ragged_outer_lists(tmp_path, field):
    def mutate(r):
        r[field] = r[field][:-1]  # 2 positions for 3 input_ids
    msg = expect_error(_bad(tmp_path, mutate), field)
    assert "has 2 positions but input_ids has 3" in msg


def test_ragged_inner_lists(tmp_path):
    def mutate(r):
        r["topk_logprobs"][0] = r["topk_logprobs"][0][:2]  # 3 ids, 2 logprobs
    msg = expect_error(_bad(tmp_path, mutate), "topk_logprobs")
    assert "2 logprobs for 3 ids" in msg


def test_k_above_k_max(tmp_path):
    path = write_raw(valid_rows(), tmp_path / "k3.parquet")  # row 1 has 3 candidates at position 0
    msg = expect_error(path, "topk_ids", k_max=2)
    assert "K_max=2" in msg
    assert read_traces(path, vocab_size=VOCAB, k_max=3).num_rows == 3


@pytest.mark.parametrize("cs", [0, 3, 7, -1])
def test_completion_start_out_of_range(tmp_path, cs):
    def mutate(r):
        r["completion_start"] = cs
    msg = expect_error(_bad(tmp_path, mutate), "completion_start")
    assert f"is {cs}" in msg


def test_kd_valid_position_without_candidates(tmp_path):
    def mutate(r):
        r["kd_valid"][2] = True  # last position has no candidates
    msg = expect_error(_bad(tmp_path, mutate), "kd_valid")
    assert "no candidates" in msg and "position 2" in msg


@pytest.mark.parametrize("field", ["input_ids", "other_logprob", "kd_valid"])
def test_null_element(tmp_path, field):
    def mutate(r):
        r[field][1] = None
    msg = expect_error(_bad(tmp_path, mutate), field)
    assert "element 1 is null" in msg


@pytest.mark.parametrize("field", ["topk_ids", "topk_logprobs"])
def test_null_candidate(tmp_path, field):
    def mutate(r):
        r[field][0][1] = None
    msg = expect_error(_bad(tmp_path, mutate), field)
    assert "null candidate" in msg and "position 0" in msg


@pytest.mark.parametrize("field", ["input_ids", "topk_ids", "completion_start", "kd_valid"])
def test_null_cell(tmp_path, field):
    nullable = pa.schema([f.with_nullable(True) for f in TRACE_SCHEMA])

    def mutate(r):
        r[field] = None
    rows = valid_rows()
    mutate(rows[1])
    path = write_raw(rows, tmp_path / "nullcell.parquet", schema=nullable)
    msg = expect_error(path, field)
    assert "is null" in msg


@pytest.mark.parametrize("value", [0.5, float("nan"), float("inf")])
def test_bad_other_logprob(tmp_path, value):
    def mutate(r):
        r["other_logprob"][1] = value
    msg = expect_error(_bad(tmp_path, mutate), "other_logprob")
    assert "position 1" in msg and "≤ 0" in msg


def test_row_number_counts_within_the_file(tmp_path):
    """The error points at the first bad row, not at a later one and not at row 0."""
    rows = valid_rows()
    rows[1]["topk_logprobs"][0][0] = float("nan")
    rows[2]["topk_logprobs"][0][0] = float("nan")
    path = write_raw(rows, tmp_path / "two-bad.parquet")
    msg = expect_error(path, "topk_logprobs")
    assert "row 2" not in msg
    rows = valid_rows()
    rows[2]["input_ids"][4] = 99
    msg = expect_error(write_raw(rows, tmp_path / "last-bad.parquet"), "input_ids", row=2)
    assert "token id 99" in msg


def test_error_names_the_bad_shard_in_a_folder(tmp_path):
    rows = valid_rows()
    write_trace_shard(rows, tmp_path / "a.parquet", meta())
    rows[1]["other_logprob"][0] = 1.0
    bad = write_raw(rows, tmp_path / "b.parquet")
    with pytest.raises(TraceValidationError) as ei:
        read_traces(tmp_path, vocab_size=VOCAB)
    msg = str(ei.value)
    assert str(bad) in msg and "a.parquet" not in msg
    assert "row 1 " in msg and "'other_logprob'" in msg


def test_truncated_file(tmp_path):
    path = write_trace_shard(valid_rows(), tmp_path / "cut.parquet", meta())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceValidationError) as ei:
        read_traces(path, vocab_size=VOCAB)
    msg = str(ei.value)
    assert str(path) in msg
    assert "not a readable Parquet file" in msg and "truncated" in msg


def test_folder_with_truncated_shard_names_it(tmp_path):
    write_trace_shard(valid_rows(), tmp_path / "a.parquet", meta())
    cut = write_trace_shard(valid_rows(), tmp_path / "b.parquet", meta())
    cut.write_bytes(cut.read_bytes()[:100])
    with pytest.raises(TraceValidationError) as ei:
        read_traces(tmp_path)
    assert str(cut) in str(ei.value) and "truncated" in str(ei.value)


@pytest.mark.parametrize("metadata, shown", [({b"bitnet_kde.schema_version": b"2"}, "'2'"),
                                             ({b"bitnet_kde.teacher_model": b"x"}, "None"),
                                             (None, "None")])
def test_wrong_or_missing_schema_version(tmp_path, metadata, shown):
    path = write_raw(valid_rows(), tmp_path / "v.parquet", metadata=metadata)
    with pytest.raises(TraceValidationError) as ei:
        read_traces(path, vocab_size=VOCAB)
    msg = str(ei.value)
    assert str(path) in msg
    assert "schema version" in msg and shown in msg and "bitnet_kde.schema_version" in msg


# ----------------------------------------------------------------------------- atomic write


def test_write_leaves_no_temp_files(tmp_path):
    out = tmp_path / "sub" / "shard.parquet"  # parent folder created on demand
    write_trace_shard(valid_rows(), out, meta())
    write_trace_shard(valid_rows()[:1], out, meta())  # overwrite in place
    assert sorted(os.listdir(out.parent)) == ["shard.parquet"]
    assert read_traces(out).column("id").to_pylist() == ["r0"]


def test_failed_write_leaves_nothing_under_final_name(tmp_path, monkeypatch):
    real_write = pq.write_table
    seen = []

    def write_half_then_die(table, where, *a, **kw):
        seen.append(Path(where.name))  # the open temporary file the shard is streamed into
        buf = io.BytesIO()
        real_write(table, buf, *a, **kw)
        where.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pq, "write_table", write_half_then_die)
    out = tmp_path / "shard.parquet"
    with pytest.raises(OSError, match="simulated"):
        write_trace_shard(valid_rows(), out, meta())
    assert len(seen) == 1
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".") and seen[0] != out
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_shard(tmp_path, monkeypatch):
    out = write_trace_shard(valid_rows(), tmp_path / "shard.parquet", meta())
    before = out.read_bytes()

    def die(table, where, *a, **kw):
        where.write(b"PAR1 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", die)
    with pytest.raises(KeyboardInterrupt):
        write_trace_shard(valid_rows()[:1], out, meta())
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["shard.parquet"]
    assert out.read_bytes() == before
    assert read_traces(out).num_rows == 3


# ----------------------------------------------------------------------------- manifest


def test_manifest_lists_shards_rows_and_sha256(tmp_path):
    rows = valid_rows()
    shards = [write_trace_shard(rows[:2], tmp_path / "kd-00000.parquet", meta()),
              write_trace_shard(rows[2:], tmp_path / "kd-00001.parquet", meta())]
    path = write_manifest(tmp_path, shards, {"trace_set": "abc", "failures": {"p9": "timeout"}})
    assert path == tmp_path / "manifest.json"
    m = json.loads(path.read_text())
    assert m["schema_version"] == "1"
    assert m["trace_set"] == "abc" and m["failures"] == {"p9": "timeout"}
    assert m["rows"] == 3
    assert [(s["file"], s["rows"]) for s in m["shards"]] == [("kd-00000.parquet", 2), ("kd-00001.parquet", 1)]
    for s, shard in zip(m["shards"], shards):
        assert s["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert m["shards"][0]["sha256"] != m["shards"][1]["sha256"]
    assert sorted(os.listdir(tmp_path)) == ["kd-00000.parquet", "kd-00001.parquet", "manifest.json"]
