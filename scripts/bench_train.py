"""Training throughput of the BitNet student vs the same model with quantization off.

Both models (same shapes, same loss, same optimizer) run full training steps (forward, the
KD + CE loss on Top-K traces, backward, AdamW) on the same random batch; measurements are
interleaved in alternating order (quantized, dense, dense, quantized, ...) so drift on a shared machine hits both. The
matmul peak is measured in the same run and gives MFU = achieved FLOP/s / peak FLOP/s,
with FLOPs per token counted on the meta device.

The loss is the training step's: `DistillationLoss` on `ProjectedLogits` (the fused head +
loss, no [B, T, V] logits).

    python scripts/bench_train.py                  # mini, batch 8 x 256, vocab 49152
    python scripts/bench_train.py --model tiny --vocab 512 --rounds 2
    python scripts/bench_train.py --override model.d_model=384 --override model.n_heads=6   # another width
    python scripts/bench_train.py --memory         # 7b widths, 2 blocks: activation memory, predicted vs measured
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python scripts/bench_train.py --churn 8   # sys time, faults
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import weakref
from dataclasses import fields

import torch
from omegaconf import OmegaConf

from bitnet_kde.dryrun import rss_bytes
from bitnet_kde.losses import DistillationLoss, LossConfig
from bitnet_kde.model import BitNetConfig, BitNetLM
from bitnet_kde.model.sizing import measure_flops_per_token
from bitnet_kde.runinfo import describe, run_info


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """`model.*` / `loss.*` overrides in train.yaml's dotted form (`model.d_model=384`), as
    {"model": BitNetConfig fields, "loss": LossConfig fields}; other keys do not shape the step."""
    given = OmegaConf.to_container(OmegaConf.from_dotlist(items))
    out = {"model": given.pop("model", {}), "loss": given.pop("loss", {})}
    if given or not all(isinstance(v, dict) for v in out.values()):
        raise ValueError(f"--override {' '.join(items)}: only model.<field>=value and loss.<field>=value "
                         "shape the benchmarked step")
    if "quantize" in out["model"]:
        raise ValueError("--override model.quantize: the benchmark times the quantized and the dense model both")
    unknown = set(out["loss"]) - {f.name for f in fields(LossConfig)}
    if unknown:
        raise ValueError(f"--override: unknown LossConfig fields {sorted(unknown)}")
    return out


def model_config(args, **fixed) -> BitNetConfig:
    """The `--model` preset at `--vocab` and a context of at least 256, with the `model.*` overrides."""
    spec = {"vocab_size": args.vocab, "max_seq_len": max(args.seq, 256), **args.overrides["model"], **fixed}
    return BitNetConfig.from_name(args.model, **spec)


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


def step_loss(model, loss_fn, batch, fused: bool = True) -> dict:
    """The training step's loss: fused head + loss, or (`fused=False`) through full logits."""
    if not fused:
        return loss_fn(model(batch["input_ids"]), batch)
    from bitnet_kde.losses import ProjectedLogits

    # through forward, as the training step asks (FSDP2 gathers the root's parameters in its hooks)
    hidden = model(batch["input_ids"], return_hidden=True)
    return loss_fn(ProjectedLogits(hidden, model.lm_head.weight), batch)


def timed_steps(model, loss_fn, opt, batch, steps: int, fused: bool = True, clock=time.perf_counter) -> float:
    t = clock()
    for _ in range(steps):
        out = step_loss(model, loss_fn, batch, fused)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (clock() - t) / steps


