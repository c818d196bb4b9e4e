"""Anthropic (Claude) teacher over the official `anthropic` SDK: baseline / chat only.

The Messages API returns no token log-probabilities, so `supports_logprobs = False` and
`check_kd()` refuses trace collection with a clear message. `generate` returns the completion
text with `tokens=[]` and empty candidate lists, plus usage and latency, for the teacher-baseline
stage.

Retries are the SDK's own (`anthropic/_base_client.py`: `AsyncAPIClient.request`,
`_should_retry`, `_calculate_retry_timeout`): connection errors, timeouts and HTTP 408/409/429/5xx
(including 529 overloaded), `max_retries` times, waiting `retry-after-ms` / `Retry-After` when
the server sends one (which the SDK does not bound: we cap each wait at `max_retry_wait_s`,
120 s), else `min(0.5 * 2**n, 8)` s minus 0-25 % jitter. Concurrency, spend caps,
fail-fast rules and key hygiene come from `APITeacherBase` (see `api`).
"""

from __future__ import annotations

from typing import Any

from bitnet_kde.teachers.api import APITeacherBase, shared_ssl_context
from bitnet_kde.teachers.base import SamplingConfig, TeacherError, TeacherFailure, TeacherSequence

__all__ = ["AnthropicTeacher"]


class AnthropicTeacher(APITeacherBase):
    """Claude via `AsyncAnthropic().messages.create` (no logprobs: teacher baseline only)."""

    supports_logprobs = False
    logprob_mode = "none"
    max_top_k = 0

    max_retry_wait_s: float = 120.0
    """Longest single wait between retries. The anthropic SDK honours any Retry-After without a
    bound (`_calculate_retry_timeout` caps it only at ~49 days); the openai SDK stops at 120 s."""

    def __init__(self, model: str, provider: str = "anthropic", base_url: str | None = None,
                 api_key_env: str = "ANTHROPIC_API_KEY", max_concurrency: int = 4, max_retries: int = 5,
                 timeout_s: float = 60.0, max_prompts: int | None = None, max_total_tokens: int | None = None,
                 system_prompt: str | None = None, extra_body: dict | None = None) -> None:
        super().__init__(model=model, provider=provider, base_url=base_url, api_key_env=api_key_env,
                         max_concurrency=max_concurrency, max_retries=max_retries, timeout_s=timeout_s,
                         max_prompts=max_prompts, max_total_tokens=max_total_tokens,
                         system_prompt=system_prompt, extra_body=extra_body)

    def _is_local(self) -> bool:
        return False  # the Messages API always needs a key, wherever it is served

    def _make_client(self, key: str) -> Any:
        from anthropic import AsyncAnthropic, DefaultAsyncHttpxClient

        cap = float(self.max_retry_wait_s)

        class _Client(AsyncAnthropic):
            # (a private SDK hook: if a future SDK drops it, this override is simply unused)
            def _calculate_retry_timeout(self, *args: Any, **kwargs: Any) -> float:
                return min(super()._calculate_retry_timeout(*args, **kwargs), cap)

        return _Client(api_key=key, base_url=self.base_url, max_retries=self.max_retries, timeout=self.timeout_s,
                       http_client=DefaultAsyncHttpxClient(verify=shared_ssl_context()))

    async def _close_client(self, client: Any) -> None:
        await client.close()

    async def _request(self, client: Any, prompt: str, sampling: SamplingConfig
                       ) -> tuple[TeacherSequence | TeacherFailure, int, int]:
        # The installed SDK's `messages.create` has no sampling parameters (no `temperature`), so
        # sampling.temperature is not sent; pass `extra_body: {temperature: 0}` in the config for
        # API versions that still accept it.
        kw: dict[str, Any] = {"model": self.model, "max_tokens": int(sampling.max_new_tokens),
                              "messages": [{"role": "user", "content": prompt}]}
        if self.system_prompt:
            kw["system"] = self.system_prompt
        if self.extra_body:
            kw["extra_body"] = dict(self.extra_body)
        resp = await client.messages.create(**kw)
        return self._parse(resp, prompt)

    def _parse(self, resp: Any, prompt: str) -> tuple[TeacherSequence | TeacherFailure, int, int]:
        from anthropic.types import Message

        if not isinstance(resp, Message):
            return TeacherFailure(prompt, "malformed_response",
                                  f"{self.name}: response is not a message JSON object "
                                  f"(got {type(resp).__name__})"), 0, 0
        usage = resp.usage
        try:
            pt = int(getattr(usage, "input_tokens", 0) or 0)
            ct = int(getattr(usage, "output_tokens", 0) or 0)
        except (TypeError, ValueError):
            pt = ct = 0
        blocks = resp.content
        if blocks is None:
            return TeacherFailure(prompt, "malformed_response", f"{self.name}: response has no content"), pt, ct
        try:
            text = "".join(b.text for b in blocks if getattr(b, "type", None) == "text" and b.text)
        except (AttributeError, TypeError) as exc:
            return TeacherFailure(prompt, "malformed_response",
                                  f"{self.name}: unexpected content blocks ({exc})"), pt, ct
        return self._sequence(prompt, text, [], [], [], resp.stop_reason or "stop", pt, ct), pt, ct

    def _classify_error(self, exc: BaseException, prompt: str) -> TeacherFailure | TeacherError:
        import json

        import anthropic

        failure = self._transport_failure(exc, prompt, anthropic.APITimeoutError, anthropic.APIConnectionError)
        if failure is not None:
            return failure
        if isinstance(exc, anthropic.APIStatusError):
            body = getattr(exc, "body", None)
            detail, code = None, None
            if isinstance(body, dict):
                err = body.get("error", body)
                if isinstance(err, dict):
                    detail, code = err.get("message"), err.get("type")
            detail = str(detail or getattr(exc, "message", None) or exc)
            return self._classify_status(int(exc.status_code), prompt, detail, code=code,
                                         kind=type(exc).__name__)
        if isinstance(exc, (anthropic.APIResponseValidationError, json.JSONDecodeError, ValueError)):
            return TeacherFailure(prompt, "malformed_response",
                                  f"{self.name}: unreadable response body ({type(exc).__name__}: {exc})")
        return TeacherFailure(prompt, "error", f"{self.name}: {type(exc).__name__}: {exc}")
