"""The BitNet b1.58 student: a decoder-only transformer with ternary weights and k-bit activations.

Architecture choices (and why):

- **BitLinear everywhere inside the blocks** (q/k/v/o projections and the FFN). Weights are
  ternarized per tensor with the absmean scale, activations per token with absmax at 8 bits
  (A8) and later 4 bits (A4). Both use straight-through gradients onto fp32 latent weights.
- **Full-precision embedding and LM head, tied by default.** They are a lookup and a single
  projection whose precision matters most for the output distribution, and BitNet keeps them
  in high precision as well. Tying halves the parameter count of small students whose vocab
  dominates (49k x 512 is 25M parameters).
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
- **Two forms of the same layer.** `BitLinear` keeps fp32 latent weights for training;
  `PackedBitLinear` keeps only the 2-bit codes and one scale (the inference / export form) and
  produces bit-identical outputs. `bitnet_kde.model.packed` swaps one for the other.
- **KV cache for greedy decoding** (`KVCache`, `BitNetLM.generate`): activations are quantized
  per token, so caching keys and values of earlier tokens computes what a full recomputation
  computes. Only floating-point rounding differs (matmuls of other shapes sum in another order);
  in fp32 that can move an activation across an A4 level, in float64 the tokens are identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from bitnet_kde.quant import (
    fake_quant_activations,
    pack_ternary,
    ternary_fractions,
    ternary_linear,
    ternary_weight,
    unpack_ternary,
)


@dataclass
class BitNetConfig:
    """Hyper-parameters of a BitNet student. Build presets with `BitNetConfig.from_name`."""

    vocab_size: int = 49152
    """Size of the student tokenizer's vocabulary (rows of the embedding / LM head)."""
    d_model: int = 512
    """Width of the residual stream."""
    n_layers: int = 6
    """Number of transformer blocks."""
    n_heads: int = 8
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
    subln: bool = True
    """SubLN: an RMSNorm before the attention output and FFN down projections (off: those are identity)."""
    quantize: bool = True
    """Quantize BitLinear weights and activations. False gives the dense baseline of the same shape."""
    activation_bits: int = 8
    """Activation bits at construction time (8 for A8, 4 after the flip)."""
    a4_scale: str = "absmax"
    """Activation scale used at 4 bits: `absmax` (the default) or `absmean` (clipped, BitNet a4.8 style)."""
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

    @classmethod
    def from_spec(cls, spec: Mapping) -> "BitNetConfig":
        """The config of `{"name": preset, **overrides}`: the `model` config group of `train.py`, which
        a training checkpoint keeps as its `model` hyper-parameter."""
        spec = dict(spec)
        return cls.from_name(spec.pop("name"), **spec)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, BitNetConfig] = {
    # Seconds-scale model for tests.
    "tiny": BitNetConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=256),
    # CPU-trainable default: ~13M block parameters + the (tied) embedding. Every BitLinear input
    # width (512, 1024) is a multiple of 256, the block size of llama.cpp's ternary TQ1_0/TQ2_0
    # types; a training step costs what the earlier d_model=384 preset cost (the vocabulary
    # projection dominates at this size).
    "mini": BitNetConfig(d_model=512, n_layers=6, n_heads=8, n_kv_heads=2, ffn_dim=1024, max_seq_len=512),
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
        # Keeps the latent weight for backward, not a dequantized copy (quant.ternary_linear).
        return ternary_linear(xq, self.weight, self.quant_lambda)

    def ternary_stats(self) -> dict[str, float]:
        """Fractions of -1 / 0 / +1 in the ternarized weight and its scale (for logging)."""
        return ternary_fractions(self.weight)

    def extra_repr(self) -> str:
        mode = f"W1.58A{self.activation_bits}" if self.quantize else "dense"
        return f"{super().extra_repr()}, {mode}"


