"""Projection of teacher top-K distributions onto the student tokenizer (see docs/TRACE_FORMAT.md,
"Projection onto the student tokenizer").

The student always trains on its own tokenization of the teacher's text. Output rows follow
the trace schema: position t of every list describes the prediction of `input_ids[t + 1]`.

Two paths:

- **identity** (`project_identity`): teacher and student share the tokenizer, so the teacher's
  own token ids become `input_ids` and its candidate ids are already student ids. Exact.
- **strings** (`project_strings`): any teacher, including API teachers that only return token
  strings. The student re-tokenizes the completion text; positions where a student token starts
  where a teacher token starts get the teacher's candidates mapped to student ids (first student
  token of each candidate string, in mid-text context; collisions merged with log-sum-exp; the
  rest of the mass is Other). See `project_strings` and `TokenizerPieces`.

Sampled traces (`rs_*`, schema v2) follow the same paths: identity keeps the sampled ids, strings
maps each sampled token to its first student token like a candidate and adds up the draws that
land on one student id (their importance weights combined so that each id keeps its share).
"""

from __future__ import annotations

import json
import math
import re
import weakref
from dataclasses import dataclass

from bitnet_kde.kd.traces import other_from_topk
from bitnet_kde.teachers.base import TeacherSequence


@dataclass
class ProjectedRow:
    """Trace columns of one sequence (see `bitnet_kde.kd.traces.TRACE_SCHEMA`)."""

    input_ids: list[int]
    completion_start: int
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    other_logprob: list[float]
    kd_valid: list[bool]
    rs_ids: list[list[int]] | None = None
    rs_counts: list[list[int]] | None = None
    rs_logq: list[list[float]] | None = None

    def columns(self) -> dict:
        """The trace columns this row has (no sampled columns unless it was collected with them)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _empty_sampled(seq: TeacherSequence, n: int) -> dict:
    """Per-position sampled columns, all positions empty (only when `seq` has samples)."""
    if seq.rs_ids is None:
        return {}
    cols = {"rs_ids": [[] for _ in range(n)], "rs_counts": [[] for _ in range(n)]}
    if seq.rs_logq is not None:
        cols["rs_logq"] = [[] for _ in range(n)]
    return cols


def _merge_samples(ids: list[int], counts: list[int], logq: list[float] | None):
    """Sum the draws that landed on one student id (ids < 0 are dropped); the merged log(q/p) keeps
    the id's weight: c * exp(-logq) = sum of c_i * exp(-logq_i)."""
    groups: dict[int, list[float]] = {}
    for j, i in enumerate(ids):
        if i >= 0:
            g = groups.setdefault(i, [0.0, 0.0])
            g[0] += counts[j]
            g[1] += counts[j] * math.exp(-logq[j]) if logq is not None else counts[j]
    out_ids = sorted(groups)
    out_counts = [int(groups[i][0]) for i in out_ids]
    out_logq = None if logq is None else [-math.log(groups[i][1] / groups[i][0]) for i in out_ids]
    return out_ids, out_counts, out_logq


def project_identity(prompt_ids: list[int], seq: TeacherSequence) -> ProjectedRow:
    """Same tokenizer: completion ids are the teacher's, candidates are taken as they are."""
    if seq.token_ids is None or seq.topk_ids is None:
        raise ValueError(f"{seq.prompt[:40]!r}: identity projection needs teacher token ids (a local teacher)")
    cs = len(prompt_ids)
    input_ids = list(prompt_ids) + list(seq.token_ids)
    n = len(input_ids)
    topk_ids: list[list[int]] = [[] for _ in range(n)]
    topk_lp: list[list[float]] = [[] for _ in range(n)]
    other = [0.0] * n
    valid = [False] * n
    rs = _empty_sampled(seq, n)
    for j in range(len(seq.token_ids)):
        t = cs - 1 + j  # position t predicts completion token j
        lps = [min(float(x), 0.0) for x in seq.topk_logprobs[j]]
        topk_ids[t], topk_lp[t] = list(seq.topk_ids[j]), lps
        other[t] = other_from_topk(lps)
        valid[t] = True
        if rs:
            rs["rs_ids"][t], rs["rs_counts"][t] = list(seq.rs_ids[j]), list(seq.rs_counts[j])
            if "rs_logq" in rs:
                rs["rs_logq"][t] = list(seq.rs_logq[j])
    return ProjectedRow(input_ids, cs, topk_ids, topk_lp, other, valid, **rs)


