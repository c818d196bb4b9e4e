"""Training processes for tests/test_fsdp.py; each writes one JSON line per training batch of
each rank: (rank, step, loss, tokens seen by the flip counter, activation bits).

    python tests/fsdp_child.py ref   TRACE_DIR OUT STEPS             one process, the two ranks' batches
                                                                    as 2 accumulated micro-batches
    python tests/fsdp_child.py fsdp  TRACE_DIR OUT STEPS [CKPT]      trainer=fsdp's strategy, 2 CPU processes
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from bitnet_kde.data import KDTraceDataModule
from bitnet_kde.training import ActivationFlip, DistillationModule

FLIP_AT_TOKENS = 200
"""Reached after about two steps of 2 x 4 rows: both runs must flip at the same step."""


class Recorded(DistillationModule):
    """The module with a record of each training batch (`out`, `flip` are set after construction,
    so they stay out of the checkpoint's hyper-parameters)."""

    out: str
    flip: ActivationFlip

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        with open(f"{self.out}/losses-{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": self.global_step, "loss": float(loss), "ids": batch["ids"],
                                "tokens_seen": self.flip.tokens_seen, "bits": self.model.activation_bits}) + "\n")
        return loss


def datamodule(trace_dir: str) -> KDTraceDataModule:
    return KDTraceDataModule(trace_dir, vocab_size=64, batch_size=4, num_workers=0, val_fraction=0.25, max_seq_len=64)


def rank_loader(trace_dir: str, rank: int):
    """Rank `rank`'s training batches of a 2-rank run, built in this one process."""
    dm = datamodule(trace_dir)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)  # what setup reads of a trainer
    dm.setup("fit")
    return dm.train_dataloader()


def main(mode: str, trace_dir: str, out: str, steps: int, ckpt: str | None = None) -> None:
    pl.seed_everything(0)
    flip = ActivationFlip(flip_at_tokens=FLIP_AT_TOKENS)
    module = Recorded({"name": "tiny", "vocab_size": 64}, optim={"warmup_steps": 2})
    module.out, module.flip = out, flip
    common = dict(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out,
                  gradient_clip_val=1.0)
    if mode == "ref":
        # rank 0's and rank 1's batch j of a 2-rank run, as micro-batches 2j and 2j + 1 of one step
        ranks = [iter(rank_loader(trace_dir, r)) for r in range(2)]
        batches = [next(ranks[i % 2]) for i in range(2 * steps)]
        trainer = pl.Trainer(devices=1, accumulate_grad_batches=2, callbacks=[flip], enable_checkpointing=False,
                             **common)
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    else:
        save = ModelCheckpoint(dirpath=f"{out}/checkpoints", every_n_train_steps=steps // 2, save_top_k=-1)
        trainer = pl.Trainer(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                             callbacks=[flip, save], **common)
        trainer.fit(module, datamodule=datamodule(trace_dir), ckpt_path=ckpt)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
