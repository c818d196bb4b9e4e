"""KD trace files: Parquet schema v1 and v2 (v1 + sampled-token columns), atomic shard writing
and validating reads, and the conventions every trace writer and reader shares (see
docs/TRACE_FORMAT.md).

One row per teacher sequence. Every check on read names the file, the row (and its `id`),
the field and what is wrong, because a bad trace must stop training with a message a user
can act on, never turn into a NaN loss.

The shared conventions live here so writers cannot drift apart: content ids (`content_id`),
shard file names (`shard_name`), the Other mass (`other_from_topk`, `OTHER_FLOOR`), reading a
list column (`list_offsets`) and what a producer of trace sets offers (`TraceSource`).

Integrity: shards are written with Parquet page checksums (verified on every read), and a folder
with a `manifest.json` is read only when each listed shard still has the sha256 and row count the
manifest recorded, so a flipped bit or a swapped file stops the run and names the shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bitnet_kde import storage

__all__ = [
    "OTHER_FLOOR",
    "SCHEMA_VERSION",
    "SAMPLED_SCHEMA_VERSION",
    "SAMPLED_FIELDS",
    "TRACE_SCHEMA",
    "TraceSource",
    "TraceValidationError",
    "content_id",
    "list_offsets",
    "other_from_topk",
    "shard_name",
    "trace_metadata",
    "table_metadata",
    "trace_schema",
    "check_schema_version",
    "write_trace_shard",
    "read_traces",
    "validate_traces",
    "list_shards",
    "write_manifest",
    "manifest_complete",
    "mismatched_shards",
    "manifest_entries",
    "manifest_mismatch",
    "file_sha256",
    "check_same_trace_set",
    "check_column_types",
    "check_run_match",
    "check_draws_match",
]

SCHEMA_VERSION = "1"
"""Version of a trace shard without sampled columns."""
SAMPLED_SCHEMA_VERSION = "2"
"""Version of a shard with sampled-token columns (`SAMPLED_FIELDS`); otherwise the same as v1."""
META_PREFIX = "bitnet_kde."

TRACE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("category", pa.string()),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("completion_start", pa.int32(), nullable=False),
    pa.field("topk_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
    pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32())), nullable=False),
    pa.field("other_logprob", pa.list_(pa.float32()), nullable=False),
    pa.field("kd_valid", pa.list_(pa.bool_()), nullable=False),
    pa.field("teacher_text", pa.string()),
])
"""Parquet schema v1 of a KD trace shard (see docs/TRACE_FORMAT.md)."""

SAMPLED_FIELDS = (
    pa.field("rs_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
    pa.field("rs_counts", pa.list_(pa.list_(pa.int32())), nullable=False),
    pa.field("rs_logq", pa.list_(pa.list_(pa.float32()))),
)
"""Schema v2's sampled-token columns: per position the distinct sampled ids, their draw counts and
(only when the proposal q differs from the teacher p) log(q / p) of each id."""


def trace_schema(columns) -> pa.Schema:
    """The trace schema of a table with these column names: v1, plus the sampled columns it has."""
    names = set(columns.names if isinstance(columns, pa.Schema) else columns)
    extra = [f for f in SAMPLED_FIELDS if f.name in names]
    return pa.schema(list(TRACE_SCHEMA) + extra) if extra else TRACE_SCHEMA


def check_schema_version(path, meta: dict[str, str], schema: pa.Schema) -> None:
    """Refuse a shard of an unknown schema version, or a v2 shard without its sampled columns."""
    version = meta.get("schema_version")
    if version not in (SCHEMA_VERSION, SAMPLED_SCHEMA_VERSION):
        raise TraceValidationError(
            f"{path}: trace schema version {version!r}, this version of bitnet-kde reads "
            f"{SCHEMA_VERSION!r} and {SAMPLED_SCHEMA_VERSION!r} (metadata key '{META_PREFIX}schema_version')")
    if version == SAMPLED_SCHEMA_VERSION:
        for name in ("rs_ids", "rs_counts"):
            if name not in schema.names:
                raise TraceValidationError(
                    f"{path}: trace schema version {version!r} (metadata key '{META_PREFIX}schema_version') but no "
                    f"column '{name}': sampled traces hold rs_ids and rs_counts; re-collect it")

SUM_TOLERANCE = 1e-4
"""Allowed excess of sum(exp(topk_logprobs)) over 1 (float32 rounding of K terms)."""


OTHER_FLOOR = -30.0
"""`other_logprob` stored when the candidates hold (numerically) all the mass, instead of -inf."""


RECOLLECT = ("re-collect it: `python collect.py` (`make collect`) rewrites exactly the shards that do not match "
             "their manifest entry, and a run whose data has a source rewrites them when it starts")
"""What to do about a shard that no longer matches its manifest entry."""

DUPLICATE_HINT = ("a row id is a content address, so two rows with one id mean two trace sets were mixed "
                  "or a shard was copied; remove the extra copy (or re-collect into an empty folder)")
"""What to do about a row id seen twice (refused, never dropped: see docs/TRACE_FORMAT.md)."""


class TraceValidationError(ValueError):
    """A trace file that cannot be trained on; the message names file, row and field."""


class TraceSource(Protocol):
    """What produces a trace set on demand (the DataModule's `source`): teacher collection
    (`bitnet_kde.kd.collect.TraceCollector`) or the synthetic bigram source (`bitnet_kde.kd.synthetic`)."""

    @property
    def trace_set_id(self) -> str:
        """Content address of the trace set; its shard names and manifest carry it."""

    @property
    def tokenizer_hash(self) -> str:
        """The `student_tokenizer_hash` its shards carry (the run refuses traces with another)."""

    def is_complete(self, trace_dir: str | os.PathLike) -> bool:
        """True when `trace_dir` holds this whole trace set (manifest and every shard)."""

    def write(self, trace_dir: str | os.PathLike) -> list[Path | str]:
        """Write the trace set (the missing part this job owns) into `trace_dir`; return its shards."""

    def piece_table(self) -> Sequence[str] | None:
        """Text of every student token id (enables the format mask), or None when ids stand for no text."""


def content_id(blob: str, n: int = 16) -> str:
    """Content address of a text: the first `n` hex digits of the sha256 of its UTF-8 bytes.

    Trace-set ids, row ids, prompt ids and prompt-set hashes are all made this way. Existing
    trace sets are found again by these exact digests, so the recipe must not change.
    """
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]


def shard_name(trace_set_id: str, index: int) -> str:
    """File name of shard `index` of a trace set: `kd-<set id>-<index, 5 digits>.parquet`."""
    return f"kd-{trace_set_id}-{index:05d}.parquet"


def other_from_topk(logprobs: list[float]) -> float:
    """log(1 - sum exp(logprobs)): the teacher's mass outside its candidates, floored at
    OTHER_FLOOR, computed stably."""
    if not logprobs:
        return 0.0
    m = max(logprobs)
    covered = m + math.log(sum(math.exp(lp - m) for lp in logprobs))
    if covered >= 0.0:
        return OTHER_FLOOR
    tail = math.log(-math.expm1(covered)) if covered > -math.log(2) else math.log1p(-math.exp(covered))
    return max(tail, OTHER_FLOOR)


def list_offsets(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(offsets, values) of a list column: row r spans values[offsets[r]:offsets[r+1]]."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy()
    return offsets - offsets[0], arr.flatten()


def trace_metadata(*, teacher_provider: str, teacher_model: str, k: int, sampling: dict,
                   logprob_mode: str, tokenizer_name: str, tokenizer_hash: str, vocab_size: int,
                   extra: dict | None = None) -> dict[str, str]:
    """File-level key/value metadata of a shard (all values are strings)."""
    meta = {
        "schema_version": SCHEMA_VERSION,
        "teacher_provider": teacher_provider,
        "teacher_model": teacher_model,
        "k": str(k),
        "sampling": json.dumps(sampling, sort_keys=True),
        "logprob_mode": logprob_mode,
        "student_tokenizer": tokenizer_name,
        "student_tokenizer_hash": tokenizer_hash,
        "vocab_size": str(vocab_size),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra or {})
    return {META_PREFIX + k_: str(v) for k_, v in meta.items()}


def table_metadata(table: pa.Table) -> dict[str, str]:
    """The bitnet-kde key/value metadata of a trace table, without the key prefix."""
    raw = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return {k[len(META_PREFIX):]: v for k, v in raw.items() if k.startswith(META_PREFIX)}


def write_trace_shard(rows: list[dict] | pa.Table, path: str | os.PathLike, metadata: dict[str, str]) -> Path | str:
    """Write rows as one Parquet shard at `path` (a local path or storage URL), atomically.

    The file goes to a hidden temporary name in the same folder and is then renamed (object
    stores: copied and deleted), so a reader never sees a half-written shard under its final
    name, even if the writer is killed.
    """
    names = rows.column_names if isinstance(rows, pa.Table) else (rows[0].keys() if rows else ())
    schema = trace_schema(names)
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    if schema is not TRACE_SCHEMA:
        metadata = {**metadata, META_PREFIX + "schema_version": SAMPLED_SCHEMA_VERSION}
    table = table.select(schema.names).cast(schema).replace_schema_metadata(metadata)
    with storage.open_atomic(path) as f:
        pq.write_table(table, f, write_page_checksum=True)  # every read verifies them
    return storage.join(path) if storage.is_local(path) else os.fspath(path)


def arrow_path(path) -> tuple[str, object | None]:
    """(path, filesystem) for pyarrow: local files natively, others through their fsspec filesystem."""
    if storage.is_local(path):
        return storage.local_path(os.fspath(path)), None
    fs, p = storage.resolve(path)
    return p, fs


def folder_names(trace_dir) -> set[str]:
    """Names of the visible files in a trace folder (one listing, also for object stores)."""
    fs, p = storage.resolve(trace_dir)
    fs.invalidate_cache(p)  # other jobs may have written shards since the last listing
    try:
        return {e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _read_manifest(trace_dir) -> dict | None:
    url = storage.join(trace_dir, "manifest.json")
    try:
        return storage.read_json(url)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise TraceValidationError(f"{url}: not valid JSON ({e}); delete it and re-run collection") from e


def manifest_entries(trace_dir) -> list[tuple[Path | str, dict | None]]:
    """(shard, its `manifest.json` entry) per shard of a folder; without a manifest every `*.parquet`, entry None."""
    info = _read_manifest(trace_dir)
    names = folder_names(trace_dir)
    if info is None:
        return [(storage.join(trace_dir, n), None) for n in sorted(names)
                if n.endswith(".parquet") and not n.startswith(".")]
    manifest = storage.join(trace_dir, "manifest.json")
    shards = info.get("shards")
    if not isinstance(shards, list):
        raise TraceValidationError(f"{manifest}: no 'shards' list; delete the manifest or re-run collection")
    for e in shards:
        if not (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("rows"), int)
                and isinstance(e.get("sha256"), str)):
            raise TraceValidationError(f"{manifest}: shard entry {e!r} lacks its file, rows or sha256; "
                                       "delete the manifest and re-run collection")
    missing = [e["file"] for e in shards if e["file"] not in names]
    if missing:
        raise TraceValidationError(f"{manifest}: lists shards that are missing: {missing[:5]}; "
                                   "re-run collection to complete the trace set")
    return [(storage.join(trace_dir, e["file"]), e) for e in shards]


def list_shards(trace_dir: str | os.PathLike) -> list[Path | str]:
    """Shard files of a trace folder: those its `manifest.json` lists, else every `*.parquet`.

    The manifest wins so that one folder holding an older trace set never mixes it into the
    current one; a listed shard that is missing is an error, not a silent gap. Hidden names
    (temporary files of unfinished writes) are never returned. Local folders give `Path`s,
    storage URLs give URL strings.
    """
    return [path for path, _ in manifest_entries(trace_dir)]


RACY_NS = 2_000_000_000
"""A hash is kept only for a file last changed more than this before its hashing began: a rewrite
within the same file-system timestamp tick (up to 2 s on some file systems) keeps mtime and ctime."""

_HASHED: dict[tuple, str] = {}
"""(path, device, inode, size, mtime, ctime) of a local file -> the sha256 this process read."""


def _local_identity(path) -> tuple | None:
    """What changes whenever a local file's bytes change; None on remote stores (not cached)."""
    if not storage.is_local(path):
        return None
    local = os.path.realpath(storage.local_path(path))
    st = os.stat(local)
    return local, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_sha256(path, sink=None) -> str:
    """sha256 of a file, streamed in 1 MiB blocks through storage (any store); each block also
    goes to `sink` when given.

    Without `sink`, a local file this process already hashed and that has not changed since is
    not read again: a run's completeness check and its trace scan hash each shard once.
    """
    identity = _local_identity(path)
    if sink is None and identity in _HASHED:
        return _HASHED[identity]
    started = time.time_ns()
    sha = _read_sha256(path, sink)
    if identity is not None and started - identity[-1] > RACY_NS and _local_identity(path) == identity:
        _HASHED[identity] = sha
    return sha


def _read_sha256(path, sink) -> str:
    """One read of the file's bytes into the digest (and `sink`)."""
    digest = hashlib.sha256()
    with storage.open_url(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            if sink is not None:
                sink(block)
    return digest.hexdigest()


def _read_hashed(path) -> tuple[bytes, str]:
    """The bytes of a file and their sha256, hashed while they stream in (one read)."""
    blocks: list[bytes] = []
    sha = file_sha256(path, blocks.append)
    return b"".join(blocks), sha


def manifest_mismatch(path, entry: dict, sha256: str, rows: int | str | None = None) -> str:
    """What is wrong with a shard whose bytes (or row count) differ from its manifest entry."""
    counted = "" if rows is None else f"; {rows} rows, the manifest says {entry.get('rows')}"
    return (f"{path}: does not match its manifest.json entry (sha256 {sha256[:16]}..., the manifest says "
            f"{str(entry.get('sha256'))[:16]}...{counted}): the file was changed, damaged or replaced after it "
            "was written")


def mismatched_shards(trace_dir: str | os.PathLike) -> dict[str, str]:
    """Shards of a folder that exist but no longer have the sha256 their `manifest.json` entry
    recorded: file name -> why. Empty without a manifest (nothing to compare with)."""
    info = _read_manifest(trace_dir)
    if info is None or not isinstance(info.get("shards"), list):
        return {}
    names = folder_names(trace_dir)
    bad = {}
    for e in info["shards"]:
        if isinstance(e, dict) and e.get("file") in names:
            path = storage.join(trace_dir, e["file"])
            sha = file_sha256(path)
            if sha != e.get("sha256"):
                bad[e["file"]] = manifest_mismatch(path, e, sha)
    return bad


def read_traces(source, *, vocab_size: int | None = None, k_max: int = 128) -> pa.Table:
    """Read one file, a folder of shards or a list of files; validate; return one table.

    `vocab_size` (when given) bounds every token id; `k_max` bounds the candidates per position.
    A folder with a `manifest.json` is read only if each shard has the sha256 and row count the
    manifest recorded. Row ids must be unique across all files, and the files must agree on the
    student tokenizer and vocabulary they were made for, their schema version and draw settings
    (`SET_KEYS`).
    Raises `TraceValidationError` naming the file, row and field of the first problem.
    """
    if isinstance(source, (list, tuple)):
        files = [(f, None) for f in source]
    elif _is_dir(source):
        files = manifest_entries(source)
        if not files:
            raise TraceValidationError(f"{source}: no *.parquet trace shards in this folder")
    else:
        files = [(source, None)]
    tables = [_read_one(f, entry, vocab_size=vocab_size, k_max=k_max) for f, entry in files]
    paths = [f for f, _ in files]
    check_same_trace_set(paths, tables)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if len(tables) > 1 and pc.count_distinct(table.column("id")).as_py() != table.num_rows:
        _fail_duplicate_across(paths, tables)
    return table


def _is_dir(url) -> bool:
    fs, p = storage.resolve(url)
    return fs.isdir(p)


def _read_one(path, entry: dict | None, *, vocab_size: int | None, k_max: int) -> pa.Table:
    """One validated shard; `entry` (its manifest entry, if any) must match its bytes and rows."""
    if not storage.exists(path):
        raise TraceValidationError(f"{path}: trace file not found")
    try:
        if entry is None:
            src, fs = arrow_path(path)
            table = pq.read_table(src, filesystem=fs, page_checksum_verification=True)
        else:
            data, sha = _read_hashed(path)
            if sha != entry["sha256"]:
                try:
                    rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
                except (pa.ArrowException, OSError):
                    rows = "unreadable"
                raise TraceValidationError(f"{manifest_mismatch(path, entry, sha, rows)}; {RECOLLECT}")
            table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
        # The footer (names, metadata) has no checksum, and files made elsewhere may have none at
        # all: text that is not UTF-8 is damage too, found here rather than deep in a later step.
        meta = table_metadata(table)
        table.validate(full=True)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise TraceValidationError(
            f"{path}: not a readable Parquet file (truncated or corrupt?): {e}. "
            "Delete it and re-run collection to regenerate it."
        ) from e
    if entry is not None and table.num_rows != entry["rows"]:
        raise TraceValidationError(f"{manifest_mismatch(path, entry, sha, table.num_rows)}; {RECOLLECT}")
    check_schema_version(path, meta, table.schema)
    check_column_types(path, table.schema)
    schema = trace_schema(table.schema)
    table = table.select(schema.names)
    validate_traces(table, name=str(path), vocab_size=vocab_size, k_max=k_max)
    return table.cast(schema.with_metadata(table.schema.metadata))


SET_KEYS = ("student_tokenizer_hash", "vocab_size", "schema_version", "rs")
"""Metadata every file of one trace set shares: ids only mean something under one tokenizer, and
one set has sampled columns in every shard or in none, all drawn with the same `rs` settings."""


def check_same_trace_set(paths: list, tables: list[pa.Table]) -> None:
    """Refuse shards (tables or footers) whose `SET_KEYS` metadata differ: two trace sets mixed."""
    first: dict[str, tuple] = {}
    for path, table in zip(paths, tables):
        meta = table_metadata(table)
        for key in SET_KEYS:
            if key not in meta:
                continue
            seen = first.setdefault(key, (path, meta[key]))
            if seen[1] != meta[key]:
                raise TraceValidationError(
                    f"{path}: made for {META_PREFIX}{key}={meta[key]!r}, but {seen[0]} for {seen[1]!r}: "
                    "shards of different trace sets are mixed; keep one trace set per folder "
                    "(or re-collect into an empty one)")


def _fail_duplicate_across(paths: list, tables: list[pa.Table]) -> None:
    """Name the first row id that appears in two files (each file alone has unique ids)."""
    seen: dict[str, tuple] = {}
    for path, table in zip(paths, tables):
        for row, rid in enumerate(table.column("id").to_pylist()):
            if rid in seen:
                raise TraceValidationError(
                    f"{path}: row {row} has id {rid!r}, which {seen[rid][0]} row {seen[rid][1]} has too: "
                    f"{DUPLICATE_HINT}")
            seen[rid] = (path, row)


def check_column_types(path, schema: pa.Schema) -> None:
    """Refuse a shard schema that lacks a trace column or holds it with an incompatible type."""
    for field in trace_schema(schema):
        if field.name not in schema.names:
            raise TraceValidationError(f"{path}: missing column '{field.name}' (expected {field.type})")
        got = schema.field(field.name).type
        if not _compatible(got, field.type):
            raise TraceValidationError(
                f"{path}: column '{field.name}' has type {got}, expected {field.type}"
            )


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    """Same logical type; integer/float widths and large_* list/string variants are accepted."""
    if pa.types.is_list(want):
        return (pa.types.is_list(got) or pa.types.is_large_list(got)) and _compatible(got.value_type, want.value_type)
    if pa.types.is_integer(want):
        return pa.types.is_integer(got)
    if pa.types.is_floating(want):
        return pa.types.is_floating(got)
    if pa.types.is_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got)
    return got == want


def _first_null(col) -> int | None:
    if not col.null_count:
        return None
    return int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])