# ----------------------------------------------------------------------------------------------
# strings path
# ----------------------------------------------------------------------------------------------

_FFFD = "\ufffd"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPECIAL_LIKE = re.compile(r"<\|[^|<>\s]{1,40}\|>|<\uff5c[^\uff5c<>]{1,40}\uff5c>")
"""Chat/control markers such as `<|im_end|>`, `<|eot_id|>` or DeepSeek's `<｜end▁of▁sentence｜>`."""


def is_special_like(candidate: str) -> bool:
    """True for a candidate that is a chat/control marker (`<|...|>`), not text."""
    return _SPECIAL_LIKE.fullmatch(candidate) is not None


def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE piece character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _node_types(node) -> set[str]:
    """All `type` values inside a tokenizer.json component (recursing into Sequences)."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for v in node.values():
            found |= _node_types(v)
    elif isinstance(node, list):
        for v in node:
            found |= _node_types(v)
    return found


def _strip_dummy_prefix(node):
    """Copy of a normalizer / pre-tokenizer JSON with every 'prepend a ▁/space' step turned off."""
    if isinstance(node, list):
        return [_strip_dummy_prefix(v) for v in node if not (isinstance(v, dict) and v.get("type") == "Prepend")]
    if isinstance(node, dict):
        if node.get("type") == "Prepend":
            return None
        out = {k: _strip_dummy_prefix(v) for k, v in node.items()}
        if out.get("type") == "Metaspace":
            out["prepend_scheme"] = "never"
            if "add_prefix_space" in out:
                out["add_prefix_space"] = False
        if out.get("type") == "ByteLevel" and "add_prefix_space" in out:
            out["add_prefix_space"] = False
        return out
    return node


class TokenizerPieces:
    """What `project_strings` needs to know about a tokenizer, built once per tokenizer: the
    student's (to encode the text and its candidates) and, when given, the teacher's (to place its
    token boundaries exactly). The items below speak of the student's.

    - `piece_bytes[id]`: the exact UTF-8 bytes token `id` stands for in running text (byte-level
      BPE characters mapped back to bytes, SentencePiece `▁` -> space, byte-fallback `<0xNN>` -> that
      byte, added tokens -> their content). Byte-level / byte-fallback tokens may be part of a
      character; summing piece lengths gives exact byte offsets of every student token.
    - `encode(text)`: the student's tokenization of `text` **as a continuation** (no special
      tokens, no dummy prefix). Tokenizers that prepend a `▁`/space to a text (SentencePiece
      `add_dummy_prefix`, Metaspace `prepend_scheme="first"/"always"`, ByteLevel
      `add_prefix_space`) get a copy of their backend with that step turned off, so that a
      completion decodes back to exactly its text and a candidate in the middle of a text
      tokenizes as it would there. (SmolLM2's and Gemma-3's tokenizers add no dummy prefix.)
    - `first_ids(candidates)`: the first student token of each candidate's continuation encoding,
      or -1 (goes to Other) for an empty string, a partial-UTF-8 string (contains U+FFFD: its
      bytes are unknown) or a teacher's special token (a `<|...|>` marker, or one of
      `teacher_specials`) that is not also one of the student's own special tokens: an end-of-turn
      marker is not text, and spelling it out would put its mass on the student's `<`. A
      candidate equal to a student special token (`<eos>`, `<|im_end|>` for the same family) maps to
      it. Cached per distinct string.

    Why one context for every candidate: BPE merges never cross a boundary that survives in the
    final tokenization, and pre-tokenizer splits (regexes, added tokens) look only forward, so
    whenever `prefix + candidate` tokenizes with a token boundary at the end of the prefix, the
    tokens after it are exactly those of the candidate alone. When that boundary does not hold in
    context (the candidate would merge with the prefix, e.g. "\\n" after "\\n"), the student has
    already emitted the prefix's tokens at a KD-valid position, so the candidate's own first
    token is what the student would emit next; that is what we use. The tests check this against
    the slow in-context encoding on real traces.
    """

    _cache: dict[int, tuple[weakref.ref | None, "TokenizerPieces"]] = {}

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._tok_ref = None
        self._first: dict[str, int] = {"": -1}
        self.special_ids: set[int] = set()
        self.special_strings: frozenset[str] = frozenset()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend
        self.dummy_prefix = False
        """True when the dummy prefix could not be turned off; offsets then skip one leading space."""
        if backend is not None:
            self._init_fast(backend)
        else:
            self._init_slow(tokenizer)
        self.vocab_size = len(self.piece_bytes)
        if self._encode_raw("a") and self._join(self._encode_raw("a")) == b" a":
            self._remove_dummy_prefix()

    @classmethod
    def of(cls, tokenizer) -> "TokenizerPieces":
        """The (cached) pieces of `tokenizer`; a `TokenizerPieces` is returned as is."""
        if isinstance(tokenizer, TokenizerPieces):
            return tokenizer
        key = id(tokenizer)
        hit = cls._cache.get(key)
        if hit is not None and hit[0] is not None and hit[0]() is tokenizer:
            return hit[1]
        pieces = cls(tokenizer)
        try:
            ref = weakref.ref(tokenizer, lambda _r, k=key: cls._cache.pop(k, None))
        except TypeError:  # not weak-referenceable: do not cache (ids could be reused)
            return pieces
        pieces._tok, pieces._tok_ref = None, ref  # the cache must not keep the tokenizer alive
        cls._cache[key] = (ref, pieces)
        return pieces

    @property
    def tokenizer(self):
        return self._tok if self._tok is not None else self._tok_ref()

    # -- construction ----------------------------------------------------------------------------

    def _init_fast(self, backend) -> None:
        spec = json.loads(backend.to_str())
        self._spec = spec
        types = _node_types(spec.get("decoder")) | _node_types(spec.get("pre_tokenizer"))
        vocab = backend.get_vocab(with_added_tokens=True)
        added = {int(a["id"]) for a in spec.get("added_tokens", [])}
        self.special_ids = {int(a["id"]) for a in spec.get("added_tokens", []) if a.get("special")}
        self.special_strings = frozenset(a["content"] for a in spec.get("added_tokens", []) if a.get("special"))
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback")) or "ByteFallback" in types
        self.piece_bytes = self._build(vocab, added, types, byte_fallback)

    def _init_slow(self, tokenizer) -> None:
        self._spec = None
        vocab = tokenizer.get_vocab()
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        added = set(decoder)
        self.special_ids = {int(i) for i, a in decoder.items() if getattr(a, "special", False)}
        self.special_strings = frozenset(str(decoder[i]) for i in self.special_ids)
        pieces = list(vocab)
        types = {"ByteLevel"} if any("Ġ" in p for p in pieces[:5000]) else {"Metaspace"}
        self.piece_bytes = self._build(vocab, added, types, True)

    @staticmethod
    def _build(vocab: dict[str, int], added: set[int], types: set[str], byte_fallback: bool) -> list[bytes]:
        size = max(vocab.values()) + 1 if vocab else 0
        out: list[bytes] = [b""] * size
        if "ByteLevel" in types:
            table = _byte_level_decoder()
            for piece, i in vocab.items():
                if i in added:
                    out[i] = piece.encode("utf-8")
                    continue
                try:
                    out[i] = bytes(table[ch] for ch in piece)
                except KeyError:  # not a byte-level piece (should not happen): take it as text
                    out[i] = piece.encode("utf-8")
            return out
        for piece, i in vocab.items():
            if i in added:
                out[i] = piece.encode("utf-8")
                continue
            m = _BYTE_PIECE.match(piece) if byte_fallback else None
            out[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")
        return out

    def _remove_dummy_prefix(self) -> None:
        if self._backend is not None and self._spec is not None:
            from tokenizers import Tokenizer

            spec = dict(self._spec)
            spec["normalizer"] = _strip_dummy_prefix(spec.get("normalizer"))
            spec["pre_tokenizer"] = _strip_dummy_prefix(spec.get("pre_tokenizer"))
            try:
                backend = Tokenizer.from_str(json.dumps(spec))
                if self._join(backend.encode("a", add_special_tokens=False).ids) == b"a":
                    self._backend = backend
                    return
            except Exception:  # noqa: BLE001 - fall through to the offset shift below
                pass
        self.dummy_prefix = True

    # -- encoding --------------------------------------------------------------------------------

    def _encode_raw(self, text: str) -> list[int]:
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        """Student ids of `text` as a continuation (no special tokens, no dummy prefix)."""
        return self._encode_raw(text) if text else []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        return [self._encode_raw(t) for t in texts]

    def _join(self, ids) -> bytes:
        pb = self.piece_bytes
        return b"".join(pb[i] if 0 <= i < len(pb) else b"" for i in ids)

    def first_ids(self, candidates, teacher_specials: frozenset[str] = frozenset()) -> list[int]:
        """First student token of each candidate string in mid-text context; -1 = goes to Other.

        `teacher_specials`: the teacher's special-token strings (when its tokenizer is known)."""
        cache = self._first
        missing = [c for c in dict.fromkeys(candidates) if c not in cache]
        if missing:
            todo = [c for c in missing
                    if _FFFD not in c and (c in self.special_strings or not is_special_like(c))]
            for c in missing:
                cache[c] = -1
            if todo:
                for c, ids in zip(todo, self.encode_batch(todo)):
                    if self.dummy_prefix and ids and not c.startswith(" ") and self.piece_bytes[ids[0]] == b" ":
                        ids = ids[1:]  # a lone dummy "▁" that could not be switched off
                    cache[c] = ids[0] if ids else -1
        if teacher_specials:
            own = self.special_strings
            return [-1 if c in teacher_specials and c not in own else cache[c] for c in candidates]
        return [cache[c] for c in candidates]

    def token_starts(self, ids: list[int], text: str) -> list[int | None]:
        """Byte offset in `text` where each student token starts (None: inside a character or unknown)."""
        target = text.encode("utf-8")
        pb = self.piece_bytes
        lens = [len(pb[i]) if 0 <= i < len(pb) else -1 for i in ids]
        if -1 not in lens:
            shift = 0
            joined = self._join(ids)
            if joined != target and self.dummy_prefix and joined == b" " + target:
                shift = -1
            if joined == target or shift:
                starts: list[int | None] = []
                pos = shift
                for i, n in zip(ids, lens):
                    starts.append(pos if pos >= 0 and (pos == len(target) or (target[pos] & 0xC0) != 0x80) else None)
                    pos += n
                return starts
        return self._token_starts_by_decoding(ids, text)

    def _token_starts_by_decoding(self, ids: list[int], text: str) -> list[int | None]:
        """Fallback when pieces do not spell the text (normalizers, unknown tokens): decode prefixes."""
        starts: list[int | None] = []
        for k in range(len(ids)):
            prefix = self.tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if self.dummy_prefix and prefix.startswith(" ") and not text.startswith(" "):
                prefix = prefix[1:]
            ok = _FFFD not in prefix and text.startswith(prefix)
            starts.append(len(prefix.encode("utf-8")) if ok else None)
            if not ok and k > 0:
                starts.extend([None] * (len(ids) - k - 1))
                break
        return starts


