"""Prompt sets: the shipped default set and a loader for users' own prompts.

A prompt set is an ordered list of `Prompt(id, prompt, category, split)`. The teacher baseline,
trace collection and evaluation all read prompts through `load_prompts`, and trace sets are
content-addressed by `prompt_set_hash`, so the same prompts always give the same address.

Sources accepted by `load_prompts(source)`:

| `source` | read with |
|---|---|
| `None` | the shipped set `DEFAULT_PROMPTS` (441 prompts, 7 categories, fixed 80/10/10 splits) |
| path to a `.jsonl` file (or `.json` holding JSON lines or one JSON array of objects) | `json` |
| path to a `.parquet` file | `pyarrow.parquet` |
| storage URL of such a file (`s3://`, `gs://`, `az://`, `webdav://`, `file://`) | `bitnet_kde.storage`, then as above |
| path to an existing directory | `datasets.load_dataset(dir)` (format inferred from the files) |
| `"json:<files>"`, `"parquet:<files>"`, `"csv:<files>"` (path or glob) | `load_dataset(builder, data_files=files)` |
| `"hf:<name>"`, or any other string that is not a local path | `datasets.load_dataset(name)` (Hub; network) |
| a mapping, e.g. `{"path": "json", "data_files": "p.jsonl", "split": "train"}` | `datasets.load_dataset(**mapping)` |
| a list of mappings (rows already in memory) | as is |

A string that names a local file (an existing path, or one ending in `.jsonl`/`.json`/`.parquet`,
or starting with `/`, `./`, `../`, `~`) is never sent to the Hub: if it does not exist the loader
says so. When `datasets` returns several splits (a `DatasetDict`, e.g. a directory with
`train.jsonl` and `test.jsonl`), rows are read split after split and a row with no split field
takes its Hugging Face split name (`validation`/`valid`/`dev` -> `val`); otherwise a row with no
split field gets `default_split`.

Columns are picked with `prompt_field`, `category_field`, `split_field` and `id_field`. A row
without an id gets a stable content id: the first 16 hex digits of sha256(prompt text). Every
problem (missing file, bad JSON line, missing or empty prompt, duplicate ids) raises
`PromptLoadError` (a `ValueError`) naming the file, the line or row, the field and the fix.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from bitnet_kde import storage
from bitnet_kde.kd.traces import content_id

__all__ = ["DEFAULT_PROMPTS", "Prompt", "PromptLoadError", "load_prompts", "prompt_set_hash"]

DEFAULT_PROMPTS = files("bitnet_kde.kd") / "prompt_sets" / "default.jsonl"
"""The shipped prompt set (package data): 7 categories (qa, explain, json, list, code, math,
rewrite), 63 prompts each, split train/val/test ~80/10/10 per category."""

_FILE_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_BUILDER_SPEC = re.compile(r"^(json|jsonl|parquet|csv|text|arrow):(.+)$", re.DOTALL)
_HF_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
_MAX_NAMED = 10  # how many offending ids/rows an error message lists


class PromptLoadError(ValueError):
    """A prompt source cannot be loaded; the message names where and what to fix."""


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    category: str
    split: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def prompt_set_hash(prompts: Iterable[Prompt]) -> str:
    """Content address of an ordered prompt set: sha256 over (id, text) pairs in order, 16 hex.

    Reloading the same source gives the same hash; changing, adding, removing or reordering a
    prompt changes it. Category and split are not part of the hash (they do not change what
    the teacher is asked).
    """
    blob = json.dumps([[p.id, p.prompt] for p in prompts], ensure_ascii=False, separators=(",", ":"))
    return content_id(blob)


# --------------------------------------------------------------------------------------------
# Reading rows from each kind of source. Each reader yields (where, row) with `where` a text
# such as "prompts.jsonl line 7" used in error messages.
# --------------------------------------------------------------------------------------------

def _read_json_lines(text: str, name: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptLoadError(
                f"{name} line {lineno}: invalid JSON ({e.msg} at column {e.colno}). Each line must hold "
                f"one JSON object, e.g. {{\"prompt\": \"...\"}}; fix or remove that line.") from None
        yield f"{name} line {lineno}", row


def _read_json_text(text: str, name: str, suffix: str) -> Iterator[tuple[str, Any]]:
    if suffix == "json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptLoadError(f"{name} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                  f"fix the file (a JSON array of objects or one JSON object per line).") from None
        for i, row in enumerate(rows, start=1):
            yield f"{name} item {i}", row
        return
    yield from _read_json_lines(text, name)


def _read_parquet(path: Path | io.BytesIO, name: str | None = None) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    path_name = name or path
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise PromptLoadError(f"{path_name}: cannot read as Parquet ({e}); check that it is a Parquet file.") from e
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path_name} row {i}", row


def _read_datasets(spec: Mapping[str, Any], label: str) -> tuple[Iterator[tuple[str, Any, str | None]], str]:
    """Rows from `datasets.load_dataset(**spec)`; the third item is the HF split name or None."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a declared dependency
        raise PromptLoadError(f"{label}: loading a dataset needs the `datasets` package (pip install datasets)") from e
    try:
        loaded = datasets.load_dataset(**spec)
    except Exception as e:
        raise PromptLoadError(
            f"{label}: datasets.load_dataset({', '.join(f'{k}={v!r}' for k, v in spec.items())}) failed: "
            f"{type(e).__name__}: {e}. Check the dataset name or the data files; a local file must exist "
            f"(pass a path to a .jsonl/.json/.parquet file, a directory, or 'json:<files>').") from e

    def rows() -> Iterator[tuple[str, Any, str | None]]:
        if isinstance(loaded, Mapping):  # DatasetDict: every split, in order
            several = len(loaded) > 1
            for hf_split, ds in loaded.items():
                for i, row in enumerate(ds, start=1):
                    yield f"{label} split {hf_split!r} row {i}", row, (hf_split if several else None)
        else:
            for i, row in enumerate(loaded, start=1):
                yield f"{label} row {i}", row, None

    return rows(), label


