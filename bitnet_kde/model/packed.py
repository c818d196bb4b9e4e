"""The packed form of a `BitNetLM`: every `BitLinear` replaced by a `PackedBitLinear`.

One swap helper (`swap_bitlinears`) does the replacement for all of them:

- `pack(model)`: in place, from the trained latent weights (logits stay bit-identical);
- `packed_copy(model)`: a packed model next to the training one, sharing its embedding and norms;
- `packed_skeleton(cfg)`: empty packed layers on the `meta` device, for a loader (or the
  materialization below) to assign real tensors to, so no fp32 weight is ever allocated;
- `materialize_packed(cfg)`: the packed model with random codes, built block by block from
  meta (the 7B dry-run: a model that size fits in memory only in this form).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from bitnet_kde.model.bitnet import BitLinear, BitNetConfig, BitNetLM, PackedBitLinear, RMSNorm, rope_tables

CODE_CHUNK = 1 << 20
"""Bytes of random codes generated per step: cache-sized, no large temporaries."""


def swap_bitlinears(model: BitNetLM, make: Callable[[str, BitLinear], nn.Module]) -> BitNetLM:
    """Replace every `BitLinear` of `model` by `make(name, layer)`, in place (returns `model`)."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, BitLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(name, layer))
    return model


def _require_quantized(cfg: BitNetConfig) -> None:
    if not cfg.quantize:
        raise ValueError("a dense model (quantize=False) has no packed ternary form")


def _require_ternary(model: BitNetLM) -> None:
    """Packing stores the fully ternary weights: a model still in quantization warm-up computes a
    blend with its full-precision weights, which its packed form (and every export) would not."""
    _require_quantized(model.cfg)
    if model.quant_lambda < 1.0:
        raise ValueError(f"the model is at quantization warm-up lambda={model.quant_lambda:.3f}, not fully ternary: "
                         "its packed form would compute a different function; use a checkpoint saved after "
                         "optim.quant_warmup_steps")


def pack(model: BitNetLM) -> BitNetLM:
    """Replace every BitLinear of `model` by its packed inference form, in place (returns `model`).

    The fp32 latent weights are freed; logits stay bit-identical to the quantized forward.
    """
    _require_ternary(model)
    return swap_bitlinears(model, lambda _, layer: PackedBitLinear.from_bitlinear(layer))


def packed_skeleton(cfg: BitNetConfig) -> BitNetLM:
    """`BitNetLM(cfg)` on the meta device with every BitLinear replaced by a meta `PackedBitLinear`.

    Nothing is allocated: callers assign real tensors (a loaded state dict, or freshly generated
    codes in the dry-run) module by module.
    """
    _require_quantized(cfg)
    with torch.device("meta"):
        model = BitNetLM(cfg)
    return swap_bitlinears(model, lambda _, layer: PackedBitLinear(
        layer.in_features, layer.out_features, activation_bits=cfg.activation_bits, a4_scale=cfg.a4_scale,
        device="meta"))


def set_rope_buffers(model: BitNetLM, device: str | torch.device = "cpu") -> None:
    """Rebuild the RoPE tables (non-persistent buffers, derived from the config) on `device`."""
    cfg = model.cfg
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)


def packed_copy(model: BitNetLM) -> BitNetLM:
    """A packed model (eval mode) sharing the embedding and norms of `model`; only the codes are new."""
    _require_ternary(model)
    latent_ids = {id(m.weight) for m in model.bitlinears()}
    with torch.device("meta"):
        copy = BitNetLM(model.cfg)
    swap_bitlinears(copy, lambda name, _: PackedBitLinear.from_bitlinear(model.get_submodule(name)))
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in latent_ids}
    copy.load_state_dict(state, strict=False, assign=True)
    if model.cfg.tie_embeddings:
        copy.lm_head.weight = copy.embed.weight
    set_rope_buffers(copy, model.embed.weight.device)
    return copy.eval()


# --------------------------------------------------------------------------------------------
# packed materialization with random codes
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
        if isinstance(m, RMSNorm):
            m.weight = nn.Parameter(torch.ones(m.weight.shape[0], device=device), requires_grad=False)
