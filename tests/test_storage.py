"""Storage backends for real: S3 (moto), GCS (gcp-storage-emulator), Azure Blob (Azurite) and
WebDAV (wsgidav) servers on 127.0.0.1, the local disk, atomic writes under kill -9, checkpoints
and resume on every object store, and clear errors before any work starts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from bitnet_kde import storage
from bitnet_kde.kd import list_shards, read_traces
from bitnet_kde.kd.synthetic import BigramTraceSource
from conftest import ROOT
from storage_servers import (S3_KEY_ID, azurite, azurite_binary, free_port, gcs_emulator, moto_s3, unavailable,
                             webdav_server)

pytest.importorskip("s3fs")
pytest.importorskip("webdav4")

S3_SECRET = f"s3-secret-{uuid.uuid4().hex}"
DAV_USER, DAV_PASSWORD = "alice", f"dav-pass-{uuid.uuid4().hex}"


def teacher(**kw) -> BigramTraceSource:
    return BigramTraceSource(**{"vocab_size": 64, "k": 8, "num_sequences": 40, "completion_len": (8, 16),
                            "shard_rows": 16, **kw})


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3() as url:
        yield url


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """The variables a user puts in .env for an S3-compatible store; returns a fresh bucket name."""
    env = {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "S3_ENDPOINT_URL": s3_endpoint,
           "AWS_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return f"bk-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def gcs_endpoint():
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    with gcs_emulator() as url:
        yield url


@pytest.fixture
def gcs_env(gcs_endpoint, monkeypatch):
    """The variables for a GCS endpoint that takes no credentials (an emulator); returns a fresh bucket name."""
    for k, v in {"GOOGLE_APPLICATION_CREDENTIALS": "anon", "STORAGE_EMULATOR_HOST": gcs_endpoint,
                 "GOOGLE_CLOUD_PROJECT": "bitnet-kde-test"}.items():
        monkeypatch.setenv(k, v)
    return f"bk-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def azurite_connection(tmp_path_factory):
    pytest.importorskip("adlfs")
    if azurite_binary()[0] is None:
        unavailable(azurite_binary()[1])
    with azurite(tmp_path_factory.mktemp("azurite")) as conn:
        yield conn


@pytest.fixture
def azure_env(azurite_connection, monkeypatch):
    """AZURE_STORAGE_CONNECTION_STRING for the Azurite account; returns a fresh container name."""
    for var in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_connection)
    return f"bk-{uuid.uuid4().hex[:12]}"


OBJECT_STORES = {"s3": ("s3", "s3_env"), "gcs": ("gs", "gcs_env"), "azure": ("az", "azure_env")}
"""backend -> (URL scheme, the fixture that sets its variables and names a fresh bucket)."""


@pytest.fixture(params=sorted(OBJECT_STORES))
def bucket(request) -> str:
    """`<scheme>://<fresh bucket>` on each object store in turn (not created yet)."""
    scheme, fixture = OBJECT_STORES[request.param]
    return f"{scheme}://{request.getfixturevalue(fixture)}"


def stored_secrets() -> list[str]:
    """Every credential value the stores' variables hold in this test."""
    return [v for b in storage.BACKENDS.values() for opt, v in storage._env_values(b).items()
            if opt in b.secret or opt == "connection_string"]


def assert_no_secret_in_objects(url: str) -> None:
    """Read back every object under `url` and search its bytes for every credential value."""
    fs, path = storage.resolve(url)
    fs.invalidate_cache()
    secrets = [s.encode() for s in stored_secrets()]
    for name in fs.find(path):
        body = fs.cat_file(name)
        assert not any(s in body for s in secrets), name


@pytest.fixture
def dav(tmp_path, monkeypatch):
    """A WebDAV server serving tmp_path/dav; returns that folder (what the server stores)."""
    served = tmp_path / "dav"
    served.mkdir()
    with webdav_server(served, DAV_USER, DAV_PASSWORD) as url:
        for k, v in {"WEBDAV_URL": url, "WEBDAV_USERNAME": DAV_USER, "WEBDAV_PASSWORD": DAV_PASSWORD}.items():
            monkeypatch.setenv(k, v)
        yield served


