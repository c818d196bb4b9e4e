"""LightningDataModule over KD trace shards (Parquet schema v1, or v2 with sampled tokens), streamed
one row group at a time.

The folder is scanned once when the run starts (`TraceIndex.scan`: manifest sha256 and row
counts, schema, metadata compared with the run: vocabulary size, student tokenizer, K); rows are
split into train/val by a hash of their `id` (stable across runs, shard layouts and machines) and
streamed (`TraceStream`: each row group validated as it is read) as right-padded batches through
a `StatefulDataLoader`, whose position Lightning keeps in the checkpoint, so a resumed run
continues with exactly the batches the interrupted one would have seen.
Batch entries, tensors [B, T] unless noted:

- `ids`            the row ids (list of B strings)
- `input_ids`      student token ids (padding: 0)
- `loss_mask`      position t predicts a completion token t+1 (never padding or prompt)
- `kd_valid`       the teacher distribution at t applies (and t is not padding)
- `format_mask`    t+1 is a JSON structural token (see `bitnet_kde.data.format_mask`)
- `topk_ids`       [B, T, K] teacher candidates for t+1 (padded slots: id 0)
- `topk_logprobs`  [B, T, K] their logprobs (padded slots: -inf)
- `other_logprob`  teacher log-mass outside the candidates (padding: 0)
- `rs_ids`, `rs_counts` (+ `rs_logq`)  [B, T, S] sampled-token columns, only from schema v2
  traces (padded slots: count 0)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from bitnet_kde import storage
from bitnet_kde.data.format_mask import token_format_mask
from bitnet_kde.data.stream import TraceIndex, TraceStream, split_of
from bitnet_kde.kd.traces import (TraceSource, TraceValidationError, check_draws_match, check_run_match, list_offsets,
                                   list_shards)

log = logging.getLogger(__name__)


class DataConfigError(ValueError):
    """Data settings that cannot work together (one line, naming the keys)."""


class TraceDataset(Dataset):
    """Rows of a validated trace table, as numpy arrays truncated to `max_seq_len`.

    `piece_table` (token id -> its text, from the student tokenizer) enables the format mask;
    without it no position is a format position.
    """

    def __init__(self, table: pa.Table, max_seq_len: int, piece_table: Sequence[str] | None = None):
        self.max_seq_len = max_seq_len
        self.ids = table.column("id").to_pylist()
        self.completion_start = table.column("completion_start").to_numpy()

        def values(name):
            return list_offsets(table.column(name))[1]

        self.row_off, tok = list_offsets(table.column("input_ids"))
        self.tokens = tok.to_numpy(zero_copy_only=False).astype(np.int64)
        self.other = values("other_logprob").to_numpy(zero_copy_only=False).astype(np.float32)
        self.valid = values("kd_valid").to_numpy(zero_copy_only=False).astype(bool)
        # candidates: position p's span in the flat candidate arrays is cand_off[p]:cand_off[p + 1]
        self.cand_off, cand_ids = list_offsets(values("topk_ids"))
        self.cand_ids = cand_ids.to_numpy(zero_copy_only=False).astype(np.int64)
        self.cand_lp = list_offsets(values("topk_logprobs"))[1].to_numpy(zero_copy_only=False).astype(np.float32)
        self.k_max = int(np.diff(self.cand_off).max(initial=0))
        # sampled-token columns (schema v2): position p's draws are rs_off[p]:rs_off[p + 1]
        self.rs = None
        if "rs_ids" in table.column_names:
            self.rs_off, rs_ids = list_offsets(values("rs_ids"))
            self.rs = {"rs_ids": rs_ids.to_numpy(zero_copy_only=False).astype(np.int64),
                       "rs_counts": list_offsets(values("rs_counts"))[1].to_numpy(zero_copy_only=False)
                       .astype(np.float32)}
            if "rs_logq" in table.column_names:
                self.rs["rs_logq"] = list_offsets(values("rs_logq"))[1].to_numpy(zero_copy_only=False) \
                    .astype(np.float32)
        lengths = np.diff(self.row_off)
        self.truncated = int((lengths > max_seq_len).sum())
        self.format_targets = None
        if piece_table is not None:
            # Per token of each completion: is it JSON structure? Computed once, not per epoch.
            self.format_targets = np.zeros(self.tokens.size, dtype=bool)
            for i in range(len(self.ids)):
                a, b = self.row_off[i] + self.completion_start[i], self.row_off[i + 1]
                self.format_targets[a:b] = token_format_mask([piece_table[t] for t in self.tokens[a:b]])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        a, b = self.row_off[i], self.row_off[i + 1]
        b = min(b, a + self.max_seq_len)
        n = b - a
        k = max(self.k_max, 1)
        ids = np.zeros((n, k), dtype=np.int64)
        lps = np.full((n, k), -np.inf, dtype=np.float32)
        starts, ends = self.cand_off[a:b], self.cand_off[a + 1:b + 1]
        counts = ends - starts
        if counts.sum():
            pos = np.repeat(np.arange(n), counts)
            slot = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            src = np.arange(starts[0], ends[-1])
            ids[pos, slot] = self.cand_ids[src]
            lps[pos, slot] = self.cand_lp[src]
        loss_mask = np.zeros(n, dtype=bool)
        loss_mask[self.completion_start[i] - 1:n - 1] = True  # t predicts t+1 inside the completion
        format_mask = np.zeros(n, dtype=bool)
        if self.format_targets is not None:
            format_mask[:n - 1] = self.format_targets[a + 1:b]  # position t's target is token t+1
            format_mask &= loss_mask
        item = {
            "input_ids": self.tokens[a:b],
            "loss_mask": loss_mask,
            "kd_valid": self.valid[a:b] & loss_mask,
            "format_mask": format_mask,
            "topk_ids": ids,
            "topk_logprobs": lps,
            "other_logprob": self.other[a:b],
        }
        if self.rs is not None:
            item.update(self._sampled(a, b))
        return item

    def _sampled(self, a: int, b: int) -> dict:
        """Sampled columns of positions a:b as [n, S] arrays; padded slots have count 0 (and id 0, logq 0)."""
        starts, ends = self.rs_off[a:b], self.rs_off[a + 1:b + 1]
        sizes = ends - starts
        n, s = b - a, max(int(sizes.max(initial=0)), 1)
        out = {name: np.zeros((n, s), dtype=v.dtype) for name, v in self.rs.items()}
        if sizes.sum():
            pos = np.repeat(np.arange(n), sizes)
            slot = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            src = np.arange(starts[0], ends[-1])
            for name, v in self.rs.items():
                out[name][pos, slot] = v[src]
        return out


@dataclass
class SplitRows:
    """`pa.Table -> TraceDataset` of the rows of one split (what a `TraceStream` serves of a row group)."""

    split: str
    """"train" or "val"."""
    val_fraction: float
    """Share of rows (by id hash) held out for validation."""
    max_seq_len: int
    """Longer rows are truncated."""
    piece_table: Sequence[str] | None
    """Text of each student token id (format mask), or None."""

    def __call__(self, table: pa.Table) -> TraceDataset:
        keep = [split_of(i, self.val_fraction) == self.split for i in table.column("id").to_pylist()]
        return TraceDataset(table.filter(pa.array(keep, pa.bool_())), self.max_seq_len, self.piece_table)


def collate_traces(rows: list[dict]) -> dict:
    """Right-pad a list of `TraceDataset` items into a batch (see the module docstring); items
    with an `id` (as `TraceStream` serves them) give the batch its `ids`."""
    t = max(len(r["input_ids"]) for r in rows)
    k = max(r["topk_ids"].shape[1] for r in rows)
    b = len(rows)
    out = {
        "input_ids": torch.zeros(b, t, dtype=torch.long),
        "loss_mask": torch.zeros(b, t, dtype=torch.bool),
        "kd_valid": torch.zeros(b, t, dtype=torch.bool),
        "format_mask": torch.zeros(b, t, dtype=torch.bool),
        "topk_ids": torch.zeros(b, t, k, dtype=torch.long),
        "topk_logprobs": torch.full((b, t, k), -torch.inf),
        "other_logprob": torch.zeros(b, t),
    }
    for i, r in enumerate(rows):
        n, kk = r["topk_ids"].shape
        for name in ("input_ids", "loss_mask", "kd_valid", "format_mask", "other_logprob"):
            out[name][i, :n] = torch.from_numpy(r[name])
        out["topk_ids"][i, :n, :kk] = torch.from_numpy(r["topk_ids"])
        out["topk_logprobs"][i, :n, :kk] = torch.from_numpy(r["topk_logprobs"])
    for name in ("rs_ids", "rs_counts", "rs_logq"):  # sampled columns (schema v2), padded with count 0
        have = [name in r for r in rows]
        if any(have) and not all(have):
            which = [r.get("id", f"item {i}") for i, r in enumerate(rows) if not have[i]]
            raise TraceValidationError(
                f"a batch mixes rows with and without the sampled column '{name}' (without: {which[:5]}): "
                "shards of different trace sets are mixed; keep one trace set per folder (or re-collect into "
                "an empty one)")
        if all(have):
            s = max(r[name].shape[1] for r in rows)
            out[name] = torch.zeros(b, t, s, dtype=torch.long if name == "rs_ids" else torch.float32)
            for i, r in enumerate(rows):
                n, ss = r[name].shape
                out[name][i, :n, :ss] = torch.from_numpy(r[name])
    if all("id" in r for r in rows):
        out["ids"] = [r["id"] for r in rows]
    return out


class KDTraceDataModule(pl.LightningDataModule):
    """Trains on the trace shards in `trace_dir`; `source.write(trace_dir)` creates them if absent.

    Args:
        trace_dir: folder of `*.parquet` shards (+ `manifest.json`): a local path or a storage URL
            (`s3://`, `gs://`, `webdav://`, ...; see `bitnet_kde.storage`).
        vocab_size: student vocabulary size; every id is checked against it, and the traces'
            `vocab_size` metadata must equal it.
        source: the `TraceSource` that writes the traces when `trace_dir` lacks them (teacher
            collection, or the synthetic bigram source); None = traces must exist. Its student
            tokenizer hash must be the one in the traces' metadata.
        max_seq_len: longer rows are truncated (a warning says how many).
        k_max: largest number of candidates per position accepted on read (and largest K in the
            traces' metadata).
        val_fraction: share of rows (by id hash) held out for validation.
        piece_table: text of each student token id, enabling the format mask (JSON structure);
            taken from `source.piece_table()` when not given (None from sources whose ids are no text).
        shuffle_seed: the training order of epoch e is a pure function of (shuffle_seed, e).
        verify_sha256: hash every shard against its manifest entry when the run starts (one read of
            the trace set per rank); False skips only that (page checksums and footers are still
            checked), for very large sets on remote stores.
        loss_other: the run's KD target (`loss.other`); `rs` / `hybrid` need traces whose sampled
            draws were made for them (`check_draws_match`), refused before any step otherwise (and
            before collecting when `source` would make the wrong draws). None: not checked.
    """

    def __init__(self, trace_dir: str, vocab_size: int, source: TraceSource | None = None, max_seq_len: int = 512,
                 k_max: int = 128, batch_size: int = 16, val_batch_size: int | None = None, val_fraction: float = 0.1,
                 num_workers: int = 2, pin_memory: bool = False, piece_table: Sequence[str] | None = None,
                 shuffle_seed: int = 0, verify_sha256: bool = True, loss_other: str | None = None):
        super().__init__()
        if isinstance(source, Mapping):
            # e.g. experiment=smoke (which sizes data=synthetic's source) with data=parquet
            raise DataConfigError(
                f"data.source has settings ({', '.join(sorted(map(str, source)))}) but no _target_: they were "
                "written for a data config whose source writes traces and do not combine with this one; "
                "pick that data config (e.g. data=synthetic) or drop the data.source settings")
        self.trace_dir = str(trace_dir)
        self.vocab_size, self.source = vocab_size, source
        self.max_seq_len, self.k_max = max_seq_len, k_max
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.val_fraction, self.num_workers, self.pin_memory = val_fraction, num_workers, pin_memory
        self.piece_table = piece_table
        self.shuffle_seed, self.verify_sha256 = shuffle_seed, verify_sha256
        self.loss_other = loss_other
        self.index: TraceIndex | None = None
        self.train_set: TraceStream | None = None
        self.val_set: TraceStream | None = None

    def prepare_data(self) -> None:
        draws = getattr(self.source, "rs", None)  # the draws a collecting source makes (SampledTraceConfig)
        if self.loss_other is not None and draws is not None:
            check_draws_match(draws.as_dict(), self.loss_other, f"data.source ({type(self.source).__name__})")
        if self.source is not None:
            if self.source.is_complete(self.trace_dir):
                log.info("reusing traces in %s", self.trace_dir)
            else:
                log.info("traces not found in %s: writing them with %s", self.trace_dir, type(self.source).__name__)
                self.source.write(self.trace_dir)
        elif not (storage.exists(self.trace_dir) and list_shards(self.trace_dir)):
            raise FileNotFoundError(
                f"no trace shards (*.parquet) in {self.trace_dir}: run collection first "
                "or choose a data config with a source (e.g. data=synthetic)"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        index = TraceIndex.scan(self.trace_dir, val_fraction=self.val_fraction, max_seq_len=self.max_seq_len,
                                vocab_size=self.vocab_size, k_max=self.k_max, verify_sha256=self.verify_sha256)
        check_run_match(index.metadata, self.trace_dir, vocab_size=self.vocab_size, k_max=self.k_max,
                        tokenizer_hash=self.source.tokenizer_hash if self.source is not None else None,
                        kd_variant=self.loss_other)
        if self.piece_table is None and self.source is not None:
            self.piece_table = self.source.piece_table()  # the student tokenizer's token texts
        n_train, n_val = (int(index.rows[s].sum()) for s in ("train", "val"))
        if not n_train or not n_val:
            raise ValueError(
                f"{self.trace_dir}: {n_train + n_val} rows give {n_train} train / {n_val} val rows with "
                f"val_fraction={self.val_fraction}; both need at least one")
        if index.truncated:
            log.warning("%d of %d rows are longer than max_seq_len=%d and were truncated",
                        index.truncated, n_train + n_val, self.max_seq_len)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        read = partial(index.read_unit, vocab_size=self.vocab_size, k_max=self.k_max)

        def stream(split, batch_size, shuffle):
            rows = SplitRows(split, self.val_fraction, self.max_seq_len, self.piece_table)
            return TraceStream(index, split, batch_size=batch_size, shuffle=shuffle, seed=self.shuffle_seed,
                               rank=rank, world_size=world, read=read, make_rows=rows)

        self.index = index
        self.train_set = stream("train", self.batch_size, True)
        self.val_set = stream("val", self.val_batch_size, False)

    def train_tokens_per_epoch(self) -> int:
        """Loss-bearing tokens in one pass over the training split (for the flip budget)."""
        assert self.index is not None, "call setup() first"
        return int(self.index.loss_tokens["train"].sum())

    def _loader(self, ds, batch_size):
        return StatefulDataLoader(ds, batch_size=batch_size, collate_fn=collate_traces, num_workers=self.num_workers,
                                  pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader(self.train_set, self.batch_size)

    def val_dataloader(self):
        return self._loader(self.val_set, self.val_batch_size)