_MAX_STATES = 64
"""Bound on ambiguous byte alignments tracked per teacher token (partial UTF-8 runs)."""


def _teacher_byte_starts(tokens: list[str], text: str) -> list[int | None]:
    """UTF-8 byte offset in `text` where each teacher token starts (None: unknown or inside a character).

    Tokens normally join to `text` and the offsets are their cumulative byte lengths. Byte-level
    teachers can emit tokens that are part of a character; their strings (decoded on their own)
    hold U+FFFD and no longer spell the text. Then every token is aligned to the text's bytes: a
    token without U+FFFD must match its own bytes, a token with U+FFFD must match some byte span
    that decodes (errors="replace", the rule tokenizers use) to exactly that string. A start is kept
    only where every alignment of the sequence agrees on it and it is a character boundary.
    Alignment stops (later starts None) where no span matches, e.g. special tokens such as an
    end-of-turn marker that the text leaves out.
    """
    n = len(tokens)
    if "".join(tokens) == text:
        starts: list[int | None] = []
        pos = 0
        for tok in tokens:
            starts.append(pos)
            pos += len(tok.encode("utf-8"))
        return starts
    target = text.encode("utf-8")
    size = len(target)
    reach: list[set[int]] = [{0}]
    edges: list[dict[int, set[int]]] = []
    for tok in tokens:
        here, nxt = reach[-1], set()
        step: dict[int, set[int]] = {}
        tb = tok.encode("utf-8")
        if _FFFD not in tok:
            for p in here:
                if target.startswith(tb, p):
                    step[p] = {p + len(tb)}
                    nxt.add(p + len(tb))
        else:
            nf = tok.count(_FFFD)
            lit = len(tb) - 3 * nf
            for p in here:
                for length in range(max(lit + nf, 1), lit + 3 * nf + 1):
                    if p + length > size:
                        break
                    if target[p:p + length].decode("utf-8", "replace") == tok:
                        step.setdefault(p, set()).add(p + length)
                        nxt.add(p + length)
        if not nxt or len(nxt) > _MAX_STATES:
            break
        edges.append(step)
        reach.append(nxt)
    depth = len(edges)  # tokens aligned
    alive = reach[depth] & {size} if depth == n and size in reach[depth] else reach[depth]
    out: list[int | None] = [None] * n
    for j in range(depth - 1, -1, -1):
        alive = {p for p, succ in edges[j].items() if succ & alive}
        if len(alive) == 1:
            p = next(iter(alive))
            if p >= size or (target[p] & 0xC0) != 0x80:
                out[j] = p
    return out


