"""A training process for tests/test_resume.py: tiny student on a trace folder, a checkpoint after
every optimizer step, and one JSON line per training batch (step, row ids, activation bits).

python tests/resume_child.py TRACE_DIR RUN_DIR MAX_STEPS [CKPT_PATH]
"""

from __future__ import annotations

import json
import sys

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from bitnet_kde.data import KDTraceDataModule
from bitnet_kde.training import ActivationFlip, DistillationModule

FLIP_AT_TOKENS = 300
"""Mid-run: the resumed part must also restore the A8 -> A4 state."""


class BatchLog(pl.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.path, "a") as f:  # one line per batch, flushed before the step runs
            f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch, "ids": batch["ids"],
                                "bits": pl_module.model.activation_bits}) + "\n")


def main(trace_dir: str, run_dir: str, max_steps: int, ckpt_path: str | None = None) -> None:
    pl.seed_everything(0)
    dm = KDTraceDataModule(trace_dir, vocab_size=64, batch_size=4, num_workers=2, val_fraction=0.25,
                           max_seq_len=64, shuffle_seed=7)
    module = DistillationModule({"name": "tiny", "vocab_size": 64}, optim={"warmup_steps": 2})
    callbacks = [ActivationFlip(flip_at_tokens=FLIP_AT_TOKENS), BatchLog(f"{run_dir}/batches.jsonl"),
                 ModelCheckpoint(dirpath=f"{run_dir}/checkpoints", every_n_train_steps=1, save_last=True,
                                 save_top_k=0)]
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=run_dir,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
