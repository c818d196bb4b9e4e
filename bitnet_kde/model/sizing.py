"""How big a `BitNetLM` is and what it costs, without allocating it: exact parameter counts and
training FLOPs from the model built on the `meta` device, and the analytic memory plan.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from bitnet_kde.losses import LossConfig
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


FUSED_LOSS_BUFFERS = 6
"""fp32 [chunk, V] buffers the fused head + loss holds at its peak: the chunk's logits, the
logsumexp temporaries and the gradient pieces (6.3 measured by `scripts/bench_loss.py`)."""


def training_activation_bytes(cfg: BitNetConfig, tokens: int, *, bytes_per_elem: int = 2,
                              loss_chunk: int | None = LossConfig.chunk_size) -> dict:
    """Activation memory of one training step without checkpointing, by term, in bytes.

    `blocks`: what every block saves for backward (`activation_elems_per_token_block`, in the
    compute dtype). BitLinears keep their latent weight (a parameter) rather than a dequantized
    copy; backward rebuilds one matrix at a time, in fp32 and then the compute dtype
    (`bitlinear_rebuild`, transient). `head`: the fused head + loss holds `FUSED_LOSS_BUFFERS`
    fp32 buffers of `loss_chunk` x V plus the loss positions' hidden states and their gradient
    (fp32); no [tokens, V] logits exist.
    """
    largest = max(cfg.d_model * cfg.n_heads * cfg.head_dim, cfg.d_model * cfg.ffn_dim)
    chunk = min(loss_chunk or tokens, tokens)
    out = {
        "blocks": cfg.n_layers * bytes_per_elem * tokens * activation_elems_per_token_block(cfg),
        "bitlinear_rebuild": (4 + bytes_per_elem) * largest,
        "head": FUSED_LOSS_BUFFERS * 4 * chunk * cfg.vocab_size + 2 * 4 * tokens * cfg.d_model,
    }
    out["total"] = sum(out.values())
    return out


def memory_plan(cfg: BitNetConfig, counts: dict, *, gpus=(1, 8, 64), train_seq_len: int = 2048,
                train_micro_batch: int = 1, gpu_memory_gb: float = 80.0,
                loss_chunk: int | None = LossConfig.chunk_size) -> dict:
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
    block = counts["per_block"]
    terms = training_activation_bytes(cfg, tokens, bytes_per_elem=2, loss_chunk=loss_chunk)  # bf16
    act_block = terms["blocks"] // cfg.n_layers
    activations = {
        "none": terms["total"],
        # per-block checkpointing: block inputs stay, one block is recomputed at a time
        "per_block_checkpointing": cfg.n_layers * 2 * tokens * cfg.d_model + act_block + terms["bitlinear_rebuild"]
        + terms["head"],
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
                        f"BitLinears keep their latent weight for backward and rebuild one dequantized matrix "
                        f"at a time; LM head: fused with the loss, {FUSED_LOSS_BUFFERS} fp32 buffers of "
                        f"{loss_chunk} positions x vocabulary, no full logits; "
                        f"framework overhead, fragmentation and communication buffers not included",
            "train_seq_len": train_seq_len,
            "train_micro_batch": train_micro_batch,
            "activation_elems_per_token_per_block": activation_elems_per_token_block(cfg),
            "activation_terms": terms,
            "gpu_memory_gb": gpu_memory_gb,
        },
    }