def validate_traces(table: pa.Table, *, name: str = "<table>", vocab_size: int | None = None,
                    k_max: int = 128) -> None:
    """Vectorised checks of the schema's rules (docs/TRACE_FORMAT.md, "Reading and validation");
    raises `TraceValidationError` for the first bad row."""
    ids = table.column("id").to_pylist()

    def fail(row: int, field: str, problem: str):
        raise TraceValidationError(f"{name}: row {row} (id={ids[row]!r}), field '{field}': {problem}")

    def row_of(offsets: np.ndarray, flat_index: int) -> int:
        return int(np.searchsorted(offsets, flat_index, side="right") - 1)

    n = table.num_rows
    if len(set(ids)) != n:
        first: dict[str, int] = {}
        for r, rid in enumerate(ids):
            if rid in first:
                fail(r, "id", f"row {first[rid]} has the same id: {DUPLICATE_HINT}")
            first[rid] = r
    for field in ("id", "input_ids", "completion_start", "topk_ids", "topk_logprobs", "other_logprob", "kd_valid"):
        row = _first_null(table.column(field))
        if row is not None:
            fail(row, field, "is null")
    lengths = {f: list_offsets(table.column(f))
               for f in ("input_ids", "topk_ids", "topk_logprobs", "other_logprob", "kd_valid")}
    for field, (off, values) in lengths.items():
        idx = _first_null(values)
        if idx is not None:
            fail(row_of(off, idx), field, f"element {idx - off[row_of(off, idx)]} is null")
    seq_len = np.diff(lengths["input_ids"][0])
    for field in ("topk_ids", "topk_logprobs", "other_logprob", "kd_valid"):
        other = np.diff(lengths[field][0])
        bad = np.flatnonzero(other != seq_len)
        if bad.size:
            r = int(bad[0])
            fail(r, field, f"has {other[r]} positions but input_ids has {seq_len[r]} (ragged lists)")
    bad = np.flatnonzero(seq_len < 2)
    if bad.size:
        fail(int(bad[0]), "input_ids", f"has {seq_len[bad[0]]} tokens; a trace needs at least 2")

    cs = table.column("completion_start").to_numpy()
    bad = np.flatnonzero((cs < 1) | (cs >= seq_len))
    if bad.size:
        r = int(bad[0])
        fail(r, "completion_start", f"is {cs[r]}, must be in [1, {seq_len[r] - 1}] (the completion needs ≥1 token)")

    row_off, tok = lengths["input_ids"][0], lengths["input_ids"][1].to_numpy()
    upper = vocab_size if vocab_size is not None else np.iinfo(np.int64).max
    bad = np.flatnonzero((tok < 0) | (tok >= upper))
    if bad.size:
        fail(row_of(row_off, bad[0]), "input_ids", f"token id {tok[bad[0]]} outside [0, {vocab_size or 'vocab'})")

    # Per-position candidate lists: positions -> candidates.
    pos_off_ids, cand_ids_arr = list_offsets(lengths["topk_ids"][1])
    pos_off_lp, cand_lp_arr = list_offsets(lengths["topk_logprobs"][1])
    for field, (off, values) in (("topk_ids", (pos_off_ids, cand_ids_arr)), ("topk_logprobs", (pos_off_lp, cand_lp_arr))):
        idx = _first_null(values)
        if idx is not None:
            pos = int(np.searchsorted(off, idx, side="right") - 1)
            r = row_of(row_off, pos)
            fail(r, field, f"position {pos - row_off[r]} holds a null candidate")
    k_ids, k_lp = np.diff(pos_off_ids), np.diff(pos_off_lp)
    bad = np.flatnonzero(k_ids != k_lp)
    if bad.size:
        fail(row_of(row_off, bad[0]), "topk_logprobs",
             f"position {bad[0] - row_off[row_of(row_off, bad[0])]} has {k_lp[bad[0]]} logprobs for {k_ids[bad[0]]} ids")
    bad = np.flatnonzero(k_ids > k_max)
    if bad.size:
        fail(row_of(row_off, bad[0]), "topk_ids", f"{k_ids[bad[0]]} candidates at one position exceeds K_max={k_max}")

    cand_ids = cand_ids_arr.to_numpy(zero_copy_only=False)
    cand_lp = cand_lp_arr.to_numpy(zero_copy_only=False).astype(np.float64)
    pos_row = np.repeat(np.arange(n), seq_len)                  # row of each position
    cand_pos = np.repeat(np.arange(k_ids.size), k_ids)          # position of each candidate

    def fail_cand(field: str, idx: int, problem: str):
        p = int(cand_pos[idx])
        r = int(pos_row[p])
        fail(r, field, f"position {p - row_off[r]}: {problem}")

    bad = np.flatnonzero((cand_ids < 0) | (cand_ids >= upper))
    if bad.size:
        fail_cand("topk_ids", bad[0], f"token id {cand_ids[bad[0]]} outside [0, {vocab_size or 'vocab'})")
    if cand_ids.size:
        # (position, id) as one int64 key: equal neighbours after sorting are a repeated candidate
        span = int(cand_ids.max()) + 1
        key = np.sort(cand_pos.astype(np.int64) * span + cand_ids)
        dup = np.flatnonzero(key[1:] == key[:-1])
        if dup.size:
            p, tok_id = divmod(int(key[dup[0]]), span)
            r = int(pos_row[p])
            fail(r, "topk_ids", f"position {p - row_off[r]}: student id {tok_id} is listed twice; each id may "
                 "appear once per position (merge such candidates with log-sum-exp)")
    bad = np.flatnonzero(~np.isfinite(cand_lp))
    if bad.size:
        fail_cand("topk_logprobs", bad[0], f"logprob {cand_lp[bad[0]]} is not finite")
    bad = np.flatnonzero(cand_lp > 0)
    if bad.size:
        fail_cand("topk_logprobs", bad[0], f"logprob {cand_lp[bad[0]]} > 0 (not a log-probability)")

    other = lengths["other_logprob"][1].to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.flatnonzero(np.isnan(other) | (other > 0) | (other == np.inf))
    if bad.size:
        p = int(bad[0])
        fail(int(pos_row[p]), "other_logprob", f"position {p - row_off[pos_row[p]]}: value {other[p]} must be ≤ 0")

    valid = lengths["kd_valid"][1].to_numpy(zero_copy_only=False).astype(bool)
    mass = np.zeros(k_ids.size)
    np.add.at(mass, cand_pos, np.exp(cand_lp))
    bad = np.flatnonzero(valid & (mass > 1 + SUM_TOLERANCE))
    if bad.size:
        p = int(bad[0])
        fail(int(pos_row[p]), "topk_logprobs",
             f"position {p - row_off[pos_row[p]]}: probabilities sum to {mass[p]:.6f} > 1")
    bad = np.flatnonzero(valid & (k_ids == 0))
    if bad.size:
        p = int(bad[0])
        fail(int(pos_row[p]), "kd_valid", f"position {p - row_off[pos_row[p]]} is KD-valid but has no candidates")
    if "rs_ids" in table.column_names:
        _validate_sampled(table, seq_len, row_off, pos_row, upper, vocab_size, fail)


