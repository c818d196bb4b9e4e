"""No secret is persisted: run collect -> train -> baseline against a real OpenAI-compatible HTTP
server with a fake API key, storing traces, checkpoints and reports on a real S3-protocol server
(moto) with fake storage credentials; then search every file the runs wrote, locally and in the
bucket, and everything they printed, for each secret."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

import pytest

from conftest import ROOT
from fault_server import FaultServer


def run(script: str, root, env, *overrides):
    proc = subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_fake_keys_never_reach_any_artefact(tmp_path):
    pytest.importorskip("s3fs")
    from storage_servers import moto_s3

    secrets = {"OPENAI_API_KEY": f"sk-test-{uuid.uuid4().hex}",
               "AWS_ACCESS_KEY_ID": f"AKIA{uuid.uuid4().hex[:16].upper()}",
               "AWS_SECRET_ACCESS_KEY": f"aws-secret-{uuid.uuid4().hex}"}
    bucket = f"secrets-{uuid.uuid4().hex[:8]}"
    with FaultServer() as server, moto_s3() as endpoint:
        env = {**os.environ, **secrets, "S3_ENDPOINT_URL": endpoint, "PYTHONUNBUFFERED": "1"}
        store = ["storage=s3", f"storage.bucket={bucket}"]
        teacher = ["teacher=openai", f"teacher.base_url={server.openai_base_url}", "teacher.model=fake-model"]
        collection = ["collection.prompts.limit=12", "collection.chunk_size=6", "collection.progress=false"]
        ensure = subprocess.run([sys.executable, "-m", "bitnet_kde.env", "ensure_dirs", *store], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=300)
        assert ensure.returncode == 0, ensure.stdout + ensure.stderr
        outputs = [ensure, run("collect.py", tmp_path, env, *store, *teacher, *collection)]
        outputs.append(run("train.py", tmp_path, env, *store, *teacher, *collection, "data=smollm2", "model=tiny",
                           "trainer.max_steps=3", "trainer.val_check_interval=3", "data.num_workers=0",
                           "data.val_fraction=0.25"))
        outputs.append(run("teacher_baseline.py", tmp_path, env, *store, *teacher, "prompts.limit=3"))
        assert server.requests and all(r["auth"] == f"Bearer {secrets['OPENAI_API_KEY']}" for r in server.requests), \
            "the runs must really have used the key"

        import s3fs

        fs = s3fs.S3FileSystem(key=secrets["AWS_ACCESS_KEY_ID"], secret=secrets["AWS_SECRET_ACCESS_KEY"],
                               endpoint_url=endpoint, skip_instance_cache=True)
        remote = {p: fs.cat_file(p) for p in fs.find(bucket)}
    report = json.loads(remote[f"{bucket}/bitnet-kde/reports/teacher_baseline.json"])
    assert report["summary"]["answered"] == 3 and report["summary"]["failed"] == 0
    assert report["summary"]["completion_tokens"] > 0 and report["summary"]["tokens_per_second"] > 0
    assert all(a["answer"] and a["latency_s"] > 0 for a in report["answers"])
    local = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    files = {**local, **remote}
    kinds = {os.path.splitext(name)[1] for name in files}
    assert {".parquet", ".json", ".yaml", ".ckpt", ".log"} <= kinds, kinds  # traces, manifest, configs, ckpts
    assert any(".ckpt" in name for name in remote) and any(".parquet" in name for name in remote)
    assert any(os.path.basename(n).startswith("events.out.tfevents") for n in local)  # TensorBoard stays local
    assert not any(name.endswith((".ckpt", ".parquet")) for name in local)  # the rest went to the store
    for name, secret in secrets.items():
        leaks = [f for f, data in files.items() if secret.encode() in data]
        assert leaks == [], f"{name} found in {leaks}"
        assert all(secret not in o.stdout + o.stderr for o in outputs), f"{name} printed"


@pytest.mark.slow
def test_credentials_inside_a_teacher_url_never_reach_any_artefact(tmp_path):
    """`VLLM_BASE_URL=http://user:secret@host/v1`: the run uses the URL, but no file it writes (traces,
    manifest, Hydra configs, logs) and nothing it prints holds the userinfo."""
    secret = f"url-secret-{uuid.uuid4().hex}"
    with FaultServer() as server:
        url = server.openai_base_url.replace("http://", f"http://alice:{secret}@")
        env = {**os.environ, "VLLM_BASE_URL": url, "PYTHONUNBUFFERED": "1"}
        env.pop("TEACHER_PROVIDER", None)
        proc = run("collect.py", tmp_path, env, "teacher=vllm", "teacher.model=fake-model", f"paths.root={tmp_path}",
                   "collection.prompts.limit=4", "collection.chunk_size=2", "collection.progress=false")
        assert server.requests, "the run must really have used the URL"
    files = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert any(name.endswith("manifest.json") for name in files) and any(name.endswith(".log") for name in files)
    assert b"HTTP Request" in b"".join(data for name, data in files.items() if name.endswith(".log"))
    leaks = [name for name, data in files.items() if secret.encode() in data]
    assert leaks == [], f"URL credentials found in {leaks}"
    assert secret not in proc.stdout + proc.stderr
    userinfo = re.compile(rb"[a-z][a-z0-9+.-]*://[^/\s@*]+:[^/\s@]+@")  # any URL still carrying user:password
    assert [name for name, data in files.items() if userinfo.search(data)] == []
