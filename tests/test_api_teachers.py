"""API teachers against a real local HTTP server that injects faults (tests/fault_server.py).

The SDKs' own HTTP stacks, timeouts and retry loops run unmodified; only the server is ours.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib.util
import logging
import math
import pickle
import sys
import time
from pathlib import Path

import pytest
from fault_server import (
    MISSING,
    FaultServer,
    bad_logprob,
    completion_text,
    drop,
    empty_logprobs,
    malformed,
    mismatch,
    no_choices,
    no_logprobs,
    prompt_token_count,
    sleep,
    status,
    text_body,
    truncated,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bitnet_kde.teachers.anthropic_api import AnthropicTeacher
from bitnet_kde.teachers.base import (
    LogprobsUnsupported,
    SamplingConfig,
    TeacherError,
    TeacherFailure,
    TeacherSequence,
)
from bitnet_kde.teachers.openai_api import OpenAITeacher

pytestmark = pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")

SECRET = "sk-test-SECRET123"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "teacher"
HAVE_GENAI = importlib.util.find_spec("google.genai") is not None if importlib.util.find_spec("google") else False
FAST = {"retry-after-ms": "10"}  # keep retry waits short where the wait itself is not under test


@pytest.fixture(autouse=True)
def _keys(monkeypatch):
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GROQ_API_KEY", "TESTPROV_API_KEY",
                "DEEPSEEK_API_KEY", "AIMLAPI_API_KEY"):
        monkeypatch.setenv(var, SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def server():
    with FaultServer() as srv:
        yield srv


def teacher(server: FaultServer, **kw) -> OpenAITeacher:
    args = {"model": "gpt-test", "provider": "testprov", "base_url": server.openai_base_url,
            "api_key_env": "TESTPROV_API_KEY", "max_concurrency": 4, "max_retries": 3, "timeout_s": 5.0}
    args.update(kw)
    return OpenAITeacher(**args)


def assert_ok(seq, prompt: str, k: int) -> None:
    assert isinstance(seq, TeacherSequence), seq
    assert seq.prompt == prompt
    assert seq.text == completion_text(prompt) == "".join(seq.tokens)
    assert len(seq.topk_tokens) == len(seq.topk_logprobs) == len(seq.tokens) > 0
    for j, (toks, lps) in enumerate(zip(seq.topk_tokens, seq.topk_logprobs)):
        assert len(toks) == len(lps) == k
        assert toks[0] == seq.tokens[j]
        assert all(math.isfinite(x) and x <= 0 for x in lps)
        assert lps == sorted(lps, reverse=True)
        assert sum(math.exp(x) for x in lps) <= 1 + 1e-4


def no_secret(*objs: object) -> None:
    for o in objs:
        assert SECRET not in str(o), f"key leaked in {o!r}"


# ---------------------------------------------------------------------------------------------
# happy path, request shape
# ---------------------------------------------------------------------------------------------

def test_generate_records_top_k_and_usage(server):
    # extra_body as Hydra passes it (a DictConfig)
    t = teacher(server, system_prompt="Be brief.", extra_body=OmegaConf.create({"repetition_penalty": 1.0}))
    prompts = ["what is two plus two", "name a colour"]
    out = t.generate(prompts, SamplingConfig(max_new_tokens=32, temperature=0.0, top_k=5, seed=7))
    for seq, p in zip(out, prompts):
        assert_ok(seq, p, 5)
        assert seq.prompt_tokens == prompt_token_count(p)
        assert seq.latency_s > 0
        assert seq.finish_reason == "stop"
    body = server.requests[0]["body"]
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    assert body["temperature"] == 0.0 and body["seed"] == 7 and body["max_tokens"] == 32
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["repetition_penalty"] == 1.0
    assert server.requests[0]["auth"] == f"Bearer {SECRET}"  # read from the environment
    assert t.supports_logprobs and t.logprob_mode == "api_top_logprobs"
    assert t.max_top_k == 20 and t.max_concurrency == 4
    assert t.prompts_sent == 2
    assert t.total_tokens_used == sum(prompt_token_count(p) + len(s.tokens) for p, s in zip(prompts, out))


def test_top_k_is_capped_at_20_and_openai_uses_max_completion_tokens(server):
    t = teacher(server, provider="openai")
    (seq,) = t.generate(["cap me"], SamplingConfig(top_k=50, max_new_tokens=16))
    assert_ok(seq, "cap me", 20)
    body = server.requests[0]["body"]
    assert body["top_logprobs"] == 20
    assert body["max_completion_tokens"] == 16 and "max_tokens" not in body


# ---------------------------------------------------------------------------------------------
# retries (the SDK's own loop, against real HTTP faults)
# ---------------------------------------------------------------------------------------------

def test_429_retry_after_is_honoured(server):
    server.script("p", status(429, "slow down", headers={"Retry-After": "1"}, err_type="rate_limit_error"))
    t0 = time.perf_counter()
    (seq,) = teacher(server).generate(["p"], SamplingConfig(top_k=3))
    elapsed = time.perf_counter() - t0
    assert_ok(seq, "p", 3)
    assert server.count("p") == 2
    # the SDK's own first backoff would be 0.375-0.5 s: waiting ~1 s shows Retry-After was used
    assert elapsed >= 0.95, elapsed


def test_500_then_502_then_success(server):
    server.script("p", status(500, "boom", err_type="server_error"), status(502, "bad gateway"))
    (seq,) = teacher(server).generate(["p"], SamplingConfig(top_k=3))
    assert_ok(seq, "p", 3)
    assert server.count("p") == 3


def test_timeout_then_success(server):
    server.script("slow", sleep(1.5))
    t0 = time.perf_counter()
    (seq,) = teacher(server, timeout_s=0.4).generate(["slow"], SamplingConfig(top_k=2))
    assert_ok(seq, "slow", 2)
    assert server.count("slow") == 2
    assert time.perf_counter() - t0 < 3.0  # gave up on the slow answer and retried


@pytest.mark.parametrize("fault, reason", [
    (lambda: status(429, "rate limited", headers=FAST, err_type="rate_limit_error"), "rate_limited"),
    (lambda: status(503, "overloaded", headers=FAST), "server_error"),
    (lambda: sleep(1.0), "timeout"),
])
def test_exhausted_retries_become_counted_failures(server, fault, reason):
    retries = 1
    server.script("bad", *[fault() for _ in range(retries + 1)])
    t = teacher(server, max_retries=retries, timeout_s=0.3)
    out = t.generate(["ok1", "bad", "ok2"], SamplingConfig(top_k=2))
    assert_ok(out[0], "ok1", 2)
    assert_ok(out[2], "ok2", 2)
    assert isinstance(out[1], TeacherFailure) and out[1].prompt == "bad"
    assert out[1].reason == reason, out[1]
    assert "testprov/gpt-test" in out[1].message
    assert server.count("bad") == retries + 1


def test_retry_after_beyond_two_minutes_is_not_waited_for(server):
    server.script("p", status(429, "come back tomorrow", headers={"Retry-After": "86400"}))
    t0 = time.perf_counter()
    (res,) = teacher(server).generate(["p"])
    assert isinstance(res, TeacherFailure) and res.reason == "rate_limited"
    assert time.perf_counter() - t0 < 5 and server.count("p") == 1


# ---------------------------------------------------------------------------------------------
# fail fast
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [401, 403])
def test_auth_errors_fail_fast_without_leaking_the_key(server, code):
    # a hostile/verbose server echoing the key must not get it into our message
    for p in ["a", "b", "c", "d", "e"]:
        server.script(p, status(code, f"Incorrect API key provided: {SECRET}", err_type="invalid_request_error",
                                err_code="invalid_api_key"))
    t = teacher(server, max_concurrency=1)
    with pytest.raises(TeacherError) as ei:
        t.generate(["a", "b", "c", "d", "e"])
    err = ei.value
    assert not isinstance(err, LogprobsUnsupported)
    msg = str(err)
    assert "testprov" in msg and str(code) in msg and "TESTPROV_API_KEY" in msg
    no_secret(msg, repr(err), err.args)
    assert err.__cause__ is None and err.__context__ is None  # no SDK error (with auth headers) attached
    assert server.count() == 1  # no retries, no further prompts


def test_400_about_logprobs_raises_logprobs_unsupported(server):
    server.script("p", status(400, "Unsupported parameter: 'logprobs' is not supported with this model.",
                              err_code="unsupported_parameter", param="logprobs"))
    with pytest.raises(LogprobsUnsupported) as ei:
        teacher(server, model="o3-mini").generate(["p"])
    msg = str(ei.value)
    assert "o3-mini" in msg and "400" in msg and "logprob" in msg.lower() and "reasoning" in msg
    assert server.count() == 1


@pytest.mark.parametrize("code, words", [(400, "bad request"), (404, "unknown model")])
def test_other_client_errors_fail_fast(server, code, words):
    server.script("p", status(code, "The model `nope` does not exist" if code == 404 else "temperature must be <= 2"))
    with pytest.raises(TeacherError) as ei:
        teacher(server, model="nope").generate(["p"])
    assert not isinstance(ei.value, LogprobsUnsupported)
    assert str(code) in str(ei.value) and words in str(ei.value) and "testprov/nope" in str(ei.value)
    assert server.count() == 1


def test_context_length_400_is_a_per_prompt_failure(server):
    server.script("huge", status(400, "This model's maximum context length is 8192 tokens.",
                                 err_code="context_length_exceeded"))
    out = teacher(server).generate(["huge", "small"], SamplingConfig(top_k=2))
    assert isinstance(out[0], TeacherFailure) and out[0].reason == "prompt_too_long"
    assert_ok(out[1], "small", 2)


def test_missing_key_for_a_remote_provider_fails_when_the_teacher_is_built(monkeypatch):
    # at construction: a stage stops before it loads any model, tokenizer or prompt
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(TeacherError, match="OPENAI_API_KEY"):
        OpenAITeacher(model="gpt-4o-mini")
    with pytest.raises(TeacherError, match="ANTHROPIC_API_KEY"):
        monkeypatch.delenv("ANTHROPIC_API_KEY")
        AnthropicTeacher(model="claude-test")


def test_credentials_are_checked_from_the_config_without_building_the_teacher(monkeypatch):
    from bitnet_kde.teachers import check_credentials

    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(TeacherError, match="OPENAI_API_KEY is not set"):
        check_credentials(OmegaConf.load(CONFIGS / "openai.yaml"))
    check_credentials(OmegaConf.load(CONFIGS / "vllm.yaml"))  # a local server: no key needed
    check_credentials(OmegaConf.load(CONFIGS / "local_smollm2.yaml"))  # in-process
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    check_credentials(OmegaConf.load(CONFIGS / "openai.yaml"))


def test_local_server_needs_no_key(server, monkeypatch):
    monkeypatch.delenv("TESTPROV_API_KEY", raising=False)
    (seq,) = teacher(server).generate(["hi"], SamplingConfig(top_k=1))
    assert_ok(seq, "hi", 1)
    assert server.requests[0]["auth"] == "Bearer EMPTY"


# ---------------------------------------------------------------------------------------------
# malformed answers are counted, never a crash
# ---------------------------------------------------------------------------------------------

def test_malformed_responses_are_counted_failures(server):
    server.script("broken json", malformed())
    server.script("null logprobs", no_logprobs())
    server.script("no choices", no_choices())
    server.script("plain text", text_body())
    prompts = ["good one", "broken json", "null logprobs", "no choices", "plain text", "good two"]
    out = teacher(server).generate(prompts, SamplingConfig(top_k=3))
    assert [r.prompt for r in out] == prompts
    assert_ok(out[0], "good one", 3)
    assert_ok(out[5], "good two", 3)
    reasons = {r.prompt: r.reason for r in out if isinstance(r, TeacherFailure)}
    assert reasons == {"broken json": "malformed_response", "null logprobs": "missing_logprobs",
                       "no choices": "malformed_response", "plain text": "malformed_response"}


def test_answers_whose_logprobs_do_not_fit_the_text_are_counted_under_their_cause(server):
    # an empty logprobs.content beside text carries no KD data: missing_logprobs (not an empty
    # completion); tokens spelling other text than the message cannot be placed: logprobs_mismatch
    server.script("empty list", empty_logprobs())
    server.script("other text", mismatch())
    out = teacher(server).generate(["empty list", "other text", "fine"], SamplingConfig(top_k=3))
    assert isinstance(out[0], TeacherFailure) and out[0].reason == "missing_logprobs", out[0]
    assert "empty logprobs.content" in out[0].message
    assert isinstance(out[1], TeacherFailure) and out[1].reason == "logprobs_mismatch", out[1]
    assert_ok(out[2], "fine", 3)
    assert server.count() == 3  # a 200 is never retried


@pytest.mark.parametrize("value", [float("nan"), 0.5, MISSING], ids=["nan", "positive", "missing"])
def test_invalid_values_inside_logprobs_are_malformed_and_not_retried(server, value):
    server.script("bad", bad_logprob(value))
    out = teacher(server).generate(["bad", "good"], SamplingConfig(top_k=3))
    assert isinstance(out[0], TeacherFailure) and out[0].reason == "malformed_response", out[0]
    assert "logprobs.content[0]" in out[0].message
    assert_ok(out[1], "good", 3)
    assert server.count("bad") == 1


# ---------------------------------------------------------------------------------------------
# transport faults and the remaining HTTP statuses
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [drop, truncated], ids=["dropped", "truncated"])
def test_connection_lost_mid_answer_is_retried_then_counted(server, fault):
    server.script("once", fault())
    server.script("always", *[fault() for _ in range(3)])
    out = teacher(server, max_retries=2).generate(["once", "always"], SamplingConfig(top_k=2))
    assert_ok(out[0], "once", 2)
    assert server.count("once") == 2
    assert isinstance(out[1], TeacherFailure) and out[1].reason == "connection_error", out[1]
    assert server.count("always") == 3


def test_429_insufficient_quota_is_a_billing_stop_not_retried(server):
    for p in ("a", "b"):
        server.script(p, *[status(429, "You exceeded your current quota, please check your plan and billing",
                                  err_type="insufficient_quota", err_code="insufficient_quota")
                           for _ in range(4)])
    t0 = time.perf_counter()
    with pytest.raises(TeacherError, match="quota exhausted") as ei:
        teacher(server, max_concurrency=1).generate(["a", "b"])
    assert "429" in str(ei.value)
    assert server.count() == 1  # no retry, no further prompt
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("code, reason, retried", [(408, "timeout", True), (409, "server_error", True),
                                                   (413, "prompt_too_long", False)])
def test_408_409_413(server, code, reason, retried):
    server.script("p", *[status(code, f"scripted {code}", headers=FAST) for _ in range(2)])
    (res,) = teacher(server, max_retries=1).generate(["p"])
    assert isinstance(res, TeacherFailure) and res.reason == reason, res
    assert str(code) in res.message
    assert server.count("p") == (2 if retried else 1)
    server.script("q", status(code, "once", headers=FAST))
    (res,) = teacher(server, max_retries=1).generate(["q"], SamplingConfig(top_k=2))
    if retried:
        assert_ok(res, "q", 2)
    else:
        assert isinstance(res, TeacherFailure) and server.count("q") == 1


def test_retry_after_as_an_http_date_is_honoured(server):
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: a wait of 1-2 s
    server.script("p", status(503, "maintenance", headers={"Retry-After": when}))
    t0 = time.perf_counter()
    (seq,) = teacher(server).generate(["p"], SamplingConfig(top_k=2))
    elapsed = time.perf_counter() - t0
    assert_ok(seq, "p", 2)
    assert server.count("p") == 2
    assert 0.95 <= elapsed < 4, elapsed  # the SDK's own first backoff would be under 0.5 s


# ---------------------------------------------------------------------------------------------
# concurrency, order, spend caps
# ---------------------------------------------------------------------------------------------

def test_concurrency_is_bounded_and_order_kept(server):
    server.latency_s = 0.1
    prompts = [f"prompt number {i}" for i in range(24)]
    t0 = time.perf_counter()
    out = teacher(server, max_concurrency=3).generate(prompts, SamplingConfig(top_k=2))
    elapsed = time.perf_counter() - t0
    for seq, p in zip(out, prompts):
        assert_ok(seq, p, 2)
    assert 2 <= server.max_inflight <= 3
    assert elapsed < 24 * 0.1 * 0.75  # clearly faster than one at a time


def test_prompt_cap(server):
    t = teacher(server, max_prompts=3, max_concurrency=2)
    prompts = [f"p{i}" for i in range(5)]
    out = t.generate(prompts, SamplingConfig(top_k=1))
    assert [type(r).__name__ for r in out] == ["TeacherSequence"] * 3 + ["TeacherFailure"] * 2
    assert all(r.reason == "spend_cap" and "max_prompts=3" in r.message for r in out[3:])
    assert [r.prompt for r in out] == prompts  # never silently dropped
    assert server.count() == 3
    again = t.generate(["q0", "q1"])
    assert all(isinstance(r, TeacherFailure) and r.reason == "spend_cap" for r in again)
    assert server.count() == 3


def test_token_cap(server):
    prompts = ["alpha", "beta gamma", "delta", "epsilon"]
    used = [prompt_token_count(p) + len(completion_text(p).split()) for p in prompts]
    t = teacher(server, max_total_tokens=used[0] + used[1], max_concurrency=1)
    out = t.generate(prompts, SamplingConfig(top_k=1))
    assert isinstance(out[0], TeacherSequence) and isinstance(out[1], TeacherSequence)
    assert [r.reason for r in out[2:]] == ["spend_cap", "spend_cap"]
    assert "max_total_tokens" in out[2].message
    assert server.count() == 2 and t.total_tokens_used == used[0] + used[1]


# ---------------------------------------------------------------------------------------------
# key hygiene
# ---------------------------------------------------------------------------------------------

def test_key_never_stored_on_the_teacher(server, monkeypatch):
    t = teacher(server)
    t.generate(["x"], SamplingConfig(top_k=1))
    assert server.requests[-1]["auth"] == f"Bearer {SECRET}"
    no_secret(repr(t), str(t), vars(t))
    assert SECRET.encode() not in pickle.dumps(t)
    clone = pickle.loads(pickle.dumps(t))
    # a rotated key is picked up at the next call: it is read from the environment each time
    monkeypatch.setenv("TESTPROV_API_KEY", "sk-test-ROTATED")
    clone.generate(["y"], SamplingConfig(top_k=1))
    assert server.requests[-1]["auth"] == "Bearer sk-test-ROTATED"


def test_key_redacted_from_failure_messages(server):
    server.script("p", *[status(500, f"upstream said: key {SECRET} is weird", headers=FAST) for _ in range(2)])
    (res,) = teacher(server, max_retries=1).generate(["p"])
    assert isinstance(res, TeacherFailure) and res.reason == "server_error"
    no_secret(res.message)
    assert "***" in res.message


def test_credentials_inside_base_url_are_never_shown(server, caplog):
    url = server.openai_base_url.replace("http://", "http://alice:url-secret-42@")
    t = teacher(server, base_url=url, max_retries=0)
    server.script("down", status(500, "boom", headers=FAST))
    with caplog.at_level(logging.DEBUG):
        out = t.generate(["down", "up"], SamplingConfig(top_k=1))
    assert isinstance(out[0], TeacherFailure) and "http://***@127.0.0.1" in out[0].message
    assert isinstance(out[1], TeacherSequence)
    assert t.display_url.startswith("http://***@127.0.0.1") and t.base_url == url  # the connection keeps them
    logged = [r.getMessage() for r in caplog.records]
    assert any("HTTP Request" in m and "***@127.0.0.1" in m for m in logged), logged
    for text in (out[0].message, repr(t), *logged):
        assert "url-secret-42" not in text


def test_generate_works_inside_a_running_event_loop(server):
    async def main():
        return teacher(server).generate(["inside loop"], SamplingConfig(top_k=1))

    (seq,) = asyncio.run(main())
    assert_ok(seq, "inside loop", 1)


# ---------------------------------------------------------------------------------------------
# providers without logprobs
# ---------------------------------------------------------------------------------------------

def test_groq_style_teacher_is_baseline_only(server):
    t = teacher(server, provider="groq", logprobs=False, api_key_env="GROQ_API_KEY")
    with pytest.raises(LogprobsUnsupported, match="baseline"):
        t.check_kd()
    (seq,) = t.generate(["hello groq"])
    assert isinstance(seq, TeacherSequence) and seq.text == completion_text("hello groq")
    assert seq.tokens == [] and seq.topk_tokens == [] and seq.topk_logprobs == []
    body = server.requests[0]["body"]
    assert "logprobs" not in body and "top_logprobs" not in body


def test_anthropic_teacher_generates_text_and_refuses_kd(server):
    t = AnthropicTeacher(model="claude-test", base_url=server.url, max_retries=2)
    with pytest.raises(LogprobsUnsupported) as ei:
        t.check_kd()
    assert "anthropic/claude-test" in str(ei.value) and "log-probabilities" in str(ei.value)
    assert not t.supports_logprobs
    server.script("second", status(529, "Overloaded", headers=FAST, err_type="overloaded_error"))
    out = t.generate(["first", "second"], SamplingConfig(max_new_tokens=64))
    for seq, p in zip(out, ["first", "second"]):
        assert isinstance(seq, TeacherSequence) and seq.text == completion_text(p)
        assert seq.tokens == [] and seq.prompt_tokens == prompt_token_count(p)
    assert server.count("second") == 2
    assert server.requests[0]["path"] == "/v1/messages" and SECRET in server.requests[0]["auth"]
    assert t.completion_tokens_used == sum(len(completion_text(p).split()) for p in ["first", "second"])
    no_secret(repr(t), vars(t))
    assert SECRET.encode() not in pickle.dumps(t)


def test_anthropic_retry_after_wait_is_capped(server):
    t = AnthropicTeacher(model="claude-test", base_url=server.url, max_retries=1)
    t.max_retry_wait_s = 0.2  # (120 s by default) the SDK alone would sleep for a day here
    server.script("p", status(429, "later", headers={"Retry-After": "86400"}, err_type="rate_limit_error"))
    t0 = time.perf_counter()
    (seq,) = t.generate(["p"])
    assert isinstance(seq, TeacherSequence) and server.count("p") == 2
    assert time.perf_counter() - t0 < 3


def test_anthropic_auth_error_fails_fast(server):
    server.script("p", status(401, f"invalid x-api-key {SECRET}", err_type="authentication_error"))
    with pytest.raises(TeacherError) as ei:
        AnthropicTeacher(model="claude-test", base_url=server.url).generate(["p"])
    assert "anthropic" in str(ei.value) and "401" in str(ei.value)
    no_secret(str(ei.value))
    assert server.count() == 1


# ---------------------------------------------------------------------------------------------
# Gemini (optional extra)
# ---------------------------------------------------------------------------------------------

def test_gemini_missing_extra_has_a_clear_error(monkeypatch):
    from bitnet_kde.teachers import gemini_api

    monkeypatch.setitem(sys.modules, "google.genai", None)  # makes `from google import genai` fail
    with pytest.raises(TeacherError, match=r"pip install 'bitnet-kde\[gemini\]'"):
        gemini_api.GeminiTeacher(model="gemini-test")


@pytest.mark.skipif(not HAVE_GENAI, reason="google-genai (optional extra) not installed")
def test_gemini_teacher_against_server(server):
    from bitnet_kde.teachers.gemini_api import GeminiTeacher

    t = GeminiTeacher(model="gemini-test", base_url=server.url, max_retries=2, timeout_s=5)
    server.script("retry me", status(503, "unavailable", headers={"Retry-After": "0.2"}, err_type="UNAVAILABLE"))
    out = t.generate(["hi gem", "retry me"], SamplingConfig(top_k=4))
    for seq, p in zip(out, ["hi gem", "retry me"]):
        assert_ok(seq, p, 4)
        assert seq.token_ids is not None and len(seq.token_ids) == len(seq.tokens)
        assert seq.topk_ids is not None and seq.topk_ids[0][0] == seq.token_ids[0]
    assert server.count("retry me") == 2
    cfg = server.requests[0]["body"]["generationConfig"]
    assert cfg["responseLogprobs"] is True and cfg["logprobs"] == 4
    assert server.requests[0]["auth"] == SECRET
    no_secret(repr(t), vars(t))

    server.script("slow", sleep(1.5))
    (seq,) = GeminiTeacher(model="gemini-test", base_url=server.url, timeout_s=0.4).generate(
        ["slow"], SamplingConfig(top_k=2))
    assert_ok(seq, "slow", 2)
    assert server.count("slow") == 2

    server.script("lp", status(400, "Logprobs is not enabled for models/gemini-test", err_type="INVALID_ARGUMENT"))
    with pytest.raises(LogprobsUnsupported):
        t.generate(["lp"])
    server.script("auth", status(403, f"API key {SECRET} not valid", err_type="PERMISSION_DENIED"))
    with pytest.raises(TeacherError) as ei:
        t.generate(["auth"])
    assert "gemini" in str(ei.value) and "403" in str(ei.value)
    no_secret(str(ei.value))


# ---------------------------------------------------------------------------------------------
# Hydra configs
# ---------------------------------------------------------------------------------------------

API_CONFIGS = {
    "openai": (OpenAITeacher, True), "aimlapi": (OpenAITeacher, True), "deepseek": (OpenAITeacher, True),
    "vllm": (OpenAITeacher, True), "llamacpp": (OpenAITeacher, True), "ollama": (OpenAITeacher, True),
    "groq": (OpenAITeacher, False), "anthropic": (AnthropicTeacher, False), "gemini": (None, True),
}


@pytest.mark.parametrize("name", sorted(API_CONFIGS))
def test_teacher_configs_instantiate(name, monkeypatch):
    if name == "gemini" and not HAVE_GENAI:
        pytest.skip("google-genai (optional extra) not installed")
    monkeypatch.delenv("TEACHER_MODEL", raising=False)
    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    assert "returns logprobs" in text.lower()
    assert "sk-" not in text and "api_key:" not in text  # names of env vars only, never keys
    cfg = OmegaConf.load(path)
    t = instantiate(cfg)
    cls, logprobs = API_CONFIGS[name]
    if cls is not None:
        assert isinstance(t, cls)
    assert t.provider == name and t.supports_logprobs is logprobs
    assert t.model and t.api_key_env.endswith("_API_KEY")
    if name in ("vllm", "llamacpp", "ollama"):
        assert t.base_url.startswith("http://127.0.0.1:")
    if not logprobs:
        with pytest.raises(LogprobsUnsupported):
            t.check_kd()
    monkeypatch.setenv("TEACHER_MODEL", "override-model")
    assert instantiate(OmegaConf.load(path)).model == "override-model"
