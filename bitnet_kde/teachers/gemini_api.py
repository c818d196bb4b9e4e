"""Google Gemini teacher over `google-genai` (optional extra: `pip install 'bitnet-kde[gemini]'`).

`generate_content` with `response_logprobs=True, logprobs=min(K, 20)` returns, per generated
token, the chosen token and the top candidates (with teacher-vocabulary token ids, which we keep
in `token_ids` / `topk_ids`).

Retries: google-genai's client does **not** retry HTTP errors unless `HttpOptions.retry_options`
is set, and its tenacity policy (`_api_client.retry_args`) ignores `Retry-After`. So this teacher
turns the SDK's retries off (`HttpRetryOptions(attempts=1)`) and runs its own loop with the
same policy as the openai/anthropic SDKs (`api.parse_retry_after`, `api.backoff_delay`):
HTTP 408/429/500/502/503/504, timeouts and connection errors are retried `max_retries` times,
waiting the server's `Retry-After` (0 < s <= 120) or `min(0.5 * 2**n, 8)` s minus 0-25 % jitter.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bitnet_kde.teachers.api import APITeacherBase, backoff_delay, parse_retry_after
from bitnet_kde.teachers.base import SamplingConfig, TeacherError, TeacherFailure, TeacherSequence

__all__ = ["GeminiTeacher"]

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
INSTALL_HINT = ("pip install 'bitnet-kde[gemini]'  (or: pip install google-genai) to use the Gemini teacher")


def _import_genai() -> Any:
    try:
        from google import genai
        from google.genai import errors, types  # noqa: F401
    except ImportError as exc:
        raise TeacherError(f"gemini teacher needs the optional google-genai SDK, which is not installed: "
                           f"{INSTALL_HINT} ({exc})") from None
    return genai


def _transient_exceptions() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = [asyncio.TimeoutError, TimeoutError, ConnectionError]
    try:  # google-genai sends async requests through aiohttp when it is installed
        import aiohttp

        out += [aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError]
    except ImportError:
        pass
    for mod_name in ("httpx2", "httpx"):
        try:
            mod = __import__(mod_name)
        except ImportError:
            continue
        out += [mod.TimeoutException, mod.ConnectError, mod.RemoteProtocolError]
    return tuple(out)


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or "Timeout" in type(exc).__name__


class GeminiTeacher(APITeacherBase):
    """Gemini via `google.genai.Client(...).aio.models.generate_content` with logprobs (<= 20)."""

    def __init__(self, model: str, provider: str = "gemini", base_url: str | None = None,
                 api_key_env: str = "GEMINI_API_KEY", logprobs: bool = True, max_concurrency: int = 4,
                 max_retries: int = 5, timeout_s: float = 60.0, max_prompts: int | None = None,
                 max_total_tokens: int | None = None, system_prompt: str | None = None,
                 extra_body: dict | None = None) -> None:
        _import_genai()  # fail at construction with the install hint, not mid-run
        super().__init__(model=model, provider=provider, base_url=base_url, api_key_env=api_key_env,
                         max_concurrency=max_concurrency, max_retries=max_retries, timeout_s=timeout_s,
                         max_prompts=max_prompts, max_total_tokens=max_total_tokens,
                         system_prompt=system_prompt, extra_body=extra_body)
        self.supports_logprobs = bool(logprobs)

    def _make_client(self, key: str) -> Any:
        genai = _import_genai()
        from google.genai import types

        # attempts=1: no SDK retries at all (with retry_options unset, its aiohttp path would still
        # retry connection errors once after a 1-10 s sleep); `_request` owns the retry policy.
        opts: dict[str, Any] = {"timeout": round(self.timeout_s * 1000), "base_url": self.base_url}
        if hasattr(types, "HttpRetryOptions"):  # (older google-genai releases have no SDK retries at all)
            opts["retry_options"] = types.HttpRetryOptions(attempts=1)
        return genai.Client(api_key=key, vertexai=False, http_options=types.HttpOptions(**opts))

    async def _close_client(self, client: Any) -> None:
        aclose = getattr(client.aio, "aclose", None)
        if aclose is not None:
            await aclose()

    def _config(self, sampling: SamplingConfig) -> Any:
        from google.genai import types

        kw: dict[str, Any] = {"temperature": float(sampling.temperature),
                              "max_output_tokens": int(sampling.max_new_tokens), "candidate_count": 1}
        if sampling.seed is not None:
            kw["seed"] = int(sampling.seed)
        if self.system_prompt:
            kw["system_instruction"] = self.system_prompt
        if self.supports_logprobs:
            kw["response_logprobs"] = True
            kw["logprobs"] = max(0, min(int(sampling.top_k), self.max_top_k))
        if self.extra_body:
            kw["http_options"] = types.HttpOptions(extra_body=dict(self.extra_body))
        return types.GenerateContentConfig(**kw)

    async def _request(self, client: Any, prompt: str, sampling: SamplingConfig
                       ) -> tuple[TeacherSequence | TeacherFailure, int, int]:
        from google.genai import errors

        config = self._config(sampling)
        transient = _transient_exceptions()
        for attempt in range(self.max_retries + 1):
            try:
                resp = await client.aio.models.generate_content(model=self.model, contents=prompt, config=config)
                return self._parse(resp, prompt, sampling)
            except errors.APIError as exc:
                if attempt >= self.max_retries or int(exc.code or 0) not in RETRY_STATUS:
                    raise
                headers = getattr(getattr(exc, "response", None), "headers", None)
                retry_after = parse_retry_after(headers)
                if retry_after is not None and retry_after > 120:
                    raise  # the server asks for a longer pause than we wait per request
                await asyncio.sleep(backoff_delay(attempt, retry_after))
            except transient:
                if attempt >= self.max_retries:
                    raise
                await asyncio.sleep(backoff_delay(attempt, None))
        raise AssertionError("unreachable")  # pragma: no cover

    def _parse(self, resp: Any, prompt: str, sampling: SamplingConfig
               ) -> tuple[TeacherSequence | TeacherFailure, int, int]:
        def bad(reason: str, msg: str, pt: int = 0, ct: int = 0):
            return TeacherFailure(prompt, reason, f"{self.name}: {msg}"), pt, ct

        um = getattr(resp, "usage_metadata", None)
        try:
            pt = int(getattr(um, "prompt_token_count", 0) or 0)
            ct = int(getattr(um, "candidates_token_count", 0) or 0) + int(getattr(um, "thoughts_token_count", 0) or 0)
        except (TypeError, ValueError):
            pt = ct = 0
        try:
            cands = getattr(resp, "candidates", None)
            if not cands:
                feedback = getattr(resp, "prompt_feedback", None)
                block = getattr(feedback, "block_reason", None)
                if block:
                    return bad("blocked", f"prompt blocked by the provider ({block})", pt, ct)
                return bad("malformed_response", "response has no candidates", pt, ct)
            cand = cands[0]
            parts = getattr(getattr(cand, "content", None), "parts", None) or []
            text = "".join(p.text for p in parts if getattr(p, "text", None) and not getattr(p, "thought", False))
            finish = getattr(cand, "finish_reason", None)
            finish = str(getattr(finish, "value", finish) or "stop").lower()
            if not self.supports_logprobs:
                return self._sequence(prompt, text, [], [], [], finish, pt, ct), pt, ct
            lr = getattr(cand, "logprobs_result", None)
            chosen = getattr(lr, "chosen_candidates", None) if lr is not None else None
            tops = getattr(lr, "top_candidates", None) if lr is not None else None
            if chosen is None:
                if text == "":
                    return self._sequence(prompt, text, [], [], [], finish, pt, ct), pt, ct
                return bad("missing_logprobs", "response has no logprobs_result although response_logprobs "
                                               "was requested", pt, ct)
            k = max(0, min(int(sampling.top_k), self.max_top_k))
            if k > 0 and (tops is None or len(tops) != len(chosen)):
                return bad("missing_logprobs", f"top_candidates has {0 if tops is None else len(tops)} steps "
                                               f"for {len(chosen)} chosen tokens", pt, ct)
            tokens, token_ids, topk_tokens, topk_lps, topk_ids = [], [], [], [], []
            have_ids = True
            for j, ch in enumerate(chosen):
                if not isinstance(getattr(ch, "token", None), str):
                    return bad("malformed_response", f"chosen_candidates[{j}] has no token", pt, ct)
                tokens.append(ch.token)
                token_ids.append(getattr(ch, "token_id", None))
                raw = list(getattr(tops[j], "candidates", None) or []) if k > 0 else []
                if k > 0 and not raw:
                    return bad("missing_logprobs", f"top_candidates[{j}] is empty", pt, ct)
                id_of = {c.token: getattr(c, "token_id", None) for c in raw}
                cleaned = self._clean_candidates([(c.token, c.log_probability) for c in raw], k)
                if isinstance(cleaned, str):
                    return bad("malformed_response", f"top_candidates[{j}]: {cleaned}", pt, ct)
                topk_tokens.append([c[0] for c in cleaned])
                topk_lps.append([c[1] for c in cleaned])
                ids = [id_of.get(c[0]) for c in cleaned]
                have_ids = have_ids and token_ids[-1] is not None and all(i is not None for i in ids)
                topk_ids.append(ids)
            extra = {"token_ids": [int(i) for i in token_ids],
                     "topk_ids": [[int(i) for i in row] for row in topk_ids]} if have_ids and tokens else {}
            return self._sequence(prompt, text, tokens, topk_tokens, topk_lps, finish, pt, ct or len(tokens),
                                  **extra), pt, ct or len(tokens)
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
            return bad("malformed_response", f"unexpected response shape ({type(exc).__name__}: {exc})", pt, ct)

    def _classify_error(self, exc: BaseException, prompt: str) -> TeacherFailure | TeacherError:
        from google.genai import errors

        if isinstance(exc, errors.APIError):
            detail = str(exc.message or exc.details or exc)
            return self._classify_status(int(exc.code or 0), prompt, detail, code=exc.status,
                                         kind=str(exc.status or type(exc).__name__))
        if isinstance(exc, _transient_exceptions()):
            if _is_timeout(exc):
                return TeacherFailure(prompt, "timeout", f"{self.name} at {self._where}: no response within "
                                                         f"{self.timeout_s:g}s after {self.max_retries} retries")
            return TeacherFailure(prompt, "connection_error", f"{self.name} at {self._where}: connection failed "
                                                              f"after {self.max_retries} retries "
                                                              f"({type(exc).__name__}: {exc})")
        if isinstance(exc, (errors.UnknownApiResponseError, ValueError)):
            return TeacherFailure(prompt, "malformed_response",
                                  f"{self.name}: unreadable response body ({type(exc).__name__}: {exc})")
        return TeacherFailure(prompt, "error", f"{self.name}: {type(exc).__name__}: {exc}")
