"""The 7B dry-run: exact size, analytic memory plan, and a real packed forward pass at A8 and A4.

Steps (`docs/BENCHMARKS.md` shows a run):

1. Count parameters exactly on the `meta` device (`model.sizing.count_parameters`).
2. Memory plan from those counts: packed inference, bf16 inference, and training per GPU under
   FSDP full sharding for several GPU counts (`model.sizing.memory_plan`; the assumptions are
   written into the report).
3. Materialize the model **directly in packed form**, one block at a time, with random 2-bit
   codes (`model.packed.materialize_packed`), so no full-size fp32 weight tensor ever exists.
4. Forward a [batch, seq_len] batch at A8 and at A4: finite logits, A8-vs-A4 agreement (top-1
   match, KL), wall time, seconds per token, peak memory.

The weights are random, so the logits mean nothing linguistically; what the run shows is that the
model fits, runs, and how far A4 moves its output distribution from A8 for the same weights.
"""

from __future__ import annotations

import logging
import platform
import resource
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from bitnet_kde.model import BitNetConfig, BitNetLM
from bitnet_kde.model.packed import materialize_packed
from bitnet_kde.model.sizing import count_parameters, memory_plan
from bitnet_kde.runinfo import run_info

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# forward at A8 and A4
# --------------------------------------------------------------------------------------------


