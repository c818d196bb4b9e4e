"""The A8->A4 flip: exact trigger step, checkpoint round trip, and token counting over 2 ranks."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from bitnet_kde.data import KDTraceDataModule
from bitnet_kde.training import ActivationFlip, DistillationModule

from conftest import small_source


class Recorder(pl.Callback):
    """Records (tokens in this batch, cumulative count, bits after the step) per training batch."""

    def __init__(self, flip: ActivationFlip):
        self.flip, self.rows = flip, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((int(batch["loss_mask"].sum()), self.flip.tokens_seen, pl_module.model.activation_bits))


def make(trace_dir, **dm):
    datamodule = KDTraceDataModule(str(trace_dir), vocab_size=64, batch_size=4, num_workers=0, **dm)
    module = DistillationModule({"name": "tiny", "vocab_size": 64}, optim={"warmup_steps": 2})
    return datamodule, module


def trainer(callbacks, max_steps, tmp_path, **kw):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                      default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0, **kw)


def test_flip_triggers_at_first_step_reaching_budget(trace_dir, tmp_path):
    torch.manual_seed(0)
    datamodule, module = make(trace_dir)
    # Budget in the middle of the run: the flip must happen after the batch whose tokens cross it.
    flip = ActivationFlip(flip_at_tokens=200)
    rec = Recorder(flip)
    trainer([flip, rec], 12, tmp_path).fit(module, datamodule=datamodule)
    counts = [c for _, c, _ in rec.rows]
    assert counts == list(torch.tensor([n for n, _, _ in rec.rows]).cumsum(0).tolist())
    first = next(i for i, c in enumerate(counts) if c >= 200)
    assert 0 < first < len(counts) - 1, "budget should fall inside the run"
    assert [b for _, _, b in rec.rows] == [8] * first + [4] * (len(counts) - first)
    assert flip.flipped and flip.flip_step == first + 1  # global_step after that optimizer step
    assert all(m.activation_bits == 4 for m in module.model.bitlinears())


class BitsAtForward(pl.Callback):
    """(global step, activation bits) at the start of every micro-batch: the width its forward runs at."""

    def __init__(self):
        self.rows: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.global_step, pl_module.model.activation_bits))


@pytest.mark.parametrize("crossing", [0, 4])
def test_flip_waits_for_the_optimizer_step_boundary(trace_dir, tmp_path, crossing):
    """With accumulate_grad_batches=2 the budget is crossed on the first micro-batch of a step
    (micro-batch `crossing`); the flip comes after the second one, so no step mixes A8 and A4."""
    pl.seed_everything(0)
    datamodule, module = make(trace_dir)
    count = Recorder(ActivationFlip(flip_at_tokens=10**9))
    trainer([count.flip, count], 4, tmp_path, accumulate_grad_batches=2).fit(module, datamodule=datamodule)
    budget = count.rows[crossing][1]  # the cumulative count is first reached at that micro-batch

    pl.seed_everything(0)  # the same data order as above
    datamodule, module = make(trace_dir)
    flip, bits = ActivationFlip(flip_at_tokens=budget), BitsAtForward()
    trainer([flip, bits], 4, tmp_path, accumulate_grad_batches=2).fit(module, datamodule=datamodule)
    step_of_crossing = bits.rows[crossing][0]
    assert [s for s, _ in bits.rows[crossing:crossing + 2]] == [step_of_crossing] * 2, "crossing opens a step"
    widths: dict[int, set[int]] = {}
    for step, b in bits.rows:
        widths.setdefault(step, set()).add(b)
    assert all(len(w) == 1 for w in widths.values()), f"a step mixed A8 and A4: {widths}"
    assert flip.flip_step == step_of_crossing + 1
    assert widths[step_of_crossing] == {8} and widths[flip.flip_step] == {4}


def test_disabled_flip_counts_but_stays_a8(trace_dir, tmp_path):
    datamodule, module = make(trace_dir)
    flip = ActivationFlip(flip_at_tokens=10, enabled=False)
    trainer([flip], 4, tmp_path).fit(module, datamodule=datamodule)
    assert flip.tokens_seen > 10 and not flip.flipped and module.model.activation_bits == 8


def test_a4_model_trains_at_a4_without_the_flip_and_is_refused_with_it(trace_dir, tmp_path):
    datamodule = KDTraceDataModule(str(trace_dir), vocab_size=64, batch_size=4, num_workers=0)
    module = DistillationModule({"name": "tiny", "vocab_size": 64, "activation_bits": 4}, optim={"warmup_steps": 2})
    flip = ActivationFlip(flip_at_tokens=10, enabled=False)
    recorder = Recorder(flip)
    trainer([flip, recorder], 3, tmp_path).fit(module, datamodule=datamodule)
    assert [bits for _, _, bits in recorder.rows] == [4, 4, 4]
    with pytest.raises(ValueError, match="enabled=false to train at A4"):
        trainer([ActivationFlip(flip_at_tokens=10)], 3, tmp_path).fit(module, datamodule=datamodule)


def test_flip_point_estimated_from_run_length(trace_dir, tmp_path):
    datamodule, module = make(trace_dir)
    flip = ActivationFlip(flip_fraction=0.5)
    trainer([flip], 8, tmp_path).fit(module, datamodule=datamodule)
    per_batch = datamodule.train_tokens_per_epoch() / len(datamodule.train_dataloader())
    assert flip.flip_at_tokens == int(0.5 * int(8 * per_batch))
    assert flip.flipped  # half of the run's tokens is reached within the run


@pytest.mark.parametrize("flip_at, expect_bits", [(150, 4), (10**9, 8)])
def test_flip_state_survives_checkpoint_resume(trace_dir, tmp_path, flip_at, expect_bits):
    datamodule, module = make(trace_dir)
    flip = ActivationFlip(flip_at_tokens=flip_at)
    t1 = trainer([flip], 8, tmp_path)
    t1.fit(module, datamodule=datamodule)
    ckpt = tmp_path / "flip.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["activation_bits"] == expect_bits
    assert saved["callbacks"]["ActivationFlip"]["tokens_seen"] == flip.tokens_seen

    # Fresh objects, as in a new process: the mode and the count must come from the checkpoint.
    datamodule2, module2 = make(trace_dir)
    flip2 = ActivationFlip(flip_at_tokens=flip_at)
    seen_at_start = {}

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen_at_start.update(bits=pl_module.model.activation_bits, tokens=flip2.tokens_seen,
                                 step=trainer.global_step)

    rec = Recorder(flip2)
    trainer([flip2, AtStart(), rec], 12, tmp_path).fit(module2, datamodule=datamodule2, ckpt_path=ckpt)
    assert seen_at_start == {"bits": expect_bits, "tokens": flip.tokens_seen, "step": 8}
    assert rec.rows[0][1] == flip.tokens_seen + rec.rows[0][0]  # counting continues, not restarts
    assert len(rec.rows) == 4


def test_module_checkpoint_restores_bits_for_eval(trace_dir, tmp_path):
    datamodule, module = make(trace_dir)
    module.model.set_activation_bits(4)
    t = trainer([], 1, tmp_path)
    t.fit(module, datamodule=datamodule)
    t.save_checkpoint(tmp_path / "m.ckpt")
    loaded = DistillationModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.model.activation_bits == 4
    assert all(m.activation_bits == 4 for m in loaded.model.bitlinears())


@pytest.mark.slow
def test_flip_counts_tokens_from_two_processes(tmp_path):
    """ddp_spawn over 2 CPU processes (gloo): the count is the sum over both ranks' batches."""
    n = 40
    while True:  # an even number of train rows, so DistributedSampler adds no padding duplicates
        teacher = small_source(num_sequences=n)
        teacher.write(tmp_path / f"t{n}")
        dm = KDTraceDataModule(str(tmp_path / f"t{n}"), vocab_size=64, batch_size=4, num_workers=0)
        dm.setup()
        if len(dm.train_set) % 2 == 0:
            break
        n += 1
    expected = dm.train_tokens_per_epoch()
    datamodule, module = make(tmp_path / f"t{n}")
    flip = ActivationFlip(flip_at_tokens=expected)  # reached exactly at the end of the epoch
    t = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   callbacks=[flip], default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    t.fit(module, datamodule=datamodule)
    # ddp_spawn sends rank 0's logged metrics back to this process.
    assert int(t.callback_metrics["train/tokens_seen"]) == expected
    assert int(t.callback_metrics["train/activation_bits"]) == 4
