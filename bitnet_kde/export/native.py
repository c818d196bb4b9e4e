"""The native export format: a trained student as packed 2-bit ternary weights, its config and tokenizer.

Export layout (one directory, `FORMAT_VERSION` 1):

- `model.safetensors`: per quantized linear layer `<name>.packed` (uint8, four 2-bit ternary
  codes per byte, code = w + 1, element i of the row-major [out, in] weight at bits 2 * (i % 4)
  of byte i // 4) and `<name>.scale` (fp32 scalar); the embedding and the RMSNorm weights in
  fp32. A tied LM head is stored once (as `embed.weight`). No fp32 latent weight is written.
- `config.json`: the `BitNetConfig` (including `activation_bits`, so an A4 student stays A4),
  the format name and version, the packing layout and the source checkpoint's file name.
- tokenizer files (`tokenizer.save_pretrained`) when a tokenizer is given.

Loading builds the model on the `meta` device, swaps in empty `PackedBitLinear` modules and
assigns the stored tensors, so no full-precision weight is ever allocated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from bitnet_kde.model import BitNetConfig, BitNetLM
from bitnet_kde.model.packed import packed_copy, packed_skeleton, set_rope_buffers
from bitnet_kde.storage import write_bytes_atomic, write_text_atomic

FORMAT = "bitnet-kde-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PACKING = {
    "bits_per_weight": 2,
    "code": "w + 1 (0 = -1, 1 = 0, 2 = +1)",
    "order": "row-major [out_features, in_features]; element i at bits 2*(i%4) of byte i//4",
    "dequantized_weight": "(code - 1) * scale",
}


def is_export_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a directory written by `export_packed`."""
    p = Path(path)
    if not (p.is_dir() and (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()):
        return False
    try:
        return json.loads((p / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def packed_state_dict(model: BitNetLM) -> dict[str, torch.Tensor]:
    """The tensors an export stores: packed codes, scales, embedding, norms; a tied head once."""
    if not model.is_packed:
        raise ValueError("pack the model first (bitnet_kde.model.packed.pack)")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def export_packed(model: BitNetLM, out_dir: str | os.PathLike, tokenizer=None, *,
                  source: str | os.PathLike | None = None) -> dict:
    """Write `model` in packed form to `out_dir`; returns a summary (files and byte counts).

    A model in training form is packed on a copy first, so the caller's model is left as is.
    `source` (the checkpoint it came from) is recorded by file name only.
    """
    if not model.cfg.quantize:
        raise ValueError("a dense model (quantize=False) has no packed ternary form to export")
    if tokenizer is not None and len(tokenizer) > model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{model.cfg.vocab_size}: it cannot embed every token id")
    packed = model if model.is_packed else packed_copy(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = packed_state_dict(packed)
    quantized = {n for n, _ in packed.named_bitlinears()}
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        # The whole point of the format: a quantized layer contributes its codes and scale only.
        if owner in quantized and not (leaf == "packed" and t.dtype == torch.uint8
                                       or leaf == "scale" and t.dtype == torch.float32 and t.dim() == 0):
            raise AssertionError(f"{name} ({t.dtype}) is not a packed code/scale tensor")
    write_bytes_atomic(out / WEIGHTS_FILE, save(tensors, metadata={"format": FORMAT,
                                                                 "format_version": str(FORMAT_VERSION)}))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": packed.cfg.to_dict(),
        "packing": PACKING,
        "source_checkpoint": Path(source).name if source is not None else None,
        "tokenizer": tokenizer is not None,
    }
    write_text_atomic(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    sizes = packed.weight_bytes()
    return {
        "out_dir": str(out),
        "files": sorted(p.name for p in out.iterdir() if p.is_file()),
        "weights_file_bytes": (out / WEIGHTS_FILE).stat().st_size,
        "ternary_bytes": sizes["ternary"],
        "other_bytes": sizes["other"],
        "fp32_weight_bytes": 4 * (packed.num_parameters()
                                  + sum(m.in_features * m.out_features for m in packed.bitlinears())),
        "activation_bits": packed.cfg.activation_bits,
    }


def load_packed(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> BitNetLM:
    """A `BitNetLM` in packed form from an `export_packed` directory (eval mode, saved A8/A4 mode)."""
    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not a {FORMAT} export (format={meta.get('format')!r})")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(f"{path} uses export format version {meta['format_version']}; this version of "
                         f"bitnet-kde reads up to {FORMAT_VERSION}")
    cfg = BitNetConfig(**meta["model"])
    model = packed_skeleton(cfg)
    device = torch.device(map_location)
    tensors = load_file(str(path / WEIGHTS_FILE), device=str(device))
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, t in tensors.items():
        want = model.get_parameter(name) if name.endswith("weight") else model.get_buffer(name)
        if t.shape != want.shape or t.dtype != want.dtype:
            raise ValueError(f"{path / WEIGHTS_FILE}: {name} is {t.dtype} {tuple(t.shape)}, "
                             f"expected {want.dtype} {tuple(want.shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    set_rope_buffers(model, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()

