"""LightningModule: the BitNet student trained with the distillation loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch.distributed.fsdp import FSDPModule
from torch.optim.lr_scheduler import LambdaLR

from bitnet_kde.losses import DistillationLoss, LossConfig, ProjectedLogits
from bitnet_kde.model import BitNetConfig, BitNetLM
from bitnet_kde.model.pretrained import split_spec
from bitnet_kde.model.sizing import measure_flops_per_token
from bitnet_kde.training.fsdp import shard_student
from bitnet_kde.training.warmstart import check_tokenizer, warm_start

LOGGED = ("kd", "ce", "format", "top1_agree")
TERMS = ("kd", "ce", "format")
"""The terms of the training loss, checked for non-finite values every step."""


class NonFiniteLossError(FloatingPointError):
    """A training loss term or a validation metric became NaN or infinite; the run stops there."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up from 0, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def quant_lambda(step: int, warmup_steps: int) -> float:
    """Quantization blend at an optimizer step: linear from 0 at step 0 to 1 at `warmup_steps`, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


@dataclass
class OptimConfig:
    """AdamW and its schedule; `configs/optim/adamw.yaml` lists the same keys with the same values."""

    lr: float = 3.0e-3
    """Peak learning rate, reached at the end of the warm-up."""
    weight_decay: float = 0.1
    """AdamW weight decay of the matrices inside the blocks; norms and the embedding do not decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW coefficients of the running averages of the gradient and of its square."""
    eps: float = 1.0e-8
    """AdamW term added to the denominator for numerical stability."""
    warmup_steps: int = 50
    """Steps of linear LR warm-up from 0 (capped below the run's total steps)."""
    min_lr_ratio: float = 0.1
    """Final LR of the cosine decay, as a fraction of `lr`."""
    quant_warmup_steps: int = 0
    """Steps over which quantization blends in from full precision: lambda = step / quant_warmup_steps,
    then 1 (0 = quantized from step 0). The A8 -> A4 flip waits for lambda = 1."""


class DistillationModule(pl.LightningModule):
    """Student + losses + optimizer. Hydra passes plain dicts so checkpoints reload anywhere.

    Args:
        model: `BitNetConfig.from_spec` mapping, e.g. `{"name": "mini", "vocab_size": 49152}`; with
            `init_from` (and `init_layers`, `init_subln`) the student is warm-started from that pretrained model
            (`bitnet_kde.training.warmstart`) and the saved `model` hyper-parameter becomes its
            resolved shape, so checkpoints reload without the source.
        loss: `LossConfig` fields.
        optim: `OptimConfig` fields.
    """

    def __init__(self, model: dict, loss: dict | None = None, optim: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        spec, init = split_spec(model)
        self.warm_start: dict | None = None
        if init["init_from"]:
            self.model, self.warm_start = warm_start(spec, init)
            self.hparams["model"] = {"name": spec["name"], **self.model.cfg.to_dict()}
            self.hparams["warm_start"] = self.warm_start
        else:
            self.model = BitNetLM(BitNetConfig.from_spec(spec))
        self.loss_fn = DistillationLoss(LossConfig(**(loss or {})))
        self.optim_cfg = OptimConfig(**(optim or {}))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def configure_model(self) -> None:
        # Under ModelParallelStrategy (trainer=fsdp) only; once (fit, then validate, call it again).
        if self.device_mesh is None or isinstance(self.model, FSDPModule):
            return
        strategy = self.trainer.strategy
        shard_student(self.model, self.device_mesh["data_parallel"],
                      activation_checkpointing=getattr(strategy, "activation_checkpointing", False))

    def setup(self, stage: str) -> None:
        if self.warm_start is not None:
            check_tokenizer(self.warm_start, self.trainer.datamodule)  # before the first step
        # FLOPs of one forward+backward token, counted once on the meta device (no memory, no
        # compute) at a typical length; ThroughputMonitor turns it into FLOP/s (and MFU on GPUs).
        self.flops_per_token = measure_flops_per_token(self.model.cfg, min(256, self.model.cfg.max_seq_len))

    def _check_finite(self, out: dict, batch_idx: int) -> None:
        """Stop on a NaN/inf loss before the optimizer sees it (one device sync for all terms)."""
        names = (*TERMS, "loss")
        values = torch.stack([out[t].detach().float() for t in names])
        if bool(torch.isfinite(values).all()):
            return
        bad = {t: v for t, v in zip(names, values.tolist()) if not math.isfinite(v)}
        # the total is non-finite whenever a term is: name the terms, the total only on its own
        terms = {t: v for t, v in bad.items() if t != "loss"} or bad
        which = ", ".join(f"{t}={v}" for t, v in terms.items())
        raise NonFiniteLossError(
            f"non-finite training loss at step {self.global_step} (batch {batch_idx}): {which}; the run stops "
            "without writing a checkpoint of these weights (check loss.tau, optim.lr and the traces)")

    def _step(self, batch: dict, stage: str, batch_idx: int = 0) -> torch.Tensor:
        # The fused head + loss projects a chunk of positions at a time: no [B, T, V] logits.
        hidden = self.model(batch["input_ids"], return_hidden=True)
        out = self.loss_fn(ProjectedLogits(hidden, self.model.lm_head.weight), batch)
        if stage == "train":
            self._check_finite(out, batch_idx)
        n = int(out["n_tokens"])
        on_step = stage == "train"
        self.log_dict({f"{stage}/{k}": out[k] for k in LOGGED}, on_step=on_step, on_epoch=not on_step,
                      batch_size=max(n, 1), sync_dist=not on_step, prog_bar=False)
        self.log(f"{stage}/loss", out["loss"], on_step=on_step, on_epoch=not on_step, batch_size=max(n, 1),
                 sync_dist=not on_step, prog_bar=True)
        return out["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        steps = self.optim_cfg.quant_warmup_steps
        if steps:
            lam = quant_lambda(self.global_step, steps)
            self.model.set_quant_lambda(lam)
            self.log("train/quant_lambda", lam, on_step=True, on_epoch=False)
        self.flops_per_batch = int(self.flops_per_token * batch["input_ids"].numel())
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        cfg = self.optim_cfg
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # Matrices inside the blocks decay; norms and the (tied) embedding do not.
            (decay if p.dim() >= 2 and not name.startswith(("embed", "lm_head")) else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(int(cfg.warmup_steps), max(total - 1, 1))
        sched = LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total, cfg.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # The activation mode is part of the model's state: eval and export read it from here.
    # So is the warm-up blend: eval refuses a student saved before it reached 1.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["activation_bits"] = self.model.activation_bits
        checkpoint["quant_lambda"] = self.model.quant_lambda

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.model.set_activation_bits(int(checkpoint.get("activation_bits", 8)))
        self.model.set_quant_lambda(float(checkpoint.get("quant_lambda", 1.0)))
