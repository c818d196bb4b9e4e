"""Run records for real: a PostgreSQL cluster and moto's DynamoDB server started on 127.0.0.1 by
the tests, records written by the stages' own code and read back with the database's client,
a secret scan over every record, and record failures that leave the report file in place.

MongoDB: no MongoDB server can run on this machine (none is packaged for Debian or PyPI without
downloading a binary at test time), so its tests cover only what needs no server: the driver
and variable messages, and a real pymongo connection attempt to a closed port on 127.0.0.1
ending in the logged error with the file kept. Nothing stands in for the service."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid

import pytest
from omegaconf import OmegaConf

from bitnet_kde import env, records, storage
from conftest import ROOT
from storage_servers import free_port, moto_s3, postgres_binaries, postgres_server, unavailable

PG_PASSWORD = f"pg-pass-{uuid.uuid4().hex}"
AWS_SECRET = f"aws-secret-{uuid.uuid4().hex}"
API_KEY = f"sk-test-{uuid.uuid4().hex}"
REPORT = {"summary": {"answered": 3, "tokens_per_second": 12.5}, "answers": ["a", "b"],
          "teacher": "local_smollm2"}


def config(backend: str, **extra):
    records_cfg = OmegaConf.load(ROOT / "configs" / "records" / f"{backend}.yaml")
    return OmegaConf.create({"task_name": "eval", "records": {**OmegaConf.to_container(records_cfg), **extra},
                             "teacher": {"api_key_env": "OPENAI_API_KEY"}, "paths": {"root": "."}})


@pytest.fixture(autouse=True)
def secrets_in_env(monkeypatch):
    """Credentials a run would hold, so that every test can search what was written for them."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIARECORDSTEST0001")


def leaky_report() -> dict:
    """A report that (wrongly) carries credentials: the record must not."""
    return {**REPORT, "endpoint": f"postgresql://bitnet:{PG_PASSWORD}@db.example.com/x",
            "note": f"key {API_KEY} secret {AWS_SECRET}"}


def assert_clean(text: str) -> None:
    for secret in (PG_PASSWORD, API_KEY, AWS_SECRET):
        assert secret not in text


def test_record_shape_hash_and_scrubbing(tmp_path, monkeypatch):
    cfg = config("postgres")
    rec = records.make_record(cfg, "eval", leaky_report(), tmp_path / "evaluation.json")
    assert set(rec) == {"run_id", "stage", "created_at", "config_hash", "report_url", "report"}
    assert rec["run_id"] == records.RUN_ID and rec["stage"] == "eval"
    expected = hashlib.sha256(json.dumps(OmegaConf.to_container(cfg), sort_keys=True).encode()).hexdigest()
    assert rec["config_hash"] == expected
    assert rec["report"]["summary"] == REPORT["summary"]
    assert rec["report"]["note"] == "key *** secret ***"
    assert rec["report"]["endpoint"] == "postgresql://***@db.example.com/x"
    assert_clean(json.dumps(rec))


def test_records_none_writes_nothing(tmp_path):
    assert records.write(config("none"), "eval", REPORT, file=tmp_path / "r.json") is None
    lines, problems = env.records_lines(config("none"))
    assert lines == ["records     none (reports are files only)"] and problems == []


# ------------------------------------------------------------------------------------ PostgreSQL


@pytest.fixture(scope="module")
def pg_url():
    pytest.importorskip("psycopg")
    if postgres_binaries()[0] is None:
        unavailable(postgres_binaries()[1])
    with postgres_server(PG_PASSWORD) as url:
        yield url


@pytest.fixture
def pg(pg_url, monkeypatch):
    monkeypatch.setenv("RECORDS_POSTGRES_URL", pg_url)
    return pg_url


def pg_rows(url: str, table: str = "bitnet_kde_runs") -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT run_id, stage, config_hash, report_url, report, row_to_json(t)::text "
                            f"FROM {table} t ORDER BY id").fetchall()