def _validate_sampled(table: pa.Table, seq_len, row_off, pos_row, upper, vocab_size, fail) -> None:
    """Schema v2's sampled columns: one list per position, ids in the vocabulary and distinct,
    counts >= 1, and finite log(q / p) values; no null row, position or element (a position
    without draws holds an empty list)."""
    fields = [f.name for f in SAMPLED_FIELDS if f.name in table.column_names]
    per_pos = {}
    for field in fields:
        row = _first_null(table.column(field))
        if row is not None:
            fail(row, field, "is null")
        off, values = list_offsets(table.column(field))
        bad = np.flatnonzero(np.diff(off) != seq_len)
        if bad.size:
            fail(int(bad[0]), field, f"has {np.diff(off)[bad[0]]} positions but input_ids has {seq_len[bad[0]]}")
        p = _first_null(values)  # positions are numbered as input_ids' now that the lengths agree
        if p is not None:
            fail(int(pos_row[p]), field, f"position {p - row_off[pos_row[p]]} is null (a position without draws "
                 "holds an empty list)")
        per_pos[field] = list_offsets(values)
    pos_off, ids = per_pos["rs_ids"]
    sizes = np.diff(pos_off)
    for field in fields[1:]:
        bad = np.flatnonzero(np.diff(per_pos[field][0]) != sizes)
        if bad.size:
            p = int(bad[0])
            fail(int(pos_row[p]), field, f"position {p - row_off[pos_row[p]]} has {np.diff(per_pos[field][0])[p]} "
                 f"values for {sizes[p]} rs_ids")
    pos = np.repeat(np.arange(sizes.size), sizes)

    def fail_at(field, idx, problem):
        p = int(pos[idx])
        fail(int(pos_row[p]), field, f"position {p - row_off[pos_row[p]]}: {problem}")

    for field in fields:
        idx = _first_null(per_pos[field][1])
        if idx is not None:
            fail_at(field, idx, f"element {idx - pos_off[pos[idx]]} is null")
    ids = ids.to_numpy(zero_copy_only=False).astype(np.int64)
    bad = np.flatnonzero((ids < 0) | (ids >= upper))
    if bad.size:
        fail_at("rs_ids", bad[0], f"token id {ids[bad[0]]} outside [0, {vocab_size or 'vocab'})")
    if ids.size:
        key = np.sort(pos * (int(ids.max()) + 1) + ids)
        if (key[1:] == key[:-1]).any():
            idx = int(np.argsort(pos * (int(ids.max()) + 1) + ids)[np.flatnonzero(key[1:] == key[:-1])[0]])
            fail_at("rs_ids", idx, "an id is listed twice (store each sampled id once with its count)")
    counts = per_pos["rs_counts"][1].to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(counts < 1)
    if bad.size:
        fail_at("rs_counts", bad[0], f"count {counts[bad[0]]} < 1")
    if "rs_logq" in per_pos:
        logq = per_pos["rs_logq"][1].to_numpy(zero_copy_only=False).astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(logq))
        if bad.size:
            fail_at("rs_logq", bad[0], f"value {logq[bad[0]]} is not finite")


