"""What the trace integrity checks cost when a trace set is read.

Writes one synthetic trace set (page checksums on, `manifest.json` with each shard's sha256 and
row count), copies its shards into a second folder without the manifest, then times in
alternating order, in the same run:

- `read_traces` with the manifest: page checksums + streamed sha256 + row counts;
- `read_traces` without it: page checksums only (the baseline);
- the sha256 of every shard alone.

    python scripts/bench_trace_read.py                      # 1,024 rows in 16 shards, K = 20
    python scripts/bench_trace_read.py --rows 4096 --rounds 9
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bitnet_kde.kd.synthetic import BigramTraceSource
from bitnet_kde.kd.traces import read_traces
from bitnet_kde.runinfo import describe, run_info


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sha256_all(paths: list[Path]) -> None:
    for p in paths:
        hashlib.sha256(p.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checked, plain = Path(tmp, "with-manifest"), Path(tmp, "without-manifest")
        BigramTraceSource(num_sequences=args.rows, k=20, shard_rows=args.rows // args.shards).write(checked)
        shards = sorted(checked.glob("*.parquet"))
        plain.mkdir()
        for p in shards:
            shutil.copy(p, plain / p.name)
        size = sum(p.stat().st_size for p in shards)
        times: dict[str, list[float]] = {"with manifest": [], "page checksums only": [], "sha256 alone": []}
        for i in range(args.rounds):
            order = list(times) if i % 2 == 0 else list(reversed(times))
            for name in order:
                fn = {"with manifest": lambda: read_traces(checked),
                      "page checksums only": lambda: read_traces(plain),
                      "sha256 alone": lambda: sha256_all(shards)}[name]
                times[name].append(timed(fn))

    info = run_info()
    print(f"{info['created_at']}  {describe(info['machine'])}")
    print(f"{args.rows} rows in {len(shards)} shards, {size / 1e6:.1f} MB; median of {args.rounds} rounds")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, sec in med.items():
        print(f"  {name:<22} {sec * 1e3:8.1f} ms")
    print(f"  with / without manifest: {med['with manifest'] / med['page checksums only']:.2f}x;"
          f" sha256 {size / med['sha256 alone'] / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
