"""The GGUF export: a trained student as one file for llama.cpp's `bitnet` architecture.

The file is written with the `gguf` package from the student's own ternary codes (its packed
form), not by re-quantizing a dequantized matrix:

- each quantized linear layer becomes `blk.N.<role>.weight` in `TQ2_0` (2.06 bits per weight)
  or `TQ1_0` (1.69 bits), holding the codes {-1, 0, 1} with a block scale of exactly 1, plus a
  `blk.N.<role>.scale` F32 tensor of one value: the student's absmean scale. llama.cpp multiplies
  the matrix product by it (`build_lora_mm` with a scale), the convention of the Microsoft
  BitNet GGUFs; keeping it apart from the fp16 block scale keeps it at fp32 precision.
  `F16` (the dequantized `code * scale`) is the escape hatch for shapes TQ cannot hold;
- TQ types pack 256 weights per block along a row, so every quantized layer's input width must
  be a multiple of 256; otherwise the export stops with a message naming the layer;
- the tied embedding (llama.cpp's `bitnet` graph always uses it as the output matrix too) in
  F16 or Q8_0; RMSNorm weights in F32; RoPE is the half-split (NEOX) kind llama.cpp's `bitnet`
  architecture applies, which is the student's, so Q and K are written unpermuted;
- `bitnet.hidden_activation` names the FFN gate activation, but llama.cpp's `bitnet` graph
  computes SiLU gates regardless (the build inside llama-cpp-python 0.3.36 ignores the key;
  upstream reads it but maps no `relu2`). A `relu2` student would run with the wrong
  activation, so it is refused unless `strict_activation=False`; train a student meant for
  llama.cpp with `model.ffn_act=swiglu`;
- the tokenizer's `tokenizer.*` keys are copied from a GGUF that holds the student tokenizer
  (the embedded SmolLM2 GGUF by default); its token count must equal the student's vocabulary.

llama.cpp quantizes a TQ layer's input to 8 bits per block of 256 values (Q8_K), not per token:
close to the student's A8 forward, not bit-identical. It has no 4-bit activation path, so an A4
student runs at A8 there (`export_gguf` says so). The file is written to a temporary name in
the target folder and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from bitnet_kde.export import process_umask
from bitnet_kde.model import BitNetLM, PackedBitLinear
from bitnet_kde.model.packed import packed_copy
from bitnet_kde.quant import unpack_ternary

log = logging.getLogger(__name__)

ARCH = "bitnet"
TQ_BLOCK = 256
"""Weights per TQ1_0 / TQ2_0 block: a quantized layer's input width must be a multiple of it."""
TERNARY_TYPES = ("TQ2_0", "TQ1_0", "F16")
EMBEDDING_TYPES = ("F16", "Q8_0")
LLAMA_ACTIVATION = {"relu2": "relu2", "swiglu": "silu"}
"""Student `ffn_act` -> the `bitnet.hidden_activation` value written (transformers' `hidden_act` names)."""
LLAMA_RUNS = "swiglu"
"""The gate activation llama.cpp's `bitnet` graph computes: SiLU, whatever `hidden_activation` says
(measured with the llama.cpp inside llama-cpp-python 0.3.36; upstream maps no `relu2` either)."""

# our module path (inside a block) -> llama.cpp tensor role
_ROLES = {
    "attn_norm": "ATTN_NORM", "attn.q_proj": "ATTN_Q", "attn.k_proj": "ATTN_K", "attn.v_proj": "ATTN_V",
    "attn.sub_norm": "ATTN_SUB_NORM", "attn.o_proj": "ATTN_OUT", "ffn_norm": "FFN_NORM",
    "ffn.gate_proj": "FFN_GATE", "ffn.up_proj": "FFN_UP", "ffn.sub_norm": "FFN_SUB_NORM",
    "ffn.down_proj": "FFN_DOWN",
}


class ExportError(ValueError):
    """The student cannot be written in the requested form; the message says why and what to do."""


def check_gguf_shapes(model: BitNetLM, ternary_type: str = "TQ2_0") -> None:
    """Raise `ExportError` when a quantized layer's input width does not fill whole TQ blocks."""
    if ternary_type == "F16":
        return
    for name, layer in model.named_bitlinears():
        if layer.in_features % TQ_BLOCK:
            raise ExportError(
                f"{name}: input width {layer.in_features} is not a multiple of {TQ_BLOCK}, the {ternary_type} "
                f"block size; export with --gguf-type F16 (dequantized, no ternary kernels) or train a model "
                f"whose widths are multiples of {TQ_BLOCK} (the mini preset)")


def tokenizer_fields(path: str | os.PathLike) -> list:
    """The `tokenizer.*` key/value fields of the GGUF at `path` (gguf `ReaderField`s)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return [f for k, f in reader.fields.items() if k.startswith("tokenizer.")]


def _tensor_name(role: str, block: int | None = None, leaf: str = "weight") -> str:
    """llama.cpp's name of a tensor, e.g. `blk.3.attn_q.weight` or `blk.3.attn_q.scale`."""
    import gguf

    name = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, role)]
    return f"{name.format(bid=block) if block is not None else name}.{leaf}"


