"""Warm start: a BitNet student built from a pretrained Llama-family model (docs/TRAINING_GUIDE.md).

A source is a local Hugging Face folder (`config.json` + weights + tokenizer), a GGUF file
(loaded and de-quantized by transformers, as the embedded teacher is), or `teacher` for the
embedded SmolLM2-135M. Nothing is downloaded. This module loads the source with transformers and
hands its config and state dict to `bitnet_kde.model.pretrained.from_llama`, which does the
conversion with torch only.

A warm-started run records the student's resolved shape as its `model` hyper-parameter, so its
checkpoints reload without the source, and the source's tokenizer hash, which must equal the
traces' student tokenizer (`check_tokenizer`): ids mean something only under one tokenizer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
import torch

from bitnet_kde.kd.prompts import load_prompts
from bitnet_kde.kd.traces import arrow_path, list_shards
from bitnet_kde.model import BitNetConfig, BitNetLM
from bitnet_kde.model.pretrained import SUBLN_INITS, PretrainedError, from_llama, llama_config, split_spec
from bitnet_kde.tokenizer import chat_ids, load_tokenizer, smollm2_gguf, tokenizer_hash

log = logging.getLogger(__name__)

TEACHER = "teacher"
"""The source name of the embedded SmolLM2-135M GGUF (the default teacher)."""

CALIBRATION_SHAPE = (4, 256)
"""Rows x tokens of the text SubLN is calibrated on (`calibration_ids`)."""


def locate(source: str) -> tuple[str, str | None]:
    """(folder, GGUF file name or None) of a source, as transformers' `from_pretrained` takes them."""
    if source == TEACHER:
        return smollm2_gguf()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir() and (path / "config.json").is_file():
        return str(path), None
    what = "is a folder without config.json" if path.is_dir() else "is not a .gguf file" if path.exists() \
        else "does not exist"
    raise PretrainedError(f"init_from={source!r} {what}: give a local Hugging Face model folder (config.json + "
                          f"weights), a .gguf file, or {TEACHER!r} for the embedded SmolLM2-135M")


def _source_config(source: str, folder: str, gguf_file: str | None) -> dict:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, gguf_file=gguf_file).to_dict()
    except (OSError, ValueError, KeyError) as e:
        raise PretrainedError(f"init_from={source!r}: cannot read its config: {e}") from None


def from_pretrained(source: str, *, layers: int | Sequence[int] | None = None, subln: bool = True,
                    subln_init: str = "median_rms", quantize: bool = True, **overrides) -> BitNetLM:
    """A `BitNetLM` with the shape and weights of a pretrained Llama-family model.

    Args:
        source: a Hugging Face folder, a `.gguf` file, or `"teacher"` (embedded SmolLM2-135M).
        layers: source blocks to keep: None = all, an int k = every k-th from block 0, or a list.
        subln: add SubLN norms before the attention output and FFN down projections.
        subln_init: `"median_rms"`: each SubLN weight is the median per-token RMS of its input
            on the shipped training prompts (`calibration_ids`), so a typical token passes
            unchanged; `"one"`: weight 1, which rescales every output projection's input to RMS 1.
        quantize: ternary BitLinear layers (False: the dense model, which with `subln=False`
            computes the source's own logits).
        overrides: `BitNetConfig` fields the source does not fix (`max_seq_len`, `activation_bits`,
            `a4_scale`, and `vocab_size`, which must equal the source's).
    """
    return _convert(source, layers, subln, subln_init, quantize, overrides)[0]


def _convert(source: str, layers, subln: bool, subln_init: str | None, quantize: bool, overrides: dict,
             record: dict | None = None) -> tuple[BitNetLM, list[int]]:
    """`from_pretrained`, also returning the source blocks kept; fills `record` (when given) with
    the source, the blocks kept, the SubLN init and its tokenizer hash."""
    subln_init = subln_init or SUBLN_INITS[0]
    if subln_init not in SUBLN_INITS:
        raise PretrainedError(f"init_subln={subln_init!r}: use one of {', '.join(SUBLN_INITS)}")
    folder, gguf_file = locate(source)
    config = _source_config(source, folder, gguf_file)
    # refuse the architecture, the layers, the overrides and a missing tokenizer before the (slow) weight load
    cfg, kept = llama_config(config, layers=layers, subln=subln, quantize=quantize, source=source, **overrides)
    calibrate = subln and subln_init == "median_rms"
    tokenizer = source_tokenizer(source) if record is not None or calibrate else None
    if record is not None:
        record.update(source=source, layers=kept, subln_init=subln_init if subln else None,
                      tokenizer_hash=tokenizer_hash(tokenizer))
    ids = calibration_ids(tokenizer, cfg.max_seq_len) if calibrate else None
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    try:
        lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise PretrainedError(f"init_from={source!r}: cannot load its weights: {e}") from None
    model = from_llama(config, lm.state_dict(), layers=layers, subln=subln, quantize=quantize, source=source,
                       calibration_ids=ids, **overrides)
    log.info("warm start from %s: blocks %s of %d, d_model %d, loaded in %.1f s", source, kept,
             config["num_hidden_layers"], model.cfg.d_model, time.perf_counter() - t)
    return model, kept


