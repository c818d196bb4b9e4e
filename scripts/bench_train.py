"""Training throughput of the BitNet student vs the same model with quantization off.

Both models (same shapes, same loss, same optimizer) run full training steps (forward, the
KD + CE loss on Top-K traces, backward, AdamW) on the same random batch; measurements are
interleaved in alternating order (quantized, dense, dense, quantized, ...) so drift on a shared machine hits both. The
matmul peak is measured in the same run and gives MFU = achieved FLOP/s / peak FLOP/s,
with FLOPs per token counted on the meta device.

    python scripts/bench_train.py                  # mini, batch 8 x 256, vocab 49152
    python scripts/bench_train.py --model tiny --vocab 512 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bitnet_kde.losses import DistillationLoss, LossConfig
from bitnet_kde.model import BitNetConfig, BitNetLM
from bitnet_kde.model.sizing import measure_flops_per_token
from bitnet_kde.runinfo import describe, run_info


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 GEMM throughput (FLOP/s) of an n x n product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def make_batch(batch: int, seq: int, vocab: int, k: int, gen: torch.Generator) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    teacher = torch.randn(batch, seq, vocab, generator=gen).log_softmax(-1)
    top_lp, top_ids = teacher.topk(k, dim=-1)
    other = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-6))
    loss_mask = torch.ones(batch, seq, dtype=torch.bool)
    loss_mask[:, : seq // 8] = False  # a prompt
    loss_mask[:, -1] = False
    return {"input_ids": ids, "loss_mask": loss_mask, "kd_valid": loss_mask.clone(),
            "format_mask": torch.zeros_like(loss_mask), "topk_ids": top_ids, "topk_logprobs": top_lp,
            "other_logprob": other}


def timed_steps(model, loss_fn, opt, batch, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        out = loss_fn(model(batch["input_ids"]), batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the median round counts")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    torch.manual_seed(0)
    peak = matmul_peak()
    batch = make_batch(args.batch, args.seq, args.vocab, args.k, torch.Generator().manual_seed(0))
    loss_fn = DistillationLoss(LossConfig())
    runs = {}
    for name, quantize in (("bitnet", True), ("dense", False)):
        cfg = BitNetConfig.from_name(args.model, vocab_size=args.vocab, quantize=quantize,
                                     max_seq_len=max(args.seq, 256))
        model = BitNetLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        timed_steps(model, loss_fn, opt, batch, 1)  # warm-up (allocator, kernels)
        runs[name] = {"model": model, "opt": opt, "times": [], "cfg": cfg}
    for i in range(args.rounds):
        # Alternate the order (AB, BA, ...) so neither variant always runs on a warmer cache.
        for r in (list(runs.values()) if i % 2 == 0 else list(runs.values())[::-1]):
            r["times"].append(timed_steps(r["model"], loss_fn, r["opt"], batch, args.steps))

    tokens = args.batch * args.seq
    flops_tok = measure_flops_per_token(runs["bitnet"]["cfg"], args.seq)
    result = {**run_info(device="cpu"), "model": args.model, "params": runs["bitnet"]["model"].num_parameters(),
              "batch": [args.batch, args.seq], "vocab": args.vocab, "k": args.k,
              "matmul_peak_gflops": peak / 1e9, "flops_per_token_train": flops_tok}
    for name, r in runs.items():
        sec = statistics.median(r["times"])
        result[name] = {"sec_per_step": sec, "tokens_per_sec": tokens / sec, "mfu": flops_tok * tokens / sec / peak}
    result["ratio_bitnet_over_dense_time"] = result["bitnet"]["sec_per_step"] / result["dense"]["sec_per_step"]

    print(f"machine: {describe(result['machine'])}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{args.model}: {result['params'] / 1e6:.1f}M params, batch {args.batch}x{args.seq}, vocab {args.vocab}")
    print(f"{'variant':<8} {'s/step':>8} {'tokens/s':>10} {'MFU':>7}")
    for name in runs:
        r = result[name]
        print(f"{name:<8} {r['sec_per_step']:>8.3f} {r['tokens_per_sec']:>10.1f} {100 * r['mfu']:>6.1f}%")
    print(f"time ratio bitnet/dense: {result['ratio_bitnet_over_dense_time']:.3f} (target <= 1.15)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
