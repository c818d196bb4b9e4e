"""Teacher-relative quality metrics and the quality-efficiency index (QEI).

Token metrics are computed on the teacher's own greedy text (KD traces of held-out prompts):
every loss-bearing position contributes to cross-entropy, every KD-valid one to KL and top-1
agreement. They are accumulated as sums and counts per category, so the overall value is the
token-weighted mean and a category's value does not depend on what else was evaluated.
Answer metrics compare whole greedy generations: JSON validity and exact match.

With a local teacher (it has every logit and the student's tokenizer), `full_vocab_kl` is the exact
KL(teacher || student) over the whole vocabulary, teacher-forced on the same text: unlike the
bucket KL it sees how the student spreads the mass the Top-K leave out. `CalibrationBins` gives
the expected calibration error of the student's top-1 against the teacher's actual next token.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from bitnet_kde.losses import kd_per_position

__all__ = ["TokenTotals", "token_sums", "full_vocab_kl", "CalibrationBins", "group_totals", "parse_json_answer", "json_valid", "normalize_answer",
           "QUALITY_METRICS", "QEIResult", "qei"]


@dataclass
class TokenTotals:
    """Sums over positions of one category; `as_metrics()` turns them into means."""

    kl: float = 0.0
    agree: float = 0.0
    nll: float = 0.0
    kd_positions: int = 0
    tokens: int = 0

    def add(self, other: "TokenTotals") -> None:
        self.kl += other.kl
        self.agree += other.agree
        self.nll += other.nll
        self.kd_positions += other.kd_positions
        self.tokens += other.tokens

    def as_metrics(self) -> dict[str, float | int | None]:
        kd = self.kd_positions
        return {
            "kl": self.kl / kd if kd else None,
            "top1_agreement": self.agree / kd if kd else None,
            "perplexity": math.exp(self.nll / self.tokens) if self.tokens else None,
            "kd_positions": kd,
            "tokens": self.tokens,
        }


@torch.no_grad()
def token_sums(logits: torch.Tensor, batch: dict) -> list[TokenTotals]:
    """Per-row sums of KL(teacher || student) over Top-K+Other, top-1 agreement and NLL.

    `logits` [B, T, V] and a collated trace `batch` (see `bitnet_kde.data.collate_traces`):
    position t predicts token t + 1; `loss_mask` marks completion targets and `kd_valid` the
    positions whose teacher distribution is trusted. Agreement: the student's argmax equals the
    teacher's most probable candidate. NLL: the student's -log p of the teacher's actual token.
    """
    z = logits.float()
    loss_mask, kd_mask = batch["loss_mask"], batch["loss_mask"] & batch["kd_valid"]
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    kl = kd_per_position(z, batch["topk_ids"], batch["topk_logprobs"], batch["other_logprob"], kd_mask, lse=lse)
    # The teacher's top-1 is its most probable finite slot (slots are not assumed sorted).
    lp = batch["topk_logprobs"]
    best = torch.where(torch.isfinite(lp), lp, -math.inf).argmax(-1, keepdim=True)
    top1 = batch["topk_ids"].long().gather(-1, best).squeeze(-1).clamp(0, z.shape[-1] - 1)
    agree = (z.argmax(-1) == top1).float()
    targets = torch.cat([batch["input_ids"][:, 1:], batch["input_ids"][:, :1]], dim=1)
    nll = (lse.squeeze(-1) - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    zero = torch.zeros_like(kl)
    agree, nll = torch.where(kd_mask, agree, zero), torch.where(loss_mask, nll, zero)
    return [TokenTotals(kl=float(kl[i].sum()), agree=float(agree[i].sum()), nll=float(nll[i].sum()),
                        kd_positions=int(kd_mask[i].sum()), tokens=int(loss_mask[i].sum()))
            for i in range(z.shape[0])]


@torch.no_grad()
def full_vocab_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact KL(teacher || student) over the whole vocabulary at each position ([B, T]; 0 off `mask`).

    Both logits [B, T, V] over one vocabulary, at temperature 1; ids the teacher gives no mass
    contribute 0 (never -inf * 0).
    """
    lt = torch.log_softmax(teacher_logits.double(), dim=-1)
    ls = torch.log_softmax(student_logits.double(), dim=-1)
    pt = lt.exp()
    kl = torch.where(pt > 0, pt * (lt - ls), torch.zeros_like(pt)).sum(-1)
    return torch.where(mask, kl, torch.zeros_like(kl))


