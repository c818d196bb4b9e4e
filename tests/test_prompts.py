"""Prompt sets: the shipped default set and `load_prompts` over every kind of source."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bitnet_kde.kd.prompts import DEFAULT_PROMPTS, Prompt, PromptLoadError, load_prompts, prompt_set_hash

CATEGORIES = {"qa", "explain", "json", "list", "code", "math", "rewrite"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"id": "a", "prompt": "What is 2 + 2?", "category": "math", "split": "train"},
    {"id": "b", "prompt": "Name three colors.", "category": "list", "split": "train"},
    {"id": "c", "prompt": "What is 3 + 5?", "category": "math", "split": "val"},
    {"id": "d", "prompt": "Return a JSON object with key \"x\".", "category": "json", "split": "test"},
    {"id": "e", "prompt": "What is 9 - 4?", "category": "math", "split": "train"},
]


# ------------------------------------------------------------------ the shipped set

@pytest.fixture(scope="module")
def shipped() -> list[Prompt]:
    return load_prompts()


def test_shipped_set_size_and_categories(shipped):
    assert len(shipped) >= 400
    counts = Counter(p.category for p in shipped)
    assert set(counts) == CATEGORIES
    assert all(n >= 55 for n in counts.values()), counts


def test_shipped_splits_are_stratified_80_10_10(shipped):
    for cat in CATEGORIES:
        ps = [p for p in shipped if p.category == cat]
        c = Counter(p.split for p in ps)
        assert set(c) == {"train", "val", "test"}, (cat, c)
        n = len(ps)
        assert 0.75 <= c["train"] / n <= 0.85, (cat, c)
        assert 0.07 <= c["val"] / n <= 0.13, (cat, c)
        assert 0.07 <= c["test"] / n <= 0.13, (cat, c)


def test_shipped_ids_and_texts_unique_and_well_formed(shipped):
    ids = [p.id for p in shipped]
    assert len(set(ids)) == len(ids)
    texts = [" ".join(p.prompt.lower().split()) for p in shipped]
    assert len(set(texts)) == len(texts)
    for p in shipped:
        assert re.fullmatch(rf"{p.category}-\d{{4}}", p.id), p.id
        assert p.split in {"train", "val", "test"}
        assert 0 < len(p.prompt) <= 300 and p.prompt == p.prompt.strip()


def test_shipped_file_is_package_data_with_explicit_fields():
    lines = DEFAULT_PROMPTS.read_text(encoding="utf-8").splitlines()
    for line in lines:
        row = json.loads(line)
        assert set(row) == {"id", "prompt", "category", "split"}


def test_shipped_ids_are_stable(shipped):
    again = load_prompts()
    assert [p.id for p in again] == [p.id for p in shipped]
    assert prompt_set_hash(again) == prompt_set_hash(shipped)
    by_id = {p.id: p for p in shipped}
    assert by_id["qa-0001"].prompt == "What is the capital of Peru? Answer in one word."
    assert by_id["qa-0001"].split == "train" and by_id["qa-0009"].split == "val" and by_id["qa-0010"].split == "test"


def test_shipped_json_prompts_ask_for_json(shipped):
    for p in shipped:
        if p.category == "json":
            assert "JSON" in p.prompt, p.prompt


# ------------------------------------------------------------------ sources and field remapping

def test_jsonl_source_and_filters(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", ROWS)
    assert [p.id for p in load_prompts(f)] == ["a", "b", "c", "d", "e"]
    assert [p.id for p in load_prompts(str(f), split="train")] == ["a", "b", "e"]
    assert [p.id for p in load_prompts(f, split=["val", "test"])] == ["c", "d"]
    assert [p.id for p in load_prompts(f, categories="math")] == ["a", "c", "e"]
    assert [p.id for p in load_prompts(f, categories=["math", "json"], split="train")] == ["a", "e"]
    assert [p.id for p in load_prompts(f, categories="math", limit=2)] == ["a", "c"]
    assert load_prompts(f, limit=0) == []
    assert load_prompts(f)[0] == Prompt("a", "What is 2 + 2?", "math", "train")


def test_shipped_filters(shipped):
    val_json = load_prompts(split="val", categories=["json"])
    assert val_json and all(p.split == "val" and p.category == "json" for p in val_json)
    assert load_prompts(limit=5) == shipped[:5]


def test_field_remapping_defaults_and_content_ids(tmp_path):
    rows = [{"question": "Why is the sky blue?", "kind": "explain", "part": "test", "key": 7},
            {"question": "Say hi.", "other": 1}]
    f = write_jsonl(tmp_path / "custom.jsonl", rows)
    ps = load_prompts(f, prompt_field="question", category_field="kind", split_field="part", id_field="key",
                      default_category="misc", default_split="val")
    assert ps[0] == Prompt("7", "Why is the sky blue?", "explain", "test")
    assert ps[1] == Prompt(hashlib.sha256(b"Say hi.").hexdigest()[:16], "Say hi.", "misc", "val")
    # Without an id field the id is the content hash: stable across loads and files.
    ps2 = load_prompts(write_jsonl(tmp_path / "again.jsonl", [{"question": "Say hi."}]), prompt_field="question")
    assert ps2[0].id == ps[1].id and ps2[0].category == "general" and ps2[0].split == "train"


def test_json_array_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(ROWS[:2], indent=2), encoding="utf-8")
    assert [p.id for p in load_prompts(f)] == ["a", "b"]


def test_parquet_source_with_remapping(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": [r["prompt"] for r in ROWS], "cat": [r["category"] for r in ROWS],
                             "uid": [r["id"] for r in ROWS]}), f)
    ps = load_prompts(f, prompt_field="text", category_field="cat", id_field="uid", categories="math")
    assert [p.id for p in ps] == ["a", "c", "e"]
    assert all(p.split == "train" for p in ps)  # no split column -> default_split


def test_datasets_sources(tmp_path):
    pytest.importorskip("datasets")
    f = write_jsonl(tmp_path / "p.jsonl", [{"q": r["prompt"], "category": r["category"]} for r in ROWS])
    cache = str(tmp_path / "hf_cache")
    # Builder spec string.
    ps = load_prompts(f"json:{f}", prompt_field="q")
    assert [p.prompt for p in ps] == [r["prompt"] for r in ROWS]
    assert all(p.split == "train" for p in ps)
    # Mapping = datasets.load_dataset kwargs.
    ps2 = load_prompts({"path": "json", "data_files": str(f), "split": "train", "cache_dir": cache},
                       prompt_field="q", categories="math", default_split="test")
    assert [p.prompt for p in ps2] == ["What is 2 + 2?", "What is 3 + 5?", "What is 9 - 4?"]
    assert all(p.split == "test" for p in ps2)
    assert [p.id for p in ps2] == [p.id for p in ps if p.category == "math"]  # content ids agree across sources


def test_datasets_directory_uses_hf_split_names(tmp_path):
    pytest.importorskip("datasets")
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(pa.table({"prompt": ["Train one.", "Train two."]}), d / "train.parquet")
    pq.write_table(pa.table({"prompt": ["Held out."]}), d / "validation.parquet")
    ps = load_prompts(d)
    assert {(p.prompt, p.split) for p in ps} == {("Train one.", "train"), ("Train two.", "train"),
                                                 ("Held out.", "val")}
    assert [p.prompt for p in load_prompts(d, split="val")] == ["Held out."]


def test_in_memory_rows():
    ps = load_prompts([{"prompt": "One?"}, {"prompt": "Two?", "split": "test"}], split="test")
    assert [p.prompt for p in ps] == ["Two?"]


# ------------------------------------------------------------------ errors

def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.jsonl not found"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(PromptLoadError, match="not found"):
        load_prompts("does/not/exist.jsonl")  # a local-looking string never goes to the Hub


def test_bad_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n\n{"prompt": "broken"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: invalid JSON"):
        load_prompts(f)
    g = write_jsonl(tmp_path / "notobj.jsonl", [{"prompt": "ok"}])
    g.write_text(g.read_text() + '["a list"]\n')
    with pytest.raises(ValueError, match=r"notobj\.jsonl line 2: expected an object"):
        load_prompts(g)


def test_missing_prompt_field_names_file_row_and_field(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"text": "no prompt here"}])
    with pytest.raises(ValueError, match=r"p\.jsonl line 2: missing prompt field 'prompt'.*'text'.*prompt_field="):
        load_prompts(f)
    g = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), g)
    with pytest.raises(ValueError, match=r"p\.parquet row 1: missing prompt field 'prompt'"):
        load_prompts(g)


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_prompt_is_an_error(tmp_path, text):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": text}])
    with pytest.raises(ValueError, match=r"line 2: field 'prompt' is empty"):
        load_prompts(f)


def test_non_text_prompt_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"item 1: field 'prompt' must be text"):
        load_prompts([{"prompt": 42}])


def test_duplicate_ids_are_named(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "prompt": "one"}, {"id": "y", "prompt": "two"},
                                           {"id": "x", "prompt": "three"}])
    with pytest.raises(ValueError, match=r"duplicate prompt id.*'x' at .*line 1, .*line 3.*unique"):
        load_prompts(f)
    # Same text twice without ids -> same content id -> duplicate.
    g = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "same"}, {"prompt": "same"}])
    with pytest.raises(ValueError, match="duplicate prompt id"):
        load_prompts(g)


def test_other_errors(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"no prompt matches.*splits \['test', 'train', 'val'\]"):
        load_prompts(f, split="validation")
    with pytest.raises(ValueError, match="limit must be"):
        load_prompts(f, limit=-1)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="contains no prompts"):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "p.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_prompts(tmp_path / "p.txt")
    with pytest.raises(ValueError, match="'path'"):
        load_prompts({"data_files": "x.jsonl"})


def test_datasets_failure_is_a_value_error(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(ValueError, match="load_dataset.*failed"):
        load_prompts(f"json:{tmp_path}/missing-*.jsonl")


# ------------------------------------------------------------------ content address

def test_prompt_set_hash(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", ROWS)
    h = prompt_set_hash(load_prompts(f))
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert prompt_set_hash(load_prompts(f)) == h  # reload -> same
    changed = [dict(r) for r in ROWS]
    changed[2]["prompt"] = "What is 3 + 6?"
    assert prompt_set_hash(load_prompts(write_jsonl(tmp_path / "q.jsonl", changed))) != h
    assert prompt_set_hash(load_prompts(f)[::-1]) != h  # order matters
    assert prompt_set_hash(load_prompts(f)[:-1]) != h
    recat = [dict(r, category="other") for r in ROWS]  # category/split are not content
    assert prompt_set_hash(load_prompts(write_jsonl(tmp_path / "r.jsonl", recat))) == h
