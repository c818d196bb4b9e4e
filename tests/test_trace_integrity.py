"""Trace integrity (docs/TRACE_FORMAT.md, "Integrity"): manifest hashes and page checksums catch
damaged or swapped shards and collection rewrites exactly those; duplicate row ids and repeated
candidates are refused; trace metadata must match the run; top_k within the provider's limit."""

from __future__ import annotations

import random
import shutil

import pyarrow.parquet as pq
import pytest

from bitnet_kde.data.datamodule import KDTraceDataModule
from bitnet_kde.kd.collect import TraceCollector
from bitnet_kde.kd.synthetic import BigramTraceSource
from bitnet_kde.kd.traces import (
    TraceValidationError,
    check_run_match,
    list_shards,
    read_traces,
    trace_metadata,
    write_trace_shard,
)
from bitnet_kde.teachers import Teacher, TeacherSequence

VOCAB = 64


def bigram(**kw) -> BigramTraceSource:
    args = {"vocab_size": VOCAB, "k": 5, "num_sequences": 60, "prompt_len": (2, 4), "completion_len": (8, 16),
            "shard_rows": 20}
    args.update(kw)
    return BigramTraceSource(**args)


def flipped_variants(data: bytes, count: int, seed: int = 0):
    """`count` copies of `data`, each with one bit flipped at a seeded random position."""
    rng = random.Random(seed)
    for _ in range(count):
        b = bytearray(data)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        yield bytes(b)


# ----------------------------------------------------------------------------- damaged shards


def test_every_bit_flip_of_a_manifest_shard_is_refused_naming_it(tmp_path):
    bigram().write(tmp_path)
    shard = list_shards(tmp_path)[1]
    good = shard.read_bytes()
    for variant in flipped_variants(good, 150):
        shard.write_bytes(variant)
        with pytest.raises(TraceValidationError) as ei:
            read_traces(tmp_path, vocab_size=VOCAB)
        msg = str(ei.value)
        assert str(shard) in msg and "manifest.json" in msg and "python collect.py" in msg, msg
    shard.write_bytes(good)
    assert read_traces(tmp_path, vocab_size=VOCAB).num_rows == 60


def test_without_a_manifest_page_checksums_refuse_every_changed_page(tmp_path):
    """A lone shard (no manifest to compare with): no bit flip may change the rows read back.
    Flips in the footer's free text (e.g. `created_at`) are not covered by page checksums; they
    leave the rows as they were."""
    bigram().write(tmp_path / "set")
    shard = tmp_path / "lone.parquet"
    shutil.copy(list_shards(tmp_path / "set")[0], shard)
    rows = read_traces(shard, vocab_size=VOCAB).to_pylist()
    refused = 0
    for variant in flipped_variants(shard.read_bytes(), 150, seed=1):
        shard.write_bytes(variant)
        try:
            got = read_traces(shard, vocab_size=VOCAB).to_pylist()
        except TraceValidationError:
            refused += 1
            continue
        assert got == rows
    assert refused > 100


def test_replaced_shard_is_refused_naming_it(tmp_path):
    bigram().write(tmp_path / "a")
    bigram(seed=1, shard_rows=7).write(tmp_path / "b")  # another valid trace set, other row counts
    target = list_shards(tmp_path / "a")[2]
    shutil.copy(list_shards(tmp_path / "b")[0], target)
    with pytest.raises(TraceValidationError) as ei:
        read_traces(tmp_path / "a", vocab_size=VOCAB)
    msg = str(ei.value)
    assert str(target) in msg and "7 rows, the manifest says 20" in msg and "sha256" in msg
    assert "re-collect" in msg and "python collect.py" in msg
    # a run without a source refuses it too
    with pytest.raises(TraceValidationError, match=target.name):
        KDTraceDataModule(str(tmp_path / "a"), vocab_size=VOCAB, num_workers=0).setup()


def test_a_run_with_a_synthetic_source_rewrites_a_damaged_shard(tmp_path):
    src = bigram()
    src.write(tmp_path)
    shard = list_shards(tmp_path)[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 4
    shard.write_bytes(bytes(data))
    assert not src.is_complete(tmp_path)
    dm = KDTraceDataModule(str(tmp_path), vocab_size=VOCAB, source=src, num_workers=0, val_fraction=0.25)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 60 and src.is_complete(tmp_path)


class StubTeacher(Teacher):
    """A cheap in-process teacher on the student's ids: a fixed answer per prompt, counted."""

    provider, model = "stub", "fixed"

    def __init__(self, max_top_k: int = 20):
        self.max_top_k = max_top_k
        self.asked: list[str] = []

    def generate(self, prompts, sampling):
        self.asked += prompts
        out = []
        for p in prompts:
            ids = [2 + (len(p) + j) % 6 for j in range(4)]
            out.append(TeacherSequence(prompt=p, text="x" * len(ids), tokens=["x"] * len(ids),
                                       topk_tokens=[["x", "y"]] * len(ids), topk_logprobs=[[-0.2, -2.5]] * len(ids),
                                       token_ids=ids, topk_ids=[[i, (i + 1) % 8] for i in ids], finish_reason="length"))
        return out

    def chat_ids(self, prompt):
        return [1, 2 + len(prompt) % 5]

    def token_ids_match(self, tokenizer):
        return True


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> dict:
    """A student tokenizer of 8 word-level tokens, saved as a transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "a", "b", "c", "d", "e", "f"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path_factory.mktemp("tiny-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>").save_pretrained(d)
    return {"model": str(d)}


def collector(teacher, tokenizer, n: int = 6, **kw) -> TraceCollector:
    prompts = [{"id": f"p{i}", "prompt": f"prompt number {i}" + "!" * i, "category": "qa", "split": "train"}
               for i in range(n)]
    args = {"student_tokenizer": tokenizer, "prompts": {"source": prompts}, "chunk_size": 2, "progress": False,
            "sampling": {"max_new_tokens": 4, "top_k": 2}}
    args.update(kw)
    return TraceCollector(teacher, **args)


def test_collect_rewrites_exactly_the_replaced_shard(tmp_path, tiny_tokenizer):
    teacher = StubTeacher()
    col = collector(teacher, tiny_tokenizer)
    shards = col.write(tmp_path)
    assert len(shards) == 3 and len(teacher.asked) == 6
    expected = read_traces(tmp_path, vocab_size=8).to_pylist()
    # shard 1 replaced by a valid shard of another trace set (3 prompts: other rows, other sha256)
    collector(StubTeacher(), tiny_tokenizer, n=3, chunk_size=3).write(tmp_path / "other")
    shutil.copy(list_shards(tmp_path / "other")[0], shards[1])
    with pytest.raises(TraceValidationError, match=f"{shards[1].name}.*3 rows, the manifest says 2"):
        read_traces(tmp_path, vocab_size=8)
    assert not col.is_complete(tmp_path)  # so `python collect.py` collects again
    kept = {s.name: s.stat().st_mtime_ns for s in (shards[0], shards[2])}
    teacher.asked.clear()
    col.write(tmp_path)
    assert teacher.asked == ["prompt number 2!!", "prompt number 3!!!"]  # chunk 1's prompts only
    assert {s.name: s.stat().st_mtime_ns for s in (shards[0], shards[2])} == kept
    assert col.is_complete(tmp_path)
    assert read_traces(tmp_path, vocab_size=8).to_pylist() == expected


def test_top_k_above_the_providers_limit_is_refused_before_any_request(tmp_path, tiny_tokenizer):
    teacher = StubTeacher(max_top_k=20)
    col = collector(teacher, tiny_tokenizer, sampling={"max_new_tokens": 4, "top_k": 50})
    with pytest.raises(ValueError) as ei:
        col.write(tmp_path)
    msg = str(ei.value)
    assert "collection.sampling.top_k=50" in msg and "'stub'" in msg and "max_top_k=20" in msg
    assert "\n" not in msg
    assert teacher.asked == [] and list_shards(tmp_path) == []
    collector(teacher, tiny_tokenizer, sampling={"max_new_tokens": 4, "top_k": 20}).write(tmp_path)  # at the limit
    assert len(teacher.asked) == 6


# ----------------------------------------------------------------------------- duplicates


def meta(**kw) -> dict[str, str]:
    args = {"teacher_provider": "test", "teacher_model": "hand-made", "k": 5, "sampling": {},
            "logprob_mode": "exact", "tokenizer_name": "test-ids", "tokenizer_hash": "abc123", "vocab_size": VOCAB}
    args.update(kw)
    return trace_metadata(**args)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    d = tmp_path_factory.mktemp("rows")
    bigram(num_sequences=6).write(d)
    return read_traces(d).to_pylist()


def test_duplicate_row_id_within_a_file_is_refused(tmp_path, rows):
    dup = rows[:4] + [dict(rows[1])]
    path = write_trace_shard(dup, tmp_path / "dup.parquet", meta())
    with pytest.raises(TraceValidationError) as ei:
        read_traces(path, vocab_size=VOCAB)
    msg = str(ei.value)
    assert str(path) in msg and "row 4 " in msg and "row 1 has the same id" in msg and rows[1]["id"] in msg
    assert "two trace sets were mixed or a shard was copied" in msg


def test_duplicate_row_id_across_files_is_refused_naming_both(tmp_path, rows):
    write_trace_shard(rows[:3], tmp_path / "a.parquet", meta())
    write_trace_shard(rows[3:] + [rows[2]], tmp_path / "b.parquet", meta())
    with pytest.raises(TraceValidationError) as ei:
        read_traces(tmp_path, vocab_size=VOCAB)
    msg = str(ei.value)
    assert str(tmp_path / "b.parquet") in msg and f"row {len(rows) - 3} " in msg
    assert str(tmp_path / "a.parquet") in msg and "row 2" in msg and repr(rows[2]["id"]) in msg
    assert "remove the extra copy" in msg
    # a copied shard, the typical cause
    (tmp_path / "b.parquet").unlink()
    shutil.copy(tmp_path / "a.parquet", tmp_path / "a-copy.parquet")
    with pytest.raises(TraceValidationError, match="a.parquet.*row 0 has id .*a-copy.parquet row 0"):
        read_traces(tmp_path)


def test_repeated_student_id_at_one_position_is_refused(tmp_path, rows):
    bad = [dict(r) for r in rows[:3]]
    cands = [list(c) for c in bad[2]["topk_ids"]]
    cands[3][4] = cands[3][1]
    bad[2]["topk_ids"] = cands
    path = write_trace_shard(bad, tmp_path / "rep.parquet", meta())
    with pytest.raises(TraceValidationError) as ei:
        read_traces(path, vocab_size=VOCAB)
    msg = str(ei.value)
    assert str(path) in msg and "row 2 " in msg and "'topk_ids'" in msg and "position 3" in msg
    assert f"student id {cands[3][1]} is listed twice" in msg


# ----------------------------------------------------------------------------- metadata vs the run


def test_traces_for_another_vocabulary_are_refused(tmp_path):
    bigram().write(tmp_path)
    with pytest.raises(TraceValidationError) as ei:
        KDTraceDataModule(str(tmp_path), vocab_size=100, num_workers=0).setup()
    msg = str(ei.value)
    assert str(tmp_path) in msg and "vocabulary of 64 ids" in msg and "vocab_size=100" in msg
    assert "data.vocab_size=64" in msg


def test_traces_for_another_student_tokenizer_are_refused(tmp_path):
    class OtherTokenizer(BigramTraceSource):
        tokenizer_hash = "0123456789abcdef"  # same trace set, a run whose student tokenizer differs

    bigram().write(tmp_path)
    src = OtherTokenizer(vocab_size=VOCAB, k=5, num_sequences=60, prompt_len=(2, 4), completion_len=(8, 16))
    assert src.is_complete(tmp_path)
    dm = KDTraceDataModule(str(tmp_path), vocab_size=VOCAB, source=src, num_workers=0)
    with pytest.raises(TraceValidationError) as ei:
        dm.setup()
    msg = str(ei.value)
    assert bigram().tokenizer_hash in msg and "0123456789abcdef" in msg and "re-collect" in msg


def test_traces_with_a_larger_k_than_k_max_are_refused(tmp_path, rows):
    write_trace_shard(rows, tmp_path / "k.parquet", meta(k=8))  # 5 candidates stored, K=8 declared
    with pytest.raises(TraceValidationError) as ei:
        KDTraceDataModule(str(tmp_path), vocab_size=VOCAB, k_max=6, num_workers=0).setup()
    msg = str(ei.value)
    assert "K=8" in msg and "data.k_max=6" in msg and "collection.sampling.top_k" in msg


@pytest.mark.parametrize("k", ["0", "-3", "many"])
def test_nonsense_k_in_metadata_is_refused(k):
    with pytest.raises(TraceValidationError, match="bitnet_kde.k"):
        check_run_match({"k": k}, "traces", k_max=128)


def test_metadata_the_traces_lack_or_the_run_does_not_know_is_not_compared():
    check_run_match({}, "traces", vocab_size=10, tokenizer_hash="x", k_max=1)
    check_run_match({"vocab_size": "5", "student_tokenizer_hash": "y", "k": "9"}, "traces")


def test_shards_made_for_different_tokenizers_do_not_mix(tmp_path, rows):
    write_trace_shard(rows[:3], tmp_path / "a.parquet", meta())
    write_trace_shard(rows[3:], tmp_path / "b.parquet", meta(tokenizer_hash="fff000"))
    with pytest.raises(TraceValidationError) as ei:
        read_traces(tmp_path)
    msg = str(ei.value)
    assert "b.parquet" in msg and "'fff000'" in msg and "a.parquet" in msg and "'abc123'" in msg


def test_written_shards_carry_page_checksums(tmp_path, rows):
    """Flip one bit inside the first data page of a lone shard: the reader refuses it."""
    path = write_trace_shard(rows, tmp_path / "s.parquet", meta())
    col = pq.ParquetFile(path).metadata.row_group(0).column(3)  # input_ids
    data = bytearray(path.read_bytes())
    data[col.data_page_offset + col.total_compressed_size - 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(TraceValidationError, match="not a readable Parquet file"):
        read_traces(path)
