"""The Hugging Face export: a trained student as a `transformers` `BitNetForCausalLM` folder.

The folder loads offline with `AutoModelForCausalLM.from_pretrained(path)` (model_type
`bitnet`, quantization method `bitnet`) and works with `pipeline("text-generation")`:

- `config.json`: transformers' `BitNetConfig` of the student (`hidden_act` `relu2`, or `silu`
  for `ffn_act=swiglu`; tied embeddings; the student's `rope_theta`, norm epsilon, bos/eos ids)
  with `quantization_config = {quant_method: bitnet, linear_class: bitlinear,
  quantization_mode: offline}`, the linear class of the published BitNet b1.58 checkpoints;
- `model.safetensors`: per quantized layer `weight` as uint8 `[out/4, in]`, four ternary codes
  (code = w + 1) per byte with row `r + k * out/4` at bits `2k` of stored row `r` (transformers'
  `pack_weights` order), and `weight_scale` = 1 / (the student's absmean scale): that class
  *divides* its int8 matmul by `weight_scale * input_scale`. Embedding and norms in fp32;
  the tied LM head is not stored;
- the tokenizer files, `generation_config.json` (greedy, the tokenizer's bos/eos) and a model
  card `README.md`.

The student's modules map one to one onto BitNet's (SubLN `attn.sub_norm` -> `attn_sub_norm`,
`ffn.sub_norm` -> `ffn_sub_norm`, RoPE in the same rotate-half convention). transformers'
BitLinear quantizes activations per token to 8 bits, as the student's A8 forward does; it has
no 4-bit path, so an A4 student runs there at A8 (said in a warning and in the model card).
Everything is written to a temporary folder beside the target and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from bitnet_kde.export import process_umask
from bitnet_kde.model import BitNetLM, PackedBitLinear
from bitnet_kde.model.packed import packed_copy
from bitnet_kde.quant import unpack_ternary

log = logging.getLogger(__name__)

HF_ACTIVATION = {"relu2": "relu2", "swiglu": "silu"}
"""Student `ffn_act` -> transformers `hidden_act` (both gate activations of `BitNetMLP`)."""
A4_NOTE = ("This student was trained with 4-bit activations; transformers' BitNet layers quantize activations "
           "to 8 bits, so here it runs at A8, not in its trained mode.")

# our parameter path -> transformers' (the block index is spliced in)
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj", "attn.sub_norm": "self_attn.attn_sub_norm",
    "ffn.gate_proj": "mlp.gate_proj", "ffn.up_proj": "mlp.up_proj", "ffn.down_proj": "mlp.down_proj",
    "ffn.sub_norm": "mlp.ffn_sub_norm",
}


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """Ternary `[out, in]` values -> uint8 `[out/4, in]` in transformers' BitNet order.

    Stored row `r` holds rows `r`, `r + out/4`, `r + 2 out/4`, `r + 3 out/4` at bits 0, 2, 4, 6.
    """
    out_features = codes.shape[0]
    if out_features % 4:
        raise ValueError(f"a BitNet layer needs a multiple of 4 output rows, got {out_features}")
    c = (codes.to(torch.int16) + 1).to(torch.uint8).view(4, out_features // 4, -1)
    return c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6)


def hf_state_dict(packed: BitNetLM) -> dict[str, torch.Tensor]:
    """transformers' tensors of a packed student: packed codes + inverse scales, embedding, norms."""
    sd = {"model.embed_tokens.weight": packed.embed.weight, "model.norm.weight": packed.norm.weight}
    for i, block in enumerate(packed.blocks):
        for ours, theirs in _BLOCK_NAMES.items():
            module = block.get_submodule(ours)
            prefix = f"model.layers.{i}.{theirs}"
            if isinstance(module, PackedBitLinear):
                codes = unpack_ternary(module.packed, (module.out_features, module.in_features))
                sd[f"{prefix}.weight"] = pack_rows(codes)
                sd[f"{prefix}.weight_scale"] = (1.0 / module.scale.double()).float().reshape(1)
            else:
                sd[f"{prefix}.weight"] = module.weight
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def hf_config(model: BitNetLM, tokenizer=None) -> dict:
    """transformers' `BitNetConfig` (with the bitnet quantization config) of the student, as a dict."""
    from transformers import BitNetConfig as HFBitNetConfig
    from transformers.utils.quantization_config import BitNetQuantConfig

    cfg = model.cfg
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    config = HFBitNetConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        hidden_act=HF_ACTIVATION[cfg.ffn_act], max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=pad if pad is not None else eos,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    config.architectures = ["BitNetForCausalLM"]
    config.quantization_config = BitNetQuantConfig(
        linear_class="bitlinear", quantization_mode="offline", modules_to_not_convert=["lm_head"]).to_dict()
    out = config.to_dict()
    out["dtype"] = "float32"
    out["rope_theta"] = cfg.rope_theta  # where transformers 4.x reads it (5.x reads rope_parameters)
    return out


