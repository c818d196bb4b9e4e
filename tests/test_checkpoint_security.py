"""No code runs from a checkpoint: every checkpoint read refuses http(s) URLs and non-tensor pickles.

A malicious checkpoint is a pickle whose `__reduce__` creates a marker file when unpickled. It
is served from a 127.0.0.1 HTTP server and kept as a local file; `load_student`,
`scripts/export.py` and `train.py ckpt_path=` must fail with a clear message and the marker must
never appear. The processes run with `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`, which turns torch's
weights-only default off wherever a caller leaves `weights_only` unset: every read must set it.
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from bitnet_kde import storage
from bitnet_kde.checkpoint import load_student

from conftest import ROOT


class Payload:
    """Unpickling this calls `open(marker, "w")`: the file appears iff the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious(path: Path, marker: Path) -> Path:
    torch.save({"hyper_parameters": {"model": {"name": "tiny", "vocab_size": 64}}, "state_dict": {},
                "activation_bits": 8, "payload": Payload(marker)}, path)
    return path


@pytest.fixture
def served(tmp_path):
    """(URL of a malicious checkpoint on a 127.0.0.1 HTTP server, its marker, requests served)."""
    root = tmp_path / "www"
    root.mkdir()
    marker = tmp_path / "code-ran.marker"
    write_malicious(root / "x.ckpt", marker)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/x.ckpt", marker, requests
    finally:
        server.shutdown()
        server.server_close()


def test_the_payload_is_live(tmp_path):
    # guards the test itself: read unsafely, the file does run code
    marker = tmp_path / "m"
    torch.load(write_malicious(tmp_path / "x.ckpt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_load_student_refuses_http_urls(served, scheme):
    url, marker, requests = served
    url = url.replace("http://", f"{scheme}://", 1)
    with pytest.raises(storage.StorageError) as e:
        load_student(url)
    msg = str(e.value)
    assert "\n" not in msg and f"unsupported storage protocol {scheme!r}" in msg and "s3://" in msg
    assert not marker.exists() and requests == []


def test_load_student_refuses_a_local_malicious_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "code-ran.marker"
    ckpt = write_malicious(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError) as e:
        load_student(ckpt)
    msg = str(e.value)
    assert "\n" not in msg and "refused to load" in msg and "io.open" in msg
    assert not marker.exists()


UNSAFE_DEFAULT = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


def export(ckpt: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), ckpt, str(out), "--tokenizer", "none"],
                          capture_output=True, text=True, timeout=300, cwd=out.parent, env=UNSAFE_DEFAULT)


def test_export_script_refuses_url_and_malicious_file(served, tmp_path):
    url, marker, requests = served
    proc = export(url, tmp_path / "out")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "unsupported storage protocol 'http'" in proc.stderr
    local = write_malicious(tmp_path / "evil.ckpt", marker)
    proc = export(str(local), tmp_path / "out")
    assert proc.returncode != 0 and "refused to load" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and requests == []
    assert not (tmp_path / "out").exists()


def train(tmp_path: Path, ckpt: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), f"paths.root={tmp_path}", "data.num_workers=0", "experiment=smoke",
           "data.source.num_sequences=16", "trainer.max_steps=2", f"ckpt_path={ckpt}"]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=UNSAFE_DEFAULT)


def test_train_resume_refuses_url(served, tmp_path):
    url, marker, requests = served
    proc = train(tmp_path, url)
    assert proc.returncode != 0
    assert "unsupported storage protocol 'http'" in proc.stderr.strip().splitlines()[-1]
    assert not marker.exists() and requests == []
    assert not list(tmp_path.rglob("*.ckpt")) or all(p.parent.name == "www" for p in tmp_path.rglob("*.ckpt"))


def test_train_resume_reads_weights_only(tmp_path):
    marker = tmp_path / "code-ran.marker"
    ckpt = write_malicious(tmp_path / "evil.ckpt", marker)
    proc = train(tmp_path, str(ckpt))
    assert proc.returncode != 0
    assert "Weights only load failed" in proc.stderr
    assert not marker.exists()
