"""Streamed-trace loader throughput against training throughput, and the peak memory of a
training run on a large trace set against a small one.

Throughput (one process, back to back): the training loader of `--trace-dir` as `data=parquet`
builds it (`--workers` DataLoader workers, batch `--batch-size`), timed over `--batches`
batches, then the `mini` student's training step (forward, backward, AdamW) on the first of
those batches, timed over `--steps` steps. Both count real tokens (no padding) per second.

Memory (`--rss SMALL LARGE`): `train.py model=tiny trainer.max_steps=50` on each trace set (its
one validation limited to 20 batches, so that the run stays short on a large set), the
resident memory of its whole process tree (workers included) sampled every 0.2 s.

    python scripts/make_synthetic_traces.py --tokens 40000000 --out /tmp/t40m
    python scripts/bench_loader.py --trace-dir /tmp/t40m
    python scripts/bench_loader.py --rss /tmp/t400k /tmp/t40m
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from bitnet_kde.data import KDTraceDataModule
from bitnet_kde.runinfo import describe, run_info
from bitnet_kde.training import DistillationModule

ROOT = Path(__file__).resolve().parents[1]


def real_tokens(batch) -> int:
    """Tokens of a batch without padding: a row ends one past its last position with a loss or a
    teacher (its final token has neither)."""
    used = batch["loss_mask"] | batch["kd_valid"]
    last = (used * torch.arange(used.shape[1])).amax(dim=1)
    return int(((last + 2) * used.any(dim=1)).sum())


def throughput(args) -> None:
    dm = KDTraceDataModule(args.trace_dir, vocab_size=args.vocab_size, max_seq_len=args.max_seq_len,
                           batch_size=args.batch_size, num_workers=args.workers)
    t = time.perf_counter()
    dm.setup("fit")
    scan = time.perf_counter() - t
    it = iter(dm.train_dataloader())
    first = next(it)  # workers started, first row groups read
    tokens, t = 0, time.perf_counter()
    for _ in range(args.batches):
        tokens += real_tokens(next(it))
    load = tokens / (time.perf_counter() - t)

    torch.manual_seed(0)
    module = DistillationModule({"name": "mini", "vocab_size": args.vocab_size, "max_seq_len": args.max_seq_len})
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batch = {k: v for k, v in first.items() if k != "ids"}
    n = real_tokens(first)
    for step in range(args.steps + 1):
        if step == 1:  # the first step warms allocators and kernels up
            t = time.perf_counter()
        out = module.loss_fn(module.model(batch["input_ids"]), batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    train = n * args.steps / (time.perf_counter() - t)
    info = run_info()
    print(f"{info['created_at']}  {describe(info['machine'])}  load {os.getloadavg()[0]:.1f}")
    print(f"{args.trace_dir}: scan (sha256 + small columns) {scan:.1f} s")
    print(f"loader ({args.workers} workers, batch {args.batch_size}): {load:,.0f} tokens/s over {args.batches} batches")
    print(f"mini training step (batch {args.batch_size}): {train:,.0f} tokens/s over {args.steps} steps")
    print(f"loader / training: {load / train:.0f}x")


def peak_rss(cmd: list[str], cwd: str) -> tuple[float, float]:
    """(peak resident GB of the process tree, seconds) of a command."""
    proc = psutil.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(
        os.environ, PYTHONPATH=str(ROOT)))
    peak, t = 0, time.perf_counter()
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return peak / 1e9, time.perf_counter() - t


def rss(args) -> None:
    info = run_info()
    print(f"{info['created_at']}  {describe(info['machine'])}  load {os.getloadavg()[0]:.1f}")
    results = []
    for trace_dir in args.rss:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, str(ROOT / "train.py"), "model=tiny", "trainer.max_steps=50", "+trainer.limit_val_batches=20",
                   "data=parquet",
                   f"data.trace_dir={Path(trace_dir).resolve()}", f"data.vocab_size={args.vocab_size}",
                   f"paths.root={out}", "logger=csv", "callbacks.progress_bar=null"]
            gb, sec = peak_rss(cmd, out)
        size = sum(p.stat().st_size for p in Path(trace_dir).glob("*.parquet")) / 1e9
        results.append(gb)
        print(f"{trace_dir} ({size:.2f} GB of shards): peak RSS {gb:.2f} GB (process tree), {sec:.0f} s")
    print(f"difference: {results[-1] - results[0]:+.2f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace-dir", help="trace set for the throughput comparison")
    ap.add_argument("--rss", nargs=2, metavar=("SMALL", "LARGE"), help="trace sets for the memory comparison")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if args.rss:
        rss(args)
    if args.trace_dir:
        throughput(args)


if __name__ == "__main__":
    main()