def _teacher_byte_starts_exact(token_ids: list[int], teacher: TokenizerPieces, text: str) -> list[int | None] | None:
    """Teacher token starts from the teacher's own piece bytes (exact, also inside runs of half
    characters); None when the pieces do not spell `text` (then the strings are used)."""
    target = text.encode("utf-8")
    pb = teacher.piece_bytes
    out: list[int | None] = []
    pos = 0
    for tid in token_ids:
        piece = pb[tid] if 0 <= tid < len(pb) else None
        if pos >= len(target) or piece is None or not target.startswith(piece, pos):
            break  # the text is spelled out; what follows (an end-of-turn marker) is not in it
        out.append(pos if (target[pos] & 0xC0) != 0x80 else None)
        pos += len(piece)
    if pos != len(target):
        return None
    return out + [None] * (len(token_ids) - len(out))


def align_completion(seq: TeacherSequence, pieces: TokenizerPieces,
                     teacher_pieces: TokenizerPieces | None = None) -> tuple[list[int], list[int]]:
    """Student ids of `seq.text` and, per student token, the teacher step it starts with (-1: none).

    `steps[i] = j` when student token i starts at the same byte offset of the text as teacher
    token j (a non-empty token); then the teacher's step-j candidates describe student token i.
    Teacher offsets come from the token strings, or exactly from `teacher_pieces` (the teacher's
    tokenizer) when given together with `seq.token_ids`.
    """
    text = seq.text
    ids = pieces.encode(text)
    sstarts = pieces.token_starts(ids, text)
    tstarts = None
    if teacher_pieces is not None and seq.token_ids is not None and len(seq.token_ids) == len(seq.tokens):
        tstarts = _teacher_byte_starts_exact(list(seq.token_ids), teacher_pieces, text)
    if tstarts is None:
        tstarts = _teacher_byte_starts(list(seq.tokens), text)
    byte_at: dict[int, int] = {}
    for j, (tok, start) in enumerate(zip(seq.tokens, tstarts)):
        if tok and start is not None and start not in byte_at:
            byte_at[start] = j
    steps = [byte_at.get(s, -1) if s is not None else -1 for s in sstarts]
    return ids, steps


