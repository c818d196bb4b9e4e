"""The allocator setting `make train` uses: freed blocks stay in the heap instead of going back to
the OS, so repeated large allocations (every training step's logits, gradients, loss buffers)
stop page-faulting."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_kde.pipeline import train_env

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"

# Plain Python (no torch: a quick interpreter start): bytes * n is one malloc plus a write of every
# page. 5 warm-up rounds let the heap reach its high-water mark; the next 10 are the steady state.
PROBE = """
import resource
faults = []
for _ in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = b"\\x01" * (64 * 2**20)  # above glibc's largest mmap threshold (32 MB)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[5:]))
"""


def train_malloc_env() -> dict[str, str]:
    """TRAIN_MALLOC_ENV as make expands it: what `make train` runs with and, read from the same
    file, what the pipeline gives its train stage; the pipeline process itself runs without."""
    text = MAKEFILE.read_text()
    recipe = re.search(r"^train:.*\n\t(.+)$", text, re.M)
    assert recipe and recipe.group(1).startswith("$(TRAIN_MALLOC_ENV) "), "make train runs under TRAIN_MALLOC_ENV"
    pipeline = re.search(r"^pipeline:.*\n\t(.+)$", text, re.M)
    assert pipeline and "TRAIN_MALLOC_ENV" not in pipeline.group(1), "the pipeline sets it for its train stage only"
    show = "show:\n\t@echo $(TRAIN_MALLOC_ENV)"
    shown = subprocess.run(["make", "-s", "--no-print-directory", "--eval", show, "show"], cwd=MAKEFILE.parent,
                           capture_output=True, text=True, check=True).stdout
    env = dict(item.split("=", 1) for item in shown.split())
    assert env == train_env()
    return env


def steady_state_faults(extra_env: dict[str, str]) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**env, **extra_env}, capture_output=True, text=True,
                          check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is for glibc's malloc")
def test_train_allocator_setting_stops_page_faults_of_repeated_large_blocks():
    env = train_malloc_env()
    assert env == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    default, tuned = steady_state_faults({}), steady_state_faults(env)
    pages = 64 * 2**20 // 4096
    assert default >= 10 * pages * 0.9  # each 64 MB block faulted in again, every round
    assert tuned < default / 20
