"""Exact mid-epoch resume: a training process killed with SIGKILL and resumed from `last.ckpt`
trains on exactly the batches (row ids) of an uninterrupted run, in the same activation mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitnet_kde.kd.synthetic import BigramTraceSource

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "resume_child.py"
STEPS = 20
KILL_AFTER = 12  # past the flip (FLIP_AT_TOKENS is reached near step 7) and inside the second epoch


def run_child(trace_dir, run_dir, max_steps, ckpt=None, wait=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, str(CHILD), str(trace_dir), str(run_dir), str(max_steps)] + ([str(ckpt)] if ckpt else [])
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return proc


def batches(run_dir) -> list[dict]:
    path = Path(run_dir) / "batches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_sigkilled_run_resumes_with_the_uninterrupted_batches(tmp_path):
    traces = tmp_path / "traces"
    BigramTraceSource(vocab_size=64, k=5, num_sequences=60, prompt_len=(2, 4), completion_len=(8, 16),
                      shard_rows=16).write(traces)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    run_child(traces, ref_dir, STEPS)
    ref = batches(ref_dir)
    assert [b["step"] for b in ref] == list(range(STEPS))
    assert {b["bits"] for b in ref} == {8, 4} and ref[KILL_AFTER]["bits"] == 4 and ref[-1]["epoch"] == 1

    proc = run_child(traces, run_dir, STEPS, wait=False)
    deadline = time.monotonic() + 240
    while len(batches(run_dir)) <= KILL_AFTER:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed = batches(run_dir)
    assert killed == ref[:len(killed)] and len(killed) < STEPS

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    (run_dir / "batches.jsonl").rename(run_dir / "killed.jsonl")
    run_child(traces, run_dir, STEPS, ckpt=ckpt)
    resumed = batches(run_dir)
    first = resumed[0]["step"]
    assert KILL_AFTER - 2 <= first <= len(killed)  # the last checkpoint written before the kill
    assert resumed == ref[first:]  # same row ids, epochs and activation bits, step for step
