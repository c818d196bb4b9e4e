"""Sampled-token KD against Top-K KD at the same trace bytes per position; writes a section of
docs/RESULTS.md (`python scripts/run_ablations.py --sampled ...` runs it).

One local teacher (SmolLM2) and one prompt set give two trace sets: Top-K (K=`--k`) + Other with
N=`--n` draws per position (read by `bucket`, `renormalize` and `rs`), and a Top-`--k-head` head with
N=`--n-tail` tail draws (`hybrid`). Every variant trains the same student from the same seed on the
same batch order for the same steps (an in-process loop over `DistillationLoss`, so the loss is the
only difference), then is scored on held-out teacher text: exact full-vocabulary KL(teacher ‖
student) teacher-forced, bucket KL, top-1 agreement and the ECE of the student's top-1 (the eval
stage's own functions). Trace bytes per position are the Parquet bytes of the columns a variant
reads (compressed, as stored) over the KD-valid positions; collection overhead is each
collection's time over plain generation of the same prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import torch

from bitnet_kde.data.datamodule import TraceDataset, collate_traces
from bitnet_kde.eval.evaluate import HeldOut, full_vocab_section, token_metrics
from bitnet_kde.kd.collect import TraceCollector
from bitnet_kde.kd.prompts import load_prompts
from bitnet_kde.kd.traces import list_shards, read_traces
from bitnet_kde.losses import DistillationLoss, LossConfig
from bitnet_kde.model import BitNetConfig, BitNetLM
from bitnet_kde.teachers import SamplingConfig
from bitnet_kde.teachers.local import LocalHFTeacher
from run_ablations import write_section as write_results_section

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("bucket", "renormalize", "rs", "hybrid")
COLUMNS = {"bucket": ["topk_ids", "topk_logprobs", "other_logprob"], "renormalize": ["topk_ids", "topk_logprobs"],
           "rs": ["rs_ids", "rs_counts"], "hybrid": ["topk_ids", "topk_logprobs", "other_logprob", "rs_ids",
                                                     "rs_counts"]}
"""Trace columns each variant reads (what it costs to store)."""
SECTION = "## Sampled-token KD (RS-KD) vs Top-K"


def collect(teacher, prompts: dict, out: Path, sampling: dict, rs: dict | None) -> tuple[Path, float]:
    col = TraceCollector(teacher, prompts=prompts, sampling=sampling, rs=rs, progress=False, chunk_size=1000)
    _ = col.tokenizer_hash, col.prompts  # the student tokenizer and the prompts load outside the timing
    t0 = time.perf_counter()
    col.write(out)
    return out, time.perf_counter() - t0


def bytes_per_position(trace_dir: Path, columns: list[str]) -> tuple[float, float]:
    """(stored Parquet bytes of `columns`, entries of their lists) per KD-valid position."""
    stored = 0
    for shard in list_shards(trace_dir):
        md = pq.ParquetFile(shard).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema.split(".")[0] in columns:
                    stored += col.total_compressed_size
    table = read_traces(trace_dir)
    valid = sum(sum(v) for v in table.column("kd_valid").to_pylist())
    lists = [c for c in columns if c in ("topk_ids", "rs_ids")]
    entries = sum(len(x) for c in lists for row in table.column(c).to_pylist() for x in row)
    return stored / valid, entries / valid


def train(variant: str, trace_dir: Path, steps: int, batch_size: int, seed: int) -> BitNetLM:
    """A tiny student trained `steps` steps with `loss.other=variant` (same seed and batch order for all)."""
    torch.manual_seed(seed)
    model = BitNetLM(BitNetConfig.from_name("tiny", vocab_size=49152))
    loss_fn = DistillationLoss(LossConfig(other=variant))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ds = TraceDataset(read_traces(trace_dir), max_seq_len=256)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    model.train()
    for step in range(steps):
        idx = [int(order[(step * batch_size + i) % len(ds)]) for i in range(batch_size)]
        batch = collate_traces([ds[i] for i in idx])
        out = loss_fn(model(batch["input_ids"]), batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT / "data" / "sampled_ablation")
    p.add_argument("--prompts", type=int, default=48, help="training prompts")
    p.add_argument("--held-out", type=int, default=16, help="held-out (test split) prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--k", type=int, default=20, help="Top-K of bucket / renormalize")
    p.add_argument("--n", type=int, default=32, help="draws per position for rs")
    p.add_argument("--k-head", type=int, default=10, help="exact head of hybrid")
    p.add_argument("--n-tail", type=int, default=16, help="tail draws per position for hybrid")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = p.parse_args()
    root = args.root.resolve()
    load_before = os.getloadavg()[0]
    teacher = LocalHFTeacher.smollm2(batch_size=16)
    train_prompts = {"split": ["train"], "limit": args.prompts}
    sampling = {"max_new_tokens": args.max_new_tokens, "top_k": args.k}

    texts = [pr.prompt for pr in load_prompts(**train_prompts)]
    t0 = time.perf_counter()
    teacher.generate(texts, SamplingConfig(max_new_tokens=args.max_new_tokens, top_k=1))
    raw_s = time.perf_counter() - t0
    _, topk_s = collect(teacher, train_prompts, root / "topk", sampling, None)
    rs_dir, rs_s = collect(teacher, train_prompts, root / "rs", sampling, {"n": args.n, "seed": args.seed})
    hy_dir, hy_s = collect(teacher, train_prompts, root / "hybrid", {**sampling, "top_k": args.k_head},
                           {"n": args.n_tail, "seed": args.seed, "hybrid": True})
    held = TraceCollector(teacher, prompts={"split": ["test"], "limit": args.held_out},
                          sampling={"max_new_tokens": args.max_new_tokens, "top_k": args.k}, progress=False)
    held.write(root / "held_out")
    table = read_traces(root / "held_out")
    data = HeldOut(collector=held, trace_dir=str(root / "held_out"), ds=TraceDataset(table, 256),
                   categories=table.column("category").to_pylist(), prompts=table.column("prompt").to_pylist(),
                   teacher_text=table.column("teacher_text").to_pylist(), traced_by=teacher.name)

    rows = []
    for v in VARIANTS:
        trace_dir = hy_dir if v == "hybrid" else rs_dir
        stored, entries = bytes_per_position(trace_dir, COLUMNS[v])
        t0 = time.perf_counter()
        student = train(v, trace_dir, args.steps, args.batch_size, args.seed)
        train_s = time.perf_counter() - t0
        fv = full_vocab_section(student, data, 8)
        tm = token_metrics(student, data.ds, data.categories, 8)["overall"]
        coll_s = hy_s if v == "hybrid" else (rs_s if v == "rs" else topk_s)
        rows.append({"variant": v, "kl_full_vocab": fv["kl_full_vocab"], "kl_bucket": fv["kl_bucket"],
                     "top1": tm["top1_agreement"], "ece": fv["ece_top1"], "bytes": stored, "entries": entries,
                     "collect_overhead": coll_s / raw_s, "train_s": train_s})
        print(json.dumps(rows[-1]), flush=True)
    load = f"{os.cpu_count()} CPUs, load average {load_before:.0f} at the start and {os.getloadavg()[0]:.0f} at the end"
    write_section(args, rows, raw_s, root, load)


def winners(rows: list[dict]) -> str:
    """Which variant is best on each figure, said plainly (ties share the place)."""
    def best(key, lower=True):
        top = (min if lower else max)(r[key] for r in rows)
        return " = ".join(r["variant"] for r in rows if abs(r[key] - top) <= 5e-4 * max(abs(top), 1))
    return (f"Best on this run: full-vocabulary KL {best('kl_full_vocab')}; bucket KL {best('kl_bucket')}; "
            f"top-1 {best('top1', lower=False)}; ECE {best('ece')}; fewest trace bytes {best('bytes')}.")


def write_section(args, rows: list[dict], raw_s: float, root: Path, load: str) -> None:
    cmd = ("python scripts/run_ablations.py --sampled " + " ".join(
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("prompts", "held_out", "max_new_tokens", "k", "n",
                                                                 "k_head", "n_tail", "steps", "batch_size")))
    intro = (f"Produced by `{cmd}` (`scripts/sampled_ablation.py`; "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}). Teacher SmolLM2-135M (local), student "
             f"`tiny` trained {args.steps} steps × {args.batch_size} rows from one seed on one batch order per "
             f"variant; {args.prompts} training prompts, {args.held_out} held-out `test` prompts, "
             f"{args.max_new_tokens} new tokens each. bucket / renormalize: Top-{args.k}; rs: N={args.n} draws; "
             f"hybrid: Top-{args.k_head} head + N={args.n_tail} tail draws. Bytes: stored (compressed) Parquet "
             "bytes of the columns the variant reads per KD-valid position; entries: ids stored per position. "
             f"Collection overhead: collection time / plain generation of the same prompts ({raw_s:.1f} s). "
             f"Machine: {load}; times under such load vary by tens of percent between runs.")
    header = ("| variant | full-vocab KL ↓ | bucket KL ↓ | top-1 ↑ | ECE ↓ | trace bytes/position | "
              "entries/position | collection / generation |")
    lines = [SECTION, "", intro, "", header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['kl_full_vocab']:.3f} | {r['kl_bucket']:.3f} | {r['top1']:.3f} | "
                     f"{r['ece']:.3f} | {r['bytes']:.1f} | {r['entries']:.1f} | {r['collect_overhead']:.2f}× |")
    lines += ["", winners(rows), ""]
    section = "\n".join(lines)
    write_results_section(args.out, "sampled", section.rstrip("\n"))
    (root / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
