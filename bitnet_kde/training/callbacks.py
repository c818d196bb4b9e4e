"""Training callbacks besides the flip: finite validation metrics, quantization statistics, the
TensorBoard hparams tab, checkpoints with a health summary beside them, and progress log lines."""

from __future__ import annotations

import logging
import math
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.tensor import DTensor

from bitnet_kde import storage
from bitnet_kde.progress import RateLog, interactive
from bitnet_kde.quant import ternary_fractions, ternary_weight
from bitnet_kde.training.flip import ActivationFlip
from bitnet_kde.training.module import NonFiniteLossError

log = logging.getLogger(__name__)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """`t`, gathered when FSDP holds it as shards (a DTensor). Gathering is a collective: every
    rank must make the same calls, so statistics are computed on all ranks and logged on one."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class FiniteMetrics(pl.Callback):
    """Stop a training run when a validation metric (`val/...`) is NaN or infinite.

    It runs at the end of each validation before any `ModelCheckpoint` (Lightning always calls
    checkpoint callbacks last), so no checkpoint of NaN weights is written, named after a NaN
    metric, or selected as best; the checkpoints of earlier validations stay as they were.
    """

    def __init__(self, prefix: str = "val/"):
        self.prefix = prefix

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        bad = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith(self.prefix) and not math.isfinite(float(v))}
        if bad:
            which = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
            raise NonFiniteLossError(f"non-finite validation metric at step {trainer.global_step}: {which}; the "
                                     "run stops without writing a checkpoint of these weights")


class QuantStats(pl.Callback):
    """Every `every_n_steps`, log per-BitLinear fractions of -1/0/+1 weights and scale histograms.

    Scalars (`quant/<layer>/neg|zero|pos|scale`) go to every logger; histograms of the
    per-matrix scales and of the latent weights go to TensorBoard only. Once per optimizer step:
    with gradient accumulation the step stays the same for several batches.
    """

    def __init__(self, every_n_steps: int = 50, histograms: bool = True):
        self.every_n_steps = every_n_steps
        self.histograms = histograms
        self._logged_step: int | None = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.loggers or step == self._logged_step:
            return
        self._logged_step = step
        metrics, scales, codes = {}, [], {}
        tb = _tensorboard(trainer) if self.histograms else None
        for name, layer in pl_module.model.named_bitlinears():  # every rank: see _whole
            w = _whole(layer.weight)
            if not trainer.is_global_zero:
                continue
            stats = ternary_fractions(w)
            short = name.replace("blocks.", "b").replace(".weight", "")
            metrics.update({f"quant/{short}/{k}": v for k, v in stats.items()})
            scales.append(stats["scale"])
            if tb is not None:
                codes[name] = ternary_weight(w.float())[0].flatten()
        if not trainer.is_global_zero:
            return
        if metrics:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=step)
        if tb is not None and scales:
            tb.experiment.add_histogram("quant/scales", torch.tensor(scales), step)
            for name, wq in codes.items():
                tb.experiment.add_histogram(f"quant_hist/{name}", wq, step, bins=3)


class HparamsMetrics(pl.Callback):
    """Write the run's hparams with its final validation metrics for TensorBoard's HPARAMS tab."""

    def __init__(self, metrics: tuple[str, ...] = ("val/loss", "val/kd", "val/ce", "val/top1_agree")):
        self.metrics = tuple(metrics)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tb = _tensorboard(trainer)
        if tb is None or not trainer.is_global_zero:
            return
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if k in self.metrics}
        if final:
            tb.log_hyperparams(pl_module.hparams, metrics={f"hp/{k}": v for k, v in final.items()})


def batch_size(batch: dict) -> int:
    """Sequences in a batch (for `ThroughputMonitor`)."""
    return int(batch["input_ids"].shape[0])


def batch_tokens(batch: dict) -> int:
    """Token positions a batch runs through the model, padding included (for `ThroughputMonitor`)."""
    return int(batch["input_ids"].numel())


def health_path(checkpoint: str) -> str:
    """Where the health summary of `checkpoint` goes: `last.ckpt` -> `last_health.json`."""
    return f"{os.path.splitext(str(checkpoint))[0]}_health.json"


def _metric(trainer: pl.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def _summary(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)} if values else {}


class HealthCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that writes `<checkpoint>_health.json` beside every file it saves.

    The summary lets a person judge a run from its storage without loading a checkpoint: step,
    real (loss-bearing) tokens seen, the latest train and validation loss, the A8->A4 flip state,
    the ternary fractions (-1/0/+1) over all BitLinear layers (mean, min, max across layers), and
    the non-finite values counted in the weights (at the save) and in the gradients of every
    optimizer step since the previous save. A checkpoint that top-k selection deletes takes its
    summary with it. Lightning routes every save and removal of this callback through
    `_save_checkpoint` / `_remove_checkpoint`, which is where the summary is written and removed.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._grad_nonfinite: torch.Tensor | None = None
        self._grad_steps = 0
        # the gradient counts since the previous save, frozen at the step being saved: every file
        # saved at one step (a top-k file, then last.ckpt) reports the same figures
        self._saved: tuple[int, int, int] | None = None

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            # a device tensor: no host sync per step, read once at the next save
            bad = torch.stack([(~torch.isfinite(g)).sum() for g in grads]).sum()
            self._grad_nonfinite = bad if self._grad_nonfinite is None else self._grad_nonfinite + bad
            self._grad_steps += 1

    @torch.no_grad()
    def health(self, trainer: pl.Trainer, pl_module: pl.LightningModule, grads: int, grad_steps: int) -> dict:
        """The summary of the model as it is now, with `grads` non-finite gradient values counted
        over `grad_steps` optimizer steps (see the class docstring)."""
        flip = next((c for c in trainer.callbacks if isinstance(c, ActivationFlip)), None)
        fractions: dict[str, list[float]] = {"neg": [], "zero": [], "pos": []}
        for _, layer in pl_module.model.named_bitlinears():
            stats = ternary_fractions(_whole(layer.weight))
            for k in fractions:
                fractions[k].append(stats[k])
        weights_bad = sum(int((~torch.isfinite(_whole(p))).sum()) for p in pl_module.parameters())
        return {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "tokens_seen": flip.tokens_seen if flip else None,
            "train_loss": _metric(trainer, "train/loss"),
            "val_loss": _metric(trainer, "val/loss"),
            "flip": {"flipped": flip.flipped, "step": flip.flip_step, "at_tokens": flip.flip_at_tokens,
                     "enabled": flip.enabled} if flip else None,
            "activation_bits": pl_module.model.activation_bits,
            "ternary": {"layers": len(fractions["zero"]), **{k: _summary(v) for k, v in fractions.items()}},
            "nonfinite": {"weights": weights_bad, "grads": grads, "grad_steps": grad_steps},
        }

    def _grad_counts(self, step: int) -> tuple[int, int]:
        """(non-finite gradient values, optimizer steps) since the save before `step`."""
        if self._saved is None or self._saved[0] != step:
            bad = int(self._grad_nonfinite) if self._grad_nonfinite is not None else 0
            self._saved = (step, bad, self._grad_steps)
            self._grad_nonfinite, self._grad_steps = None, 0
        return self._saved[1], self._saved[2]

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        grads, grad_steps = self._grad_counts(trainer.global_step)
        health = self.health(trainer, trainer.lightning_module, grads, grad_steps)  # every rank: see _whole
        if trainer.is_global_zero:
            storage.write_json_atomic(health_path(filepath), {"checkpoint": storage.name_of(filepath), **health})

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero and storage.exists(health_path(filepath)):
            trainer.strategy.remove_checkpoint(health_path(filepath))


class ProgressLog(pl.Callback):
    """When standard output is not a terminal (a log, a notebook, CI), log one training progress
    line every `every_s` seconds: steps done/total, steps/s, ETA, the last train loss.

    A terminal has Lightning's progress bar and gets nothing from this callback.
    """

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self._lines: RateLog | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if interactive() or not trainer.is_global_zero:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._lines = RateLog(log, "train", total, "steps", self.every_s)
        self._lines.restart(trainer.global_step)  # a resumed run: rate and ETA from where it restarted

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._lines is not None:
            loss = _metric(trainer, "train/loss")
            self._lines.update(trainer.global_step, f"loss {loss:.4f}" if loss is not None else "")
