"""Which completion tokens carry JSON structure (the targets of the format loss).

A character is *structural* when it lies inside a JSON object or array that parses
(`json.JSONDecoder.raw_decode`) and is either punctuation outside string values
(`{ } [ ] : ,`) or part of an object key, quotes included. String and number values are not
structural: the format loss teaches the shape of the answer, KD and CE teach its content.
A token is structural when any of its characters is.
"""

from __future__ import annotations

import json

import numpy as np

_PUNCT = set("{}[]:,")
_decoder = json.JSONDecoder()


def _mark_value(text: str, i: int, end: int, mask: np.ndarray) -> None:
    """Mark structural characters of the JSON value spanning text[i:end] (already known to parse)."""
    in_string = False
    escaped = False
    key_start = None
    # A string is a key when the next non-space character after it is ':'.
    while i < end:
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                j = i + 1
                while j < end and text[j] in " \t\r\n":
                    j += 1
                if j < end and text[j] == ":":
                    mask[key_start:i + 1] = True
        elif c == '"':
            in_string, key_start = True, i
        elif c in _PUNCT:
            mask[i] = True
        i += 1


def json_structure_chars(text: str) -> np.ndarray:
    """Boolean mask over the characters of `text` marking JSON structure (see module docstring)."""
    mask = np.zeros(len(text), dtype=bool)
    i = 0
    while i < len(text):
        if text[i] in "{[":
            try:
                _, end = _decoder.raw_decode(text, i)
            except ValueError:
                i += 1
                continue
            _mark_value(text, i, end, mask)
            i = end
        else:
            i += 1
    return mask


def token_format_mask(pieces: list[str]) -> np.ndarray:
    """Per token (given the decoded text piece of each), whether it carries JSON structure."""
    chars = json_structure_chars("".join(pieces))
    out = np.zeros(len(pieces), dtype=bool)
    pos = 0
    for t, piece in enumerate(pieces):
        out[t] = bool(chars[pos:pos + len(piece)].any())
        pos += len(piece)
    return out