def write_manifest(trace_dir: str | os.PathLike, shards: list, info: dict) -> Path | str:
    """Write `manifest.json` (atomically) listing shards with row counts and sha256 hashes."""
    entries = []
    for shard in shards:
        src, fs = arrow_path(shard)
        rows = pq.ParquetFile(src, filesystem=fs).metadata.num_rows
        entries.append({"file": storage.name_of(shard), "rows": rows, "sha256": file_sha256(shard)})
    manifest = {"schema_version": SCHEMA_VERSION, **info, "shards": entries,
                "rows": sum(e["rows"] for e in entries)}
    return storage.write_text_atomic(storage.join(trace_dir, "manifest.json"),
                                     json.dumps(manifest, indent=2, sort_keys=True))


def manifest_complete(trace_dir: str | os.PathLike, trace_set_id: str, shards: list | None = None) -> bool:
    """True when `trace_dir/manifest.json` describes `trace_set_id` and its shards all exist with
    the sha256 it recorded (a damaged or replaced shard makes the set incomplete, so it is
    written again).

    `shards` (the files the caller expects) defaults to those the manifest lists.
    """
    info = _read_manifest(trace_dir)
    if info is None or info.get("trace_set") != trace_set_id:
        return False
    wanted = [s["file"] for s in info.get("shards", [])] if shards is None else [storage.name_of(s) for s in shards]
    names = folder_names(trace_dir)
    return all(n in names for n in wanted) and not mismatched_shards(trace_dir)


