"""Converting a pretrained Llama-family model into a `BitNetLM` (the warm start), torch only.

The input is what any loader of such a model can hand over: its Hugging Face config as a plain
mapping (`config.to_dict()`) and its state dict with Hugging Face parameter names. Loading the
model itself (a folder, a GGUF file, the embedded teacher) needs `transformers`, which this
package must not import; `bitnet_kde.training.warmstart.from_pretrained` does that part.

What maps to what (Llama names on the left):

- `embed_tokens` -> `embed`; `lm_head` -> `lm_head` unless the source ties them (then one tensor);
- `self_attn.{q,k,v,o}_proj` -> `attn.{q,k,v,o}_proj` (grouped-query heads as they are; the
  Hugging Face layout already uses the half-split RoPE convention of `apply_rope`);
- `mlp.{gate,up,down}_proj` -> `ffn.{gate,up,down}_proj` with `ffn_act="swiglu"` (SiLU gate);
- `input_layernorm` / `post_attention_layernorm` / `norm` -> `attn_norm` / `ffn_norm` / `norm`;
- `rope_theta` and `rms_norm_eps` carry over. SubLN norms have no source counterpart: with
  `subln=False` they are left out; with `subln=True` they are added, and `calibrate_subln` sets
  each one's weight to the typical size of what it normalizes, so that it rescales activations
  back to the size the source's output projection was trained on.

Why calibrate: an RMSNorm at weight 1 outputs activations of RMS 1, while the source's attention
and FFN outputs are far smaller or larger; at weight 1 the output projections' contributions to
the residual stream change by that factor in every block, which wipes out the source's function
before training starts. At the median per-token RMS of its input (measured on real text in full
precision) a SubLN passes a typical token through unchanged and only rescales unusual ones.

Layer selection (`layers`) keeps a subset of the source's blocks in order: block j of the student
is block `layers[j]` of the source. An integer k keeps every k-th block starting at block 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from bitnet_kde.model.bitnet import BitNetConfig, BitNetLM, RMSNorm

SUPPORTED = ("Llama-family models with plain RoPE (model_type 'llama': LlamaForCausalLM, e.g. SmolLM2, TinyLlama, "
             "Llama 2, Llama 3.0; Llama 3.1 and later scale RoPE and are refused)")
"""What `from_llama` converts, as said in its errors."""

INIT_KEYS = ("init_from", "init_layers", "init_subln")
"""Keys of a `model` spec that say where a warm start comes from; they are no `BitNetConfig` fields."""

SUBLN_INITS = ("median_rms", "one")
"""How a warm start's new SubLN norms start: calibrated (`calibrate_subln`) or at weight 1."""

_BLOCK = {  # student name in a block -> source name in a layer
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
}


class PretrainedError(ValueError):
    """A source the warm start cannot use; the message names the source, what was found and what to do."""


def split_spec(spec: Mapping) -> tuple[dict, dict]:
    """(`BitNetConfig.from_spec` mapping, `{init_from, init_layers}`) of a `model` config group."""
    spec = dict(spec)
    init = {k: spec.pop(k, None) for k in INIT_KEYS}
    return spec, init


def select_layers(layers: int | Sequence[int] | None, n_source: int, source: str = "source") -> list[int]:
    """Source block indices the student keeps: all (None), every k-th from 0 (int k) or a list."""
    if layers is None:
        return list(range(n_source))
    if isinstance(layers, int) and not isinstance(layers, bool):
        if layers < 1:
            raise PretrainedError(f"{source}: init_layers={layers}: a stride must be >= 1 (1 keeps every block)")
        return list(range(0, n_source, layers))
    chosen = list(layers)
    if not chosen or not all(isinstance(i, int) and not isinstance(i, bool) for i in chosen):
        raise PretrainedError(f"{source}: init_layers={chosen}: give a stride k or a non-empty list of block indices")
    bad = [i for i in chosen if not 0 <= i < n_source]
    if bad:
        raise PretrainedError(f"{source}: init_layers {bad} out of range: the source has {n_source} blocks "
                              f"(indices 0..{n_source - 1})")
    if any(b <= a for a, b in zip(chosen, chosen[1:])):
        raise PretrainedError(f"{source}: init_layers={chosen} must be strictly increasing (blocks keep their order)")
    return chosen