def test_postgres_record_round_trip_and_secret_scan(pg, tmp_path, caplog):
    table = f"runs_{uuid.uuid4().hex[:8]}"
    cfg = config("postgres", table=table)
    out = storage.write_json_atomic(tmp_path / "evaluation.json", REPORT)
    with caplog.at_level(logging.INFO, logger="bitnet_kde.records"):
        where = records.write(cfg, "eval", REPORT, file=out)
        records.write(cfg, "teacher_baseline", leaky_report(), file=out)
    assert where.startswith(f"postgres table {table} at 127.0.0.1:")
    rows = pg_rows(pg, table)
    assert [(r[0], r[1], r[3]) for r in rows] == [(records.RUN_ID, "eval", str(out)),
                                                  (records.RUN_ID, "teacher_baseline", str(out))]
    assert rows[0][2] == records.config_hash(cfg) and rows[0][4] == REPORT
    assert rows[1][4]["note"] == "key *** secret ***"
    for row in rows:
        assert_clean(row[5])
    assert_clean(caplog.text)
    lines, problems = env.records_lines(cfg)
    assert problems == [] and "yes: postgres table" in lines[-1] and PG_PASSWORD not in "\n".join(lines)


@pytest.mark.parametrize("fault", ["wrong_password", "server_down", "missing_variable", "missing_driver"])
def test_postgres_failure_is_logged_and_the_file_is_kept(fault, pg, tmp_path, monkeypatch, caplog):
    out = storage.write_json_atomic(tmp_path / "evaluation.json", REPORT)
    expect = {"wrong_password": "password authentication failed", "server_down": "Connection refused",
              "missing_variable": "RECORDS_POSTGRES_URL", "missing_driver": "pip install 'bitnet-kde[postgres]'"}[fault]
    if fault == "wrong_password":
        monkeypatch.setenv("RECORDS_POSTGRES_URL", pg.replace(PG_PASSWORD, "wrong-password"))
    elif fault == "server_down":
        monkeypatch.setenv("RECORDS_POSTGRES_URL", pg.rsplit(":", 1)[0] + f":{free_port()}/bitnet")
    elif fault == "missing_variable":
        monkeypatch.delenv("RECORDS_POSTGRES_URL")
    else:
        monkeypatch.setitem(sys.modules, "psycopg", None)
    with caplog.at_level(logging.ERROR, logger="bitnet_kde.records"):
        assert records.write(config("postgres"), "eval", REPORT, file=out) is None
    msg = caplog.text
    assert "run record of stage 'eval' not written to postgres" in msg and expect in msg, msg
    assert f"the report itself is in {out}" in msg
    assert "wrong-password" not in msg and PG_PASSWORD not in msg
    assert json.loads(out.read_text()) == REPORT


@pytest.mark.parametrize("server", ["up", "down"])
def test_dryrun_writes_its_report_then_a_postgres_record(server, pg, tmp_path):
    """Through the real entry point: the file, then one row whose body equals the file; with the
    database down, the file, one error line, and a normal exit."""
    table = f"runs_{uuid.uuid4().hex[:8]}"
    url = pg if server == "up" else pg.rsplit(":", 1)[0] + f":{free_port()}/bitnet"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "dryrun.py"), "model.name=tiny", "device=cpu", "seq_len=16",
         f"paths.root={tmp_path}", "records=postgres", f"records.table={table}"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RECORDS_POSTGRES_URL": url},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "reports" / "dryrun_7b.json").read_text())
    if server == "down":
        out = proc.stdout + proc.stderr
        assert "[ERROR] - run record of stage 'dryrun' not written to postgres" in out, out[-3000:]
        assert f"the report itself is in {tmp_path / 'reports' / 'dryrun_7b.json'}" in out
        assert_clean(out)
        return
    rows = pg_rows(pg, table)
    assert len(rows) == 1 and rows[0][1] == "dryrun" and rows[0][4] == report
    assert rows[0][3] == str(tmp_path / "reports" / "dryrun_7b.json")
    assert_clean(rows[0][5] + proc.stdout + proc.stderr)


# ------------------------------------------------------------------------------------ DynamoDB


