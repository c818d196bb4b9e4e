"""The 7B dry-run: exact size, analytic memory plan, and a real packed forward pass at A8 and A4.

Steps (SPEC §9):

1. Build the model on the `meta` device (no memory) and count parameters exactly.
2. Memory plan from those counts: packed inference, bf16 inference, and training per GPU under
   FSDP full sharding for several GPU counts (assumptions are written into the report).
3. Materialize the model **directly in packed form**, one block at a time: every quantized
   layer gets random 2-bit codes generated in small chunks straight into its uint8 buffer, so
   no full-size fp32 (or int64) weight tensor ever exists. Norms are ones, the tied embedding is
   random fp32.
4. Forward a [batch, seq_len] batch at A8 and at A4: finite logits, A8-vs-A4 agreement (top-1
   match, KL), wall time, seconds per token, peak memory.

The weights are random, so the logits mean nothing linguistically; what the run shows is that the
model fits, runs, and how far A4 moves its output distribution from A8 for the same weights.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import nn

from bitnet_kde.model.bitnet import BitLinear, BitNetConfig, BitNetLM, PackedBitLinear
from bitnet_kde.model.export import packed_skeleton, set_rope_buffers

log = logging.getLogger(__name__)
CODE_CHUNK = 1 << 20
"""Bytes of random codes generated per step: cache-sized, no large temporaries."""


# --------------------------------------------------------------------------------------------
# 1. exact size on the meta device
# --------------------------------------------------------------------------------------------


def count_parameters(cfg: BitNetConfig) -> dict:
    """Exact parameter counts of `BitNetLM(cfg)`, built on the meta device (allocates nothing)."""
    with torch.device("meta"):
        model = BitNetLM(cfg)
    bit = [m for m in model.modules() if isinstance(m, BitLinear)]
    bitlinear = sum(m.weight.numel() for m in bit)
    embedding = model.embed.weight.numel()
    total = model.num_parameters()  # tied weights counted once
    lm_head = 0 if cfg.tie_embeddings else model.lm_head.weight.numel()
    block = sum(p.numel() for p in model.blocks[0].parameters())
    block_bitlinear = sum(m.weight.numel() for m in model.blocks[0].modules() if isinstance(m, BitLinear))
    return {
        "total": total,
        "embedding": embedding,
        "lm_head_untied": lm_head,
        "bitlinear": bitlinear,
        "norm": total - bitlinear - embedding - lm_head,
        "per_block": block,
        "per_block_bitlinear": block_bitlinear,
        "bitlinear_matrices": len(bit),
        "largest_matrix": max(m.weight.numel() for m in bit),
        # exactly what PackedBitLinear stores: ceil(numel / 4) code bytes + one fp32 scale
        "packed_ternary_bytes": sum((m.weight.numel() + 3) // 4 + 4 for m in bit),
    }


# --------------------------------------------------------------------------------------------
# 2. analytic memory plan
# --------------------------------------------------------------------------------------------


def activation_elems_per_token_block(cfg: BitNetConfig) -> int:
    """Activation elements one block saves for backward, per token (what autograd keeps here).

    Every RMSNorm keeps its input and its normalized (pre-weight) output; every quantized linear
    keeps its quantized input (q/k/v and gate/up share one). Attention: block input, normed,
    quantized, q, k, v, attention output, SubLN input, SubLN normed, quantized o_proj input.
    FFN: residual input, normed, quantized, relu output, its square, up output, their product
    (SubLN input), SubLN normed, quantized down_proj input. Per-token scalars (inverse RMS,
    attention logsumexp) are left out. `tests/test_dryrun.py` checks this against the tensors
    autograd really saves; fused norm kernels (CUDA) save less, so this is an upper bound there.
    """
    d, kv, f = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    return (8 * d + 2 * kv) + (3 * d + 6 * f)


def memory_plan(cfg: BitNetConfig, counts: dict, *, gpus=(1, 8, 64), train_seq_len: int = 2048,
                train_micro_batch: int = 1, gpu_memory_gb: float = 80.0) -> dict:
    """Inference and per-GPU training memory in bytes, with the assumptions spelled out."""
    p, emb = counts["total"], counts["embedding"] + counts["lm_head_untied"]
    norms = counts["norm"]
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # K and V, bf16
    inference = {
        "packed_ternary_fp16_embedding": counts["packed_ternary_bytes"] + 2 * emb + 4 * norms,
        "packed_ternary_fp32_embedding": counts["packed_ternary_bytes"] + 4 * emb + 4 * norms,
        "bf16": 2 * p,
        "fp32": 4 * p,
        "kv_cache_bf16_per_token": kv_per_token,
        "kv_cache_bf16_at_max_seq_len": kv_per_token * cfg.max_seq_len,
    }
    tokens = train_seq_len * train_micro_batch
    block, block_bit = counts["per_block"], counts["per_block_bitlinear"]
    act_block = 2 * tokens * activation_elems_per_token_block(cfg)  # bf16
    saved_weights_block = 2 * block_bit  # bf16 dequantized ternary weights that F.linear saves
    head = 2 * 2 * tokens * cfg.vocab_size  # bf16 logits and their gradient
    activations = {
        "none": cfg.n_layers * (act_block + saved_weights_block) + head,
        # per-block checkpointing: block inputs stay, one block is recomputed at a time
        "per_block_checkpointing": cfg.n_layers * 2 * tokens * cfg.d_model + act_block + saved_weights_block + head,
    }
    gathered = 2 * 2 * block + 2 * block  # two bf16 blocks gathered (prefetch) + one block's bf16 grads
    training = []
    for n in gpus:
        sharded = 16 * p / n  # fp32 weights 4 + fp32 grads 4 + AdamW exp_avg 4 + exp_avg_sq 4
        for ac, act in activations.items():
            total = sharded + gathered + act
            training.append({"gpus": n, "activation_checkpointing": ac, "sharded_states": int(sharded),
                             "gathered_params_grads": gathered, "activations": act, "total": int(total),
                             f"fits_{gpu_memory_gb:g}GB": total <= gpu_memory_gb * 1e9})
    return {
        "inference": inference,
        "training_per_gpu": training,
        "assumptions": {
            "inference": "weights only (no activations); packed = ceil(n/4) bytes of 2-bit codes + one fp32 scale "
                         "per matrix; embedding/LM head (tied) in fp16 or fp32; norms fp32; KV cache listed "
                         "separately (bf16, batch 1)",
            "training": f"FSDP full shard over N GPUs, bf16 mixed precision, AdamW: fp32 latent weights, fp32 "
                        f"grads and two fp32 AdamW states sharded (16 B/param / N); one FSDP unit per block with "
                        f"prefetch (2 blocks of bf16 params gathered + 1 block of bf16 grads); activations for a "
                        f"micro-batch of {train_micro_batch} x {train_seq_len} tokens per GPU in bf16, not sharded; "
                        f"each BitLinear saves its dequantized bf16 weight for backward (held for all blocks "
                        f"without checkpointing, for one block with it); LM head: bf16 logits + their gradient; "
                        f"framework overhead, fragmentation and communication buffers not included",
            "train_seq_len": train_seq_len,
            "train_micro_batch": train_micro_batch,
            "activation_elems_per_token_per_block": activation_elems_per_token_block(cfg),
            "gpu_memory_gb": gpu_memory_gb,
        },
    }


# --------------------------------------------------------------------------------------------
# 3. packed materialization, layer by layer
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def fill_random_codes(packed: torch.Tensor, generator: torch.Generator) -> None:
    """Fill a uint8 buffer with random packed ternary codes, in place, chunk by chunk.

    Random bytes hold four uniform 2-bit fields; the invalid code 3 (binary 11) is folded onto
    code 1 (value 0) by clearing its high bit, giving P(-1) = P(+1) = 1/4 and P(0) = 1/2 — a
    plausible ternary mix. Only chunk-sized temporaries exist.
    """
    n = packed.numel()
    tmp = torch.empty(CODE_CHUNK, dtype=torch.uint8, device=packed.device)
    with _single_thread(packed.device):
        _fill(packed, tmp, n, generator)


@contextmanager
def _single_thread(device: torch.device):
    """Run many small CPU ops on one thread: each op is ~1 MB, too small to gain from a second
    thread, and on a busy machine every parallel region waits for a core (measured: minutes
    instead of seconds for the 7B codes while another job held the CPUs)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fill(packed: torch.Tensor, tmp: torch.Tensor, n: int, generator: torch.Generator) -> None:
    for start in range(0, n, CODE_CHUNK):
        x = packed[start:start + CODE_CHUNK]
        # 32-bit draws fill four bytes each (4x faster than byte-wise draws); all 2^32 values are uniform
        tmp.view(torch.int32).random_(-2**31, 2**31, generator=generator)
        t = tmp[: x.numel()]
        x.copy_(t)
        torch.bitwise_right_shift(x, 1, out=t)
        t &= x  # low bit of each field: both bits of the field were set
        t &= 0x55
        t <<= 1
        x ^= t  # clear the high bit of every field that was 3


