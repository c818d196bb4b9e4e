"""File formats a trained student is written in: `native` (packed ternary safetensors + config),
`hf` (transformers BitNetForCausalLM folder) and `gguf` (llama.cpp bitnet file); docs/EXPORT.md."""

from __future__ import annotations

import os


def process_umask() -> int:
    """The process's file-creation mask: exports made with mkstemp/mkdtemp (owner-only) get the
    permissions an ordinary `open`/`mkdir` would have given them before they are renamed into place."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
