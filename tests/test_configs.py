"""Every config group composes, and the objects it describes instantiate (hydra compose API)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def cfg_with(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root={tmp_path}", *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)  # so ${hydra:...} interpolations resolve outside a run
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


@pytest.mark.parametrize("model", ["tiny", "mini", "7b"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp"])
def test_groups_compose(tmp_path, model, trainer):
    cfg = cfg_with(tmp_path, f"model={model}", f"trainer={trainer}")
    assert cfg.model.name == model
    assert cfg.model.vocab_size == cfg.data.vocab_size
    assert cfg.trainer.precision == ("bf16-mixed" if trainer in ("gpu", "fsdp") else "32-true")


def test_defaults_instantiate_on_cpu(tmp_path):
    cfg = cfg_with(tmp_path, "experiment=smoke", "logger=many")
    dm = instantiate(cfg.data)
    assert dm.vocab_size == 512 and dm.source.num_sequences == 96
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    names = {type(c).__name__ for c in callbacks}
    assert {"HealthCheckpoint", "ActivationFlip", "QuantStats", "ThroughputMonitor", "LearningRateMonitor",
            "ProgressLog"} <= names
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert {type(lg).__name__ for lg in loggers} == {"TensorBoardLogger", "CSVLogger"}
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert trainer.max_steps == 20 and trainer.precision == "32-true"


def test_optuna_search_space_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = cfg_with(tmp_path, "hparams_search=optuna")
    assert cfg.hydra.sweeper.direction == "minimize"
    assert cfg.optimized_metric == "val/kd"