def check_draws_match(rs: dict | None, kd_variant: str, where: str) -> None:
    """Refuse a KD target (`loss.other`) that the traces' sampled draws were not made for.

    `rs` is the collection's `rs` settings (`n`, `hybrid`, ...; None or n = 0: no draws). `rs`
    needs draws from the teacher's whole distribution and `hybrid` draws from the tail outside
    the Top-K: tail draws under `rs` fit the student to the tail alone, and whole-distribution
    draws under `hybrid` count the head twice. `bucket` and `renormalize` read no draws."""
    if kd_variant not in ("rs", "hybrid"):
        return
    hybrid = bool((rs or {}).get("hybrid"))
    if not (rs or {}).get("n"):
        raise TraceValidationError(
            f"{where}: loss.other={kd_variant} needs sampled draws (rs_ids / rs_counts, trace schema v2) and these "
            "traces have none; collect them from a local teacher with collection.rs.n > 0"
            f"{' and collection.rs.hybrid=true' if kd_variant == 'hybrid' else ''}, or set loss.other=bucket")
    if kd_variant == "rs" and hybrid:
        raise TraceValidationError(
            f"{where}: the traces' draws come from the tail outside the Top-K only (collection.rs.hybrid=true), "
            "and loss.other=rs would fit the student to that tail alone; set loss.other=hybrid, or collect them "
            "with collection.rs.hybrid=false")
    if kd_variant == "hybrid" and not hybrid:
        raise TraceValidationError(
            f"{where}: the traces' draws come from the teacher's whole distribution (collection.rs.hybrid=false), "
            "and loss.other=hybrid would count the exact Top-K head twice; set loss.other=rs, or collect them "
            "with collection.rs.hybrid=true")


