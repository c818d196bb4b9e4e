"""A non-finite loss stops training with the step and the term named, and no NaN checkpoint is written.

The callbacks are the ones `configs/callbacks/default.yaml` gives `train.py` (ModelCheckpoint and
FiniteMetrics), instantiated from that file with a temporary checkpoint folder.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bitnet_kde.data import KDTraceDataModule
from bitnet_kde.training import DistillationModule, NonFiniteLossError

from conftest import ROOT

CALLBACKS = OmegaConf.load(ROOT / "configs" / "callbacks" / "default.yaml")


def checkpoint_callbacks(ckpt_dir, *, guard: bool = True) -> list[pl.Callback]:
    out = [instantiate(CALLBACKS.model_checkpoint, dirpath=str(ckpt_dir))]
    return [instantiate(CALLBACKS.finite_metrics), *out] if guard else out


def poisoned_module(term: str, *, from_step: int | None = None, in_validation: bool = False) -> DistillationModule:
    """A tiny student whose loss term `term` is NaN from training step `from_step` on, or in validation."""
    module = DistillationModule({"name": "tiny", "vocab_size": 64}, optim={"warmup_steps": 2})
    clean = module.loss_fn.forward

    def forward(logits, batch):
        out = clean(logits, batch)
        hit = (not module.training) if in_validation else (module.training and module.global_step >= from_step)
        if hit:
            out[term] = out[term] * float("nan")
            out["loss"] = out["loss"] + out[term]
        return out

    module.loss_fn.forward = forward
    return module


def fit(module, trace_dir, tmp_path, callbacks, max_steps=6):
    torch.manual_seed(0)
    dm = KDTraceDataModule(str(trace_dir), vocab_size=64, batch_size=4, num_workers=0)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path,
                         num_sanity_val_steps=0, val_check_interval=2, limit_val_batches=2)
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.mark.parametrize("term", ["kd", "ce", "format"])
def test_nan_training_term_stops_at_its_step(trace_dir, tmp_path, term):
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(NonFiniteLossError) as e:
        fit(poisoned_module(term, from_step=3), trace_dir, tmp_path, checkpoint_callbacks(ckpts))
    msg = str(e.value)
    assert "\n" not in msg and "at step 3" in msg and f"{term}=nan" in msg
    assert not any(f"{other}=" in msg for other in {"kd", "ce", "format"} - {term})
    # the validation at step 2 saved finite checkpoints; nothing after the NaN
    names = sorted(p.name for p in ckpts.iterdir())
    assert names and not any("nan" in n for n in names), names
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 2


def test_nan_validation_metric_writes_no_checkpoint(trace_dir, tmp_path):
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(NonFiniteLossError, match=r"non-finite validation metric at step 2: .*val/loss=nan"):
        fit(poisoned_module("kd", in_validation=True), trace_dir, tmp_path, checkpoint_callbacks(ckpts))
    assert not ckpts.exists() or not any(ckpts.iterdir())


def test_without_the_guard_a_nan_checkpoint_is_written(trace_dir, tmp_path):
    # what FiniteMetrics prevents: ModelCheckpoint alone saves a NaN-named top-k file and last.ckpt
    ckpts = tmp_path / "checkpoints"
    fit(poisoned_module("kd", in_validation=True), trace_dir, tmp_path, checkpoint_callbacks(ckpts, guard=False),
        max_steps=2)
    assert any("nan" in p.name for p in ckpts.iterdir())