def source_tokenizer(source: str):
    """The tokenizer stored with a source (a source without one is refused)."""
    folder, gguf_file = locate(source)
    try:
        return load_tokenizer(folder, gguf_file)
    except (OSError, ValueError, TypeError) as e:
        raise PretrainedError(f"init_from={source!r}: no usable tokenizer stored with it ({e}); the student "
                              "keeps its source's vocabulary, so the source must come with its tokenizer") from None


def calibration_ids(tokenizer, max_len: int) -> torch.Tensor:
    """Up to `CALIBRATION_SHAPE` token ids (rows no longer than `max_len`): the shipped training
    prompts, each chat-formatted by `tokenizer` (the source's) as the collector formats a prompt
    (`chat_ids`), one after another. This is the text `calibrate_subln` measures activations on.
    Chat-formatted because the student trains on chat-formatted traces and the activations'
    sizes depend on the format; prompts rather than the run's traces, so that a source always
    gives the same student."""
    rows, length = CALIBRATION_SHAPE[0], min(CALIBRATION_SHAPE[1], max_len)
    ids: list[int] = []
    for prompt in load_prompts(split="train"):
        ids += chat_ids(tokenizer, prompt.prompt)
        if len(ids) >= rows * length:
            break
    rows = max(1, min(rows, len(ids) // length))
    return torch.tensor(ids[: rows * length], dtype=torch.long).view(rows, -1)


def warm_start(spec: dict, init: dict) -> tuple[BitNetLM, dict]:
    """The student of a `model` spec with `init_from` set, and what the run records about it.

    `spec` is the rest of the spec (`name` and `BitNetConfig` overrides such as `max_seq_len`),
    `init` its `init_*` keys (`split_spec`). The record holds the source, the blocks kept, the
    SubLN init and the source's tokenizer hash.
    """
    overrides, subln, quantize = _options(spec)
    record: dict = {}
    model, _ = _convert(init["init_from"], init["init_layers"], subln, init["init_subln"], quantize, overrides,
                        record)
    return model, record


def student_config(spec: dict) -> BitNetConfig:
    """The student config of a `model` spec, warm-started or not, reading no weights (only the
    source's config): for sizing and timing a student before building it."""
    spec, init = split_spec(spec)
    if not init["init_from"]:
        return BitNetConfig.from_spec(spec)
    overrides, subln, quantize = _options(spec)
    folder, gguf_file = locate(init["init_from"])
    config = _source_config(init["init_from"], folder, gguf_file)
    return llama_config(config, layers=init["init_layers"], subln=subln, quantize=quantize, source=init["init_from"],
                        **overrides)[0]


def _options(spec: dict) -> tuple[dict, bool, bool]:
    """(`BitNetConfig` overrides, subln, quantize) of a warm-start spec without its init keys."""
    overrides = {k: v for k, v in spec.items() if k != "name"}
    return overrides, overrides.pop("subln", True), overrides.pop("quantize", True)


def traces_tokenizer_hash(datamodule) -> str | None:
    """The student tokenizer hash the training traces were made for (None if nothing says)."""
    source = getattr(datamodule, "source", None)
    if source is not None and hasattr(source, "tokenizer_hash"):
        return source.tokenizer_hash
    trace_dir = getattr(datamodule, "trace_dir", None)
    shards = list_shards(trace_dir) if trace_dir else []
    if not shards:
        return None
    path, fs = arrow_path(shards[0])
    meta = pq.read_schema(path, filesystem=fs).metadata or {}
    value = meta.get(b"bitnet_kde.student_tokenizer_hash")
    return value.decode() if value else None


def check_tokenizer(record: dict, datamodule) -> None:
    """Refuse traces made for another tokenizer than the warm start's source."""
    traces = traces_tokenizer_hash(datamodule)
    if traces is not None and traces != record["tokenizer_hash"]:
        raise PretrainedError(
            f"init_from={record['source']!r}: its tokenizer (hash {record['tokenizer_hash']}) is not the traces' "
            f"student tokenizer (hash {traces}): a warm-started student keeps its source's vocabulary, so collect "
            "traces with collection.student_tokenizer set to the source's tokenizer, or warm-start from a model "
            "that uses the traces' tokenizer")