def model_card(cfg, *, source: str | None, training: dict | None, eval_report: dict | None) -> str:
    """The folder's `README.md`: what the model is, how it was made, how to run it, its eval figures."""
    training = training or {}
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [bitnet, ternary, knowledge-distillation, bitnet-kde]", "---", "",
        "# BitNet b1.58 student (bitnet-kde)", "",
        (f"A {cfg.n_layers}-layer BitNet b1.58 student (d_model {cfg.d_model}, {cfg.n_heads}/{cfg.n_kv_heads} "
         f"heads, FFN {cfg.ffn_dim} with `{cfg.ffn_act}`, vocabulary {cfg.vocab_size}) distilled from a teacher's "
         "Top-K traces with bitnet-kde. Quantized linear layers hold ternary weights {-1, 0, 1} with one absmean "
         "scale each; activations are quantized per token."), "",
        "## Training", "",
        f"- source checkpoint: `{source or 'unknown'}`",
        f"- optimizer steps: {training.get('global_step', 'unknown')}",
        f"- activation mode: A{cfg.activation_bits}",
    ]
    teacher = (eval_report or {}).get("teacher") or {}
    data = (eval_report or {}).get("data") or {}
    if teacher.get("name"):
        lines.append(f"- teacher: `{teacher['name']}`")
    if data.get("trace_set"):
        lines.append(f"- evaluated on the teacher's greedy traces of {data.get('rows')} held-out prompts "
                     f"(trace set `{data['trace_set']}`)")
    if cfg.activation_bits == 4:
        lines += ["", f"**A4 caveat.** {A4_NOTE}"]
    lines += ["", "## Use", "", "```python", "from transformers import pipeline", "",
              'pipe = pipeline("text-generation", model="PATH/TO/THIS/FOLDER")',
              'print(pipe("The capital of France is", max_new_tokens=20)[0]["generated_text"])', "```"]
    if eval_report:
        m = eval_report.get("metrics", {}).get("overall", {})
        q = eval_report.get("qei", {})
        lines += ["", "## Evaluation (held-out prompts, against the teacher)", "", "| metric | value |", "|---|---|"]
        for key in ("kl", "top1_agreement", "perplexity", "json_validity", "exact_match"):
            if m.get(key) is not None:
                lines.append(f"| {key} | {m[key]:.4g} |")
        for key in ("qei", "qei_speed"):
            if q.get(key) is not None:
                lines.append(f"| {key} | {q[key]:.4g} |")
    return "\n".join(lines) + "\n"


def export_hf(model: BitNetLM, out_dir: str | os.PathLike, tokenizer=None, *, source: str | None = None,
              training: dict | None = None, eval_report: dict | None = None) -> dict:
    """Write `model` as a transformers `BitNetForCausalLM` folder at `out_dir`; returns a summary.

    `out_dir` is replaced as a whole (written beside it, then renamed). `training` holds what the
    checkpoint says about its run (`global_step`), `eval_report` an `eval.py` report for the card.
    """
    from transformers import GenerationConfig

    cfg = model.cfg
    if not cfg.quantize:
        raise ValueError("a dense model (quantize=False) has no ternary weights to export")
    if not cfg.tie_embeddings:
        raise ValueError("the export writes a tied LM head; this student has a separate one (tie_embeddings=False)")
    if not cfg.subln:
        raise ValueError("transformers' bitnet architecture normalizes before o_proj and down_proj (SubLN); this "
                         "student was built without it (model.subln=false), so it cannot be written in that form")
    if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {cfg.vocab_size}")
    if cfg.activation_bits == 4:
        log.warning(A4_NOTE)
    packed = model if model.is_packed else packed_copy(model)
    tensors = hf_state_dict(packed)
    config = hf_config(packed, tokenizer)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        GenerationConfig(do_sample=False, bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"],
                         pad_token_id=config["pad_token_id"]).save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(cfg, source=source, training=training, eval_report=eval_report))
        os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp creates it owner-only
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out_dir": str(out), "files": sorted(p.name for p in out.iterdir()),
            "weights_file_bytes": (out / "model.safetensors").stat().st_size,
            "activation_bits": cfg.activation_bits}