def _merge(ids: list[int], logprobs: list[float]) -> tuple[list[int], list[float]]:
    """Log-sum-exp candidates landing on the same student id; sorted, best first.

    Ids < 0 (Other) and non-finite logprobs (-inf: no mass; NaN: unusable) are dropped, values
    above 0 are clipped to 0, and if the kept mass exceeds 1 (rounded API values) it is
    renormalized to 1 so that the row stays a distribution.
    """
    groups: dict[int, list[float]] = {}
    for i, lp in zip(ids, logprobs):
        lp = float(lp)
        if i >= 0 and math.isfinite(lp):
            groups.setdefault(i, []).append(min(lp, 0.0))
    merged: list[tuple[float, int]] = []
    for i, lps in groups.items():
        if len(lps) == 1:
            merged.append((lps[0], i))
        else:
            m = max(lps)
            merged.append((min(m + math.log(sum(math.exp(x - m) for x in lps)), 0.0), i))
    if merged:
        m = max(lp for lp, _ in merged)
        total = m + math.log(sum(math.exp(lp - m) for lp, _ in merged))
        if total > 0.0:
            merged = [(min(lp - total, 0.0), i) for lp, i in merged]
    merged.sort(key=lambda x: (-x[0], x[1]))
    return [i for _, i in merged], [lp for lp, _ in merged]