def _rope_theta(config: Mapping, source: str) -> float:
    """RoPE base of a Hugging Face config (transformers 5 `rope_parameters`, or the older keys)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise PretrainedError(f"{source}: RoPE type {kind!r} (rope scaling) is not supported: the student's RoPE "
                              "has no scaling; use a source with plain RoPE (rope_type 'default')")
    theta = params.get("rope_theta", config.get("rope_theta"))
    return 10000.0 if theta is None else float(theta)


def llama_config(config: Mapping, *, layers: int | Sequence[int] | None = None, subln: bool = True,
                 quantize: bool = True, source: str = "source", **overrides) -> tuple[BitNetConfig, list[int]]:
    """The student config of a Hugging Face Llama config and the source blocks it keeps.

    `overrides` set `BitNetConfig` fields the source does not decide (`max_seq_len`,
    `activation_bits`, `a4_scale`); the default `max_seq_len` is the source's context length.
    """
    kind = config.get("model_type")
    if kind != "llama":
        found = config.get("architectures") or []
        raise PretrainedError(f"{source}: architecture {kind!r} ({', '.join(found) or 'no architectures listed'}) "
                              f"cannot be converted; supported: {SUPPORTED}")
    problems = [f"{key}={config.get(key)!r}" for key, ok in (
        ("hidden_act", config.get("hidden_act", "silu") == "silu"),
        ("attention_bias", not config.get("attention_bias", False)),
        ("mlp_bias", not config.get("mlp_bias", False)),
    ) if not ok]
    d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != d:
        problems.append(f"head_dim={head_dim} (hidden_size {d} / {heads} heads = {d // heads})")
    if problems:
        raise PretrainedError(f"{source}: {', '.join(problems)} cannot be converted: the student has SiLU-gated "
                              "FFNs, no biases and head_dim = hidden_size / num_attention_heads")
    fixed = {"d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "rope_theta", "norm_eps", "ffn_act",
             "tie_embeddings"}
    clash = sorted(fixed & set(overrides))
    if clash:
        raise PretrainedError(f"{source}: {clash} come from the source checkpoint and cannot be set as well")
    vocab = int(config["vocab_size"])
    if overrides.get("vocab_size", vocab) != vocab:
        raise PretrainedError(f"{source}: the source has a vocabulary of {vocab} ids, the run asks for "
                              f"vocab_size={overrides['vocab_size']} (data.vocab_size): a warm-started student keeps "
                              "its source's tokenizer, so train it on traces made for that tokenizer")
    keep = select_layers(layers, int(config["num_hidden_layers"]), source)
    overrides.setdefault("max_seq_len", int(config.get("max_position_embeddings") or 2048))
    overrides["vocab_size"] = vocab
    cfg = BitNetConfig(
        d_model=d, n_layers=len(keep), n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads), ffn_dim=int(config["intermediate_size"]),
        rope_theta=_rope_theta(config, source), norm_eps=float(config.get("rms_norm_eps", 1e-6)), ffn_act="swiglu",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), subln=subln, quantize=quantize, **overrides)
    return cfg, keep


@torch.no_grad()
def from_llama(config: Mapping, state: Mapping[str, torch.Tensor], *, layers: int | Sequence[int] | None = None,
               subln: bool = True, quantize: bool = True, source: str = "source",
               calibration_ids: torch.Tensor | None = None, **overrides) -> BitNetLM:
    """A `BitNetLM` with the shape of a Llama config and the weights of its state dict (fp32).

    `state` uses Hugging Face names, with or without the `model.` prefix of `LlamaForCausalLM`.
    With SubLN and `calibration_ids` ([B, T] token ids of real text), the SubLN weights are set
    by `calibrate_subln` on them; without, they stay at 1.
    """
    cfg, keep = llama_config(config, layers=layers, subln=subln, quantize=quantize, source=source, **overrides)
    names = {k.removeprefix("model."): k for k in state}

    def get(name: str, shape: torch.Size) -> torch.Tensor:
        if name not in names:
            raise PretrainedError(f"{source}: the checkpoint has no tensor {name!r}; is it a complete Llama model?")
        t = state[names[name]]
        if t.shape != shape:
            raise PretrainedError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, its config implies "
                                  f"{tuple(shape)}")
        return t

    model = BitNetLM(cfg)
    own = model.state_dict()
    copy = {"embed.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        copy["lm_head.weight"] = "lm_head.weight"
    for j, i in enumerate(keep):
        copy.update({f"blocks.{j}.{mine}": f"layers.{i}.{theirs}" for mine, theirs in _BLOCK.items()})
    for mine, theirs in copy.items():
        own[mine].copy_(get(theirs, own[mine].shape).to(own[mine].dtype))
    if subln and calibration_ids is not None:
        calibrate_subln(model, calibration_ids)
    return model


@torch.no_grad()
def calibrate_subln(model: BitNetLM, input_ids: torch.Tensor) -> list[float]:
    """Set every SubLN weight to the median per-token RMS of its input on `input_ids` [B, T].

    One full-precision forward pass (quantization blended out, λ = 0), blocks in order: each
    norm is set just before it runs, so later norms see the already-calibrated earlier blocks.
    Returns the weights set, in block order (attention, FFN). A model without SubLN is left as it is.
    """
    def set_from_input(norm, args):
        rms = args[0].float().pow(2).mean(-1).sqrt()
        norm.weight.fill_(rms.median())
        weights.append(float(norm.weight[0]))

    weights: list[float] = []
    norms = [m for b in model.blocks for m in (b.attn.sub_norm, b.ffn.sub_norm) if isinstance(m, RMSNorm)]
    hooks = [n.register_forward_pre_hook(set_from_input) for n in norms]
    lam = model.quant_lambda
    model.set_quant_lambda(0.0)
    try:
        model(input_ids)
    finally:
        model.set_quant_lambda(lam)
        for h in hooks:
            h.remove()
    return weights
