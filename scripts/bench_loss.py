"""Peak memory of one loss step: fused head + loss vs the naive path through fp32 logits.

One step = LM-head projection of every position, KD (Top-K + Other) + CE + format loss, and the
backward pass to the hidden states and the head weight. *naive* materializes the [T, V] fp32
logits and runs `DistillationLoss` on them (its softmax chunked as in training before);
*fused* is `fused_distillation_loss`, which projects `chunk` positions at a time. Each variant
runs in its own process (peak RSS is per process), one after the other; the step's peak is the
process's peak RSS (VmHWM) minus its RSS right before the step, when the inputs exist.

    python scripts/bench_loss.py                          # V 128256, 4096 positions, hidden 2048
    python scripts/bench_loss.py --vocab 4096 --positions 512 --hidden 256   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from bitnet_kde.dryrun import rss_bytes
from bitnet_kde.losses import DistillationLoss, LossConfig, fused_distillation_loss
from bitnet_kde.runinfo import describe, run_info

VARIANTS = ("naive", "fused")


def make_inputs(positions: int, hidden: int, vocab: int, k: int, seed: int = 0):
    """Hidden states [1, T, d], head weight [V, d] and a trace batch, without any [T, V] tensor."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, positions, hidden, generator=g).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).requires_grad_(True)
    ids = torch.randint(0, vocab, (1, positions), generator=g)
    lp = torch.log_softmax(2 * torch.randn(1, positions, k + 1, generator=g), -1).sort(-1, descending=True).values
    loss_mask = torch.ones(1, positions, dtype=torch.bool)
    loss_mask[:, -1] = False
    batch = {"input_ids": ids, "loss_mask": loss_mask, "kd_valid": loss_mask.clone(),
             "format_mask": torch.rand(1, positions, generator=g) < 0.1,
             "topk_ids": torch.randint(0, vocab, (1, positions, k), generator=g),
             "topk_logprobs": lp[..., :k], "other_logprob": lp[..., k]}
    return h, w, batch


def one_step(variant: str, args) -> dict:
    h, w, batch = make_inputs(args.positions, args.hidden, args.vocab, args.k)
    cfg = LossConfig(chunk_size=args.chunk if variant == "fused" else args.naive_chunk)
    before = rss_bytes()["rss"]
    t = time.perf_counter()
    if variant == "fused":
        out = fused_distillation_loss(h, w, batch, cfg)
    else:
        out = DistillationLoss(cfg)(h @ w.T, batch)
    out["loss"].backward()
    seconds = time.perf_counter() - t
    peak = rss_bytes()["peak_rss"]
    return {"variant": variant, "chunk": cfg.chunk_size, "rss_before_step": before, "peak_rss": peak,
            "step_peak": peak - before, "seconds": seconds, "loss": float(out["loss"].detach()),
            "grad_norm_hidden": float(h.grad.norm()), "grad_norm_head": float(w.grad.norm())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--chunk", type=int, default=LossConfig.chunk_size, help="positions per chunk, fused path")
    p.add_argument("--naive-chunk", type=int, default=2048, help="softmax chunk of the naive path")
    p.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (internal)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    if args.variant:
        print(json.dumps(one_step(args.variant, args)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    naive, fused = results["naive"], results["fused"]
    report = {**run_info(device="cpu"), "vocab": args.vocab, "positions": args.positions, "hidden": args.hidden,
              "k": args.k, **results,
              "ratio_step_peak": fused["step_peak"] / naive["step_peak"],
              "ratio_peak_rss": fused["peak_rss"] / naive["peak_rss"],
              "loss_rel_diff": abs(fused["loss"] - naive["loss"]) / abs(naive["loss"])}
    print(f"machine: {describe(report['machine'])}")
    print(f"V {args.vocab}, {args.positions} positions, hidden {args.hidden}, top-{args.k}")
    print(f"{'variant':<7} {'chunk':>6} {'step peak GB':>13} {'peak RSS GB':>12} {'seconds':>8}")
    for r in (naive, fused):
        print(f"{r['variant']:<7} {r['chunk']:>6} {r['step_peak'] / 1e9:>13.2f} {r['peak_rss'] / 1e9:>12.2f} "
              f"{r['seconds']:>8.1f}")
    print(f"fused / naive: step peak {report['ratio_step_peak']:.3f} (target <= 0.15), "
          f"process peak RSS {report['ratio_peak_rss']:.3f}; loss rel. diff {report['loss_rel_diff']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