def step_memory(n_layers: int = 2, seq: int = 256, fused: bool = True) -> dict:
    """Activation memory of one fp32 training step of the `7b` widths with `n_layers` blocks.

    `saved_bytes`: distinct non-parameter storages autograd keeps for backward (from
    `saved_tensors_hooks`): the activation memory the plan predicts. `step_peak_rss`: the process's
    peak RSS during forward + backward over its RSS before, with the gradients already allocated
    (so the figure is activations and transients, not the gradients themselves).
    """
    torch.manual_seed(0)
    cfg = BitNetConfig.from_name("7b", n_layers=n_layers, max_seq_len=max(seq, 256))
    model = BitNetLM(cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    batch = make_batch(1, seq, cfg.vocab_size, 20, torch.Generator().manual_seed(0))
    loss_fn = DistillationLoss(LossConfig())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = (weakref.ref(t), s.nbytes())
        return t

    before = rss_bytes()["rss"]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step_loss(model, loss_fn, batch, fused)
    # what the graph still holds when backward starts (a loss-internal graph is gone by then)
    held = sum(n for ref, n in saved.values() if ref() is not None)
    out["loss"].backward()
    return {"n_layers": n_layers, "seq": seq, "fused": fused, "saved_bytes": held,
            "step_peak_rss": rss_bytes()["peak_rss"] - before}


def churn_steps(steps: int, args, fused: bool = True) -> dict:
    """CPU time split and minor page faults of `steps` training steps (after one warm-up step).

    What `make train` spends per step outside Lightning: the same model, loss and AdamW on one
    batch. Run it under the allocator settings to compare (`TRAIN_MALLOC_ENV` in the Makefile).
    """
    torch.manual_seed(0)
    model = BitNetLM(model_config(args))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = make_batch(args.batch, args.seq, args.vocab, args.k, torch.Generator().manual_seed(0))
    loss_fn = DistillationLoss(LossConfig(**args.overrides["loss"]))

    def step():
        step_loss(model, loss_fn, batch, fused)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return {"steps": steps, "fused": fused, "wall_per_step": wall / steps, "user": user, "sys": sys_,
            "sys_fraction": sys_ / (user + sys_), "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}


def memory_report(n_layers: int, seq: int) -> dict:
    from bitnet_kde.model.sizing import training_activation_bytes

    cfg = BitNetConfig.from_name("7b", n_layers=n_layers)
    predicted = training_activation_bytes(cfg, seq, bytes_per_elem=4)
    measured = step_memory(n_layers, seq)
    print(f"7b widths, {n_layers} blocks, 1 x {seq} tokens, fp32")
    print(f"predicted saved activations of the blocks: {predicted['blocks'] / 1e9:.3f} GB; measured (whole step): "
          f"{measured['saved_bytes'] / 1e9:.3f} GB")
    print(f"predicted peak (+ one rebuilt matrix + fused-loss chunk buffers): {predicted['total'] / 1e9:.3f} GB; "
          f"measured step peak RSS: {measured['step_peak_rss'] / 1e9:.3f} GB")
    return {**run_info(device="cpu"), "predicted": predicted, "measured": measured}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the median round counts")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="seconds of wall clock, or of this process's CPU time (steadier on a busy machine)")
    p.add_argument("--unfused", action="store_true", help="also time the BitNet step through full logits")
    p.add_argument("--churn", type=int, metavar="STEPS", help="CPU time split and page faults of STEPS steps instead")
    p.add_argument("--memory", action="store_true", help="activation memory of a 7b-width step instead")
    p.add_argument("--layers", type=int, default=2, help="blocks of the --memory model")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a train.yaml model.* or loss.* setting, e.g. model.d_model=384 (repeatable)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    try:
        args.overrides = parse_overrides(args.override)
    except ValueError as e:
        p.error(str(e))
    if args.memory and args.override:
        p.error("--override: --memory measures the fixed 7b widths; drop the overrides or --memory")
    if args.churn:
        result = {**run_info(device="cpu"), "overrides": args.override, **churn_steps(args.churn, args)}
        print(json.dumps(result))
        return
    if args.memory:
        result = memory_report(args.layers, args.seq)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return

    torch.manual_seed(0)
    peak = matmul_peak()
    batch = make_batch(args.batch, args.seq, args.vocab, args.k, torch.Generator().manual_seed(0))
    loss_fn = DistillationLoss(LossConfig(**args.overrides["loss"]))
    # process CPU time (all threads) holds up better than wall time on a machine shared with other jobs
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    variants = [("bitnet", True, True), ("dense", False, True)]
    if args.unfused:
        variants.append(("bitnet_logits", True, False))  # the loss on full [B, T, V] logits
    runs = {}
    for name, quantize, fused in variants:
        cfg = model_config(args, quantize=quantize)
        model = BitNetLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        timed_steps(model, loss_fn, opt, batch, 1, fused)  # warm-up (allocator, kernels)
        runs[name] = {"model": model, "opt": opt, "times": [], "cfg": cfg, "fused": fused}
    for i in range(args.rounds):
        # Alternate the order (AB, BA, ...) so neither variant always runs on a warmer cache.
        for r in (list(runs.values()) if i % 2 == 0 else list(runs.values())[::-1]):
            r["times"].append(timed_steps(r["model"], loss_fn, r["opt"], batch, args.steps, r["fused"], clock))

    tokens = args.batch * args.seq
    flops_tok = measure_flops_per_token(runs["bitnet"]["cfg"], args.seq)
    result = {**run_info(device="cpu"), "model": args.model, "params": runs["bitnet"]["model"].num_parameters(),
              "overrides": args.override, "batch": [args.batch, args.seq], "vocab": args.vocab, "k": args.k,
              "matmul_peak_gflops": peak / 1e9, "flops_per_token_train": flops_tok}
    for name, r in runs.items():
        sec = statistics.median(r["times"])
        result[name] = {"sec_per_step": sec, "tokens_per_sec": tokens / sec, "mfu": flops_tok * tokens / sec / peak}
    result["clock"] = args.clock
    result["ratio_bitnet_over_dense_time"] = result["bitnet"]["sec_per_step"] / result["dense"]["sec_per_step"]
    if args.unfused:
        result["ratio_fused_over_logits_time"] = (result["bitnet"]["sec_per_step"]
                                                  / result["bitnet_logits"]["sec_per_step"])

    print(f"machine: {describe(result['machine'])}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{' '.join([args.model, *args.override])}: {result['params'] / 1e6:.1f}M params, "
          f"batch {args.batch}x{args.seq}, vocab {args.vocab}")
    print(f"{'variant':<13} {'s/step':>8} {'tokens/s':>10} {'MFU':>7}")
    for name in runs:
        r = result[name]
        print(f"{name:<13} {r['sec_per_step']:>8.3f} {r['tokens_per_sec']:>10.1f} {100 * r['mfu']:>6.1f}%")
    print(f"time ratio bitnet/dense: {result['ratio_bitnet_over_dense_time']:.3f} (target <= 1.15)")
    if args.unfused:
        print(f"time ratio fused loss / loss on logits: {result['ratio_fused_over_logits_time']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