# ------------------------------------------------------------------------------------ helpers


def test_local_and_file_urls_write_atomically_and_read_back(tmp_path):
    out = storage.write_json_atomic(f"file://{tmp_path}/reports/r.json", {"a": [1, 2], "é": "ü"})
    assert out == tmp_path / "reports" / "r.json"
    assert storage.read_json(tmp_path / "reports" / "r.json") == {"a": [1, 2], "é": "ü"}
    assert os.listdir(tmp_path / "reports") == ["r.json"]  # no temporary file left behind
    storage.write_json_atomic(out, {"b": 1})
    assert json.loads(out.read_text()) == {"b": 1}
    assert storage.join("s3://b/p/", "data", "x.parquet") == "s3://b/p/data/x.parquet"
    assert storage.join(str(tmp_path), "data") == tmp_path / "data"


def test_failed_write_keeps_the_old_object_on_every_backend(tmp_path, bucket, dav):
    storage.makedirs(bucket)
    for url in (tmp_path / "local" / "r.json", f"{bucket}/p/r.json", "webdav://p/r.json"):
        storage.write_json_atomic(url, {"v": 1})
        with pytest.raises(RuntimeError, match="boom"):
            with storage.open_atomic(url) as f:
                f.write(b'{"v": 2, "half')
                raise RuntimeError("boom")
        assert storage.read_json(url) == {"v": 1}, url
        fs, path = storage.resolve(url)
        parent = path.rsplit("/", 1)[0]
        fs.invalidate_cache(parent)
        assert [p.rsplit("/", 1)[-1] for p in fs.ls(parent, detail=False)] == ["r.json"], url


def test_unknown_protocol_and_missing_variables_name_what_to_set(monkeypatch):
    with pytest.raises(storage.StorageError, match="unsupported storage protocol 'ftp'"):
        storage.resolve("ftp://host/x")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WEBDAV_URL", "WEBDAV_USERNAME", "WEBDAV_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(storage.StorageError, match="'s3'.*AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"):
        storage.resolve("s3://bucket/x")
    with pytest.raises(storage.StorageError, match="'webdav'.*WEBDAV_URL, WEBDAV_USERNAME, WEBDAV_PASSWORD"):
        storage.exists("webdav://x")
    # a storage config may rename the variables it reads; messages follow the names
    storage.configure({"backend": "s3", "env": {"key": "MINIO_USER", "secret": "MINIO_PASSWORD"}})
    try:
        with pytest.raises(storage.StorageError, match="MINIO_USER, MINIO_PASSWORD"):
            storage.resolve("s3://bucket/x")
    finally:
        storage._env_names.clear()


def test_local_check_names_what_the_path_is(tmp_path):
    """A report file is checked through its folder (it is replaced via a temporary file beside it)."""
    report = tmp_path / "reports" / "summary.json"
    assert storage.check_store(str(tmp_path)) == f"local folder {tmp_path} (writable)"
    assert storage.check_store(str(report)) == f"local path, to be created, {report} (writable)"
    report.parent.mkdir()
    report.write_text("{}")
    assert storage.check_store(str(report)) == f"local file {report} (writable)"


# ------------------------------------------------------------------------------------ S3 and WebDAV