def materialize_packed(cfg: BitNetConfig, *, device: str | torch.device = "cpu", seed: int = 0,
                       on_block=None) -> BitNetLM:
    """The model of `cfg` in packed form with random weights, built block by block from meta.

    Scales follow what a fresh `BitNetLM` would quantize to (mean|W| of its normal init, smaller
    on residual outputs), so activations keep a realistic size through the depth.
    `on_block(i, model)` is called after each block is materialized (memory probes).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    model = packed_skeleton(cfg)
    mean_abs = cfg.init_std * math.sqrt(2 / math.pi)  # E|w| for w ~ N(0, init_std^2)
    resid = mean_abs / math.sqrt(2 * cfg.n_layers)
    for i, block in enumerate(model.blocks):
        for name, layer in list(block.named_modules()):
            if isinstance(layer, PackedBitLinear):
                layer.packed = torch.empty_like(layer.packed, device=device)
                fill_random_codes(layer.packed, gen)
                scale = resid if name.endswith(("o_proj", "down_proj")) else mean_abs
                layer.scale = torch.tensor(scale, dtype=torch.float32, device=device)
        _materialize_norms(block, device)
        if on_block is not None:
            on_block(i, model)
    _materialize_norms(model.norm, device)
    weight = torch.empty(cfg.vocab_size, cfg.d_model, device=device)
    weight.normal_(0.0, cfg.init_std, generator=gen)
    model.embed.weight = nn.Parameter(weight, requires_grad=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    else:
        head = torch.empty(cfg.vocab_size, cfg.d_model, device=device).normal_(0.0, cfg.init_std, generator=gen)
        model.lm_head.weight = nn.Parameter(head, requires_grad=False)
    set_rope_buffers(model, device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device: {leftover[:5]}")
    return model.eval()


def _materialize_norms(module: nn.Module, device: torch.device) -> None:
    for m in module.modules():
        if m.__class__.__name__ == "RMSNorm":
            m.weight = nn.Parameter(torch.ones(m.weight.shape[0], device=device), requires_grad=False)


# --------------------------------------------------------------------------------------------
# 4. forward at A8 and A4
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
    """Everything above for `BitNetConfig.from_name(**model)`; returns the report dict."""
    t_start = time.perf_counter()
    model = dict(model)
    cfg = BitNetConfig.from_name(model.pop("name"), **{k: v for k, v in model.items() if v is not None})
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
    cached = [m for m in net.bitlinears() if m.cache_unpacked or m._unpacked is not None]
    if cached:
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
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        },
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
