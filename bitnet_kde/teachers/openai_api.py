"""OpenAI and every OpenAI-compatible server (vLLM, llama.cpp, Ollama, DeepSeek, Groq, ...)
over the official `openai` SDK.

`OpenAITeacher` talks to `POST {base_url}/chat/completions` with `logprobs=True` and
`top_logprobs=min(K, 20)`; each completion token becomes one position of a `TeacherSequence`
whose candidates are the server's `top_logprobs` (logprob mode `api_top_logprobs`).
Concurrency, spend caps, fail-fast rules and key hygiene come from `APITeacherBase` (`api`).
"""

from __future__ import annotations

import json
from typing import Any

from bitnet_kde.teachers.api import APITeacherBase, shared_ssl_context
from bitnet_kde.teachers.base import SamplingConfig, TeacherError, TeacherFailure, TeacherSequence

__all__ = ["OpenAITeacher"]


class OpenAITeacher(APITeacherBase):
    """OpenAI chat completions (or any OpenAI-compatible server via `base_url`).

    Retries are the SDK's own (openai `_base_client.AsyncAPIClient.request` +
    `BaseClient._should_retry` / `_calculate_retry_timeout`): it retries connection errors,
    timeouts and HTTP 408/409/429/5xx (and whatever the server flags with `x-should-retry`), up to
    `max_retries` times, waiting the server's `retry-after-ms` / `Retry-After` (seconds or HTTP
    date) when 0 < wait <= 120 s, else `min(0.5 * 2**n, 8)` s minus 0-25 % random jitter; a
    `Retry-After` over 120 s is not retried (we then report `rate_limited`). A 429 whose error
    code is `insufficient_quota` is a billing stop, not a rate limit: `_stop_retry_on_quota`
    marks it `x-should-retry: false` (the SDK's own switch) so the run stops at once.
    """

    def __init__(self, model: str, provider: str = "openai", base_url: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", logprobs: bool = True, max_concurrency: int = 8,
                 max_retries: int = 5, timeout_s: float = 60.0, max_prompts: int | None = None,
                 max_total_tokens: int | None = None, system_prompt: str | None = None,
                 extra_body: dict | None = None) -> None:
        super().__init__(model=model, provider=provider, base_url=base_url, api_key_env=api_key_env,
                         max_concurrency=max_concurrency, max_retries=max_retries, timeout_s=timeout_s,
                         max_prompts=max_prompts, max_total_tokens=max_total_tokens,
                         system_prompt=system_prompt, extra_body=extra_body)
        self.supports_logprobs = bool(logprobs)

    def _make_client(self, key: str) -> Any:
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        # the SDK's default HTTP client, with a shared TLS context: building one (loading the CA
        # bundle) costs ~40 ms, paid on every `generate` call otherwise
        http_client = DefaultAsyncHttpxClient(verify=shared_ssl_context(),
                                              event_hooks={"response": [_stop_retry_on_quota]})
        return AsyncOpenAI(api_key=key, base_url=self.base_url, max_retries=self.max_retries,
                           timeout=self.timeout_s, http_client=http_client)

    async def _close_client(self, client: Any) -> None:
        await client.close()

    def _request_kwargs(self, prompt: str, sampling: SamplingConfig) -> dict:
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        kw: dict[str, Any] = {"model": self.model, "messages": messages,
                              "temperature": float(sampling.temperature)}
        # api.openai.com deprecated `max_tokens` (reasoning models reject it); compatible servers
        # (vllm, llama.cpp, ollama, deepseek, groq, ...) all take `max_tokens`.
        token_param = "max_completion_tokens" if self.provider == "openai" else "max_tokens"
        kw[token_param] = int(sampling.max_new_tokens)
        if sampling.seed is not None:
            kw["seed"] = int(sampling.seed)
        if self.supports_logprobs:
            kw["logprobs"] = True
            kw["top_logprobs"] = max(0, min(int(sampling.top_k), self.max_top_k))
        if self.extra_body:
            kw["extra_body"] = dict(self.extra_body)
        return kw

    async def _request(self, client: Any, prompt: str, sampling: SamplingConfig
                       ) -> tuple[TeacherSequence | TeacherFailure, int, int]:
        # `with_raw_response`: same request, retries and status errors as `create`, but we read
        # the JSON ourselves. Building the SDK's pydantic objects for K=20 candidates per token
        # costs ~3 ms of CPU per short response (measured), which caps throughput at high
        # concurrency; it would also hide malformed bodies behind lenient model construction.
        raw = await client.chat.completions.with_raw_response.create(**self._request_kwargs(prompt, sampling))
        http = raw.http_response
        try:
            data = json.loads(http.content)
        except ValueError:
            ctype = http.headers.get("content-type", "?")
            return TeacherFailure(prompt, "malformed_response", f"{self.name}: response body is not JSON "
                                  f"(HTTP {http.status_code}, content-type {ctype}): {http.text[:120]!r}"), 0, 0
        return self._parse(data, prompt, sampling)

    def _parse(self, data: Any, prompt: str, sampling: SamplingConfig
               ) -> tuple[TeacherSequence | TeacherFailure, int, int]:
        """Chat-completion JSON (a dict) -> TeacherSequence, or a counted failure."""

        def bad(reason: str, msg: str, pt: int = 0, ct: int = 0):
            return TeacherFailure(prompt, reason, f"{self.name}: {msg}"), pt, ct

        if not isinstance(data, dict):
            return bad("malformed_response", f"response JSON is a {type(data).__name__}, not an object")
        usage = data.get("usage") or {}
        try:
            pt = int(usage.get("prompt_tokens") or 0)
            ct = int(usage.get("completion_tokens") or 0)
        except (AttributeError, TypeError, ValueError):
            pt = ct = 0
        try:
            choices = data.get("choices")
            if not choices or not isinstance(choices, list):
                return bad("malformed_response", "response has no choices", pt, ct)
            choice = choices[0]
            message = choice.get("message") or {}
            text = message.get("content")
            text = "" if text is None else text
            if not isinstance(text, str):
                return bad("malformed_response", f"message.content is {type(text).__name__}", pt, ct)
            finish = choice.get("finish_reason")
            if not self.supports_logprobs:
                return self._sequence(prompt, text, [], [], [], finish, pt, ct), pt, ct
            content = (choice.get("logprobs") or {}).get("content")
            if not content:
                if text == "":
                    return self._sequence(prompt, text, [], [], [], finish, pt, ct), pt, ct
                return bad("missing_logprobs", f"response has {'no' if content is None else 'an empty'} "
                                               "logprobs.content beside its text although logprobs were "
                                               "requested (the server may ignore `logprobs`)", pt, ct)
            k = max(0, min(int(sampling.top_k), self.max_top_k))
            tokens: list[str] = []
            topk_tokens: list[list[str]] = []
            topk_lps: list[list[float]] = []
            for j, entry in enumerate(content):
                tok = entry.get("token")
                if not isinstance(tok, str):
                    return bad("malformed_response", f"logprobs.content[{j}] has no token", pt, ct)
                tops = entry.get("top_logprobs")
                if k > 0 and not tops:
                    return bad("missing_logprobs", f"logprobs.content[{j}] has no top_logprobs "
                                                   f"(asked for {k})", pt, ct)
                cands = self._clean_candidates([(t.get("token"), t.get("logprob")) for t in (tops or [])], k)
                if isinstance(cands, str):
                    return bad("malformed_response", f"logprobs.content[{j}]: {cands}", pt, ct)
                tokens.append(tok)
                topk_tokens.append([c[0] for c in cands])
                topk_lps.append([c[1] for c in cands])
            spelled = _spelled(content, tokens)
            if spelled is not None and spelled != text:
                # positions would not line up with the text: no KD position could be placed
                return bad("logprobs_mismatch", f"logprobs.content tokens spell {spelled[:60]!r}, "
                                                f"not message.content {text[:60]!r}", pt, ct)
            ct = ct or len(tokens)
            return self._sequence(prompt, text, tokens, topk_tokens, topk_lps, finish, pt, ct), pt, ct
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
            return bad("malformed_response", f"unexpected response shape ({type(exc).__name__}: {exc})", pt, ct)

    def _classify_error(self, exc: BaseException, prompt: str) -> TeacherFailure | TeacherError:
        import openai

        failure = self._transport_failure(exc, prompt, openai.APITimeoutError, openai.APIConnectionError)
        if failure is not None:
            return failure
        if isinstance(exc, openai.APIStatusError):
            detail = _openai_error_detail(exc)
            return self._classify_status(int(exc.status_code), prompt, detail, code=exc.code, param=exc.param,
                                         kind=type(exc).__name__)
        if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError, ValueError)):
            return TeacherFailure(prompt, "malformed_response",
                                  f"{self.name}: unreadable response body ({type(exc).__name__}: {exc})")
        return TeacherFailure(prompt, "error", f"{self.name}: {type(exc).__name__}: {exc}")


async def _stop_retry_on_quota(response: Any) -> None:
    """httpx response hook: a 429 `insufficient_quota` (billing) must not be retried like a rate limit."""
    if response.status_code == 429:
        await response.aread()
        if "insufficient_quota" in response.text:
            response.headers["x-should-retry"] = "false"


def _spelled(content: list, tokens: list[str]) -> str | None:
    """The text the logprobs tokens spell: from their `bytes` when every entry has them (exact, also
    for tokens that are half a character), else from the token strings; None when the strings hold
    half characters (U+FFFD) and no bytes say what they were."""
    raw = [entry.get("bytes") for entry in content]
    if all(isinstance(b, list) for b in raw):
        return bytes(x for b in raw for x in b).decode("utf-8", errors="replace")
    joined = "".join(tokens)
    return None if "\ufffd" in joined else joined


def _openai_error_detail(exc: Any) -> str:
    """The provider's own error message (not the SDK's repr, which embeds the whole body)."""
    body = getattr(exc, "body", None)
    msg = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("msg")
        elif isinstance(err, str):
            msg = err
    elif isinstance(body, str) and body.strip():
        msg = body.strip()
    return str(msg or getattr(exc, "message", None) or exc)
