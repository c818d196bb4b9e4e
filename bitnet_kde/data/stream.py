"""Streamed trace reading: an index of a trace folder's row groups, and an iterable data set that
reads one Parquet row group at a time, so a rank holds O(batch + row group) of trace data
whatever the size of the trace set.

`TraceIndex.scan` reads each shard once when a run starts: it checks the shard against its
`manifest.json` entry (sha256 streamed in 1 MiB blocks, not again for a local shard the same
process hashed unchanged in its completeness check; row count from the footer), its schema,
and reads only the small columns (`id`, `input_ids`, `completion_start`) to count, per row group,
the rows and loss tokens of each split. Ids are kept as 8-byte hashes (duplicate check) and
then dropped: the index costs O(row groups), plus 8 bytes per row while it is built.

`TraceStream` plans an epoch from the index alone: a seeded order of row groups and of the rows
inside each, cut into equal contiguous slices for the ranks, each rank's slice cut into whole
batches shared out between DataLoader workers. Both splits are padded (wrapping around, as
DistributedSampler pads), so every rank runs the same number of training and validation steps:
under FSDP every forward is a collective, and a rank with one batch more would wait forever.
Validation metrics then count at most `world_size - 1` rows twice. Each worker reads only the
row groups its batches touch, validates them (page checksums, `validate_traces`) as it goes, and
reports its position (`state_dict`) so a `StatefulDataLoader` resumes mid-epoch exactly.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from bitnet_kde.kd.traces import (DUPLICATE_HINT, RECOLLECT, TraceValidationError, arrow_path, check_column_types,
                                   check_run_match, check_same_trace_set, check_schema_version, file_sha256,
                                   list_offsets, manifest_entries, manifest_mismatch, table_metadata, trace_schema,
                                   validate_traces)

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


def id_hash(row_id: str) -> int:
    """First 8 bytes of the sha256 of a row id, as an unsigned integer (split and duplicate check)."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big")


def split_of(row_id: str, val_fraction: float) -> str:
    """'val' or 'train' from a hash of the row id, so the split never depends on file order."""
    return "val" if id_hash(row_id) / 2**64 < val_fraction else "train"


def _unreadable(path, e: Exception) -> TraceValidationError:
    return TraceValidationError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}. "
                                "Delete it and re-run collection to regenerate it.")


@dataclass
class TraceIndex:
    """Per row group of a trace folder: rows and loss tokens of each split (see module docstring)."""

    trace_dir: str
    val_fraction: float
    max_seq_len: int
    shards: list = field(default_factory=list)
    """Shard paths (local `Path`s or storage URLs), in manifest order."""
    units: list[tuple[int, int]] = field(default_factory=list)
    """(shard index, row group index) of every row group."""
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    """Split -> rows of that split in each unit."""
    loss_tokens: dict[str, np.ndarray] = field(default_factory=dict)
    """Split -> loss-bearing positions (after truncation to `max_seq_len`) in each unit."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Trace metadata of the first shard (`table_metadata` form)."""
    truncated: int = 0
    """Rows longer than `max_seq_len`."""

    @classmethod
    def scan(cls, trace_dir: str, *, val_fraction: float, max_seq_len: int, vocab_size: int | None = None,
             k_max: int = 128, verify_sha256: bool = True) -> TraceIndex:
        """Check every shard of `trace_dir` and count its row groups' rows (see module docstring).

        Raises `TraceValidationError` naming the shard (and row) of the first problem.
        """
        entries = manifest_entries(trace_dir)
        if not entries:
            raise TraceValidationError(f"{trace_dir}: no *.parquet trace shards in this folder")
        index = cls(str(trace_dir), val_fraction, max_seq_len)
        counts = {s: ([], []) for s in SPLITS}
        hashes: list[np.ndarray] = []
        footers: list[pa.Table] = []  # empty tables: the schema and metadata of each shard
        for s, (path, entry) in enumerate(entries):
            if entry is not None and verify_sha256:
                sha = file_sha256(path)
                if sha != entry["sha256"]:
                    raise TraceValidationError(f"{manifest_mismatch(path, entry, sha)}; {RECOLLECT}")
            src, fs = arrow_path(path)
            try:
                pf = pq.ParquetFile(src, filesystem=fs, page_checksum_verification=True)
                schema = pf.schema_arrow
            except (pa.ArrowException, OSError) as e:
                raise _unreadable(path, e) from e
            if entry is not None and pf.metadata.num_rows != entry["rows"]:
                why = manifest_mismatch(path, entry, "n/a", pf.metadata.num_rows)
                raise TraceValidationError(f"{why}; {RECOLLECT}")
            footers.append(schema.empty_table())
            meta = table_metadata(footers[-1])
            check_schema_version(path, meta, schema)
            check_column_types(path, schema)
            if not s:
                index.metadata = meta
                check_run_match(meta, str(trace_dir), vocab_size=vocab_size, k_max=k_max)
            for g in range(pf.num_row_groups):
                try:
                    part = pf.read_row_group(g, columns=["id", "input_ids", "completion_start"])
                except (pa.ArrowException, OSError) as e:
                    raise _unreadable(path, e) from e
                h = [id_hash(i) for i in part.column("id").to_pylist()]
                val = np.array([x / 2**64 < val_fraction for x in h], dtype=bool)  # as split_of decides
                lengths = np.diff(list_offsets(part.column("input_ids"))[0])
                loss = np.maximum(np.minimum(lengths, max_seq_len) - part.column("completion_start").to_numpy(), 0)
                index.truncated += int((lengths > max_seq_len).sum())
                index.units.append((s, g))
                for split, mask in (("train", ~val), ("val", val)):
                    counts[split][0].append(int(mask.sum()))
                    counts[split][1].append(int(loss[mask].sum()))
                hashes.append(np.array(h, dtype=np.uint64))
            index.shards.append(path)
        check_same_trace_set(index.shards, footers)
        index.rows = {s: np.array(c[0], dtype=np.int64) for s, c in counts.items()}
        index.loss_tokens = {s: np.array(c[1], dtype=np.int64) for s, c in counts.items()}
        all_h = np.concatenate(hashes)
        if np.unique(all_h).size != all_h.size:
            raise TraceValidationError(f"{trace_dir}: two rows have the same id: {DUPLICATE_HINT}")
        return index

    def read_unit(self, u: int, *, vocab_size: int | None, k_max: int) -> pa.Table:
        """Row group `u`, fully validated (page checksums and `validate_traces`)."""
        s, g = self.units[u]
        path = self.shards[s]
        src, fs = arrow_path(path)
        try:
            table = pq.ParquetFile(src, filesystem=fs, page_checksum_verification=True).read_row_group(g)
            table.validate(full=True)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise _unreadable(path, e) from e
        if "id" not in table.column_names:  # the file was replaced since the scan
            raise TraceValidationError(f"{path}: row group {g} has no 'id' column; {RECOLLECT}")
        schema = trace_schema(table.schema)
        table = table.select(schema.names)
        validate_traces(table, name=f"{path} (row group {g})", vocab_size=vocab_size, k_max=k_max)
        return table.cast(schema)