class PackedBitLinear(nn.Module):
    """Inference form of `BitLinear`: 2-bit packed ternary codes plus one fp32 scale.

    `forward` computes exactly what `BitLinear.forward` computes with `quant_lambda = 1`
    (the weight is unpacked to `{-1, 0, 1} * scale` in the activation dtype), so a packed model
    reproduces its checkpoint's quantized logits. Weight memory is `ceil(in * out / 4)` bytes.
    `cache_unpacked=True` keeps the unpacked weight after the first call: faster decoding on
    hardware without ternary kernels, at fp32 memory cost.
    """

    quantize = True
    quant_lambda = 1.0

    def __init__(self, in_features: int, out_features: int, *, activation_bits: int = 8,
                 a4_scale: str = "absmax", device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation_bits = activation_bits
        self.a4_scale = a4_scale
        self.cache_unpacked = False
        self._unpacked: torch.Tensor | None = None
        self.register_buffer("packed", torch.empty((in_features * out_features + 3) // 4, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scale", torch.ones((), dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, layer: BitLinear) -> "PackedBitLinear":
        out = cls(layer.in_features, layer.out_features, activation_bits=layer.activation_bits,
                  a4_scale=layer.a4_scale, device=layer.weight.device)
        wq, scale = ternary_weight(layer.weight.float())
        out.packed.copy_(pack_ternary(wq))
        out.scale.copy_(scale)
        return out

    def weight_bytes(self) -> int:
        return self.packed.numel() + self.scale.numel() * self.scale.element_size()

    @property
    def keeps_unpacked(self) -> bool:
        """True when this layer holds a full unpacked weight, or will after its next forward."""
        return self.cache_unpacked or self._unpacked is not None

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        if self._unpacked is not None and self._unpacked.dtype == dtype:
            return self._unpacked
        w = unpack_ternary(self.packed, (self.out_features, self.in_features), dtype=dtype)
        w = w.mul_(self.scale.to(dtype))
        if self.cache_unpacked:
            self._unpacked = w
        return w

    quantize_input = BitLinear.quantize_input

    def forward(self, x: torch.Tensor, *, input_quantized: bool = False) -> torch.Tensor:
        xq = x if input_quantized else self.quantize_input(x)
        return F.linear(xq, self.dequantized_weight(xq.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed W1.58A{self.activation_bits}"


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated buffer pair per layer.

    Shapes are `[B, n_kv_heads, max_len, head_dim]`; `pos` is the number of cached tokens.
    """

    def __init__(self, cfg: "BitNetConfig", batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        max_len = max_len or cfg.max_seq_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KV cache length {max_len} exceeds max_seq_len={cfg.max_seq_len}")
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of `layer` after the cached ones; return all of them."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens > max_len={self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


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
        self.sub_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.subln else nn.Identity()
        self.o_proj = lin(cfg.n_heads * cfg.head_dim, cfg.d_model)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        x = self.q_proj.quantize_input(x)  # shared by q, k and v
        q = self.q_proj(x, input_quantized=True).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x, input_quantized=True).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x, input_quantized=True).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)
            if past:
                # New query i sits at position past + i and may see keys 0 .. past + i.
                causal = False
                if t > 1:
                    mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(self.sub_norm(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: BitNetConfig):
        super().__init__()
        lin = _bitlinear_factory(cfg)
        self.gate_proj = lin(cfg.d_model, cfg.ffn_dim)
        self.up_proj = lin(cfg.d_model, cfg.ffn_dim)
        self.sub_norm = RMSNorm(cfg.ffn_dim, cfg.norm_eps) if cfg.subln else nn.Identity()
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
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

    @property
    def quant_lambda(self) -> float:
        """The warm-up blend in use: the smallest over the BitLinear layers (1 = fully quantized)."""
        return min((m.quant_lambda for m in self.bitlinears()), default=1.0)

    def bitlinears(self):
        """Every quantized linear layer, in training (`BitLinear`) or packed form."""
        return (m for m in self.modules() if isinstance(m, (BitLinear, PackedBitLinear)))

    def named_bitlinears(self):
        return ((n, m) for n, m in self.named_modules() if isinstance(m, (BitLinear, PackedBitLinear)))

    @property
    def is_packed(self) -> bool:
        return any(isinstance(m, PackedBitLinear) for m in self.modules())

    def weight_bytes(self) -> dict[str, int]:
        """Bytes held by weights: packed ternary codes + scales, and everything else (embedding, norms)."""
        packed = {id(p) for m in self.modules() if isinstance(m, PackedBitLinear) for p in m.buffers()}
        ternary = sum(m.weight_bytes() for m in self.modules() if isinstance(m, PackedBitLinear))
        other = sum(p.numel() * p.element_size() for p in self.parameters() if id(p) not in packed)
        return {"ternary": ternary, "other": other, "total": ternary + other}

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - self.embed.weight.numel() if exclude_embedding else n

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits for `input_ids`; with a `cache`, the ids continue the cached tokens.

        `return_hidden=True` returns `hidden_states` instead of logits. Training asks for them
        through `forward` rather than calling `hidden_states`, because FSDP2 gathers the sharded
        parameters of the root module (embedding, final norm, tied head) in hooks on `forward`.
        """
        x = self.hidden_states(input_ids, cache)
        return x if return_hidden else self.lm_head(x)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final normed hidden states [B, T, d] that `lm_head` projects to logits.

        Training feeds them with `lm_head.weight` to `losses.fused_distillation_loss`, which
        projects a chunk of positions at a time instead of holding [B, T, V] logits.
        """
        start = cache.pos if cache is not None else 0
        t = input_ids.shape[1]
        if start + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + t} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(input_ids)
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.pos += t
        return self.norm(x)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Greedy continuation of `input_ids` [B, T] (equal-length prompts); returns [B, <= max_new_tokens].

        With `use_cache` the prompt is run once and each new token costs one position; without
        it every step recomputes the whole sequence (the reference the cache is tested against).
        Generation stops early once every row has produced `eos_id`; later positions repeat it.
        """
        b, t = input_ids.shape
        max_new_tokens = min(max_new_tokens, self.cfg.max_seq_len - t)
        cache = KVCache(self.cfg, b, t + max_new_tokens, device=input_ids.device,
                        dtype=self.embed.weight.dtype) if use_cache else None
        seq, step_in, out = input_ids, input_ids, []
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(step_in if use_cache else seq, cache)[:, -1]
            nxt = logits.argmax(-1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out.append(nxt)
            step_in = nxt[:, None]
            if not use_cache:
                seq = torch.cat([seq, step_in], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return torch.stack(out, dim=1) if out else input_ids.new_zeros(b, 0)