def export_gguf(model: BitNetLM, out_path: str | os.PathLike, *, tokenizer_gguf: str | os.PathLike | None,
                ternary_type: str = "TQ2_0", embedding_type: str = "F16", name: str = "bitnet-kde student",
                strict_activation: bool = True) -> dict:
    """Write `model` as a llama.cpp `bitnet` GGUF at `out_path`; returns a summary.

    `tokenizer_gguf`: a GGUF whose `tokenizer.*` keys describe the student tokenizer (None: none
    is written, and llama.cpp cannot load the file; for tools that bring their own).
    `strict_activation=False` writes a student whose FFN activation llama.cpp does not compute
    (tests use it to prove that the parity check catches it).
    """
    import gguf

    cfg = model.cfg
    if ternary_type not in TERNARY_TYPES:
        raise ExportError(f"unknown GGUF ternary type {ternary_type!r}; choose one of {TERNARY_TYPES}")
    if embedding_type not in EMBEDDING_TYPES:
        raise ExportError(f"unknown GGUF embedding type {embedding_type!r}; choose one of {EMBEDDING_TYPES}")
    if not cfg.quantize:
        raise ExportError("a dense model (quantize=False) has no ternary weights to export")
    if not cfg.tie_embeddings:
        raise ExportError("llama.cpp's bitnet architecture uses the embedding as the output matrix; "
                          "this student has a separate LM head (tie_embeddings=False)")
    if not cfg.subln:
        raise ExportError("llama.cpp's bitnet architecture normalizes before o_proj and down_proj (SubLN); this "
                          "student was built without it (model.subln=false), so it cannot be written in that form")
    if strict_activation and cfg.ffn_act != LLAMA_RUNS:
        raise ExportError(f"this student's FFN activation is {cfg.ffn_act!r} but llama.cpp's bitnet architecture "
                          f"computes SiLU (swiglu) gates; train it with model.ffn_act=swiglu to run it in llama.cpp, "
                          f"or use the hf or native export")
    check_gguf_shapes(model, ternary_type)
    fields = tokenizer_fields(tokenizer_gguf) if tokenizer_gguf is not None else []
    tokens = next((f for f in fields if f.name == "tokenizer.ggml.tokens"), None)
    if tokens is not None and len(tokens.data) != cfg.vocab_size:
        raise ExportError(f"{tokenizer_gguf}: the tokenizer has {len(tokens.data)} tokens but the student's "
                          f"vocabulary is {cfg.vocab_size}; llama.cpp needs one embedding row per token")
    if cfg.activation_bits == 4:
        log.warning("this student was trained with 4-bit activations; llama.cpp has no 4-bit activation path "
                    "and runs it with 8-bit activations")
    packed = model if model.is_packed else packed_copy(model)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        _write_metadata(writer, cfg, name, LLAMA_ACTIVATION[cfg.ffn_act], ternary_type)
        for f in fields:
            value = f.contents()
            writer.add_key_value(f.name, value, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
        sizes = _write_tensors(writer, packed, ternary_type, embedding_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp creates it owner-only
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"path": str(out), "file_bytes": out.stat().st_size, "ternary_type": ternary_type,
            "embedding_type": embedding_type, "activation_bits": cfg.activation_bits, **sizes}


def _write_metadata(writer, cfg, name: str, hidden_activation: str, ternary_type: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_string(f"{ARCH}.hidden_activation", hidden_activation)
    ftype = {"TQ2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "TQ1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
             "F16": gguf.LlamaFileType.MOSTLY_F16}[ternary_type]
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tensors(writer, packed: BitNetLM, ternary_type: str, embedding_type: str) -> dict:
    import gguf

    ternary_bytes = other_bytes = 0

    def add(name: str, array: np.ndarray, qtype) -> int:
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, data)
        else:
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        return data.nbytes

    f32 = gguf.GGMLQuantizationType.F32
    emb = packed.embed.weight.detach().float().cpu().numpy()
    other_bytes += add(_tensor_name("TOKEN_EMBD"), emb, getattr(gguf.GGMLQuantizationType, embedding_type))
    other_bytes += add(_tensor_name("OUTPUT_NORM"), packed.norm.weight.detach().float().cpu().numpy(), f32)
    for i, block in enumerate(packed.blocks):
        for path, role in _ROLES.items():
            module = block.get_submodule(path)
            name = _tensor_name(role, i)
            if not isinstance(module, PackedBitLinear):  # an RMSNorm
                other_bytes += add(name, module.weight.detach().float().cpu().numpy(), f32)
                continue
            codes = unpack_ternary(module.packed, (module.out_features, module.in_features)).cpu().numpy()
            if ternary_type == "F16":
                ternary_bytes += add(name, codes * float(module.scale), gguf.GGMLQuantizationType.F16)
                continue
            ternary_bytes += add(name, codes, getattr(gguf.GGMLQuantizationType, ternary_type))
            scale = np.array([float(module.scale)], dtype=np.float32)
            ternary_bytes += add(_tensor_name(role, i, "scale"), scale, f32)
    return {"ternary_bytes": ternary_bytes, "other_bytes": other_bytes}