class TraceStream(IterableDataset):
    """Rows of one split of a `TraceIndex`, streamed (see module docstring).

    Args:
        index: the scanned trace folder.
        split: "train" or "val".
        batch_size: rows per batch; batches never span two workers.
        shuffle: a new seeded order of row groups and rows every epoch (else file order).
        seed: base of the shuffle (with the epoch number).
        rank, world_size: this process's slice of the split.
        read: `unit -> pa.Table`, one validated row group (`TraceIndex.read_unit`).
        make_rows: `pa.Table -> TraceDataset` of that row group's rows of `split`.

    `len()` is the number of rows this rank serves per epoch, so `DataLoader(batch_size=B)` has
    exactly ceil(len / B) batches for every number of workers.
    """

    def __init__(self, index: TraceIndex, split: str, *, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, read: Callable, make_rows: Callable):
        self.index, self.split, self.batch_size = index, split, batch_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.make_rows, self.read = make_rows, read
        self.total = int(index.rows[split].sum())
        per_rank = math.ceil(self.total / world_size)  # the last ranks wrap around to the first rows
        self.start, self.stop = rank * per_rank, (rank + 1) * per_rank
        self.epoch, self.served = 0, 0
        self._begun = False  # a pass of `epoch` has begun: the next pass starts the epoch after it

    def __len__(self) -> int:
        return self.stop - self.start

    def worker_slice(self, worker: int, workers: int) -> tuple[int, int]:
        """[begin, end) of the rank's rows a worker serves: whole batches, contiguous."""
        n = len(self)
        batches = math.ceil(n / self.batch_size)
        lo, hi = worker * batches // workers, (worker + 1) * batches // workers
        return min(lo * self.batch_size, n), min(hi * self.batch_size, n)

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(units in epoch order, cumulative row counts of that order)."""
        units = np.flatnonzero(self.index.rows[self.split])
        if self.shuffle:
            units = np.random.default_rng([self.seed, epoch]).permutation(units)
        return units, np.cumsum(self.index.rows[self.split][units])

    def __iter__(self) -> Iterator[dict]:
        """A pass: the rest of a loaded position, else the next epoch (epoch 0 for the first pass).

        Not a generator itself: torchdata takes a worker's state for a new pass right after
        `iter()` returns, before the first row is asked for, so the pass's position is set here.
        """
        if self._begun:
            self.epoch, self.served = self.epoch + 1, 0
        self._begun = True
        info = get_worker_info()
        w, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self._rows(*self.worker_slice(w, workers))

    def _rows(self, lo: int, hi: int) -> Iterator[dict]:
        """Rows [lo + served, hi) of the rank's slice of `epoch`, counting them in `served`."""
        units, ends = self._order(self.epoch)
        cached: tuple[int, object, np.ndarray] | None = None
        for pos in range(lo + self.served, hi):
            g = (self.start + pos) % self.total  # wraps around only for the padding
            k = int(np.searchsorted(ends, g, side="right"))
            u, off = int(units[k]), g - (int(ends[k - 1]) if k else 0)
            if cached is None or cached[0] != u:
                rows = self.make_rows(self.read(u))
                perm = (np.random.default_rng([self.seed, self.epoch, u]).permutation(len(rows))
                        if self.shuffle else np.arange(len(rows)))
                cached = (u, rows, perm)
            rows, perm = cached[1], cached[2]
            item = rows[int(perm[off])]
            item["id"] = rows.ids[int(perm[off])]
            self.served += 1
            yield item

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`: the next pass serves the rest of that epoch's slice (nothing if it was all served)."""
        self.epoch, self.served = int(state["epoch"]), int(state["served"])
        self._begun = False