def check_run_match(meta: dict[str, str], where: str, *, vocab_size: int | None = None,
                    tokenizer_hash: str | None = None, k_max: int | None = None,
                    kd_variant: str | None = None) -> None:
    """Refuse traces made for another run: their metadata (`table_metadata`) against the run's
    vocabulary size, student tokenizer hash, largest K and KD target (`kd_variant`, the run's
    `loss.other`, against the draws: `check_draws_match`). A key the traces lack is not compared
    (traces made elsewhere; v1 traces have no draws); a value the run does not know (None) neither."""
    def refuse(what: str, fix: str):
        raise TraceValidationError(f"{where}: {what}; {fix}")

    if kd_variant is not None and ("rs" in meta or meta.get("schema_version") == SCHEMA_VERSION):
        rs = None
        if "rs" in meta:
            try:
                rs = json.loads(meta["rs"])
            except json.JSONDecodeError:
                pass
            if not isinstance(rs, dict):
                refuse(f"{META_PREFIX}rs={meta['rs']!r} is not the JSON of the collection.rs settings",
                       "re-collect the traces")
        check_draws_match(rs, kd_variant, where)

    other_tokenizer = "use traces collected for this run's student tokenizer (re-collect them)"
    if vocab_size is not None and "vocab_size" in meta and meta["vocab_size"] != str(vocab_size):
        refuse(f"the traces were made for a vocabulary of {meta['vocab_size']} ids ({META_PREFIX}vocab_size), "
               f"this run's student has vocab_size={vocab_size}",
               f"{other_tokenizer}, or set data.vocab_size={meta['vocab_size']} if the student uses their tokenizer")
    if tokenizer_hash is not None and "student_tokenizer_hash" in meta \
            and meta["student_tokenizer_hash"] != tokenizer_hash:
        refuse(f"the traces were made for student tokenizer hash {meta['student_tokenizer_hash']} "
               f"({META_PREFIX}student_tokenizer_hash, {meta.get('student_tokenizer', '?')}), this run's student "
               f"tokenizer has hash {tokenizer_hash}", other_tokenizer)
    if k_max is not None and "k" in meta:
        try:
            k = int(meta["k"])
        except ValueError:
            refuse(f"{META_PREFIX}k={meta['k']!r} is not a number of candidates", "re-collect the traces")
        if k < 1:
            refuse(f"the traces declare K={k} candidates per position ({META_PREFIX}k)",
                   f"re-collect them with collection.sampling.top_k between 1 and {k_max}")
        if k > k_max:
            refuse(f"the traces hold K={k} candidates per position ({META_PREFIX}k), this run accepts "
                   f"data.k_max={k_max}", f"set data.k_max to at least {k}, or re-collect with "
                   f"collection.sampling.top_k between 1 and {k_max}")
