"""The A8 -> A4 activation flip, driven by a budget of real training tokens.

Tokens are counted as loss-bearing positions (`batch["loss_mask"]`: completion tokens, no
padding, no prompt) and summed over all ranks every step, so every rank flips at the same
step whatever its local batches held. The count and the flip live in the checkpoint; a
resumed run continues at the same count and in the same mode.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


class ActivationFlip(pl.Callback):
    """Switch every BitLinear from 8-bit to 4-bit activations once `flip_at_tokens` is reached.

    Args:
        flip_at_tokens: absolute token count of the flip. If None it is `flip_fraction` of
            `token_budget`, or, without a budget, of the tokens the run will see
            (`max_steps` x accumulation x mean loss tokens per batch, or `max_epochs` epochs).
        flip_fraction: share of the budget after which to flip (BitNet a4.8 used ~0.95).
        token_budget: planned real training tokens of the run (optional).
        enabled: False keeps the model's configured bits for the whole run (A8: the A8-only ablation;
            `model.activation_bits=4`: A4 from the first step); tokens are still counted. An enabled
            flip refuses a model configured for A4, which it would otherwise train at A8 first.
    """

    def __init__(self, flip_at_tokens: int | None = None, flip_fraction: float = 0.9,
                 token_budget: int | None = None, enabled: bool = True):
        if not 0.0 < flip_fraction <= 1.0:
            raise ValueError(f"flip_fraction must be in (0, 1], got {flip_fraction}")
        self.flip_at_tokens = flip_at_tokens
        self.flip_fraction = flip_fraction
        self.token_budget = token_budget
        self.enabled = enabled
        self.tokens_seen = 0
        self.flipped = False
        self.flip_step: int | None = None
        self._step_at_batch_start = 0

    # -- resolving the flip point -------------------------------------------------------
    def _estimate_budget(self, trainer: pl.Trainer) -> int | None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "train_tokens_per_epoch"):
            return None
        per_epoch = dm.train_tokens_per_epoch()
        # num_training_batches is per rank; one global micro-step consumes one batch on every
        # rank, so a global micro-step sees per_epoch / num_training_batches tokens on average.
        batches = trainer.num_training_batches
        estimates = []
        if trainer.max_steps and trainer.max_steps > 0 and batches and batches != float("inf"):
            estimates.append(trainer.max_steps * trainer.accumulate_grad_batches * per_epoch / batches)
        if trainer.max_epochs and trainer.max_epochs > 0:
            estimates.append(per_epoch * trainer.max_epochs)
        return int(min(estimates)) if estimates else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_fit_start: the train dataloader (and num_training_batches) exists only now.
        if self.flip_at_tokens is None and self.enabled:
            budget = self.token_budget or self._estimate_budget(trainer)
            if budget is None:
                raise ValueError("ActivationFlip needs flip_at_tokens, token_budget, or a run length "
                                 "(trainer.max_steps / max_epochs) to estimate the budget from")
            self.flip_at_tokens = max(1, int(self.flip_fraction * budget))
            log.info("A8->A4 flip planned at %d tokens (%.0f%% of %d)", self.flip_at_tokens,
                     100 * self.flip_fraction, budget)
        configured = pl_module.model.activation_bits
        if self.enabled and not self.flipped and configured == 4:
            raise ValueError("model.activation_bits=4 with the A8 -> A4 flip enabled: the flip trains at A8 until "
                             "its token budget; set callbacks.activation_flip.enabled=false to train at A4 from the "
                             "first step, or leave model.activation_bits=8")
        # Resumed after the flip: restore the mode before the first step.
        pl_module.model.set_activation_bits(4 if self.flipped else configured)

    # -- counting -----------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        local = batch["loss_mask"].sum().to(device=pl_module.device, dtype=torch.long)
        total = trainer.strategy.reduce(local, reduce_op="sum")
        self.tokens_seen += int(total)
        # An optimizer step ran in this batch iff global_step moved: with accumulate_grad_batches > 1
        # the earlier micro-batches of a step must not flip, or one step would mix A8 and A4 gradients.
        step_boundary = trainer.global_step > self._step_at_batch_start
        fully_ternary = pl_module.model.quant_lambda >= 1.0
        if self.enabled and not self.flipped and step_boundary and fully_ternary \
                and self.tokens_seen >= self.flip_at_tokens:
            pl_module.model.set_activation_bits(4)
            self.flipped = True
            self.flip_step = trainer.global_step
            log.info("A8->A4 flip at step %d after %d tokens", self.flip_step, self.tokens_seen)
            pl_module.log_dict({"flip/step": float(self.flip_step), "flip/tokens": float(self.tokens_seen)},
                               on_step=True, on_epoch=False, rank_zero_only=True)
        pl_module.log_dict({"train/tokens_seen": float(self.tokens_seen),
                            "train/activation_bits": float(pl_module.model.activation_bits)},
                           on_step=True, on_epoch=False, rank_zero_only=True)

    # -- checkpoint state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "flipped": self.flipped, "flip_step": self.flip_step,
                "flip_at_tokens": self.flip_at_tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens_seen = int(state_dict["tokens_seen"])
        self.flipped = bool(state_dict["flipped"])
        self.flip_step = state_dict.get("flip_step")
        if self.flip_at_tokens is None:
            self.flip_at_tokens = state_dict.get("flip_at_tokens")
