"""No API key is persisted: run collect -> train -> baseline against a real OpenAI-compatible
HTTP server on 127.0.0.1 with a fake key, then search every file the runs wrote for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from conftest import ROOT
from fault_server import FaultServer


def run(script: str, root, env, *overrides):
    proc = subprocess.run([sys.executable, str(ROOT / script), f"paths.root={root}", *overrides], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_fake_key_never_reaches_any_artefact(tmp_path):
    secret = f"sk-test-{uuid.uuid4().hex}"
    env = {**os.environ, "OPENAI_API_KEY": secret, "PYTHONUNBUFFERED": "1"}
    with FaultServer() as server:
        teacher = ["teacher=openai", f"teacher.base_url={server.openai_base_url}", "teacher.model=fake-model"]
        collection = ["collection.prompts.limit=12", "collection.chunk_size=6", "collection.progress=false"]
        outputs = [run("collect.py", tmp_path, env, *teacher, *collection)]
        outputs.append(run("train.py", tmp_path, env, *teacher, *collection, "data=smollm2", "model=tiny",
                           "trainer.max_steps=3", "trainer.val_check_interval=3", "data.num_workers=0",
                           "data.val_fraction=0.25"))
        outputs.append(run("teacher_baseline.py", tmp_path, env, *teacher, "prompts.limit=3"))
        assert server.requests and all(r["auth"] == f"Bearer {secret}" for r in server.requests), \
            "the runs must really have used the key"
    report = json.loads((tmp_path / "reports" / "teacher_baseline.json").read_text())
    assert report["summary"]["answered"] == 3 and report["summary"]["failed"] == 0
    assert report["summary"]["completion_tokens"] > 0 and report["summary"]["tokens_per_second"] > 0
    assert all(a["answer"] and a["latency_s"] > 0 for a in report["answers"])
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".parquet", ".json", ".yaml", ".ckpt", ".log"} <= kinds, kinds  # traces, manifest, configs, ckpts
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    leaks = [str(p.relative_to(tmp_path)) for p in files if secret.encode() in p.read_bytes()]
    assert leaks == []
    assert all(secret not in o.stdout + o.stderr for o in outputs)
