"""Checkpoint health summaries beside each saved checkpoint, progress log lines off a terminal, and
quantization statistics once per optimizer step."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger

from bitnet_kde.data import KDTraceDataModule
from bitnet_kde.progress import RateLog, format_eta
from bitnet_kde.training import (ActivationFlip, DistillationModule, HealthCheckpoint, ProgressLog, QuantStats,
                                 health_path)

from conftest import small_source


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_rate_log_interval_rate_and_eta(caplog):
    clock = Clock()
    lines = RateLog(logging.getLogger("t"), "collect", 100, "prompts", every_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="t"):
        clock.t = 5
        assert not lines.update(10)  # inside the interval: silent
        clock.t = 20
        assert lines.update(40)  # 40 prompts in 20 s: 2/s, 60 left -> 30 s
        clock.t = 21
        assert lines.update(100)  # the last item always logs
    assert caplog.messages[0] == "collect: 40/100 (40%), 2.00 prompts/s, ETA 30s"
    assert caplog.messages[1].startswith("collect: 100/100 (100%)") and caplog.messages[1].endswith("ETA 0s")
    assert [format_eta(s) for s in (None, 59.4, 61, 3725)] == ["?", "59s", "1m01s", "1h02m"]


def fit(tmp_path, callbacks, max_steps=6, **trainer_kw):
    torch.manual_seed(0)
    src = tmp_path / "traces"
    small_source().write(src)
    dm = KDTraceDataModule(str(src), vocab_size=64, batch_size=4, num_workers=0, val_fraction=0.25)
    module = DistillationModule({"name": "tiny", "vocab_size": 64}, optim={"warmup_steps": 2})
    trainer_kw = {"logger": False, **trainer_kw}
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path,
                         num_sanity_val_steps=0, val_check_interval=3, limit_val_batches=2, **trainer_kw)
    trainer.fit(module, datamodule=dm)
    return trainer, module


def test_health_json_beside_each_checkpoint(tmp_path):
    flip = ActivationFlip(flip_at_tokens=1)  # flips at the first optimizer step
    ckpt = HealthCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step}", monitor="val/loss", save_top_k=1,
                            save_last=True)
    trainer, module = fit(tmp_path, [flip, ckpt])
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    ckpts = [f for f in files if f.endswith(".ckpt")]
    # one summary per checkpoint kept; the top-1 loser of the two validations took its summary along
    assert sorted(f for f in files if f.endswith("_health.json")) == sorted(
        health_path(f) for f in ckpts) and len(ckpts) == 2
    h = json.loads((tmp_path / "ckpt" / "last_health.json").read_text())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert h["checkpoint"] == "last.ckpt" and h["step"] == saved["global_step"] == 6
    assert h["tokens_seen"] == saved["callbacks"]["ActivationFlip"]["tokens_seen"] > 0
    assert h["flip"] == {"flipped": True, "step": 1, "at_tokens": 1, "enabled": True} and h["activation_bits"] == 4
    assert h["val_loss"] == pytest.approx(float(trainer.callback_metrics["val/loss"]))
    assert h["train_loss"] > 0
    layers = list(module.model.named_bitlinears())
    zero = [layer.ternary_stats()["zero"] for _, layer in layers]
    assert h["ternary"]["layers"] == len(layers)
    assert h["ternary"]["zero"]["mean"] == pytest.approx(sum(zero) / len(zero))
    assert h["ternary"]["zero"]["min"] == pytest.approx(min(zero)) and h["ternary"]["zero"]["max"] == pytest.approx(
        max(zero))
    # 3 optimizer steps between the saves at step 3 and step 6, nothing non-finite
    assert h["nonfinite"] == {"weights": 0, "grads": 0, "grad_steps": 3}


def test_health_counts_non_finite_gradients_since_the_last_save(tmp_path):
    class PoisonGrad(pl.Callback):
        """Two NaNs in one gradient at the last optimizer step (the next loss would be NaN and stop the run)."""

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 5:
                next(pl_module.parameters()).grad.view(-1)[1] = float("nan")
                next(pl_module.parameters()).grad.view(-1)[0] = float("nan")

    ckpt = HealthCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    # gradient clipping would turn the NaN gradient into NaN weights: counted apart, so keep it off
    fit(tmp_path, [PoisonGrad(), ckpt, ActivationFlip(flip_at_tokens=10**9)], gradient_clip_val=None)
    h = json.loads((tmp_path / "ckpt" / "last_health.json").read_text())
    # save_top_k=0 and no monitor: last.ckpt at the end of the run is the first save, after 6 steps
    assert h["nonfinite"]["grads"] == 2 and h["nonfinite"]["grad_steps"] == 6
    assert h["nonfinite"]["weights"] > 0  # AdamW spread the NaN into the weights it updated


def test_progress_log_writes_lines_when_not_a_terminal(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("bitnet_kde.training.callbacks.interactive", lambda: False)
    with caplog.at_level(logging.INFO, logger="bitnet_kde.training.callbacks"):
        fit(tmp_path, [ProgressLog(every_s=0.0), ActivationFlip(flip_at_tokens=10**9)], max_steps=4,
            enable_checkpointing=False)
    lines = [m for m in caplog.messages if m.startswith("train: ")]
    assert [m.split(",")[0] for m in lines] == ["train: 1/4 (25%)", "train: 2/4 (50%)", "train: 3/4 (75%)",
                                                "train: 4/4 (100%)"]
    assert all("steps/s, ETA" in m and "loss " in m for m in lines)


class StepsLogged(Logger):
    """The steps at which quantization statistics were logged."""

    name, version = "steps", 0

    def __init__(self):
        super().__init__()
        self.quant_steps = []

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("quant/") for k in metrics):
            self.quant_steps.append(step)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_quant_stats_log_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    logger = StepsLogged()
    # 3 batches per optimizer step: the global step stays at 0, 2 and 4 for several batch ends
    fit(tmp_path, [QuantStats(every_n_steps=2, histograms=False), ActivationFlip(flip_at_tokens=10**9)],
        max_steps=4, accumulate_grad_batches=3, enable_checkpointing=False, logger=logger)
    assert logger.quant_steps == [0, 2, 4]
