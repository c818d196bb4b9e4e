"""Train a BitNet student on KD traces: `python train.py [group=option ...] [key=value ...]`.

This file only composes: Hydra builds the config, `instantiate` builds the datamodule,
module, callbacks, loggers and trainer from it, and the return value (the metric named by
`optimized_metric`) is what Hydra sweepers such as Optuna minimize.
"""

from __future__ import annotations

import logging

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bitnet_kde import cli, records, settings, storage
from bitnet_kde.training import DistillationModule

log = logging.getLogger("train")


def instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a callbacks/logger group that has a `_target_`."""
    return [instantiate(c) for c in (cfg or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def train(cfg: DictConfig) -> float | None:
    # the store (traces, checkpoints) must be usable before any work starts
    storage.setup(cfg, cfg.paths.data_dir, cfg.paths.checkpoint_dir, cfg.ckpt_path, exit_on_error=True)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    # Plain containers (not DictConfig) so checkpoints load with torch's weights_only unpickler.
    module = DistillationModule(**{k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "loss", "optim")})
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    if cfg.validate_before_fit:
        trainer.validate(module, datamodule=datamodule)
    # weights_only=True always: Lightning's default turns it off for http(s) paths, and a resumed
    # checkpoint is a pickle that could otherwise run code (storage.setup has refused http(s) already)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    if cfg.optimized_metric and cfg.optimized_metric not in trainer.callback_metrics:
        # The run ended before its first validation (e.g. max_steps < val_check_interval):
        # validate the final weights so a sweeper always gets a number.
        trainer.validate(module, datamodule=datamodule, verbose=False)

    if trainer.is_global_zero:
        ckpt = trainer.checkpoint_callback
        log.info("checkpoints: %s (best: %s)", cfg.paths.checkpoint_dir, ckpt.best_model_path if ckpt else None)
        log.info("TensorBoard: tensorboard --logdir %s", cfg.paths.output_dir)
        records.write_train_summary(cfg, trainer)
    metric = trainer.callback_metrics.get(cfg.optimized_metric)
    return None if metric is None else float(metric)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    settings.check(cfg, exit_on_error=True)
    return train(cfg)


if __name__ == "__main__":
    cli.run(main)
