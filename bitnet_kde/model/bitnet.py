"""The BitNet b1.58 student: a decoder-only transformer with ternary weights and k-bit activations.

Architecture choices (and why):

- **BitLinear everywhere inside the blocks** (q/k/v/o projections and the FFN). Weights are
  ternarized per tensor with the absmean scale, activations per token with absmax at 8 bits
  (A8) and later 4 bits (A4). Both use straight-through gradients onto fp32 latent weights.
- **Full-precision embedding and LM head, tied by default.** They are a lookup and a single
  projection whose precision matters most for the output distribution, and BitNet keeps them
  in high precision as well. Tying halves the parameter count of small students whose vocab
  dominates (49k x 384 is 19M parameters).
- **RMSNorm pre-norm + SubLN**: an extra RMSNorm right before the attention output projection
  and before the FFN down projection. The input of a BitLinear is quantized per token; SubLN
  keeps its scale stable so the absmax grid is well used.
- **RoPE and grouped-query attention** as in LLaMA / BitNet b1.58 2B4T; `n_kv_heads` divides
  `n_heads`. Attention runs through `scaled_dot_product_attention` (flash / memory-efficient
  kernels where available). Right padding plus the causal mask means real tokens never see
  padding, so no extra attention mask is needed.
- **Gated FFN with squared ReLU** (`relu2`, as in BitNet b1.58 2B4T); `swiglu` is selectable.
- **No biases** anywhere, which also matches Hugging Face's `bitnet` architecture so that a
  trained student can be exported to it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from bitnet_kde.quant import fake_quant_activations, fake_quant_weight, ternary_weight


@dataclass
class BitNetConfig:
    """Hyper-parameters of a BitNet student. Build presets with `BitNetConfig.from_name`."""

    vocab_size: int = 49152
    """Size of the student tokenizer's vocabulary (rows of the embedding / LM head)."""
    d_model: int = 384
    """Width of the residual stream."""
    n_layers: int = 6
    """Number of transformer blocks."""
    n_heads: int = 6
    """Number of query heads; `d_model` must be divisible by it."""
    n_kv_heads: int = 2
    """Number of key/value heads (grouped-query attention); must divide `n_heads`."""
    ffn_dim: int = 1024
    """Hidden width of the gated FFN."""
    max_seq_len: int = 512
    """Longest sequence the RoPE tables are built for; longer inputs raise an error."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    ffn_act: str = "relu2"
    """Gate activation: `relu2` (squared ReLU, BitNet b1.58) or `swiglu` (SiLU, LLaMA)."""
    tie_embeddings: bool = True
    """Share the embedding matrix with the LM head."""
    quantize: bool = True
    """Quantize BitLinear weights and activations. False gives the dense baseline of the same shape."""
    activation_bits: int = 8
    """Activation bits at construction time (8 for A8, 4 after the flip)."""
    a4_scale: str = "absmax"
    """Activation scale used at 4 bits: `absmax` (SPEC default) or `absmean` (clipped, BitNet a4.8 style)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension must be even for RoPE")
        if self.ffn_act not in ("relu2", "swiglu"):
            raise ValueError(f"ffn_act must be 'relu2' or 'swiglu', got {self.ffn_act!r}")
        if self.activation_bits not in (4, 8):
            raise ValueError(f"activation_bits must be 8 or 4, got {self.activation_bits}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "BitNetConfig":
        """A preset (`tiny`, `mini`, `7b`) with keyword overrides, e.g. `from_name("mini", vocab_size=512)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown BitNetConfig fields {sorted(unknown)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, BitNetConfig] = {
    # Seconds-scale model for tests.
    "tiny": BitNetConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=256),
    # CPU-trainable default: ~9M block parameters + the (tied) embedding.
    "mini": BitNetConfig(d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=512),
    # LLaMA-7B dimensions, for the memory dry-run.
    "7b": BitNetConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=2048
    ),
}


def bitnet_tiny(**overrides) -> BitNetConfig:
    return BitNetConfig.from_name("tiny", **overrides)


def bitnet_mini(**overrides) -> BitNetConfig:
    return BitNetConfig.from_name("mini", **overrides)


def bitnet_7b(**overrides) -> BitNetConfig:
    return BitNetConfig.from_name("7b", **overrides)


class BitLinear(nn.Linear):
    """A bias-free linear layer with ternary weights and per-token k-bit activations.

    The latent weight stays in full precision for the optimizer; the forward pass uses
    `ternary(W) * mean|W|` and `quant_b(x)` with straight-through gradients. `quant_lambda`
    (0..1) blends full precision into quantized values for an optional warm-up.
    """

    def __init__(self, in_features: int, out_features: int, *, quantize: bool = True,
                 activation_bits: int = 8, a4_scale: str = "absmax", device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.quantize = quantize
        self.activation_bits = activation_bits
        self.a4_scale = a4_scale
        self.quant_lambda = 1.0

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized input this layer would use (identity when `quantize=False`).

        Layers reading the same tensor (q/k/v, gate/up) quantize it once and pass
        `input_quantized=True`: per-token quantization depends only on x and the bit width.
        """
        if not self.quantize:
            return x
        scale_mode = self.a4_scale if self.activation_bits == 4 else "absmax"
        return fake_quant_activations(x, self.activation_bits, scale_mode, self.quant_lambda)

    def forward(self, x: torch.Tensor, *, input_quantized: bool = False) -> torch.Tensor:
        if not self.quantize:
            return F.linear(x, self.weight)
        xq = x if input_quantized else self.quantize_input(x)
        wq = fake_quant_weight(self.weight, self.quant_lambda)
        return F.linear(xq, wq.to(xq.dtype))

    @torch.no_grad()
    def ternary_stats(self) -> dict[str, float]:
        """Fractions of -1 / 0 / +1 in the ternarized weight and its scale (for logging)."""
        wq, scale = ternary_weight(self.weight.float())
        n = wq.numel()
        return {
            "neg": float((wq == -1).sum()) / n,
            "zero": float((wq == 0).sum()) / n,
            "pos": float((wq == 1).sum()) / n,
            "scale": float(scale),
        }

    def extra_repr(self) -> str:
        mode = f"W1.58A{self.activation_bits}" if self.quantize else "dense"
        return f"{super().extra_repr()}, {mode}"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension; x is [B, H, T, Dh]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        lin = _bitlinear_factory(cfg)
        self.q_proj = lin(cfg.d_model, cfg.n_heads * cfg.head_dim)
        self.k_proj = lin(cfg.d_model, cfg.n_kv_heads * cfg.head_dim)
        self.v_proj = lin(cfg.d_model, cfg.n_kv_heads * cfg.head_dim)
        self.sub_norm = RMSNorm(cfg.d_model, cfg.norm_eps)  # SubLN
        self.o_proj = lin(cfg.n_heads * cfg.head_dim, cfg.d_model)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        x = self.q_proj.quantize_input(x)  # shared by q, k and v
        q = self.q_proj(x, input_quantized=True).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x, input_quantized=True).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x, input_quantized=True).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(self.sub_norm(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        lin = _bitlinear_factory(cfg)
        self.gate_proj = lin(cfg.d_model, cfg.ffn_dim)
        self.up_proj = lin(cfg.d_model, cfg.ffn_dim)
        self.sub_norm = RMSNorm(cfg.ffn_dim, cfg.norm_eps)  # SubLN
        self.down_proj = lin(cfg.ffn_dim, cfg.d_model)
        self.act = cfg.ffn_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate_proj.quantize_input(x)  # shared by gate and up
        gate = self.gate_proj(x, input_quantized=True)
        gate = F.relu(gate).square() if self.act == "relu2" else F.silu(gate)
        return self.down_proj(self.sub_norm(gate * self.up_proj(x, input_quantized=True)))


class Block(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


def _bitlinear_factory(cfg: BitNetConfig):
    def make(i: int, o: int) -> BitLinear:
        return BitLinear(i, o, quantize=cfg.quantize, activation_bits=cfg.activation_bits, a4_scale=cfg.a4_scale)
    return make


class BitNetLM(nn.Module):
    """Token ids [B, T] -> next-token logits [B, T, V] (logits[:, t] predict token t + 1)."""

    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not persistent: derived from the config, so checkpoints stay small and portable.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            # Residual-branch outputs are scaled down so the residual stream does not grow
            # with depth (GPT-2 / nanoGPT initialisation).
            resid = name.endswith(("o_proj.weight", "down_proj.weight"))
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers) if resid else std)

    @property
    def activation_bits(self) -> int:
        return self.cfg.activation_bits

    def set_activation_bits(self, bits: int) -> None:
        """Switch every BitLinear to `bits`-bit activations (8 = A8, 4 = A4)."""
        if bits not in (4, 8):
            raise ValueError(f"activation bits must be 8 or 4, got {bits}")
        self.cfg = replace(self.cfg, activation_bits=bits)
        for m in self.bitlinears():
            m.activation_bits = bits

    def set_quant_lambda(self, lam: float) -> None:
        """Warm-up blend for every BitLinear: 0 = full precision, 1 = fully quantized."""
        for m in self.bitlinears():
            m.quant_lambda = float(min(max(lam, 0.0), 1.0))

    def bitlinears(self):
        return (m for m in self.modules() if isinstance(m, BitLinear))

    def named_bitlinears(self):
        return ((n, m) for n, m in self.named_modules() if isinstance(m, BitLinear))

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - self.embed.weight.numel() if exclude_embedding else n

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(input_ids)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))
