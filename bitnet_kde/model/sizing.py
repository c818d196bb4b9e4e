"""How big a `BitNetLM` is and what it costs, without allocating it: exact parameter counts and
training FLOPs from the model built on the `meta` device, and the analytic memory plan.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from bitnet_kde.model.bitnet import BitLinear, BitNetConfig, BitNetLM
from bitnet_kde.model.packed import packed_skeleton


def count_parameters(cfg: BitNetConfig) -> dict:
    """Exact parameter counts of `BitNetLM(cfg)`, built on the meta device (allocates nothing)."""
    with torch.device("meta"):
        model = BitNetLM(cfg)
    bit = list(model.bitlinears())
    bitlinear = sum(m.weight.numel() for m in bit)
    total = model.num_parameters()  # tied weights counted once
    embedding = total - model.num_parameters(exclude_embedding=True)
    lm_head = 0 if cfg.tie_embeddings else model.lm_head.weight.numel()
    return {
        "total": total,
        "embedding": embedding,
        "lm_head_untied": lm_head,
        "bitlinear": bitlinear,
        "norm": total - bitlinear - embedding - lm_head,
        "per_block": sum(p.numel() for p in model.blocks[0].parameters()),
        "per_block_bitlinear": sum(m.weight.numel() for m in model.blocks[0].modules() if isinstance(m, BitLinear)),
        "bitlinear_matrices": len(bit),
        "largest_matrix": max(m.weight.numel() for m in bit),
        # what the packed layers hold: ceil(numel / 4) code bytes + one fp32 scale each
        "packed_ternary_bytes": packed_skeleton(cfg).weight_bytes()["ternary"],
    }


def measure_flops_per_token(cfg: BitNetConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a [1, seq_len] batch.

    One step of `BitNetLM(cfg)` runs on the meta device under torch's FLOP counter, so nothing is
    allocated or computed; the counter sees the matrix products and attention, not elementwise work.
    """
    counter = FlopCounterMode(display=False)
    with torch.device("meta"):
        model = BitNetLM(cfg)
        x = torch.zeros(1, seq_len, dtype=torch.long)
        with counter:
            model(x).sum().backward()
    return counter.get_total_flops() / seq_len


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
    """Inference and per-GPU training memory in bytes (from `count_parameters`), with the assumptions
    spelled out."""
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