def test_traces_round_trip_through_object_stores(bucket, tmp_path):
    url = f"{bucket}/prefix/data/syn"
    name = bucket.split("://", 1)[1]
    with pytest.raises(storage.StorageError, match=f"bucket or folder '{name}' does not exist"):
        storage.check_store(url)
    storage.makedirs(bucket)
    assert "reachable" in storage.check_store(url)
    t = teacher()
    assert not t.is_complete(url)
    shards = t.write(url)
    assert shards == list_shards(url) and all(s.startswith(url + "/kd-") for s in shards) and len(shards) == 3
    assert t.is_complete(url) and not teacher(seed=1).is_complete(url)
    remote = read_traces(url, vocab_size=64)
    t.write(tmp_path)
    assert remote.equals(read_traces(tmp_path, vocab_size=64))
    manifest = storage.read_json(f"{url}/manifest.json")
    assert manifest["rows"] == 40 and [s["file"] for s in manifest["shards"]] == [s.rsplit("/", 1)[1] for s in shards]
    storage.write_json_atomic(f"{bucket}/prefix/reports/evaluation.json", {"kl": 0.5})
    assert storage.read_json(f"{bucket}/prefix/reports/evaluation.json") == {"kl": 0.5}
    fs, path = storage.resolve(bucket)
    fs.invalidate_cache()
    assert sorted(o.split("/", 1)[1] for o in fs.find(path)) == sorted(
        [f"prefix/data/syn/{storage.name_of(s)}" for s in shards]
        + ["prefix/data/syn/manifest.json", "prefix/reports/evaluation.json"])  # no temporary key left
    assert_no_secret_in_objects(bucket)


@pytest.mark.parametrize("backend", ["gcs", "azure"])
def test_gcs_and_azure_errors_name_what_to_fix(backend, request, monkeypatch):
    scheme, fixture = OBJECT_STORES[backend]
    url = f"{scheme}://{request.getfixturevalue(fixture)}/p"
    if backend == "gcs":
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
        with pytest.raises(storage.StorageError, match="'gcs'.*GOOGLE_APPLICATION_CREDENTIALS names a file that does not exist"):
            storage.check_store(url)
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
        with pytest.raises(storage.StorageError, match="'gcs'.*missing environment variable.*GOOGLE_APPLICATION_CREDENTIALS"):
            storage.check_store(url)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "anon")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
        expect = ["STORAGE_EMULATOR_HOST"]
    else:
        conn = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
        key = conn.split("AccountKey=", 1)[1].split(";", 1)[0]
        monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
        with pytest.raises(storage.StorageError, match="'azure'.*AZURE_STORAGE_ACCOUNT_NAME or AZURE_STORAGE_CONNECTION_STRING"):
            storage.check_store(url)
        wrong = conn.replace(key, "A" * len(key))
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", wrong)
        with pytest.raises(storage.StorageError) as e:
            storage.check_store(url)
        assert "refused the credentials" in str(e.value) and "AZURE_STORAGE_CONNECTION_STRING" in str(e.value)
        assert key not in str(e.value) and "A" * len(key) not in str(e.value)
        port = free_port()
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", re.sub(r"127\.0\.0\.1:\d+/", f"127.0.0.1:{port}/", conn))
        expect = [f"http://127.0.0.1:{port}/", "AZURE_STORAGE_CONNECTION_STRING"]
    t0 = time.perf_counter()
    with pytest.raises(storage.StorageError, match=f"'{backend}'.*no answer within 2 s") as e:
        storage.check_store(url, timeout_s=2)
    assert all(x in str(e.value) for x in expect) and time.perf_counter() - t0 < 10


def test_traces_and_reports_round_trip_through_webdav(dav, tmp_path):
    url = "webdav://proj/data/syn"
    assert "webdav store" in storage.check_store(url)
    t = teacher()
    shards = t.write(url)
    assert t.is_complete(url) and list_shards(url) == shards
    table = read_traces(url, vocab_size=64)
    t.write(tmp_path)
    assert table.equals(read_traces(tmp_path, vocab_size=64))
    # the server stored exactly the shards and the manifest: no temporary names left behind
    assert sorted(p.name for p in (dav / "proj" / "data" / "syn").iterdir()) == \
        sorted([s.rsplit("/", 1)[1] for s in shards] + ["manifest.json"])
    storage.write_json_atomic("webdav://proj/reports/baseline.json", {"ok": True})
    assert json.loads((dav / "proj" / "reports" / "baseline.json").read_text()) == {"ok": True}


def test_webdav_wrong_password_is_a_credentials_error(dav, monkeypatch):
    monkeypatch.setenv("WEBDAV_PASSWORD", "wrong-password")
    with pytest.raises(storage.StorageError) as e:
        storage.check_store("webdav://proj")
    msg = str(e.value)
    assert "'webdav'" in msg and "refused the credentials" in msg and "WEBDAV_PASSWORD" in msg
    assert "wrong-password" not in msg and DAV_PASSWORD not in msg


