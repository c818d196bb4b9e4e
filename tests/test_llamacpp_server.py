"""The OpenAI path against a real OpenAI-compatible server: llama-cpp-python's server running
the same SmolLM2 GGUF on 127.0.0.1, driven through the official `openai` SDK.

Needs the `server-tests` extra (llama-cpp-python[server], which compiles llama.cpp once; CI
installs it). Only the chat endpoint is used: its `top_logprobs` describe the generated tokens
directly, whereas `echo=True` prompt scores are shifted by one position for models without BOS.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from teacher_forcing import score_text

pytest.importorskip("llama_cpp", reason="install the server-tests extra: pip install -e '.[server-tests]'")

from bitnet_kde.kd import read_traces  # noqa: E402
from bitnet_kde.kd.collect import TraceCollector  # noqa: E402
from bitnet_kde.teachers import SamplingConfig, TeacherSequence  # noqa: E402
from bitnet_kde.teachers.local import LocalHFTeacher  # noqa: E402
from bitnet_kde.teachers.openai_api import OpenAITeacher  # noqa: E402
from bitnet_kde.tokenizer import smollm2_gguf  # noqa: E402

PROMPTS = ["What is the capital of Peru? Answer in one word.", "List three fruits.",
           "Write one sentence about the sea."]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder, name = smollm2_gguf()
    port = free_port()
    # The server logs a lot (model load, every request): a file, not a pipe nobody drains.
    log_path = tmp_path_factory.mktemp("llamacpp") / "server.log"
    log_file = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", f"{folder}/{name}",
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                             "--model_alias", "smollm2"],
                            stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited: {log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("llama_cpp.server did not come up in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log_file.close()


@pytest.fixture(scope="module")
def api_teacher(server):
    return OpenAITeacher(model="smollm2", provider="llamacpp", base_url=server, api_key_env="LLAMACPP_API_KEY",
                         max_concurrency=1, timeout_s=300)


def test_collect_through_the_openai_sdk_gives_valid_traces(api_teacher, tmp_path):
    rows = [{"id": f"p{i}", "prompt": p, "category": "qa", "split": "train"} for i, p in enumerate(PROMPTS)]
    col = TraceCollector(api_teacher, prompts={"source": rows}, chunk_size=3, progress=False,
                         sampling={"max_new_tokens": 16, "top_k": 5})
    col.write(tmp_path)
    table = read_traces(tmp_path, vocab_size=49152)
    assert table.num_rows == 3
    meta = table.schema.metadata
    assert meta[b"bitnet_kde.projection"] == b"strings"
    assert meta[b"bitnet_kde.logprob_mode"] == b"api_top_logprobs"
    for row in table.to_pylist():
        completion = len(row["input_ids"]) - row["completion_start"]
        assert sum(row["kd_valid"]) >= 0.8 * (completion - 1)


def test_server_distribution_matches_the_local_teacher_on_the_same_text(api_teacher):
    """Same GGUF, two engines: llama.cpp (native Q4_1 kernels) vs transformers (de-quantized)."""
    local = LocalHFTeacher.smollm2(batch_size=4)
    remote = [s for s in api_teacher.generate(PROMPTS, SamplingConfig(max_new_tokens=16, top_k=5))
              if isinstance(s, TeacherSequence)]
    assert len(remote) == 3
    scored = [score_text(local, s.prompt, s.text, 5) for s in remote]
    compared, agree, diffs = 0, 0, []
    for r, s in zip(remote, scored):
        n = min(len(r.tokens), len(s.tokens))
        if r.tokens[:n] != s.tokens[:n]:
            n = next(i for i in range(n) if r.tokens[i] != s.tokens[i])  # compare the aligned prefix
        for j in range(n):
            compared += 1
            agree += r.topk_tokens[j][0] == s.topk_tokens[j][0]
            diffs.append(abs(r.topk_logprobs[j][0] - s.topk_logprobs[j][0]))
    print(f"\nllama.cpp vs transformers: {compared} positions, top-1 agreement {agree / compared:.3f}, "
          f"mean |top-1 logprob diff| {sum(diffs) / len(diffs):.4f}, max {max(diffs):.4f}")
    assert compared >= 24
    assert agree / compared >= 0.9
    assert sum(diffs) / len(diffs) < 0.15 and all(math.isfinite(d) for d in diffs)