def _read_url(url: str) -> tuple[Iterator[tuple[str, Any, str | None]], str]:
    """A prompt file on a store (`s3://.../prompts.jsonl`): fetched through `bitnet_kde.storage`."""
    kind = _FILE_SUFFIXES.get(Path(url.split("?", 1)[0]).suffix.lower())
    if kind is None:
        raise PromptLoadError(f"{url}: unsupported file type; a prompt URL must end in .jsonl, .json or .parquet")
    try:
        with storage.open_url(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise PromptLoadError(f"prompt file {url} not found on its store; check the URL") from None
    if kind == "parquet":
        return ((w, r, None) for w, r in _read_parquet(io.BytesIO(data), url)), url
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptLoadError(f"{url}: not UTF-8 text ({e}); save the file as UTF-8.") from e
    return ((w, r, None) for w, r in _read_json_text(text, url, kind)), url


def _looks_local(s: str) -> bool:
    return (Path(s).suffix.lower() in _FILE_SUFFIXES or s.startswith(("/", "./", "../", "~", ".\\", "..\\"))
            or bool(re.match(r"^[A-Za-z]:[\\/]", s)))


def _iter_source(source: Any) -> tuple[Iterator[tuple[str, Any, str | None]], str]:
    """Dispatch on the source kind (see module docstring) -> (rows, label)."""
    if source is None:
        source = DEFAULT_PROMPTS
    if isinstance(source, Mapping):
        spec = {str(k): v for k, v in source.items()}
        if "path" not in spec:
            raise PromptLoadError(f"dataset spec {spec!r} has no 'path' key; give the arguments of "
                                  f"datasets.load_dataset, e.g. {{'path': 'json', 'data_files': 'prompts.jsonl'}}.")
        return _read_datasets(spec, f"dataset {spec['path']!r}")
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return ((f"rows item {i}", row, None) for i, row in enumerate(source, start=1)), "rows"

    # A Traversable from importlib.resources (the shipped set) that is not a plain path.
    if not isinstance(source, (str, os.PathLike)) and hasattr(source, "read_text") and hasattr(source, "is_file"):
        name = getattr(source, "name", str(source))
        if not source.is_file():
            raise PromptLoadError(f"prompt file {source} not found (package data missing? reinstall bitnet-kde).")
        kind = _FILE_SUFFIXES.get(Path(name).suffix.lower(), "jsonl")
        text = source.read_text(encoding="utf-8")
        return ((w, r, None) for w, r in _read_json_text(text, str(source), kind)), str(source)

    if not isinstance(source, (str, os.PathLike)):
        raise PromptLoadError(f"unsupported prompt source {source!r} ({type(source).__name__}); pass None, a path, "
                              f"a dataset name, 'json:<files>', a datasets.load_dataset mapping, or a list of dicts.")

    was_pathlike = not isinstance(source, str)
    s = os.fspath(source)
    if re.match(r"^[A-Za-z][\w+.-]*://", s):
        return _read_url(s)
    path = Path(s).expanduser()
    if path.is_file():
        kind = _FILE_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise PromptLoadError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet "
                                  f"(or 'csv:{path}' to read it through datasets).")
        if kind == "parquet":
            return ((w, r, None) for w, r in _read_parquet(path)), str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PromptLoadError(f"{path}: not UTF-8 text ({e}); save the file as UTF-8.") from e
        return ((w, r, None) for w, r in _read_json_text(text, str(path), kind)), str(path)
    if path.is_dir():
        return _read_datasets({"path": str(path)}, f"dataset directory {path}")
    m = None if was_pathlike else _BUILDER_SPEC.match(s)
    if m:
        builder, data_files = m.group(1), m.group(2)
        builder = "json" if builder == "jsonl" else builder
        return _read_datasets({"path": builder, "data_files": data_files}, f"{builder} files {data_files!r}")
    if was_pathlike or _looks_local(s):
        raise PromptLoadError(f"prompt file {path} not found; check the path (relative paths are resolved "
                              f"from {Path.cwd()}).")
    name = s[3:] if s.startswith("hf:") else s
    return _read_datasets({"path": name}, f"dataset {name!r}")