# ------------------------------------------------------------------------------------ kill -9 mid-shard

KILLED_WRITER = r"""
import io, sys, time
import pyarrow.parquet as pq
from bitnet_kde.kd.synthetic import BigramTraceSource

real, calls = pq.write_table, []

def half_then_hang(table, where, *a, **kw):
    calls.append(1)
    if len(calls) == 2:  # the second shard: write half of its bytes, then wait to be killed
        buf = io.BytesIO()
        real(table, buf, *a, **kw)
        where.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        where.flush()
        print("HALF", flush=True)
        time.sleep(600)
    return real(table, where, *a, **kw)

pq.write_table = half_then_hang
BigramTraceSource(vocab_size=64, k=8, num_sequences=40, completion_len=(8, 16), shard_rows=16).write(sys.argv[1])
"""


@pytest.mark.parametrize("backend", ["local", "s3", "gcs", "azure", "webdav"])
def test_writer_killed_mid_shard_leaves_nothing_a_reader_accepts(backend, tmp_path, request):
    if backend in OBJECT_STORES:
        scheme, fixture = OBJECT_STORES[backend]
        bucket = f"{scheme}://{request.getfixturevalue(fixture)}"
        storage.makedirs(bucket)
        url = f"{bucket}/traces"
    elif backend == "webdav":
        request.getfixturevalue("dav")
        url = "webdav://traces"
    else:
        url = str(tmp_path / "traces")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, url], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "HALF", "the writer must reach the middle of shard 2"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    t = teacher()
    assert not t.is_complete(url)
    visible = [storage.name_of(s) for s in list_shards(url)]
    assert visible == [f"kd-{t.trace_set_id}-00000.parquet"]  # shard 1 never got its name
    assert read_traces(list_shards(url), vocab_size=64).num_rows == 16  # what is visible is whole
    if backend == "local":  # the object stores' and webdav4's clients buffer a small upload until close
        fs, path = storage.resolve(url)
        fs.invalidate_cache(path)
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        assert any(n.startswith(".kd-") and n.endswith(".tmp") for n in names), names  # the half shard
    t.write(url)  # the rerun completes the set
    assert t.is_complete(url) and read_traces(url, vocab_size=64).num_rows == 40


# ------------------------------------------------------------------------------------ entry points


def run_entry(args: list[str], cwd, env: dict, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=timeout)


BLOCK_S3FS = "import runpy, sys; sys.modules['s3fs'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


