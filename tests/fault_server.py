"""A real HTTP server on 127.0.0.1 that speaks enough of three LLM APIs to test the API teachers.

Endpoints (POST, JSON):

* OpenAI chat completions: `/v1/chat/completions` (message text, `logprobs.content[]` with
  `token`, `logprob`, `bytes`, `top_logprobs[]`, `usage`);
* Anthropic messages: `/v1/messages`;
* Gemini: `/{version}/models/{model}:generateContent` (with `logprobsResult`).

Behaviour is scripted per prompt (the last user message): `server.script(prompt, a1, a2, ...)`
makes the n-th request for that prompt perform action n; once the script is used up (or for an
unscripted prompt) the request succeeds, unless a `FaultPlan` is given: it then draws, from a
seed and the prompt alone, the faults of every unscripted prompt (the soak benchmark). Every request is recorded (`server.requests`) and the
server tracks the most requests it ever had in flight at once (`server.max_inflight`).
`latency_s` delays every successful answer (throughput benchmarks, concurrency tests).

This is a real socket server run in a daemon thread, not a mock transport: the SDKs' own HTTP
stacks, timeouts and retry loops are exercised as they are in production.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar


@dataclass
class Action:
    kind: str  # ok | status | sleep | malformed | text_body | no_logprobs | no_choices | drop | truncated
    #            | empty_logprobs | mismatch | bad_logprob
    status: int = 200
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    err_type: str | None = None
    code: str | None = None
    param: str | None = None
    seconds: float = 0.0
    value: Any = None


def ok() -> Action:
    return Action("ok")


def status(code: int, message: str = "scripted error", headers: dict[str, str] | None = None,
           err_type: str | None = None, err_code: str | None = None, param: str | None = None) -> Action:
    return Action("status", status=code, message=message, headers=dict(headers or {}), err_type=err_type,
                  code=err_code, param=param)


def sleep(seconds: float) -> Action:
    """Answer (successfully) only after `seconds`: longer than the client timeout -> timeout."""
    return Action("sleep", seconds=seconds)


def malformed() -> Action:
    """200 with `Content-Type: application/json` but a body that is not JSON."""
    return Action("malformed")


def text_body() -> Action:
    """200 with a text/plain body."""
    return Action("text_body")


def no_logprobs() -> Action:
    """A well-formed completion whose `logprobs` is null."""
    return Action("no_logprobs")


def no_choices() -> Action:
    """A well-formed JSON completion with an empty `choices` list."""
    return Action("no_choices")


def drop() -> Action:
    """Read the request, then close the connection without a word."""
    return Action("drop")


def truncated() -> Action:
    """A 200 whose body stops half way (Content-Length promises more), then the connection closes."""
    return Action("truncated")


def empty_logprobs() -> Action:
    """A completion with text but `logprobs.content: []`."""
    return Action("empty_logprobs")


def mismatch() -> Action:
    """A completion whose `logprobs.content` tokens spell other text than `message.content`."""
    return Action("mismatch")


MISSING = object()


def bad_logprob(value: Any) -> Action:
    """A completion whose second candidate at the first position has logprob `value` (NaN, a
    positive number, or `MISSING`: no `logprob` key)."""
    return Action("bad_logprob", value=value)


CHOSEN_LOGPROB = -0.1


def completion_tokens(prompt: str, max_tokens: int | None = None) -> list[str]:
    """The deterministic completion the server gives for `prompt`, as tokens."""
    words = f"Answer to {prompt}".split()
    toks = [w if i == 0 else " " + w for i, w in enumerate(words)]
    return toks[:max_tokens] if max_tokens is not None else toks


def completion_text(prompt: str, max_tokens: int | None = None) -> str:
    return "".join(completion_tokens(prompt, max_tokens))


def prompt_token_count(prompt: str) -> int:
    return len(prompt.split()) + 3


def candidates(tok: str, k: int) -> list[tuple[str, float]]:
    """The chosen token first, then `alt{i}` alternatives with decreasing logprobs (Σp < 1)."""
    if k <= 0:
        return []
    return [(tok, CHOSEN_LOGPROB)] + [(f" alt{i}", -3.0 - i) for i in range(k - 1)]


@dataclass
class FaultPlan:
    """A seeded mix of faults for unscripted prompts. One draw per prompt (from `seed` and the prompt
    alone, so a client that is killed and resumed meets the same plan) picks its fault, if any,
    and whether the fault hits every attempt (`persistent`) or the first attempt only; malformed
    bodies are never retried by a client, so they always persist. `outcome(prompt)` is the failure
    reason a correct client must end with (None: the prompt must end as a row)."""

    seed: int = 0
    server_error: float = 0.10
    rate_limited: float = 0.05
    dropped: float = 0.02
    malformed: float = 0.01
    persistent: float = 0.5
    retry_after_s: float = 0.05

    REASONS: ClassVar[dict[str, str]] = {"server_error": "server_error", "rate_limited": "rate_limited", "dropped": "connection_error",
               "malformed": "malformed_response"}

    def draw(self, prompt: str) -> tuple[str | None, bool]:
        rng = random.Random(f"{self.seed}:{prompt}")
        u, persistent = rng.random(), rng.random() < self.persistent
        for kind in self.REASONS:
            p = getattr(self, kind)
            if u < p:
                return kind, persistent or kind == "malformed"
            u -= p
        return None, False

    def action(self, kind: str, prompt: str) -> Action:
        wait = {"Retry-After": f"{self.retry_after_s:g}"}
        if kind == "server_error":
            code = random.Random(f"{self.seed}:{prompt}:code").choice([500, 502, 503])
            return status(code, "injected server error", headers=wait, err_type="server_error")
        if kind == "rate_limited":
            return status(429, "injected rate limit", headers=wait, err_type="rate_limit_error")
        return drop() if kind == "dropped" else malformed()

    def outcome(self, prompt: str) -> str | None:
        kind, persistent = self.draw(prompt)
        return self.REASONS[kind] if kind and persistent else None


class FaultServer:
    def __init__(self, latency_s: float = 0.0, plan: FaultPlan | None = None) -> None:
        self.latency_s = latency_s
        self.plan = plan
        self.injected: Counter[str] = Counter()
        """Fault answers sent by the plan, by kind."""
        self._attempts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._scripts: dict[str, list[Action]] = {}
        self.requests: list[dict[str, Any]] = []
        self.inflight = 0
        self.max_inflight = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control --------------------------------------------------------------------------------
    def script(self, prompt: str, *actions: Action) -> None:
        with self._lock:
            self._scripts.setdefault(prompt, []).extend(actions)

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self.requests.clear()
            self.injected.clear()
            self._attempts.clear()
            self.inflight = 0
            self.max_inflight = 0

    def count(self, prompt: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if prompt is None or r["prompt"] == prompt)

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> FaultServer:
        server = self

        class Handler(_Handler):
            fault = server

        httpd = _QuietServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        httpd.daemon_threads = True
        httpd.request_queue_size = 256  # a burst of concurrent connects must not overflow the backlog
        httpd.allow_reuse_address = True
        httpd.server_bind()
        httpd.server_activate()
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by the handler ------------------------------------------------------------------
    def _next_action(self, prompt: str) -> Action:
        with self._lock:
            queue = self._scripts.get(prompt)
            if queue:
                return queue.pop(0)
            attempt = self._attempts[prompt]
            self._attempts[prompt] += 1
            kind, persistent = self.plan.draw(prompt) if self.plan else (None, False)
            if kind is None or not (persistent or attempt == 0):
                return ok()
            self.injected[kind] += 1
            return self.plan.action(kind, prompt)

    def _enter(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(record)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)

    def _leave(self) -> None:
        with self._lock:
            self.inflight -= 1


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that timed out / closed its keep-alive connection: expected here
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes: without TCP_NODELAY, Nagle + the client's
    # delayed ACK add ~40 ms to every answer
    disable_nagle_algorithm = True
    fault: FaultServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None, complete: bool = True) -> None:
        """Send an answer; `complete=False` leaves the Content-Length to `headers` (a cut-off body)."""
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            if complete:
                self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True  # the client gave up (timeout): nothing to answer

    def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(obj).encode(), headers=headers)

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/_stats":  # for a server run in another process
            srv = self.fault
            with srv._lock:
                injected = dict(srv.injected)
            self._json(200, {"requests": srv.count(), "max_inflight": srv.max_inflight, "injected": injected})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.split("?")[0] == "/_reset":
            self.fault.reset()
            self._json(200, {"ok": True})
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._json(400, {"error": {"message": "request body is not JSON"}})
            return
        path = self.path.split("?")[0]
        if path.endswith("/chat/completions"):
            api = "openai"
            prompt = _last_user_text(body.get("messages") or [])
        elif path.endswith("/messages"):
            api = "anthropic"
            prompt = _last_user_text(body.get("messages") or [])
        elif path.endswith(":generateContent"):
            api = "gemini"
            prompt = _gemini_prompt(body)
        else:
            self._json(404, {"error": {"message": f"no route {path}"}})
            return
        auth = (self.headers.get("Authorization") or self.headers.get("x-api-key")
                or self.headers.get("x-goog-api-key"))
        record = {"api": api, "path": path, "prompt": prompt, "body": body, "auth": auth, "t": time.time()}
        srv = self.fault
        srv._enter(record)
        try:
            action = srv._next_action(prompt)
            if action.kind == "sleep":
                time.sleep(action.seconds)
            elif action.kind == "status":
                self._error(api, action)
                return
            elif action.kind == "malformed":
                self._send(200, b'{"id": "chatcmpl-x", "choices": [ {"message": ', "application/json")
                return
            elif action.kind == "text_body":
                self._send(200, b"upstream proxy says hello", "text/plain")
                return
            elif action.kind == "drop":
                self.close_connection = True
                return
            elif action.kind == "truncated":
                body = json.dumps(_openai_response(body, prompt, action)).encode()
                self._send(200, body[: len(body) // 2], headers={"Content-Length": str(len(body))},
                           complete=False)
                self.close_connection = True
                return
            if srv.latency_s:
                time.sleep(srv.latency_s)
            if api == "openai":
                self._json(200, _openai_response(body, prompt, action))
            elif api == "anthropic":
                self._json(200, _anthropic_response(body, prompt))
            else:
                self._json(200, _gemini_response(body, prompt, action, path))
        finally:
            srv._leave()

    def _error(self, api: str, a: Action) -> None:
        if api == "anthropic":
            body = {"type": "error", "error": {"type": a.err_type or "api_error", "message": a.message}}
        elif api == "gemini":
            body = {"error": {"code": a.status, "message": a.message, "status": a.err_type or "UNKNOWN"}}
        else:
            body = {"error": {"message": a.message, "type": a.err_type or "invalid_request_error",
                              "param": a.param, "code": a.code}}
        self._json(a.status, body, headers=a.headers)


# -- response bodies ----------------------------------------------------------------------------

def _last_user_text(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):  # content blocks
                return "".join(b.get("text", "") for b in c if isinstance(b, dict))
            return str(c)
    return ""


def _gemini_prompt(body: dict) -> str:
    contents = body.get("contents") or []
    if isinstance(contents, dict):
        contents = [contents]
    texts = []
    for c in contents:
        for p in c.get("parts") or []:
            if "text" in p:
                texts.append(p["text"])
    return "".join(texts)


def _openai_response(req: dict, prompt: str, action: Action) -> dict:
    max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
    toks = completion_tokens(prompt, max_tokens)
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": "".join(toks)}, "logprobs": None}
    if req.get("logprobs") and action.kind != "no_logprobs":
        k = int(req.get("top_logprobs") or 0)
        spelled = [t.upper() for t in toks] if action.kind == "mismatch" else toks
        content = [
            {"token": t, "logprob": CHOSEN_LOGPROB, "bytes": list(t.encode()),
             "top_logprobs": [{"token": c, "logprob": lp, "bytes": list(c.encode())} for c, lp in candidates(t, k)]}
            for t in spelled]
        if action.kind == "bad_logprob":
            cand = content[0]["top_logprobs"][1]
            if action.value is MISSING:
                del cand["logprob"]
            else:
                cand["logprob"] = action.value
        choice["logprobs"] = {"content": [] if action.kind == "empty_logprobs" else content, "refusal": None}
    return {"id": "chatcmpl-fault", "object": "chat.completion", "created": int(time.time()),
            "model": req.get("model", "fake"),
            "choices": [] if action.kind == "no_choices" else [choice],
            "usage": {"prompt_tokens": prompt_token_count(prompt), "completion_tokens": len(toks),
                      "total_tokens": prompt_token_count(prompt) + len(toks)}}


def _anthropic_response(req: dict, prompt: str) -> dict:
    toks = completion_tokens(prompt, req.get("max_tokens"))
    return {"id": "msg_fault", "type": "message", "role": "assistant", "model": req.get("model", "fake"),
            "content": [{"type": "text", "text": "".join(toks)}], "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_token_count(prompt), "output_tokens": len(toks)}}


def _gemini_response(req: dict, prompt: str, action: Action, path: str) -> dict:
    cfg = req.get("generationConfig") or {}
    toks = completion_tokens(prompt, cfg.get("maxOutputTokens"))
    cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": "".join(toks)}]},
                            "finishReason": "STOP", "index": 0}
    if cfg.get("responseLogprobs") and action.kind != "no_logprobs":
        k = int(cfg.get("logprobs") or 0)
        tid = lambda s: sum(s.encode()) % 1000
        cand["logprobsResult"] = {
            "chosenCandidates": [{"token": t, "logProbability": CHOSEN_LOGPROB, "tokenId": tid(t)} for t in toks],
            "topCandidates": [{"candidates": [{"token": c, "logProbability": lp, "tokenId": tid(c)}
                                              for c, lp in candidates(t, k)]} for t in toks]}
    return {"candidates": [] if action.kind == "no_choices" else [cand],
            "usageMetadata": {"promptTokenCount": prompt_token_count(prompt), "candidatesTokenCount": len(toks),
                              "totalTokenCount": prompt_token_count(prompt) + len(toks)},
            "modelVersion": path.rsplit("/", 1)[-1].split(":")[0]}


def mass(logprobs: list[float]) -> float:
    return sum(math.exp(x) for x in logprobs)


def serve_in_subprocess(latency_s: float = 0.0, plan: FaultPlan | None = None):
    """Start a FaultServer in a child process (no GIL shared with the client under test; it
    outlives a client that is killed).

    Returns `(url, process)`; stats via `GET {url}/_stats`, reset via `POST {url}/_reset`;
    stop with `process.terminate()`.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child_main, args=(latency_s, plan, child), daemon=True)
    proc.start()
    if not parent.poll(30):
        proc.terminate()
        raise RuntimeError("fault server process did not start")
    return parent.recv(), proc


def _child_main(latency_s: float, plan: FaultPlan | None, conn) -> None:
    srv = FaultServer(latency_s=latency_s, plan=plan).start()
    conn.send(srv.url)
    while True:
        time.sleep(3600)
