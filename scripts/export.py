"""Export a trained student as packed 2-bit ternary weights + scales, config and tokenizer.

    python scripts/export.py logs/train/runs/<run>/checkpoints/last.ckpt exports/mini
    python scripts/export.py <ckpt> <out_dir> --tokenizer smollm2      # the embedded student tokenizer
    python scripts/export.py <ckpt> <out_dir> --tokenizer none         # weights and config only

The export keeps the checkpoint's activation mode (A8, or A4 after the flip). Load it with
`bitnet_kde.checkpoint.load_student(out_dir)` (the same call that loads a checkpoint).
"""

from __future__ import annotations

import argparse
import sys

import torch

from bitnet_kde import storage
from bitnet_kde.checkpoint import load_student
from bitnet_kde.export.native import export_packed, load_packed


def _mb(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="Lightning checkpoint written by train.py (e.g. last.ckpt)")
    ap.add_argument("out_dir", help="directory to write model.safetensors, config.json and tokenizer files to")
    ap.add_argument("--tokenizer", default="smollm2",
                    help="student tokenizer to ship: 'smollm2' (embedded), a model id/path, or 'none'")
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="reload the export and compare its logits with the checkpoint's on a random batch")
    args = ap.parse_args(argv)

    try:
        model = load_student(args.checkpoint)
    except (storage.StorageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = None
    if args.tokenizer.lower() != "none":
        from bitnet_kde.tokenizer import load_student_tokenizer

        tokenizer = load_student_tokenizer(args.tokenizer)
    summary = export_packed(model, args.out_dir, tokenizer, source=args.checkpoint)

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
        loaded = load_packed(args.out_dir)
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