@pytest.mark.parametrize("case", ["missing_key", "unreachable", "missing_extra", "no_bucket"])
def test_train_stops_before_any_work_with_a_clear_storage_error(case, tmp_path, s3_env):
    env = {"OMP_NUM_THREADS": "1"}
    bucket = [] if case == "no_bucket" else [f"storage.bucket={s3_env}"]
    train = [str(ROOT / "train.py"), "storage=s3", *bucket, "experiment=smoke", "trainer.max_steps=2"]
    expect = {"missing_key": ["'s3'", "AWS_SECRET_ACCESS_KEY", ".env"],
              "unreachable": ["'s3'", "cannot use", "S3_ENDPOINT_URL"],
              "missing_extra": ["'s3'", "s3fs", "pip install 'bitnet-kde[s3]'"],
              "no_bucket": ["'s3'", "no bucket", "storage.bucket"]}[case]
    if case == "missing_key":
        env["AWS_SECRET_ACCESS_KEY"] = ""
    elif case == "unreachable":
        env["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    elif case == "missing_extra":
        train = ["-c", BLOCK_S3FS, *train]
    env["S3_BUCKET"] = ""
    t0 = time.perf_counter()
    proc = run_entry(train, tmp_path, env)
    assert proc.returncode != 0
    err = proc.stderr
    assert all(e in err for e in expect), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert S3_SECRET not in proc.stdout + err
    assert not (tmp_path / "data").exists() and not list(tmp_path.rglob("*.ckpt"))  # nothing started
    assert time.perf_counter() - t0 < 120


def test_check_env_lists_missing_variables_masks_values_and_checks_reachability(tmp_path, s3_env):
    args = ["-m", "bitnet_kde.env", "check", "storage=s3", f"storage.bucket={s3_env}", "teacher=openai"]
    fake_key = f"sk-fake-{uuid.uuid4().hex}"
    proc = run_entry(args, tmp_path, {"OPENAI_API_KEY": "", "AWS_SECRET_ACCESS_KEY": ""})
    assert proc.returncode == 1
    out = proc.stdout
    assert "OPENAI_API_KEY is not set" in out and "storage s3: AWS_SECRET_ACCESS_KEY is not set" in out
    assert "AWS_ACCESS_KEY_ID                set (value hidden)" in out and S3_KEY_ID not in out
    # with no bucket configured at all, the list also says which variable names it
    proc = run_entry(["-m", "bitnet_kde.env", "check", "storage=s3"], tmp_path,
                     {"AWS_SECRET_ACCESS_KEY": "", "S3_BUCKET": ""})
    assert proc.returncode == 1
    assert "AWS_SECRET_ACCESS_KEY is not set" in proc.stdout and "set S3_BUCKET in .env" in proc.stdout

    proc = run_entry(args, tmp_path, {"OPENAI_API_KEY": fake_key})  # all set, but the bucket is missing
    assert proc.returncode == 1 and "does not exist" in proc.stdout
    proc = run_entry(["-m", "bitnet_kde.env", "ensure_dirs", "storage=s3", f"storage.bucket={s3_env}"], tmp_path, {})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert storage.exists(f"s3://{s3_env}") and (tmp_path / "logs").is_dir()
    proc = run_entry(args, tmp_path, {"OPENAI_API_KEY": fake_key})
    assert proc.returncode == 0, proc.stdout
    assert "reachable" in proc.stdout and "yes: s3 store" in proc.stdout
    assert fake_key not in proc.stdout + proc.stderr and S3_SECRET not in proc.stdout + proc.stderr


def test_check_env_never_prints_credentials_written_into_the_root_url(capsys, monkeypatch):
    from bitnet_kde import env

    for var in ("WEBDAV_URL", "WEBDAV_USERNAME", "WEBDAV_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    assert env.check(["paths.root=webdav://user:hunter2pw@127.0.0.1:1/x"]) == 1
    out = capsys.readouterr().out
    assert "webdav://***@127.0.0.1:1/x" in out and "WEBDAV_PASSWORD is not set" in out
    assert "hunter2pw" not in out


# ------------------------------------------------------------------------------------ S3 end to end

SMALL = ["collection.prompts.limit=8", "collection.chunk_size=4", "collection.sampling.max_new_tokens=16",
         "collection.progress=false"]


def s3_objects(bucket: str) -> list[str]:
    fs, path = storage.resolve(f"s3://{bucket}")
    fs.invalidate_cache()
    return sorted(fs.find(path))


@pytest.mark.slow
def test_pipeline_on_s3_collect_train_resume_evaluate(tmp_path, s3_env):
    """ensure_dirs -> collect (embedded teacher) -> train with checkpoints on s3:// -> resume from the
    s3:// checkpoint -> evaluate, all through the real entry points against the moto server."""
    import torch

    env = {"OMP_NUM_THREADS": "1"}
    store = ["storage=s3", f"storage.bucket={s3_env}", "storage.prefix=proj"]

    def ok(args):
        proc = run_entry(args, tmp_path, env, timeout=600)
        assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc

    ok(["-m", "bitnet_kde.env", "ensure_dirs", *store])
    ok([str(ROOT / "collect.py"), *store, *SMALL])
    traces = [o for o in s3_objects(s3_env) if o.endswith(".parquet")]
    assert len(traces) == 2 and all(o.startswith(f"{s3_env}/proj/data/kd-") for o in traces)
    assert read_traces(f"s3://{s3_env}/proj/data").num_rows > 0

    train = [str(ROOT / "train.py"), *store, *SMALL, "model=tiny", "data.num_workers=0", "data.val_fraction=0.25",
             "trainer.val_check_interval=2"]
    first = ok([*train, "trainer.max_steps=2"])
    assert "reusing traces in s3://" in first.stdout + first.stderr  # collected once, read from the store
    ckpts = [o for o in s3_objects(s3_env) if o.endswith("last.ckpt")]
    assert len(ckpts) == 1 and ckpts[0].startswith(f"{s3_env}/proj/train/runs/")
    assert not list(tmp_path.rglob("*.ckpt")) and list(tmp_path.rglob("events.out.tfevents*"))  # TB stays local

    ok([*train, "trainer.max_steps=4", f"ckpt_path=s3://{ckpts[0]}"])
    resumed = [o for o in s3_objects(s3_env) if o.endswith("last.ckpt") and o != ckpts[0]]
    assert len(resumed) == 1
    with storage.open_url(f"s3://{resumed[0]}") as f:
        state = torch.load(f, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4  # continued from step 2, not restarted

    proc = run_entry([str(ROOT / "eval.py"), *store, f"ckpt_path=s3://{resumed[0]}", "collection.prompts.limit=4",
                      "collection.sampling.max_new_tokens=8", "speed.prompts=1", "speed.max_new_tokens=4",
                      "speed.measure_teacher=false"], tmp_path, env, timeout=600)
    assert proc.returncode == 0, f"eval.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    report = storage.read_json(f"s3://{s3_env}/proj/reports/evaluation.json")
    assert report["metrics"]["overall"]["kl"] >= 0


def test_env_example_documents_every_variable_without_values():
    import re

    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    assigned = re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", text, flags=re.M)
    assert all(value == "" for _, value in assigned), [name for name, value in assigned if value]
    named = {v for b in storage.BACKENDS.values() for v in b.env.values()} | {"STORAGE", "AUTO_MOUNT_GDRIVE"}
    for cfg in (ROOT / "configs").glob("*/*.yaml"):
        body = cfg.read_text()
        named |= set(re.findall(r"oc\.env:([A-Z][A-Z0-9_]+)", body))
        named |= set(re.findall(r"(?:api_key_env|_env): ([A-Z][A-Z0-9_]+)", body))
        named |= set(re.findall(r"^\s+\w+: ([A-Z][A-Z0-9_]{3,})$", body, flags=re.M)) if cfg.parent.name == "storage" else set()
    assert named - documented == set()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gcs", "azure"])
def test_checkpoints_and_resume_on_gcs_and_azure(backend, request, tmp_path):
    """train.py with its checkpoints on gs:// or az://, then resumed from the stored checkpoint."""
    import torch

    scheme, fixture = OBJECT_STORES[backend]
    bucket = request.getfixturevalue(fixture)
    root = f"{scheme}://{bucket}/proj"
    storage.makedirs(root)
    train = [str(ROOT / "train.py"), f"paths.root={root}", "experiment=smoke", "trainer.val_check_interval=2"]

    def ok(args):
        proc = run_entry(args, tmp_path, {"OMP_NUM_THREADS": "1"}, timeout=600)
        assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    def stored(suffix):
        fs, path = storage.resolve(f"{scheme}://{bucket}")
        fs.invalidate_cache()
        return sorted(o for o in fs.find(path) if o.endswith(suffix))

    ok([*train, "trainer.max_steps=2"])
    [first] = stored("last.ckpt")
    assert first.startswith(f"{bucket}/proj/train/runs/") and not list(tmp_path.rglob("*.ckpt"))
    ok([*train, "trainer.max_steps=4", f"ckpt_path={scheme}://{first}"])
    [resumed] = [c for c in stored("last.ckpt") if c != first]
    with storage.open_url(f"{scheme}://{resumed}") as f:
        assert torch.load(f, map_location="cpu", weights_only=True)["global_step"] == 4  # continued, not restarted
    assert len(stored("summary.json")) == 2
    assert_no_secret_in_objects(f"{scheme}://{bucket}")

