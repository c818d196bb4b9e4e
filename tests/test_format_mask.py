"""JSON structure marking for the format loss, against hand-marked strings."""

from __future__ import annotations

import numpy as np

from bitnet_kde.data.format_mask import json_structure_chars, token_format_mask


def marked(text: str) -> str:
    """Render the mask as a string: structural chars kept, others as '.'."""
    m = json_structure_chars(text)
    return "".join(c if k else "." for c, k in zip(text, m))


def test_object_punctuation_and_keys_are_structural_values_are_not():
    text = 'Here: {"name": "Ada, Lovelace", "age": 36}'
    #                       Here: {"name": "Ada, Lovelace", "age": 36}
    assert marked(text) == '......{"name":................,."age":...}'


def test_nested_arrays_escaped_quotes_and_whitespace_before_colon():
    text = '[{"k" : "a\\"b:c"}, [1, 2]]'
    #                       [{"k" : "a\"b:c"}, [1, 2]]
    assert marked(text) == '[{"k".:.........},.[.,..]]'


def test_text_without_valid_json_has_no_structure():
    assert not json_structure_chars("a list: [1, 2 and {broken").any()
    assert not json_structure_chars("plain prose, with commas: yes").any()


def test_token_mask_marks_tokens_touching_structure():
    pieces = ["Result", ":", " {", '"', "id", '":', " 7", "}", " done"]
    # The ':' after "Result" is prose; the JSON object starts at ' {'.
    assert token_format_mask(pieces).tolist() == [False, False, True, True, True, True, False, True, False]
    assert token_format_mask([]).dtype == np.bool_


def test_dataset_format_mask_targets_structural_completion_tokens(tmp_path):
    """A character-level 'tokenizer' (id i -> chr(i)) makes the expected mask easy to write."""
    from bitnet_kde.data import KDTraceDataModule
    from bitnet_kde.kd import trace_metadata, write_trace_shard

    pieces = [chr(i) for i in range(128)]
    prompt, completion = "Q?", 'ok {"a": 1}'
    ids = [ord(c) for c in prompt + completion]
    n = len(ids)
    row = {"prompt": "p", "category": "json", "input_ids": ids, "completion_start": len(prompt),
           "topk_ids": [[ids[t + 1]] if t < n - 1 else [] for t in range(n)],
           "topk_logprobs": [[-0.1] if t < n - 1 else [] for t in range(n)],
           "other_logprob": [-2.3] * (n - 1) + [0.0], "kd_valid": [t < n - 1 for t in range(n)],
           "teacher_text": completion}
    rows = [dict(row, id=f"r{i}") for i in range(8)]
    meta = trace_metadata(teacher_provider="test", teacher_model="chars", k=1, sampling={}, logprob_mode="exact",
                          tokenizer_name="chars", tokenizer_hash="0", vocab_size=128)
    write_trace_shard(rows, tmp_path / "kd.parquet", meta)
    dm = KDTraceDataModule(str(tmp_path), vocab_size=128, num_workers=0, val_fraction=0.5, piece_table=pieces)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))  # every row is the same sequence
    item = {"format_mask": batch["format_mask"][0, :n]}
    # Targets are ids[t+1]; structural completion chars: { " a " : }  (not 'o', 'k', ' ', '1')
    text = prompt + completion
    expected = [t + 1 >= len(prompt) and text[t + 1] in '{"a:}' for t in range(n - 1)] + [False]
    assert item["format_mask"].tolist() == expected
    assert sum(expected) == 6
    # without a piece table there are no format positions
    plain = KDTraceDataModule(str(tmp_path), vocab_size=128, num_workers=0, val_fraction=0.5)
    plain.setup()
    assert not next(iter(plain.train_dataloader()))["format_mask"].any()
