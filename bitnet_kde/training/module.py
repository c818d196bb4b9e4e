"""LightningModule: the BitNet student trained with the distillation loss."""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.fabric.utilities.throughput import measure_flops
import torch
from torch.optim.lr_scheduler import LambdaLR

from bitnet_kde.losses import DistillationLoss, LossConfig
from bitnet_kde.model import BitNetConfig, BitNetLM

LOGGED = ("kd", "ce", "format", "top1_agree")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up from 0, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def measure_flops_per_token(cfg: BitNetConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a [1, seq_len] batch, measured on meta."""
    with torch.device("meta"):
        model = BitNetLM(cfg)
        x = torch.zeros(1, seq_len, dtype=torch.long)
        flops = measure_flops(model, lambda: model(x), loss_fn=torch.Tensor.sum)
    return flops / seq_len


class DistillationModule(pl.LightningModule):
    """Student + losses + optimizer. Hydra passes plain dicts so checkpoints reload anywhere.

    Args:
        model: `BitNetConfig.from_name` arguments, e.g. `{"name": "mini", "vocab_size": 49152}`.
        loss: `LossConfig` fields.
        optim: `lr`, `weight_decay`, `betas`, `eps`, `warmup_steps`, `min_lr_ratio`,
            `quant_warmup_steps` (steps over which quantization blends in from full precision; 0 = off).
    """

    def __init__(self, model: dict, loss: dict | None = None, optim: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        model = dict(model)
        self.model = BitNetLM(BitNetConfig.from_name(model.pop("name"), **model))
        self.loss_fn = DistillationLoss(LossConfig(**(loss or {})))
        self.optim_cfg = {"lr": 3e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8,
                          "warmup_steps": 100, "min_lr_ratio": 0.1, "quant_warmup_steps": 0, **(optim or {})}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def setup(self, stage: str) -> None:
        # FLOPs of one forward+backward token, counted once on the meta device (no memory, no
        # compute) at a typical length; ThroughputMonitor turns it into FLOP/s (and MFU on GPUs).
        self.flops_per_token = measure_flops_per_token(self.model.cfg, min(256, self.model.cfg.max_seq_len))

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        out = self.loss_fn(self.model(batch["input_ids"]), batch)
        n = int(out["n_tokens"])
        on_step = stage == "train"
        self.log_dict({f"{stage}/{k}": out[k] for k in LOGGED}, on_step=on_step, on_epoch=not on_step,
                      batch_size=max(n, 1), sync_dist=not on_step, prog_bar=False)
        self.log(f"{stage}/loss", out["loss"], on_step=on_step, on_epoch=not on_step, batch_size=max(n, 1),
                 sync_dist=not on_step, prog_bar=True)
        return out["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        steps = self.optim_cfg["quant_warmup_steps"]
        if steps:
            self.model.set_quant_lambda(self.global_step / steps)
        self.flops_per_batch = int(self.flops_per_token * batch["input_ids"].numel())
        return self._step(batch, "train")

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
        groups = [{"params": decay, "weight_decay": cfg["weight_decay"], "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(int(cfg["warmup_steps"]), max(total - 1, 1))
        sched = LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total, cfg["min_lr_ratio"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # The activation mode is part of the model's state: eval and export read it from here.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["activation_bits"] = self.model.activation_bits

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.model.set_activation_bits(int(checkpoint.get("activation_bits", 8)))