def _as_list(value: str | Iterable[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    try:
        out = [str(v) for v in value]
    except TypeError:
        raise PromptLoadError(f"{what} must be a string or a list of strings, got {value!r}") from None
    return out


def _field(row: Mapping[str, Any], name: str) -> Any:
    value = row.get(name)
    if isinstance(value, str):
        return value if value.strip() else None
    return value


def load_prompts(source: Any = None, *, split: str | Iterable[str] | None = None,
                 categories: str | Iterable[str] | None = None, limit: int | None = None,
                 prompt_field: str = "prompt", category_field: str = "category", split_field: str = "split",
                 id_field: str = "id", default_category: str = "general", default_split: str = "train") -> list[Prompt]:
    """Load a prompt set (see the module docstring for every kind of `source`).

    Args:
        source: None for the shipped set, a file/directory path, a `datasets` spec, or rows.
        split: keep only prompts of this split (or of any of these splits).
        categories: keep only prompts of this category (or of any of these).
        limit: keep the first `limit` prompts after filtering, in source order.
        prompt_field, category_field, split_field, id_field: column names in the source.
        default_category, default_split: values for rows without a category / split.

    Returns:
        The prompts in source order.

    Raises:
        PromptLoadError (a ValueError): missing file, bad JSON, a row without prompt text,
        duplicate ids, or filters that match nothing; the message says what to fix.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise PromptLoadError(f"limit must be a non-negative integer or None, got {limit!r}")
    splits = _as_list(split, "split")
    cats = _as_list(categories, "categories")

    rows, label = _iter_source(source)
    prompts: list[Prompt] = []
    where_by_id: dict[str, list[str]] = {}
    for where, row, hf_split in rows:
        if not isinstance(row, Mapping):
            raise PromptLoadError(f"{where}: expected an object with a {prompt_field!r} field, got "
                                  f"{type(row).__name__} {str(row)[:60]!r}.")
        if prompt_field not in row or row[prompt_field] is None:
            fields = sorted(map(str, row.keys()))
            raise PromptLoadError(f"{where}: missing prompt field {prompt_field!r} (fields present: {fields}); "
                                  f"add it, or pass prompt_field=<the column that holds the prompt text>.")
        text = row[prompt_field]
        if not isinstance(text, str):
            raise PromptLoadError(f"{where}: field {prompt_field!r} must be text, got {type(text).__name__} "
                                  f"{str(text)[:60]!r}.")
        if not text.strip():
            raise PromptLoadError(f"{where}: field {prompt_field!r} is empty; give the prompt text or remove the row.")
        pid = _field(row, id_field)
        pid = content_id(text) if pid is None else str(pid)
        category = _field(row, category_field)
        category = default_category if category is None else str(category)
        row_split = _field(row, split_field)
        if row_split is None:
            row_split = _HF_SPLIT_ALIASES.get(hf_split, hf_split) if hf_split is not None else default_split
        prompts.append(Prompt(id=pid, prompt=text, category=category, split=str(row_split)))
        where_by_id.setdefault(pid, []).append(where)

    if not prompts:
        raise PromptLoadError(f"{label}: contains no prompts; add rows with a {prompt_field!r} field.")

    dups = {pid: wheres for pid, wheres in where_by_id.items() if len(wheres) > 1}
    if dups:
        shown = "; ".join(f"{pid!r} at {', '.join(w)}" for pid, w in list(dups.items())[:_MAX_NAMED])
        more = f" (and {len(dups) - _MAX_NAMED} more)" if len(dups) > _MAX_NAMED else ""
        raise PromptLoadError(f"{label}: {len(dups)} duplicate prompt id(s): {shown}{more}. Ids must be unique: "
                              f"rename them, or drop the {id_field!r} field to use content ids (then the same "
                              f"prompt text must not appear twice).")

    kept = prompts
    if splits is not None:
        kept = [p for p in kept if p.split in splits]
    if cats is not None:
        kept = [p for p in kept if p.category in cats]
    if prompts and not kept:
        have_s = sorted(Counter(p.split for p in prompts))
        have_c = sorted(Counter(p.category for p in prompts))
        raise PromptLoadError(f"{label}: no prompt matches split={splits} categories={cats}; the source has "
                              f"splits {have_s} and categories {have_c}.")
    if limit is not None:
        kept = kept[:limit]
    return kept