def project_strings(prompt_ids: list[int], seq: TeacherSequence, student_tokenizer,
                    teacher_tokenizer=None) -> ProjectedRow:
    """Project string candidates onto a different student tokenizer.

    The completion text is tokenized by the student; student position t (predicting token
    t + 1) is KD-valid where the character offset at which token t + 1 starts is also the
    start of a teacher token j. There, each candidate string of step j is mapped, in context,
    to the first student token of its encoding; candidates landing on the same student id are
    merged with log-sum-exp, and the remaining mass is Other. Other positions are not KD-valid.

    Details (see `TokenizerPieces`): the completion is encoded as a continuation (no special
    tokens, no dummy prefix: `input_ids[completion_start:]` decodes to exactly `seq.text`);
    offsets are compared in UTF-8 bytes, so a student or teacher token that starts inside a
    character is never a boundary; candidates that are empty or partial UTF-8 (contain U+FFFD)
    go to Other, and so do the teacher's special tokens unless the student has the same one (see
    `TokenizerPieces.first_ids`); a position whose candidates all go to Other is not KD-valid (it
    carries no information). `student_tokenizer` is a Hugging Face tokenizer or a `TokenizerPieces`.

    Teacher token offsets come from the token strings. A byte-level teacher's tokens can be half a
    character (U+FFFD); they are aligned to the text's bytes, and a boundary inside a run of them
    that the strings cannot pin down is not KD-valid. A local teacher can pass its own tokenizer
    as `teacher_tokenizer` (with `seq.token_ids` set): offsets are then exact everywhere, and its
    special tokens (not only `<|...|>` markers) are recognised as such.
    """
    pieces = TokenizerPieces.of(student_tokenizer)
    teacher_pieces = TokenizerPieces.of(teacher_tokenizer) if teacher_tokenizer is not None else None
    cs = len(prompt_ids)
    comp_ids, steps = align_completion(seq, pieces, teacher_pieces)
    input_ids = [int(i) for i in prompt_ids] + comp_ids
    n = len(input_ids)
    topk_ids: list[list[int]] = [[] for _ in range(n)]
    topk_lp: list[list[float]] = [[] for _ in range(n)]
    other = [0.0] * n
    valid = [False] * n
    rs = _empty_sampled(seq, n)
    specials = teacher_pieces.special_strings if teacher_pieces is not None else frozenset()
    used = [j for j in steps if j >= 0 and j < len(seq.topk_tokens)]
    if used:
        pieces.first_ids([c for j in used for c in seq.topk_tokens[j]])  # fill the cache in one batch
        if rs:
            pieces.first_ids([c for j in used for c in seq.rs_tokens[j]])
    for i, j in enumerate(steps):
        t = cs + i - 1  # position t predicts completion token i
        if j < 0 or t < 0 or j >= len(seq.topk_tokens):
            continue
        cands, lps = seq.topk_tokens[j], seq.topk_logprobs[j]
        ids, mlps = _merge(pieces.first_ids(cands, specials), lps)
        if not ids:
            continue
        topk_ids[t], topk_lp[t] = ids, mlps
        other[t] = other_from_topk(mlps)
        valid[t] = True
        if rs:
            s_ids, s_counts, s_logq = _merge_samples(pieces.first_ids(seq.rs_tokens[j], specials), seq.rs_counts[j],
                                                     None if seq.rs_logq is None else seq.rs_logq[j])
            rs["rs_ids"][t], rs["rs_counts"][t] = s_ids, s_counts
            if s_logq is not None:
                rs["rs_logq"][t] = s_logq
    return ProjectedRow(input_ids, cs, topk_ids, topk_lp, other, valid, **rs)