def rss_bytes() -> dict:
    """Current and peak resident set size of this process (VmRSS / VmHWM)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024
    except OSError:  # not Linux: getrusage gives the peak (KiB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["VmHWM"] = peak if platform.system() == "Darwin" else peak * 1024
    return {"rss": out.get("VmRSS", out.get("VmHWM", 0)), "peak_rss": out.get("VmHWM", 0)}


@torch.inference_mode()
def forward_check(model: BitNetLM, input_ids: torch.Tensor) -> dict:
    """Forward `input_ids` at A8 and A4; agreement, timing and finiteness of both."""
    results, logprobs = {}, {}
    n_tokens = input_ids.numel()
    for bits in (8, 4):
        model.set_activation_bits(bits)
        sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        logits = model(input_ids)
        sync()
        wall = time.perf_counter() - t0
        lp = F.log_softmax(logits.float(), dim=-1)
        logprobs[bits] = lp
        results[f"A{bits}"] = {
            "finite": bool(torch.isfinite(logits).all()),
            "seconds": round(wall, 3),
            "seconds_per_token": wall / n_tokens,
            "tokens_per_second": n_tokens / wall,
            "logit_std": float(logits.float().std()),
            "entropy_mean": float(-(lp.exp() * lp).sum(-1).mean()),
        }
        del logits
    lp8, lp4 = logprobs[8], logprobs[4]
    kl = (lp8.exp() * (lp8 - lp4)).sum(-1)  # KL(A8 || A4) per position
    results["agreement"] = {
        "top1_match": float((lp8.argmax(-1) == lp4.argmax(-1)).float().mean()),
        "kl_a8_a4_mean": float(kl.mean()),
        "kl_a8_a4_max": float(kl.max()),
        "max_abs_logprob_diff": float((lp8 - lp4).abs().max()),
    }
    model.set_activation_bits(8)
    return results


# --------------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------------


def model_name(cfg: BitNetConfig) -> str:
    return f"d {cfg.d_model}, {cfg.n_layers} layers, FFN {cfg.ffn_dim}, vocab {cfg.vocab_size}"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_dryrun(model: dict, *, seq_len: int = 128, batch_size: int = 1, seed: int = 0, device: str = "auto",
               plan: dict | None = None) -> dict:
    """Everything above for the model `{"name": preset, **fields}` (a null field keeps the preset's
    value); returns the report dict."""
    t_start = time.perf_counter()
    cfg = BitNetConfig.from_spec({k: v for k, v in model.items() if v is not None})
    cfg = replace(cfg, activation_bits=8)
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    dev = resolve_device(device)

    counts = count_parameters(cfg)
    mem = memory_plan(cfg, counts, **(plan or {}))

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    before = rss_bytes()
    per_block_rss = []

    def probe(i: int, _model) -> None:
        per_block_rss.append(rss_bytes()["rss"])
        if (i + 1) % 8 == 0 or i + 1 == cfg.n_layers:
            log.info("materialized %d/%d blocks in packed form, RSS %.2f GB", i + 1, cfg.n_layers,
                     per_block_rss[-1] / 1e9)

    log.info("%s: %s parameters (%s in BitLinears); materializing on %s", model_name(cfg), f"{counts['total']:,}",
             f"{counts['bitlinear']:,}", dev)
    t0 = time.perf_counter()
    net = materialize_packed(cfg, device=dev, seed=seed, on_block=probe)
    materialize_s = time.perf_counter() - t0
    after = rss_bytes()
    held = net.weight_bytes()
    if any(m.keeps_unpacked for m in net.bitlinears()):
        raise RuntimeError("a packed layer caches its unpacked weight; the dry-run must unpack one at a time")

    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen).to(dev)
    log.info("forward [%d, %d] at A8 and A4", batch_size, seq_len)
    fwd = forward_check(net, ids)
    end = rss_bytes()
    peak = {
        "rss_before_materialize": before["rss"],
        "rss_after_materialize": after["rss"],
        "peak_rss": end["peak_rss"],
        "peak_rss_growth": end["peak_rss"] - before["rss"],
        "rss_growth_per_block": (per_block_rss[-1] - per_block_rss[0]) / max(len(per_block_rss) - 1, 1)
        if len(per_block_rss) > 1 else None,
        "weights_held_bytes": held["total"],
        "ternary_bytes_held": held["ternary"],
    }
    if dev.type == "cuda":
        peak["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(dev)

    return {
        **run_info(dev),
        "model": cfg.to_dict(),
        "parameters": counts,
        "memory_plan": mem,
        "materialization": {
            "form": "packed ternary (2-bit codes + fp32 scale per matrix), built block by block from meta",
            "codes": "random; P(-1) = P(+1) = 1/4, P(0) = 1/2",
            "scale": "mean|W| of the model's normal init (std init_std, residual outputs / sqrt(2 n_layers))",
            "embedding": "random normal fp32, tied to the LM head" if cfg.tie_embeddings else "random normal fp32",
            "seconds": round(materialize_s, 3),
        },
        "forward": {"batch_size": batch_size, "seq_len": seq_len, "seed": seed, "compute_dtype": "float32", **fwd},
        "memory": peak,
        "total_seconds": round(time.perf_counter() - t_start, 3),
    }


# --------------------------------------------------------------------------------------------
# readable output
# --------------------------------------------------------------------------------------------


def _gb(n) -> str:
    return f"{n / 1e9:,.2f} GB"


def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough that no table wraps
            console = Console(width=120)
    c, p, m = report["model"], report["parameters"], report["memory_plan"]
    t = Table(title=f"Parameters — {model_name(BitNetConfig(**c))}", min_width=64)
    t.add_column("part")
    t.add_column("parameters", justify="right")
    for key in ("total", "bitlinear", "embedding", "norm"):
        t.add_row(key, f"{p[key]:,}")
    console.print(t)

    inf = m["inference"]
    t = Table(title="Inference memory (weights)", min_width=64)
    t.add_column("layout")
    t.add_column("bytes", justify="right")
    for key, label in [("packed_ternary_fp16_embedding", "packed ternary + fp16 embedding"),
                       ("packed_ternary_fp32_embedding", "packed ternary + fp32 embedding"),
                       ("bf16", "bf16 weights"), ("fp32", "fp32 weights"),
                       ("kv_cache_bf16_at_max_seq_len", f"KV cache bf16, {c['max_seq_len']} tokens")]:
        t.add_row(label, _gb(inf[key]))
    console.print(t)

    a = m["assumptions"]
    t = Table(title=f"Training memory per GPU — FSDP full shard, bf16 mixed, AdamW, "
                    f"micro-batch {a['train_micro_batch']} x {a['train_seq_len']}")
    for col in ("GPUs", "activation checkpointing", "sharded states", "gathered block", "activations", "total",
                f"fits {a['gpu_memory_gb']:g} GB"):
        t.add_column(col, justify="right")
    fit_key = f"fits_{a['gpu_memory_gb']:g}GB"
    for row in m["training_per_gpu"]:
        t.add_row(str(row["gpus"]), row["activation_checkpointing"].replace("_", " "), _gb(row["sharded_states"]),
                  _gb(row["gathered_params_grads"]), _gb(row["activations"]), _gb(row["total"]),
                  "yes" if row[fit_key] else "no")
    console.print(t)

    f, mem = report["forward"], report["memory"]
    t = Table(title=f"Packed forward pass on {report['machine']['device']} — batch {f['batch_size']} x {f['seq_len']}",
              min_width=64)
    t.add_column("measure")
    t.add_column("A8", justify="right")
    t.add_column("A4", justify="right")
    t.add_row("finite logits", str(f["A8"]["finite"]), str(f["A4"]["finite"]))
    t.add_row("forward seconds", f"{f['A8']['seconds']:.2f}", f"{f['A4']['seconds']:.2f}")
    t.add_row("seconds per token", f"{f['A8']['seconds_per_token']:.4f}", f"{f['A4']['seconds_per_token']:.4f}")
    ag = f["agreement"]
    t.add_row("top-1 match A8 vs A4", f"{ag['top1_match']:.3f}", "")
    t.add_row("KL(A8 || A4) mean / max", f"{ag['kl_a8_a4_mean']:.4f}", f"{ag['kl_a8_a4_max']:.4f}")
    console.print(t)

    t = Table(title="Measured memory", min_width=64)
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("weights held (packed + embedding + norms)", _gb(mem["weights_held_bytes"]))
    t.add_row("RSS before materialization", _gb(mem["rss_before_materialize"]))
    t.add_row("RSS after materialization", _gb(mem["rss_after_materialize"]))
    t.add_row("peak RSS (process)", _gb(mem["peak_rss"]))
    if "cuda_max_memory_allocated" in mem:
        t.add_row("CUDA max memory allocated", _gb(mem["cuda_max_memory_allocated"]))
    t.add_row("materialization seconds", f"{report['materialization']['seconds']:.1f}")
    t.add_row("total seconds", f"{report['total_seconds']:.1f}")
    console.print(t)
