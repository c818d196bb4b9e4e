"""Numeric settings checked before any work: one rule per key, one line per refusal.

Every entry point calls `check(cfg)` first, on its composed Hydra config, so a value that could
only fail later (a temperature of 0 training to NaN, a prompt limit of 0 collecting nothing, a
negative top-K written into trace metadata) stops the run before a store is touched, a model
loaded or a trace written. The configs of the stages differ: a rule applies when its key is in
the config, so one list serves train, collect, eval and the teacher baseline.

The error names the key, the value given and the allowed range, e.g.
`invalid setting loss.tau=0: must be a number > 0`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from bitnet_kde.model import BitNetConfig
from bitnet_kde.model.pretrained import SUBLN_INITS, split_spec

__all__ = ["RULES", "SettingsError", "check"]


class SettingsError(ValueError):
    """A setting outside its allowed range; the message is one line naming key, value and range."""


def _is_number(x: object, integer: bool) -> bool:
    if isinstance(x, bool):
        return False
    if integer:
        return isinstance(x, int)
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(frozen=True)
class Rule:
    """`key` must be a number (an integer when `integer`) within the given bounds.

    `gt`/`ge`/`lt`/`le` are the bounds (strict or not); `null` lets the key be null; `also` lists
    extra values allowed outside the bounds (Lightning's -1 = no limit); `note` says what the
    extra values mean.
    """

    key: str
    integer: bool = False
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    null: bool = False
    also: tuple[object, ...] = ()
    note: str = ""

    def allows(self, value: object) -> bool:
        if value is None:
            return self.null
        if not isinstance(value, bool) and value in self.also:
            return True
        if not _is_number(value, self.integer):
            return False
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    @property
    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.gt is not None and self.lt is not None:
            bounds = f"in ({self.gt:g}, {self.lt:g})"
        elif (self.gt is not None or self.ge is not None) and (self.lt is not None or self.le is not None):
            lo = f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}"
            hi = f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]"
            bounds = f"in {lo}, {hi}"
        else:
            bounds = " and ".join(f"{op} {v:g}" for op, v in
                                  ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le)) if v is not None)
        text = f"{kind} {bounds}".strip()
        extras = [*("-1" if v == -1 else repr(v) for v in self.also), *(["null"] if self.null else [])]
        if extras:
            text += ", or " + " or ".join(extras)
        return text + (f" ({self.note})" if self.note else "")


def _positive(key: str, **kw) -> Rule:
    return Rule(key, gt=0, **kw)


def _non_negative(key: str, **kw) -> Rule:
    return Rule(key, ge=0, **kw)


def _count(key: str, **kw) -> Rule:
    """An integer >= 1."""
    return Rule(key, integer=True, ge=1, **kw)


RULES: tuple[Rule, ...] = (
    # the loss (train): tau <= 0 divides logits by zero or flips the teacher's distribution
    _positive("loss.tau"),
    _non_negative("loss.kd_weight"),
    _non_negative("loss.ce_weight"),
    _non_negative("loss.format_weight"),
    _count("loss.chunk_size", null=True, note="null = all positions at once"),
    # the optimizer
    _positive("optim.lr"),
    _non_negative("optim.weight_decay"),
    _positive("optim.eps"),
    Rule("optim.warmup_steps", integer=True, ge=0),
    Rule("optim.min_lr_ratio", ge=0, le=1),
    Rule("optim.quant_warmup_steps", integer=True, ge=0),
    # the data
    _count("data.batch_size"),
    _count("data.vocab_size"),
    _count("data.k_max"),
    Rule("data.max_seq_len", integer=True, ge=2),
    Rule("data.val_fraction", gt=0, lt=1),
    Rule("data.num_workers", integer=True, ge=0),
    _count("data.source.num_sequences"),
    _count("data.source.k"),
    # the trainer (-1 / null: Lightning's "no limit")
    _count("trainer.max_steps", also=(-1,), note="-1 = no step limit"),
    _count("trainer.max_epochs", also=(-1,), null=True, note="-1 or null = no epoch limit"),
    _count("trainer.accumulate_grad_batches"),
    _count("trainer.log_every_n_steps"),
    _non_negative("trainer.gradient_clip_val", null=True),
    _count("trainer.check_val_every_n_epoch", null=True),
    # the callbacks
    Rule("callbacks.activation_flip.flip_fraction", gt=0, le=1),
    _count("callbacks.activation_flip.flip_at_tokens", null=True, note="null = flip_fraction of the budget"),
    _count("callbacks.activation_flip.token_budget", null=True, note="null = estimated from the run length"),
    _count("callbacks.quant_stats.every_n_steps"),
    _count("callbacks.throughput.window_size"),
    Rule("callbacks.model_checkpoint.save_top_k", integer=True, ge=0, also=(-1,), note="-1 = keep all"),
    # collection (collect, train with data=smollm2, eval)
    _count("collection.chunk_size"),
    _count("collection.num_shards"),
    Rule("collection.shard_index", integer=True, ge=0),
    _count("collection.prompts.limit", null=True, note="null = every prompt"),
    _count("collection.sampling.top_k"),
    Rule("collection.rs.n", integer=True, ge=0, note="0 = no sampled traces"),
    _positive("collection.rs.beta"),
    _count("collection.sampling.max_new_tokens"),
    _non_negative("collection.sampling.temperature", note="0 = greedy"),
    Rule("collection.sampling.seed", integer=True),
    # the teacher (every stage with one; API teachers and local ones have different keys)
    _count("teacher.batch_size"),
    _count("teacher.max_concurrency"),
    Rule("teacher.max_retries", integer=True, ge=0),
    _positive("teacher.timeout_s"),
    _count("teacher.max_prompts", null=True, note="null = no cap"),
    _count("teacher.max_total_tokens", null=True, note="null = no cap"),
    # eval and teacher baseline (top-level keys of their configs)
    _count("max_new_tokens"),
    _count("batch_size"),
    _count("prompts.limit", null=True, note="null = every prompt"),
    Rule("speed.prompts", integer=True, ge=0),
    _count("speed.max_new_tokens"),
    _positive("speed.teacher_tokens_per_s", null=True),
    Rule("teacher_weight_bytes", ge=1, null=True, note="bytes; e.g. 5.4e8"),
    Rule("report_answers", integer=True, ge=0),
)
"""Every checked key; a key missing from a stage's config is skipped."""

_MISSING = object()


def _value(cfg: DictConfig, key: str) -> object:
    """The resolved value at `key`, or `_MISSING` when the config has no such key (or it is `???`)."""
    value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _refuse(key: str, value: object, allowed: str) -> SettingsError:
    shown = "null" if value is None else value
    return SettingsError(f"invalid setting {key}={shown}: must be {allowed}")


def _model_max_seq_len(cfg: DictConfig) -> int | None:
    """The student's `max_seq_len`: the override in `model`, else its preset's."""
    spec = _value(cfg, "model")
    if not isinstance(spec, dict) or "name" not in spec:
        return None
    try:
        return BitNetConfig.from_spec(split_spec(spec)[0]).max_seq_len
    except (TypeError, ValueError) as e:
        raise SettingsError(f"invalid setting model: {e}") from None


def _cross_checks(cfg: DictConfig) -> None:
    """Rules between keys: each names both keys and their values."""
    data_len = _value(cfg, "data.max_seq_len")
    if data_len is not _MISSING:
        model_len = _model_max_seq_len(cfg)
        if model_len is not None and data_len > model_len:
            raise _refuse("data.max_seq_len", data_len,
                          f"<= the student's max_seq_len ({model_len} for model={_value(cfg, 'model.name')})")
    index, shards = _value(cfg, "collection.shard_index"), _value(cfg, "collection.num_shards")
    if index is not _MISSING and shards is not _MISSING and index >= shards:
        raise _refuse("collection.shard_index", index, f"< collection.num_shards ({shards})")
    betas = _value(cfg, "optim.betas")
    if betas is not _MISSING and not (isinstance(betas, list) and len(betas) == 2
                                      and all(_is_number(b, False) and 0 <= b < 1 for b in betas)):
        raise _refuse("optim.betas", betas, "two numbers in [0, 1)")
    _check_warm_start(cfg)
    bits = _value(cfg, "activation_bits")
    if bits not in (_MISSING, None, 4, 8):
        raise _refuse("activation_bits", bits, "4 or 8, or null (the checkpoint's mode)")


def _check_warm_start(cfg: DictConfig) -> None:
    """The warm-start keys' types, and a warm-up that ends inside the run (eval refuses a student
    that is not fully ternary). The source's depth bounds `init_layers` when it is loaded."""
    source, layers = _value(cfg, "model.init_from"), _value(cfg, "model.init_layers")
    if source not in (_MISSING, None) and not (isinstance(source, str) and source):
        raise _refuse("model.init_from", source, "a Hugging Face folder, a .gguf file or 'teacher', or null")
    stride = _is_number(layers, True) and layers >= 1
    listed = isinstance(layers, list) and layers and all(_is_number(i, True) and i >= 0 for i in layers)
    if layers not in (_MISSING, None) and not (stride or listed):
        raise _refuse("model.init_layers", layers, "an integer stride >= 1, a list of block indices >= 0, or null "
                      "(every block)")
    if layers not in (_MISSING, None) and source in (_MISSING, None):
        raise _refuse("model.init_layers", layers, "null without model.init_from (there are no source blocks)")
    subln_init = _value(cfg, "model.init_subln")
    if subln_init not in (_MISSING, None, *SUBLN_INITS):
        raise _refuse("model.init_subln", subln_init, f"one of {', '.join(SUBLN_INITS)}")
    warmup, steps = _value(cfg, "optim.quant_warmup_steps"), _value(cfg, "trainer.max_steps")
    if _is_number(warmup, True) and _is_number(steps, True) and warmup > 0 and steps > 0 and warmup >= steps:
        raise _refuse("optim.quant_warmup_steps", warmup, f"< trainer.max_steps ({steps}) so the run ends fully "
                      "ternary")


def check(cfg: DictConfig, *, exit_on_error: bool = False) -> None:
    """Refuse the first setting of `cfg` outside its range (`SettingsError`, one line).

    With `exit_on_error` the program exits with that line instead (what the entry points use).
    """
    try:
        for rule in RULES:
            value = _value(cfg, rule.key)
            if value is not _MISSING and not rule.allows(value):
                raise _refuse(rule.key, value, rule.allowed)
        _cross_checks(cfg)
    except SettingsError as e:
        if exit_on_error:
            raise SystemExit(f"error: {e}") from None
        raise
