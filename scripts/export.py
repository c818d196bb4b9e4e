"""Export a trained student: packed safetensors (native), a transformers folder (hf) or a llama.cpp GGUF.

    python scripts/export.py logs/train/runs/<run>/checkpoints/last.ckpt exports/mini              # native
    python scripts/export.py <ckpt> exports/mini-hf --format hf [--eval-report reports/evaluation.json]
    python scripts/export.py <ckpt> exports/mini.gguf --format gguf [--gguf-type TQ1_0]
    python scripts/export.py <ckpt> <out_dir> --tokenizer none         # native: weights and config only

native keeps the checkpoint's activation mode (A8, or A4 after the flip); load it with
`bitnet_kde.checkpoint.load_student(out_dir)`. hf and gguf run at A8 (their runtimes have no
4-bit activation path; an A4 student is exported with a warning). docs/EXPORT.md has the details.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from bitnet_kde import storage
from bitnet_kde.checkpoint import load_student
from bitnet_kde.export.gguf import EMBEDDING_TYPES, TERNARY_TYPES, export_gguf
from bitnet_kde.export.hf import export_hf
from bitnet_kde.export.native import export_packed, is_export_dir, load_packed
from bitnet_kde.tokenizer import load_student_tokenizer, smollm2_gguf


def _mb(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _load(path: str):
    """The student at `path`, or one `error:` line saying what is wrong with it."""
    if Path(path).is_dir() and not is_export_dir(path):
        raise ValueError(f"{path} is a folder but not a bitnet-kde export (no config.json + model.safetensors); "
                         f"pass a training checkpoint (checkpoints/last.ckpt) or an export folder")
    try:
        return load_student(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such checkpoint; train one first (python train.py) or check the path") from None


def _training_info(path: str) -> dict:
    """What a training checkpoint says about its run, for the model card (empty for an export folder)."""
    if is_export_dir(path):
        return {}
    with storage.open_url(path, "rb") as f:
        ckpt = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
    return {"global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch")}


def _tokenizer_gguf(args) -> str | None:
    """The GGUF whose tokenizer keys the GGUF export copies (None for `--tokenizer none`)."""
    if args.tokenizer.lower() == "none":
        return None
    if args.tokenizer_gguf:
        return args.tokenizer_gguf
    if args.tokenizer != "smollm2":
        raise ValueError("--format gguf needs --tokenizer-gguf for a tokenizer other than the embedded smollm2")
    return str(Path(*smollm2_gguf()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="Lightning checkpoint written by train.py (e.g. last.ckpt) or a native export")
    ap.add_argument("out", help="folder to write (native, hf) or .gguf file (gguf)")
    ap.add_argument("--format", choices=("native", "hf", "gguf"), default="native")
    ap.add_argument("--tokenizer", default="smollm2",
                    help="student tokenizer to ship: 'smollm2' (embedded), a model id/path, or 'none'")
    ap.add_argument("--tokenizer-gguf", default=None,
                    help="gguf: a GGUF holding the student tokenizer (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--gguf-type", choices=TERNARY_TYPES, default="TQ2_0", help="gguf: type of the ternary matrices")
    ap.add_argument("--embedding-type", choices=EMBEDDING_TYPES, default="F16", help="gguf: type of the embedding")
    ap.add_argument("--allow-wrong-activation", action="store_true",
                    help="gguf: write a relu2 student although llama.cpp will run it with SiLU (for tests)")
    ap.add_argument("--eval-report", default=None, help="hf: an eval.py report whose figures go into the model card")
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="native: reload the export and compare its logits with the checkpoint's on a random batch")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")

    try:
        model = _load(args.checkpoint)
        if args.format == "gguf":
            summary = export_gguf(model, args.out, tokenizer_gguf=_tokenizer_gguf(args),
                                  ternary_type=args.gguf_type, embedding_type=args.embedding_type,
                                  strict_activation=not args.allow_wrong_activation)
            print(f"exported {args.checkpoint} -> {summary['path']} (llama.cpp bitnet, {args.gguf_type})")
            print(f"  ternary matrices + scales: {_mb(summary['ternary_bytes'])}")
            print(f"  embedding + norms:         {_mb(summary['other_bytes'])}")
            print(f"  file:                      {_mb(summary['file_bytes'])}")
            return 0
        tokenizer = None if args.tokenizer.lower() == "none" else load_student_tokenizer(args.tokenizer)
        if args.format == "hf":
            report = json.loads(Path(args.eval_report).read_text()) if args.eval_report else None
            summary = export_hf(model, args.out, tokenizer, source=Path(args.checkpoint).name,
                                training=_training_info(args.checkpoint), eval_report=report)
            print(f"exported {args.checkpoint} -> {summary['out_dir']} (transformers BitNetForCausalLM)")
            print(f"  files: {', '.join(summary['files'])}")
            print(f"  model.safetensors: {_mb(summary['weights_file_bytes'])}")
            return 0
        summary = export_packed(model, args.out, tokenizer, source=args.checkpoint)
    except (storage.StorageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"exported {args.checkpoint} -> {summary['out_dir']} (A{summary['activation_bits']})")
    print(f"  files: {', '.join(summary['files'])}")
    print(f"  packed ternary weights + scales: {_mb(summary['ternary_bytes'])}")
    print(f"  embedding + norms (fp32):        {_mb(summary['other_bytes'])}")
    print(f"  model.safetensors on disk:       {_mb(summary['weights_file_bytes'])}")
    print(f"  the same weights in fp32:        {_mb(summary['fp32_weight_bytes'])} "
          f"({summary['fp32_weight_bytes'] / summary['weights_file_bytes']:.1f}x the export)")
    fs, path = storage.resolve(args.checkpoint)
    print(f"  checkpoint file (incl. optimizer state): {_mb(fs.size(path))}")

    if args.verify:
        loaded = load_packed(args.out)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.cfg.vocab_size, (2, min(64, model.cfg.max_seq_len)), generator=g)
        with torch.no_grad():
            ref, out = model(ids), loaded(ids)
        rel = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        ok = rel <= 1e-5 and loaded.activation_bits == model.activation_bits
        print(f"  verify: max relative logit difference {rel:.2e} -> {'ok' if ok else 'MISMATCH'}")
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
