"""Shared fixtures: small synthetic trace sets and a runner for the real `train.py` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# importing storage registers the config resolvers that configs/paths uses (tests compose configs)
from bitnet_kde import storage  # noqa: F401
from bitnet_kde.kd.synthetic import BigramTraceSource

ROOT = Path(__file__).resolve().parents[1]


def small_source(**kw) -> BigramTraceSource:
    args = dict(vocab_size=64, k=8, num_sequences=48, prompt_len=(2, 6), completion_len=(8, 24), seed=0)
    args.update(kw)
    return BigramTraceSource(**args)


@pytest.fixture(scope="session")
def trace_dir(tmp_path_factory) -> Path:
    """A written synthetic trace set (vocab 64, K=8, 48 rows) shared by the session."""
    d = tmp_path_factory.mktemp("traces")
    small_source().write(d)
    return d


def run_train(root: Path, *overrides: str, multirun: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python train.py` as a user would, with outputs under `root`; fail loudly on error."""
    cmd = [sys.executable, str(ROOT / "train.py")]
    if multirun:
        cmd.append("-m")
    cmd += [f"paths.root={root}", "data.num_workers=0", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc
