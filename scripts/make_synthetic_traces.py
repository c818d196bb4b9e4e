"""Write a synthetic schema-v1 trace set of about N tokens, in shards, for scale tests and
benchmarks (no teacher, no network): the bigram source of `data=synthetic` with its "numpy"
sampler, one row group of `--shard-rows` rows per shard.

    python scripts/make_synthetic_traces.py --tokens 40000000 --out data/synthetic-40m
    python train.py model=tiny data=parquet data.trace_dir=data/synthetic-40m data.vocab_size=512

The token count is reached on average (rows are drawn with random lengths); the manifest and
the printed summary give the exact numbers.
"""

from __future__ import annotations

import argparse
import math
import time

from bitnet_kde.kd.synthetic import BigramTraceSource
from bitnet_kde.kd.traces import list_shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, required=True, help="tokens (prompt + completion) to write, about")
    ap.add_argument("--out", required=True, help="folder or storage URL of the trace set")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--k", type=int, default=20, help="teacher candidates per position")
    ap.add_argument("--shard-rows", type=int, default=1024, help="rows per shard (= per row group)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prompt_len, completion_len = (8, 24), (32, 160)
    mean_len = sum(prompt_len) / 2 + sum(completion_len) / 2
    source = BigramTraceSource(vocab_size=args.vocab_size, k=args.k, num_sequences=math.ceil(args.tokens / mean_len),
                               prompt_len=prompt_len, completion_len=completion_len, seed=args.seed,
                               shard_rows=args.shard_rows, sampler="numpy")
    start = time.perf_counter()
    if source.is_complete(args.out):
        print(f"{args.out} already holds trace set {source.trace_set_id}")
    else:
        source.write(args.out)
    shards = list_shards(args.out)
    print(f"{source.num_sequences} rows (~{args.tokens} tokens) in {len(shards)} shards, trace set "
          f"{source.trace_set_id}, {time.perf_counter() - start:.0f} s\n"
          f"train: python train.py data=parquet data.trace_dir={args.out} data.vocab_size={args.vocab_size}")


if __name__ == "__main__":
    main()