@dataclass
class CalibrationBins:
    """Reliability of the student's top-1: per confidence bin, the summed confidence, the number of
    correct top-1 guesses (the teacher's actual next token) and the count."""

    n_bins: int = 10
    conf: list[float] = field(default_factory=list)
    correct: list[float] = field(default_factory=list)
    count: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name, zero in (("conf", 0.0), ("correct", 0.0), ("count", 0)):
            if not getattr(self, name):
                setattr(self, name, [zero] * self.n_bins)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
        """Positions where `mask` holds: confidence max softmax(logits), correct when argmax == target."""
        p = torch.softmax(logits.double(), dim=-1)
        conf, top = p.max(-1)
        conf, hit = conf[mask], (top == targets)[mask].double()
        b = (conf * self.n_bins).long().clamp(0, self.n_bins - 1)   # bins [0, 1/n), ..., [(n-1)/n, 1]
        for i in range(self.n_bins):
            sel = b == i
            self.conf[i] += float(conf[sel].sum())
            self.correct[i] += float(hit[sel].sum())
            self.count[i] += int(sel.sum())

    def ece(self) -> float | None:
        """sum over bins of (n_b / n) * |accuracy_b - mean confidence_b|; None without positions."""
        n = sum(self.count)
        if not n:
            return None
        return sum(abs(c - k) for c, k in zip(self.conf, self.correct)) / n

    def curve(self) -> list[dict]:
        """Per non-empty bin: mean confidence, accuracy and count (a reliability diagram)."""
        return [{"confidence": c / k, "accuracy": h / k, "n": k}
                for c, h, k in zip(self.conf, self.correct, self.count) if k]


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def parse_json_answer(text: str):
    """The JSON value of an answer, or raises `ValueError` (`json.JSONDecodeError`).

    The answer is stripped; one surrounding Markdown code fence (```json ... ```) is removed,
    since chat models routinely wrap JSON in one. Anything else around the JSON is invalid.
    """
    s = text.strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1).strip()
    return json.loads(s)


def json_valid(text: str) -> bool:
    try:
        parse_json_answer(text)
    except ValueError:
        return False
    return True


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace-collapsed answer without trailing punctuation (for exact match)."""
    s = " ".join(text.split()).casefold()
    return s.rstrip(" .!;:")


@dataclass(frozen=True)
class QualityMetric:
    """A higher-is-better quality measure usable as Q in the QEI, and how the teacher scores."""

    name: str
    description: str
    teacher: str
    """`self`: 1 by definition (the metric compares against the teacher); `measured`: the teacher's own rate."""


QUALITY_METRICS = {
    m.name: m for m in (
        QualityMetric("top1_agreement", "share of held-out positions where the student's argmax is the "
                      "teacher's most probable token", "self"),
        QualityMetric("exact_match", "share of short-answer prompts whose greedy student answer equals "
                      "the teacher's (normalized)", "self"),
        QualityMetric("json_validity", "share of json prompts whose greedy answer parses with json.loads",
                      "measured"),
    )
}


@dataclass
class QEIResult:
    quality_metric: str
    q_student: float | None
    q_teacher: float | None
    m_student: int | None
    m_teacher: int | None
    tps_student: float | None
    tps_teacher: float | None
    qei: float | None = None
    qei_speed: float | None = None
    notes: list[str] = field(default_factory=list)


def qei(quality_metric: str, q_student, q_teacher, m_student, m_teacher, tps_student, tps_teacher) -> QEIResult:
    """`QEI = (Qs / Qt) / (Ms / Mt)` and `QEI_speed = QEI * TPSs / TPSt` (docs/EVALUATION.md).

    A term that is missing or zero in a denominator leaves the index as None and says why in
    `notes` instead of producing inf or NaN.
    """
    if quality_metric not in QUALITY_METRICS:
        raise ValueError(f"unknown quality metric {quality_metric!r}; choose one of {sorted(QUALITY_METRICS)}")
    r = QEIResult(quality_metric, q_student, q_teacher, m_student, m_teacher, tps_student, tps_teacher)
    for name, value in (("student quality", q_student), ("teacher quality", q_teacher),
                        ("student weight bytes", m_student), ("teacher weight bytes", m_teacher)):
        if value is None:
            r.notes.append(f"{name} is unknown")
    if not r.notes:
        if q_teacher == 0:
            r.notes.append(f"teacher {quality_metric} is 0: the quality ratio is undefined")
        elif m_student == 0:
            r.notes.append("student weight bytes are 0")
        else:
            r.qei = (q_student / q_teacher) / (m_student / m_teacher)
    if r.qei is not None:
        if tps_student is None or not tps_teacher:
            r.notes.append("tokens/s of student or teacher is unknown: no QEI_speed")
        else:
            r.qei_speed = r.qei * tps_student / tps_teacher
    return r


def group_totals(rows: list[tuple[str, TokenTotals]]) -> dict[str, TokenTotals]:
    """Sum per-row totals by category; key `overall` holds the sum over all rows."""
    out: dict[str, TokenTotals] = defaultdict(TokenTotals)
    for category, totals in rows:
        out[category].add(totals)
        out["overall"].add(totals)
    return dict(out)
