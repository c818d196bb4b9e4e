"""The teacher interface: every provider returns the same per-sequence record.

A teacher turns prompts into completions plus, per completion token, its top-K next-token
candidates with log-probabilities (natural log, temperature 1 unless recorded otherwise).
`Teacher` declares everything collection and evaluation use; what only in-process teachers
have (their tokenizer, end-of-turn ids, torch model, chat formatting) has a neutral default
here, so callers never probe a teacher for attributes. API teachers whose
service returns no log-probabilities (`supports_logprobs = False`) serve the baseline stage
only; collecting traces from them fails fast with `LogprobsUnsupported`.

A prompt that fails (after the provider's retries) is returned as a `TeacherFailure` in its
slot, never dropped, so collection can count it by reason.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class TeacherSequence:
    """One teacher completion and its per-token candidate distributions.

    Position j describes completion token j: `tokens[j]` is its exact text (the texts join to
    `text`, except that a local teacher's final end-of-turn token is in `tokens` / `token_ids`
    but not in `text`; byte-level tokens that are half a character decode to U+FFFD), and
    `topk_tokens[j]` / `topk_logprobs[j]` are the teacher's candidates for that position given
    the prompt and tokens < j. `token_ids` / `topk_ids` are teacher-vocabulary
    ids where the teacher exposes them (local models), else None.
    """

    prompt: str
    text: str
    tokens: list[str]
    topk_tokens: list[list[str]]
    topk_logprobs: list[list[float]]
    token_ids: list[int] | None = None
    topk_ids: list[list[int]] | None = None
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    latency_s: float = 0.0
    usage_completion_tokens: int | None = None
    """Completion tokens as the provider bills them (for providers that return no per-token data)."""
    rs_ids: list[list[int]] | None = None
    """Per position, the distinct teacher ids drawn by sampled-trace collection (`SampledTraceConfig`)."""
    rs_tokens: list[list[str]] | None = None
    """Their texts (for projection onto another tokenizer)."""
    rs_counts: list[list[int]] | None = None
    """How many of the N draws gave each id."""
    rs_logq: list[list[float]] | None = None
    """log(q / p) of each id (proposal over teacher); None when q = p."""

    @property
    def completion_tokens(self) -> int:
        if not self.tokens and self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return len(self.tokens)


@dataclass
class TeacherFailure:
    """A prompt the teacher could not answer; `reason` is a short machine-readable key."""

    prompt: str
    reason: str
    message: str


@dataclass
class SamplingConfig:
    """Decoding settings; they are part of a trace set's content address."""

    max_new_tokens: int = 128
    """Longest completion, in teacher tokens."""
    temperature: float = 0.0
    """0 = greedy (deterministic); > 0 samples at that temperature (logprobs stay at T=1)."""
    top_k: int = 20
    """Candidates recorded per position (API teachers: at most 20)."""
    seed: int = 0
    """Sampling seed (ignored when greedy)."""

    def as_dict(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "seed": self.seed}


@dataclass
class SampledTraceConfig:
    """Sampled-token traces (RS-KD): per position, N draws from the teacher's distribution at
    temperature 1, stored as distinct ids with counts. Part of a trace set's content address when on."""

    n: int = 0
    """Draws per position; 0 = off (Top-K + Other only)."""
    beta: float = 1.0
    """Proposal q ∝ p^beta; beta != 1 stores log(q / p) per id (`rs_logq`) as importance weights."""
    seed: int = 0
    """Seed of the draws (independent of the decoding seed); each chunk of prompts, and each prompt
    in it, draws from its own seed derived from this one (`seed_of`)."""
    hybrid: bool = False
    """Draw from the tail only (the teacher outside its Top-K, renormalized): exact head + sampled tail."""

    def as_dict(self) -> dict:
        return {"n": self.n, "beta": self.beta, "seed": self.seed, "hybrid": self.hybrid}

    def seed_of(self, index: int) -> int:
        """Seed (63 bits) of the draws of part `index` (a chunk of prompts, or a prompt of a chunk),
        derived from `seed`: parts draw independently of each other, and the same settings still
        give the same draws on every machine."""
        return int.from_bytes(hashlib.sha256(f"{self.seed}/{index}".encode()).digest()[:8], "big") >> 1


class TeacherError(RuntimeError):
    """A teacher-wide problem (bad key, unknown model, ...) that stops the run with a clear message."""


class LogprobsUnsupported(TeacherError):
    """The provider returns no log-probabilities, so it cannot produce KD traces."""


class Teacher(ABC):
    """Common interface of local and API teachers."""

    provider: str = "unknown"
    model: str = "unknown"
    supports_logprobs: bool = True
    logprob_mode: str = "exact"
    """How logprobs are obtained: `exact` (full logits), `api_top_logprobs`, ... (recorded in traces)."""
    max_top_k: int = 20
    """Largest `SamplingConfig.top_k` this teacher supports (API providers return at most 20 candidates)."""
    tokenizer = None
    """The teacher's own `transformers` tokenizer when it runs in-process, else None."""
    eos_ids: frozenset[int] = frozenset()
    """Teacher-vocabulary ids that end its turn (in-process teachers)."""
    lm = None
    """The in-process torch model (evaluation weighs its bytes), else None."""
    full_distribution: bool = False
    """The teacher sees every next-token probability (in-process models): it can record sampled
    traces and serve the full-vocabulary evaluation. API teachers return a few candidates only."""

    @property
    def name(self) -> str:
        return f"{self.provider}/{self.model}"

    @abstractmethod
    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[TeacherSequence | TeacherFailure]:
        """Chat-format each prompt, generate a completion, record per-token top-K (same order as prompts)."""

    def chat_ids(self, prompt: str) -> list[int]:
        """Teacher-vocabulary ids of the chat-formatted prompt (in-process teachers only)."""
        raise TeacherError(f"{self.name}: the prompt's token ids are known to in-process teachers only")

    def token_ids_match(self, tokenizer) -> bool:
        """True when `tokenizer` is this teacher's own, so traces can keep its token ids as they are."""
        return False

    def check_kd(self) -> None:
        """Raise `LogprobsUnsupported` if this teacher cannot produce KD traces."""
        if not self.supports_logprobs:
            raise LogprobsUnsupported(
                f"{self.name}: this provider's API returns no token log-probabilities, so it cannot "
                "produce KD traces. Use it for the teacher baseline only; collect with a local teacher "
                "(teacher=local_smollm2, local_hf) or an OpenAI-compatible server that returns logprobs."
            )

    def close(self) -> None:
        """Release clients / memory (optional)."""