@pytest.fixture(scope="module")
def moto_endpoint():
    with moto_s3() as url:  # moto's server answers every AWS service it emulates, DynamoDB included
        yield url


def test_dynamodb_record_round_trip_and_secret_scan(moto_endpoint, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("DYNAMODB_ENDPOINT_URL", moto_endpoint)
    table = f"runs-{uuid.uuid4().hex[:8]}"
    cfg = config("dynamodb", table=table)
    out = storage.write_json_atomic(tmp_path / "evaluation.json", REPORT)
    assert records.write(cfg, "eval", REPORT, file=out) == f"dynamodb table {table} at {moto_endpoint}"
    assert records.write(cfg, "collect", leaky_report(), file=out)
    client = boto3.client("dynamodb", endpoint_url=moto_endpoint, region_name="us-east-1",
                          aws_access_key_id="AKIARECORDSTEST0001", aws_secret_access_key=AWS_SECRET)
    item = client.get_item(TableName=table, Key={"run_id": {"S": records.RUN_ID}, "stage": {"S": "eval"}})["Item"]
    assert json.loads(item["report"]["S"]) == REPORT and item["config_hash"]["S"] == records.config_hash(cfg)
    assert item["report_url"]["S"] == str(out)
    items = client.scan(TableName=table)["Items"]
    assert sorted(i["stage"]["S"] for i in items) == ["collect", "eval"]
    assert_clean(json.dumps(items))


def test_dynamodb_unreachable_endpoint_keeps_the_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DYNAMODB_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    out = storage.write_json_atomic(tmp_path / "evaluation.json", REPORT)
    with caplog.at_level(logging.ERROR, logger="bitnet_kde.records"):
        assert records.write(config("dynamodb"), "eval", REPORT, file=out) is None
    assert "not written to dynamodb: EndpointConnectionError" in caplog.text and AWS_SECRET not in caplog.text
    assert json.loads(out.read_text()) == REPORT


# ------------------------------------------------------------------------------------ MongoDB (no server)


def test_mongodb_without_a_server_fails_clearly_and_keeps_the_file(tmp_path, monkeypatch, caplog):
    pytest.importorskip("pymongo")
    password = f"mongo-pass-{uuid.uuid4().hex}"
    monkeypatch.setattr(records, "TIMEOUT_S", 1)
    out = storage.write_json_atomic(tmp_path / "evaluation.json", REPORT)
    monkeypatch.delenv("RECORDS_MONGODB_URL", raising=False)
    lines, problems = env.records_lines(config("mongodb"))
    assert problems == ["records mongodb: RECORDS_MONGODB_URL is not set"]
    monkeypatch.setenv("RECORDS_MONGODB_URL", f"mongodb://bitnet:{password}@127.0.0.1:{free_port()}/?directConnection=true")
    with caplog.at_level(logging.ERROR, logger="bitnet_kde.records"):
        assert records.write(config("mongodb"), "eval", REPORT, file=out) is None
    assert "not written to mongodb: ServerSelectionTimeoutError" in caplog.text and password not in caplog.text
    assert json.loads(out.read_text()) == REPORT
    monkeypatch.setitem(sys.modules, "pymongo", None)
    with pytest.raises(records.RecordError, match=r"pip install 'bitnet-kde\[mongodb\]'"):
        records.check(config("mongodb"))


@pytest.mark.slow
def test_train_writes_its_run_summary_then_a_postgres_record(pg, tmp_path):
    table = f"runs_{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "trainer.max_steps=2", "trainer.val_check_interval=2",
         f"paths.root={tmp_path}", "records=postgres", f"records.table={table}"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [summary_file] = list(tmp_path.glob("logs/train/runs/*/summary.json"))
    summary = json.loads(summary_file.read_text())
    assert summary["global_step"] == 2 and summary["last_checkpoint"].endswith("last.ckpt")
    assert "val/loss" in summary["metrics"]
    rows = pg_rows(pg, table)
    assert [(r[1], r[3]) for r in rows] == [("train", str(summary_file))] and rows[0][4] == summary
