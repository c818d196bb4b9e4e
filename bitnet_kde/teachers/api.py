"""The provider-neutral machinery shared by every API teacher (`openai_api`, `anthropic_api`,
`gemini_api` each subclass `APITeacherBase` for one provider):

* bounded concurrency: one `asyncio.Semaphore(max_concurrency)` per `generate` call, results in
  prompt order;
* retries: the provider SDK's own retry loop (each provider module says what its SDK does), or
  `parse_retry_after` + `backoff_delay` where a provider runs its own;
* fail fast: 401/403/400 (and other non-retryable 4xx: unknown model, payment required, ...)
  raise `TeacherError` at once, naming provider, model, HTTP status and cause; a 400 about
  logprobs raises `LogprobsUnsupported`;
* every other per-prompt problem becomes a `TeacherFailure(prompt, reason, message)` in that
  prompt's slot, never a dropped prompt. Reasons: `rate_limited`, `server_error`, `timeout`,
  `connection_error`, `missing_logprobs` (no or empty log-probabilities beside a text),
  `logprobs_mismatch` (their tokens spell another text), `malformed_response`, `prompt_too_long`,
  `spend_cap`, `error` (anything unexpected);
* spend caps: `max_prompts` (requests sent by this teacher object, across calls) and
  `max_total_tokens` (running prompt + completion tokens from the responses' usage). Checked
  when a request is about to be sent, so in-flight requests may overshoot the token cap by at
  most `max_concurrency` responses;
* key hygiene: the key is read from `os.environ[api_key_env]` when a client is created (one
  client per `generate` call, closed at its end) and lives only in that call's local scope: it
  is never an attribute, so `repr`, `vars` and `pickle` of the teacher cannot contain it, and it
  is redacted from every message this module produces. Constructing a teacher checks that the
  variable is set, so a missing key stops a run before any model or data loads. `is_local`
  decides which servers may run without a key (also for `make check_env`);
* credentials inside `base_url` (`http://user:secret@host/v1`) are used for the connection but
  never shown: messages and `repr` carry `display_url`, and the HTTP client's log lines (httpx,
  the SDKs' request logs) pass a filter that redacts every URL's userinfo.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import logging
import math
import os
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any
from urllib.parse import urlparse

from bitnet_kde.storage import redact_urls
from bitnet_kde.teachers.base import (
    LogprobsUnsupported,
    SamplingConfig,
    Teacher,
    TeacherError,
    TeacherFailure,
    TeacherSequence,
)

NO_KEY_PLACEHOLDER = "EMPTY"
"""Sent to local servers that need no key (the OpenAI SDK refuses to build a client without one)."""

LOCAL_PROVIDERS = frozenset({"vllm", "llamacpp", "llama_cpp", "ollama", "local", "lmstudio"})

MAX_MESSAGE_CHARS = 600

__all__ = ["APITeacherBase", "backoff_delay", "is_local", "is_local_url", "parse_retry_after", "resolve_key",
           "run_sync", "shared_ssl_context", "to_plain"]


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion from sync code, also when an event loop is already running
    in this thread (Jupyter, an async caller): then it runs on a fresh loop in a worker thread."""
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if not in_loop:  # (outside the `except`, so errors raised by the run get no spurious context)
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def is_local_url(url: str | None) -> bool:
    """True for loopback / private / link-local hosts (a local server that may need no key)."""
    if not url:
        return False
    host = (urlparse(url).hostname or "").strip("[]").lower()
    if host in ("localhost", "0.0.0.0", "host.docker.internal") or host.endswith(".local"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified


def is_local(provider: str | None, base_url: str | None) -> bool:
    """True for a local server that may run without an API key: a local provider name
    (`LOCAL_PROVIDERS`: vllm, llamacpp, ollama, ...) or a loopback / private `base_url`."""
    return str(provider or "").lower() in LOCAL_PROVIDERS or is_local_url(base_url)


def resolve_key(name: str, provider: str | None, base_url: str | None, api_key_env: str) -> str:
    """The key in `$api_key_env` (read now, from the environment), the no-key placeholder for a
    local server, or a `TeacherError` naming the variable to set."""
    key = os.environ.get(api_key_env, "").strip()
    if key:
        return key
    if is_local(provider, base_url):
        return NO_KEY_PLACEHOLDER
    raise TeacherError(f"{name}: no API key: the environment variable {api_key_env} is not set "
                       f"(export it or put it in .env; keys are never read from config files)")


def to_plain(obj: Any) -> Any:
    """OmegaConf containers (Hydra passes DictConfig for dict kwargs) -> plain dict/list."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        DictConfig = ListConfig = ()  # type: ignore[assignment]
    if DictConfig and isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _redactor(key: str | None) -> Callable[[str], str]:
    secret = key if key and key != NO_KEY_PLACEHOLDER and len(key) >= 4 else None

    def redact(text: str) -> str:
        text = str(text)
        if secret:
            text = text.replace(secret, "***")
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[:MAX_MESSAGE_CHARS] + "..."
        return text

    return redact


def mentions_logprobs(*texts: object) -> bool:
    blob = " ".join(str(t) for t in texts if t is not None).lower()
    return "logprob" in blob or "log_prob" in blob or "log prob" in blob


def mentions_context_length(*texts: object) -> bool:
    blob = " ".join(str(t) for t in texts if t is not None).lower()
    return any(s in blob for s in ("context_length_exceeded", "maximum context length", "context length",
                                   "prompt is too long", "too many tokens", "string_above_max_length"))


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` / `retry-after` (number or HTTP date); None if absent/bad."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    import email.utils
    try:
        parsed = email.utils.parsedate_tz(value)
        return None if parsed is None else float(email.utils.mktime_tz(parsed) - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def backoff_delay(attempt: int, retry_after: float | None, initial: float = 0.5, cap: float = 8.0,
                  max_retry_after: float = 120.0) -> float:
    """Delay before retry number `attempt` (0-based): the server's Retry-After when it is given
    and sane (0 < s <= max_retry_after), else exponential backoff `initial * 2**attempt` capped at
    `cap`, reduced by a random 0-25 % jitter (the same policy as the openai/anthropic SDKs)."""
    if retry_after is not None and math.isfinite(retry_after) and 0 < retry_after <= max_retry_after:
        return retry_after
    return min(initial * 2.0 ** min(attempt, 30), cap) * (1.0 - 0.25 * random.random())


@functools.lru_cache(maxsize=1)
def shared_ssl_context() -> Any:
    """The TLS context httpx would build by default (CA bundle, SSL_CERT_* env), built once."""
    import httpx2

    return httpx2.create_ssl_context()


class _RedactURLs(logging.Filter):
    """Rewrites a log record with the userinfo of every URL in it redacted (httpx and the httpx2
    the SDKs use log each request URL at INFO, credentials included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_urls(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


HTTP_LOGGERS = ("httpx", "httpx2", "openai._base_client", "anthropic._base_client")
"""The loggers that write request URLs (a filter applies to its own logger's records only)."""
for _name in HTTP_LOGGERS:
    logging.getLogger(_name).addFilter(_RedactURLs())


class APITeacherBase(Teacher):
    """Concurrency, spend caps, failure accounting and key hygiene for API teachers.

    Subclasses implement `_make_client(key)`, `_close_client(client)`, `_request(client, prompt,
    sampling)` -> `(TeacherSequence | TeacherFailure, prompt_tokens, completion_tokens)` and
    `_classify_error(exc, prompt)` -> `TeacherFailure | TeacherError`.
    """

    logprob_mode = "api_top_logprobs"
    max_top_k = 20
    """OpenAI and Gemini return at most 20 alternatives per position."""

    def __init__(self, *, model: str, provider: str, base_url: str | None, api_key_env: str,
                 max_concurrency: int, max_retries: int, timeout_s: float, max_prompts: int | None,
                 max_total_tokens: int | None, system_prompt: str | None, extra_body: dict | None) -> None:
        if not model:
            raise TeacherError(f"{provider}: no model name given (set `model` or TEACHER_MODEL)")
        if int(max_concurrency) < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if int(max_retries) < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if float(timeout_s) <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        for cap_name, cap in (("max_prompts", max_prompts), ("max_total_tokens", max_total_tokens)):
            if cap is not None and int(cap) < 0:
                raise ValueError(f"{cap_name} must be >= 0 or null, got {cap}")
        if not api_key_env or not str(api_key_env).replace("_", "").isalnum():
            # guards against a key pasted where the variable NAME belongs
            raise TeacherError(f"{provider}: api_key_env must be the NAME of an environment variable "
                               "(e.g. OPENAI_API_KEY), not a key")
        self.model = str(model)
        self.provider = str(provider)
        self.base_url = str(base_url) if base_url else None
        self.api_key_env = str(api_key_env)
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.timeout_s = float(timeout_s)
        self.max_prompts = None if max_prompts is None else int(max_prompts)
        self.max_total_tokens = None if max_total_tokens is None else int(max_total_tokens)
        self.system_prompt = system_prompt or None
        self.extra_body = to_plain(extra_body) if extra_body else None
        self._resolve_key()  # a missing key stops the run here, before any model or data loads
        # running spend of this teacher object (across generate calls)
        self.prompts_sent = 0
        self.prompt_tokens_used = 0
        self.completion_tokens_used = 0

    # -- introspection -------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"{type(self).__name__}(provider={self.provider!r}, model={self.model!r}, "
                f"base_url={self.display_url!r}, logprobs={self.supports_logprobs}, "
                f"max_concurrency={self.max_concurrency}, api_key_env={self.api_key_env!r})")

    @property
    def total_tokens_used(self) -> int:
        return self.prompt_tokens_used + self.completion_tokens_used

    @property
    def display_url(self) -> str | None:
        """`base_url` with any credentials in it redacted: what may be recorded or shown."""
        return redact_urls(self.base_url) if self.base_url else None

    @property
    def _where(self) -> str:
        return self.display_url or "the provider's default endpoint"

    # -- key ----------------------------------------------------------------------------------
    def _is_local(self) -> bool:
        return is_local(self.provider, self.base_url)

    def _resolve_key(self) -> str:
        """Read the key from the environment now (never stored on the object)."""
        return resolve_key(self.name, self.provider, self.base_url, self.api_key_env)

    # -- subclass hooks -------------------------------------------------------------------------
    def _make_client(self, key: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    async def _close_client(self, client: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def _request(self, client: Any, prompt: str, sampling: SamplingConfig
                       ) -> tuple[TeacherSequence | TeacherFailure, int, int]:  # pragma: no cover
        raise NotImplementedError

    def _classify_error(self, exc: BaseException, prompt: str) -> TeacherFailure | TeacherError:  # pragma: no cover
        raise NotImplementedError

    # -- shared classification ----------------------------------------------------------------
    def _transport_failure(self, exc: BaseException, prompt: str, timeout_type: type,
                           connection_type: type) -> TeacherFailure | None:
        """The failure for an SDK timeout / connection error (checked in that order: in both SDKs the
        timeout class subclasses the connection class), or None for any other exception."""
        if isinstance(exc, timeout_type):
            return TeacherFailure(prompt, "timeout", f"{self.name} at {self._where}: no response within "
                                                     f"{self.timeout_s:g}s after {self.max_retries} retries")
        if isinstance(exc, connection_type):
            cause = exc.__cause__ or exc.__context__
            return TeacherFailure(prompt, "connection_error",
                                  f"{self.name} at {self._where}: connection failed after {self.max_retries} "
                                  f"retries ({type(cause).__name__ if cause else 'unknown'}: {cause or exc})")
        return None

    def _classify_status(self, status: int, prompt: str, detail: str, *, code: str | None = None,
                         param: str | None = None, kind: str = "") -> TeacherFailure | TeacherError:
        """Map an HTTP status (after the SDK's retries) to a per-prompt failure or a fatal error."""
        label = f"HTTP {status}" + (f" {kind}" if kind else "")
        head = f"{self.name} at {self._where}: {label}"
        if status in (401, 403):
            what = "authentication failed" if status == 401 else "permission denied"
            return TeacherError(f"{head} ({what}): {detail}. Check the key in ${self.api_key_env} and that it "
                                f"may use model {self.model!r}.")
        if status == 429:
            if code == "insufficient_quota" or "insufficient_quota" in detail or "quota" in (code or ""):
                return TeacherError(f"{head} (quota exhausted, retrying will not help): {detail}")
            return TeacherFailure(prompt, "rate_limited", f"{head} after {self.max_retries} retries: {detail}")
        if status == 408:
            return TeacherFailure(prompt, "timeout", f"{head} after {self.max_retries} retries: {detail}")
        if status >= 500 or status == 409:
            return TeacherFailure(prompt, "server_error", f"{head} after {self.max_retries} retries: {detail}")
        if status == 413 or (status == 400 and mentions_context_length(code, detail)):
            return TeacherFailure(prompt, "prompt_too_long", f"{head}: {detail}")
        if status == 400 and self.supports_logprobs and (
                mentions_logprobs(param, code, detail)):
            return LogprobsUnsupported(
                f"{head} (bad request) rejected the logprobs request: {detail}. This model/provider refuses "
                f"token log-probabilities (reasoning models such as o1/o3/o4-mini/gpt-5 do, and so do some "
                f"providers, e.g. Groq), so it cannot produce KD traces. Use a model that returns logprobs, "
                f"a local teacher (teacher=local_smollm2, local_hf), or set logprobs=false to use it for "
                f"the teacher baseline only.")
        what = {400: "bad request", 402: "payment required", 404: "not found (unknown model or wrong base_url?)",
                422: "unprocessable request"}.get(status, "client error")
        return TeacherError(f"{head} ({what}): {detail}")

    # -- running --------------------------------------------------------------------------------
    def generate(self, prompts: list[str], sampling: SamplingConfig | None = None
                 ) -> list[TeacherSequence | TeacherFailure]:
        return run_sync(self.agenerate(prompts, sampling))

    def _token_cap_reached(self) -> bool:
        return self.max_total_tokens is not None and self.total_tokens_used >= self.max_total_tokens

    async def agenerate(self, prompts: list[str], sampling: SamplingConfig | None = None
                        ) -> list[TeacherSequence | TeacherFailure]:
        """Async `generate`: at most `max_concurrency` requests in flight, results in prompt order."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        prompts = [str(p) for p in prompts]
        sampling = sampling or SamplingConfig()
        results: list[TeacherSequence | TeacherFailure | None] = [None] * len(prompts)
        if not prompts:
            return []

        allowed = len(prompts)
        if self.max_prompts is not None:
            allowed = max(0, min(allowed, self.max_prompts - self.prompts_sent))
        for i in range(allowed, len(prompts)):
            results[i] = TeacherFailure(prompts[i], "spend_cap",
                                        f"{self.name}: max_prompts={self.max_prompts} reached; prompt not sent")
        if allowed == 0:
            return results  # type: ignore[return-value]

        key = self._resolve_key()
        redact = _redactor(key)
        client = self._make_client(key)
        del key
        sem = asyncio.Semaphore(self.max_concurrency)
        stopped = False  # set by a fatal error: no further request may start

        async def one(i: int) -> None:
            nonlocal stopped
            prompt = prompts[i]
            async with sem:
                if stopped:
                    return
                if self._token_cap_reached():
                    results[i] = TeacherFailure(
                        prompt, "spend_cap", f"{self.name}: max_total_tokens={self.max_total_tokens} reached "
                        f"({self.total_tokens_used} used); prompt not sent")
                    return
                self.prompts_sent += 1
                t0 = time.perf_counter()
                outcome: TeacherSequence | TeacherFailure | TeacherError
                try:
                    outcome, n_prompt, n_completion = await self._request(client, prompt, sampling)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - classified below, outside the except block
                    outcome, n_prompt, n_completion = self._classify_error(exc, prompt), 0, 0
                self.prompt_tokens_used += int(n_prompt or 0)
                self.completion_tokens_used += int(n_completion or 0)
                if isinstance(outcome, TeacherError):
                    stopped = True
                    # a fresh exception raised outside `except`: no chained SDK error (whose request
                    # object carries the auth header) and the key redacted from the message
                    raise type(outcome)(redact(str(outcome)))
                if isinstance(outcome, TeacherFailure):
                    outcome = TeacherFailure(prompt, outcome.reason, redact(outcome.message))
                else:
                    outcome.latency_s = time.perf_counter() - t0
                results[i] = outcome

        tasks = [asyncio.create_task(one(i)) for i in range(allowed)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            with contextlib.suppress(Exception):  # a failing close must not mask the results/error
                await self._close_client(client)
        return results  # type: ignore[return-value]

    # -- shared response helpers -------------------------------------------------------------
    def _sequence(self, prompt: str, text: str, tokens: list[str], topk_tokens: list[list[str]],
                  topk_logprobs: list[list[float]], finish_reason: str | None, prompt_tokens: int,
                  completion_tokens: int, **extra: Any) -> TeacherSequence:
        # the usage-reported completion length counts the tokens of API teachers without
        # logprobs, which return tokens=[]
        return TeacherSequence(prompt=prompt, text=text, tokens=tokens, topk_tokens=topk_tokens,
                               topk_logprobs=topk_logprobs, finish_reason=str(finish_reason or "stop"),
                               prompt_tokens=int(prompt_tokens or 0),
                               usage_completion_tokens=int(completion_tokens or 0), **extra)

    @staticmethod
    def _clean_candidates(cands: list[tuple[str, float]], k: int) -> list[tuple[str, float]] | str:
        """Sort by logprob (desc), keep k, drop -inf, clamp tiny positive rounding to 0.
        Returns an error string for NaN / clearly positive values."""
        out: list[tuple[str, float]] = []
        for tok, lp in cands:
            if tok is None or lp is None:
                return "candidate without token or logprob"
            lp = float(lp)
            if math.isnan(lp) or lp > 1e-3:
                return f"invalid logprob {lp!r} for candidate {tok!r}"
            if lp == -math.inf:
                continue  # zero mass: dropping it loses nothing
            out.append((str(tok), min(lp, 0.0)))
        out.sort(key=lambda c: -c[1])
        return out[:k]
