"""BitNet b1.58 quantizers: ternary weights, per-token k-bit activations, 2-bit packing.

The training-time quantizers are *fake* quantizers: they return float tensors whose values
lie on the quantization grid, and their gradient is the straight-through estimator (STE),
i.e. the identity. Both are written as `torch.autograd.Function`s instead of the usual
`x + (q - x).detach()` trick: the result is the same, but it saves two full-size temporaries
per call, which is most of the quantization overhead on a CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "ternary_weight",
    "ternary_fractions",
    "quantize_activations",
    "fake_quant_weight",
    "fake_quant_activations",
    "ternary_linear",
    "pack_ternary",
    "unpack_ternary",
    "WEIGHT_EPS",
    "ACT_EPS",
]

WEIGHT_EPS = 1e-5
"""Added to mean|W| so an all-zero matrix gets a finite scale."""
ACT_EPS = 1e-5
"""Floor of the per-token activation scale so an all-zero token does not divide by zero."""


def ternary_weight(w: torch.Tensor, eps: float = WEIGHT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmean ternarization.

    Returns `(wq, scale)` with `wq = clamp(round(w / scale), -1, 1)` (values in {-1, 0, 1},
    same shape and dtype as `w`) and `scale = mean(|w|) + eps` (a 0-dim tensor), so that
    `wq * scale` is the dequantized weight.
    """
    # One fused pass for mean|w| (vector_norm avoids materializing |w|).
    scale = torch.linalg.vector_norm(w, ord=1) / max(w.numel(), 1) + eps
    wq = (w * (1.0 / scale)).round_().clamp_(-1, 1)
    return wq, scale


@torch.no_grad()
def ternary_fractions(w: torch.Tensor) -> dict[str, float]:
    """Fractions of -1 / 0 / +1 in the ternarized `w` and its scale (for logging)."""
    wq, scale = ternary_weight(w.float())
    n = max(wq.numel(), 1)
    return {"neg": float((wq == -1).sum()) / n, "zero": float((wq == 0).sum()) / n,
            "pos": float((wq == 1).sum()) / n, "scale": float(scale)}


def _act_levels(bits: int) -> int:
    if bits < 2:
        raise ValueError(f"activation bits must be >= 2, got {bits}")
    return 2 ** (bits - 1) - 1


def quantize_activations(x: torch.Tensor, bits: int = 8, scale_mode: str = "absmax") -> torch.Tensor:
    """Per-token symmetric fake-quantization of `x` to `bits` bits (no gradient logic).

    `Q = 2**(bits-1) - 1`; with `m = max|x|` over the last dimension,
    `x_q = clamp(round(x * Q / m), -Q - 1, Q) * m / Q`. Same shape and dtype as `x`.

    `scale_mode="absmean"` replaces `m` by `2.5 * mean|x|` (a clipped scale in the spirit of
    BitNet a4.8): at 4 bits the absmax grid wastes most levels on rare outliers.
    """
    q = _act_levels(bits)
    xf = x.float()
    # vector_norm reduces |x| in one pass without materializing it.
    if scale_mode == "absmax":
        m = torch.linalg.vector_norm(xf, ord=math.inf, dim=-1, keepdim=True)
    elif scale_mode == "absmean":
        m = 2.5 * torch.linalg.vector_norm(xf, ord=1, dim=-1, keepdim=True) / xf.shape[-1]
    else:
        raise ValueError(f"unknown activation scale_mode {scale_mode!r} (use 'absmax' or 'absmean')")
    step = m.clamp_min(ACT_EPS) / q
    out = (xf * step.reciprocal()).round_()
    if scale_mode != "absmax":  # |x| / (max|x| / Q) <= Q already: the clamp would be a no-op
        out.clamp_(-q - 1, q)
    return out.mul_(step).to(x.dtype)


class _FakeQuantActivations(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits, scale_mode, lam):  # type: ignore[override]
        xq = quantize_activations(x, bits, scale_mode)
        if lam >= 1.0:
            return xq
        return torch.lerp(x, xq, lam)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None, None


def _dequantized_weight(w: torch.Tensor, eps: float, lam: float) -> torch.Tensor:
    """`ternary(w) * scale`, blended with `w` by `lam` (a new tensor)."""
    wq, scale = ternary_weight(w, eps)
    wq = wq.mul_(scale)
    if lam >= 1.0:
        return wq
    return torch.lerp(w, wq, lam)


class _FakeQuantWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, eps, lam):  # type: ignore[override]
        return _dequantized_weight(w, eps, lam)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None


