"""Projection of teacher top-K distributions onto the student tokenizer (SPEC §4).

The student always trains on its own tokenization of the teacher's text. Output rows follow
the trace schema: position t of every list describes the prediction of `input_ids[t + 1]`.

Two paths:

- **identity** (`project_identity`): teacher and student share the tokenizer, so the teacher's
  own token ids become `input_ids` and its candidate ids are already student ids. Exact.
- **strings** (`project_strings`): any teacher, including API teachers that only return token
  strings. See that function's docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bitnet_kde.teachers.base import TeacherSequence

OTHER_FLOOR = -30.0
"""Other logprob stored when the candidates hold (numerically) all the mass, instead of -inf."""


@dataclass
class ProjectedRow:
    """Trace columns of one sequence (see `bitnet_kde.kd.traces.TRACE_SCHEMA`)."""

    input_ids: list[int]
    completion_start: int
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    other_logprob: list[float]
    kd_valid: list[bool]


def other_from_topk(logprobs: list[float]) -> float:
    """log(1 - sum exp(logprobs)), floored at OTHER_FLOOR, computed stably."""
    if not logprobs:
        return 0.0
    m = max(logprobs)
    covered = m + math.log(sum(math.exp(lp - m) for lp in logprobs))
    if covered >= 0.0:
        return OTHER_FLOOR
    tail = math.log(-math.expm1(covered)) if covered > -math.log(2) else math.log1p(-math.exp(covered))
    return max(tail, OTHER_FLOOR)


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
    for j in range(len(seq.token_ids)):
        t = cs - 1 + j  # position t predicts completion token j
        lps = [min(float(x), 0.0) for x in seq.topk_logprobs[j]]
        topk_ids[t], topk_lp[t] = list(seq.topk_ids[j]), lps
        other[t] = other_from_topk(lps)
        valid[t] = True
    return ProjectedRow(input_ids, cs, topk_ids, topk_lp, other, valid)


def project_strings(prompt_ids: list[int], seq: TeacherSequence, student_tokenizer) -> ProjectedRow:
    """Project string candidates onto a different student tokenizer (SPEC §4).

    The completion text is tokenized by the student; student position t (predicting token
    t + 1) is KD-valid where the character offset at which token t + 1 starts is also the
    start of a teacher token j. There, each candidate string of step j is mapped, in context,
    to the first student token of its encoding; candidates landing on the same student id are
    merged with log-sum-exp, and the remaining mass is Other. Other positions are not KD-valid.
    """
    raise NotImplementedError("cross-tokenizer projection is not implemented yet")
