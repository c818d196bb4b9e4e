"""Training callbacks besides the flip: finite validation metrics, quantization statistics and the
TensorBoard hparams tab."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from bitnet_kde.quant import ternary_weight
from bitnet_kde.training.module import NonFiniteLossError


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
    per-matrix scales and of the latent weights go to TensorBoard only.
    """

    def __init__(self, every_n_steps: int = 50, histograms: bool = True):
        self.every_n_steps = every_n_steps
        self.histograms = histograms

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step % self.every_n_steps or not trainer.loggers:
            return
        metrics, scales = {}, []
        for name, layer in pl_module.model.named_bitlinears():
            stats = layer.ternary_stats()
            short = name.replace("blocks.", "b").replace(".weight", "")
            metrics.update({f"quant/{short}/{k}": v for k, v in stats.items()})
            scales.append(stats["scale"])
        if metrics:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=step)
        tb = _tensorboard(trainer)
        if tb is not None and self.histograms and scales:
            tb.experiment.add_histogram("quant/scales", torch.tensor(scales), step)
            for name, layer in pl_module.model.named_bitlinears():
                wq, _ = ternary_weight(layer.weight.float())
                tb.experiment.add_histogram(f"quant_hist/{name}", wq.flatten(), step, bins=3)


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