class _TernaryLinear(torch.autograd.Function):
    """`F.linear(x, fake_quant_weight(w))` that saves the latent weight instead of the dequantized one.

    The latent weight is a parameter, held anyway, so what this layer adds to the tensors kept
    for backward is only its input. Backward rebuilds the dequantized weight (one elementwise
    pass) for the input gradient; the weight gradient is the straight-through one, `g^T x`.
    """

    @staticmethod
    def forward(ctx, x, w, eps, lam):  # type: ignore[override]
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # What autocast's F.linear would keep: the input in the low-precision dtype.
            x = x.to(torch.get_autocast_dtype(device))
        ctx.eps, ctx.lam = eps, lam
        ctx.save_for_backward(x, w)
        return F.linear(x, _dequantized_weight(w, eps, lam).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = grad @ _dequantized_weight(w, ctx.eps, ctx.lam).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            gw = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(grad.dtype)
        return gx, gw, None, None


def ternary_linear(x: torch.Tensor, w: torch.Tensor, lam: float = 1.0, eps: float = WEIGHT_EPS) -> torch.Tensor:
    """`F.linear(x, fake_quant_weight(w, lam))` (bit-identical output and gradients) that keeps only
    `x` and the latent `w` for backward, not a dequantized copy of the weight."""
    return _TernaryLinear.apply(x, w, eps, float(lam))


def fake_quant_activations(
    x: torch.Tensor, bits: int = 8, scale_mode: str = "absmax", lam: float = 1.0
) -> torch.Tensor:
    """`quantize_activations` with a straight-through gradient and warm-up blend.

    `lam` in [0, 1] blends full precision (0) and quantized (1) values; the gradient with
    respect to `x` is the identity for every `lam`.
    """
    return _FakeQuantActivations.apply(x, bits, scale_mode, float(lam))


def fake_quant_weight(w: torch.Tensor, lam: float = 1.0, eps: float = WEIGHT_EPS) -> torch.Tensor:
    """Dequantized ternary weight `ternary_weight(w) -> wq * scale` with a straight-through gradient."""
    return _FakeQuantWeight.apply(w, eps, float(lam))


def pack_ternary(wq: torch.Tensor) -> torch.Tensor:
    """Pack a ternary tensor (values in {-1, 0, 1}) into uint8, four 2-bit codes per byte.

    Code `c = w + 1` (0, 1, 2); element `i` of the flattened tensor goes to byte `i // 4`,
    bits `2 * (i % 4)`. The result is 1-D with `ceil(numel / 4)` bytes; keep the shape to unpack.
    """
    flat = wq.reshape(-1)
    if flat.numel() and not bool(((flat == -1) | (flat == 0) | (flat == 1)).all()):
        raise ValueError("pack_ternary expects values in {-1, 0, 1}; quantize with ternary_weight first")
    codes = (flat.to(torch.int16) + 1).to(torch.uint8)
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, codes.new_ones(pad)])  # code 1 == value 0
    codes = codes.view(-1, 4)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """Inverse of `pack_ternary`: returns a tensor of `shape` with values in {-1, 0, 1}."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 3) // 4:
        raise ValueError(
            f"packed tensor does not match shape {tuple(shape)}: expected 1-D uint8 with "
            f"{(numel + 3) // 4} bytes, got {packed.dtype} {tuple(packed.shape)}"
        )
    # One table lookup per byte gives its four values directly: a single pass writing the output,
    # instead of shift / mask / convert / subtract passes and their full-size temporaries (this
    # runs for every matrix of a packed model on every forward). The lookup's int32 index is built
    # a chunk at a time, so the only full-size allocation is the output itself.
    table = _unpack_table(dtype, packed.device)
    values = torch.empty((packed.numel(), 4), dtype=dtype, device=packed.device)
    for start in range(0, packed.numel(), _UNPACK_CHUNK_BYTES):
        chunk = packed[start:start + _UNPACK_CHUNK_BYTES]
        torch.index_select(table, 0, chunk.int(), out=values[start:start + chunk.numel()])
    return values.reshape(-1)[:numel].reshape(shape)


_UNPACK_CHUNK_BYTES = 1 << 20
"""Packed bytes per lookup in `unpack_ternary`: a 4 MiB index instead of one the size of the matrix."""


_UNPACK_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _unpack_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 4] table: row b holds the four ternary values packed into byte b."""
    key = (dtype, device)
    if key not in _UNPACK_TABLES:
        byte = torch.arange(256, dtype=torch.int32)
        codes = (byte[:, None] >> torch.tensor([0, 2, 4, 6], dtype=torch.int32)) & 3
        _UNPACK_TABLES[key] = (codes - 1).to(device=device, dtype=dtype)
    return _UNPACK_TABLES[key]
