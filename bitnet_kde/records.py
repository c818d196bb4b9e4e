"""Run records: each stage's report, also written as one record in a database (`records=` group).

The report file stays the result of a stage; a record is a copy for querying many runs at once.
`write` is called after the file is written and never raises: a record that cannot be written
(missing driver or variable, server down, refused credentials) is one `ERROR` log line naming
the database, the variable to fix and the file that holds the report.

A record is `{run_id, stage, created_at, config_hash, report_url, report}`: `run_id` is one id
per process (every record of one run shares it), `config_hash` the SHA-256 of the run's config
(which holds variable names, never their values), `report` the report body. Before a record
leaves the process, every credential value the storage, record and teacher variables hold is
replaced by `***`, and every URL's `user:password@` part too.

Targets (connection settings come from the variables a `configs/records/` file names):
PostgreSQL and Supabase's database (psycopg: one row per record, the report as `jsonb`), Amazon
DynamoDB (boto3: one item, the report as a JSON string, keyed by run id and stage) and MongoDB /
MongoDB Atlas (pymongo: one document).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from bitnet_kde import storage

__all__ = ["STORES", "RecordError", "check", "config_hash", "enabled", "make_record", "manifest_summary",
           "missing_variables", "scrub", "train_summary", "write", "write_train_summary"]

log = logging.getLogger(__name__)


class RecordError(RuntimeError):
    """The configured record store cannot be used; the message names the store and what to set or install."""


@dataclass(frozen=True)
class RecordStore:
    """One database kind: its driver package, pip extra, and the variables it reads (option -> variable)."""

    name: str
    module: str
    extra: str
    env: dict[str, str] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    secret: tuple[str, ...] = ()


STORES: dict[str, RecordStore] = {
    "postgres": RecordStore("postgres", "psycopg", "postgres", env={"url": "RECORDS_POSTGRES_URL"},
                            required=("url",), secret=("url",)),
    "dynamodb": RecordStore("dynamodb", "boto3", "dynamodb",
                            env={"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY",
                                 "token": "AWS_SESSION_TOKEN", "region": "AWS_REGION",
                                 "endpoint_url": "DYNAMODB_ENDPOINT_URL"},
                            required=("key", "secret"), secret=("key", "secret", "token")),
    "mongodb": RecordStore("mongodb", "pymongo", "mongodb", env={"url": "RECORDS_MONGODB_URL"},
                           required=("url",), secret=("url",)),
}
"""Record stores by name, with the default names of the variables each one reads."""

RUN_ID = uuid.uuid4().hex
"""This process's run id: every record it writes carries it."""

TIMEOUT_S = 10
"""Seconds to wait for a database to answer before the record is given up."""


# -- the record -------------------------------------------------------------------------------
def config_hash(cfg: Mapping) -> str:
    """SHA-256 of the config as composed (interpolations unresolved, Hydra's own node left out)."""
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    tree.pop("hydra", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


def _secret_values(cfg: Mapping) -> list[str]:
    """Every credential value held by the variables the storage backends, the record stores and
    the teacher read (their names come from the configs; the values from the environment)."""
    names = {v for b in storage.BACKENDS.values() for o, v in storage.variables(b).items() if o in b.secret}
    names |= {v for s in STORES.values() for o, v in s.env.items() if o in s.secret}
    rc = cfg.get("records") or {}
    if rc.get("backend") in STORES:  # a records config may rename its variables
        store = STORES[rc["backend"]]
        names |= {v for o, v in _variables(store, rc).items() if o in store.secret}
    teacher = cfg.get("teacher") or {}
    if teacher.get("api_key_env"):
        names.add(str(teacher["api_key_env"]))
    values = (os.environ.get(n, "").strip() for n in names)
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def scrub(text: str, cfg: Mapping) -> str:
    """`text` with every credential value (see `_secret_values`) and URL userinfo replaced by `***`."""
    for value in _secret_values(cfg):
        text = text.replace(value, "***")
    return storage.redact_urls(text)


def make_record(cfg: Mapping, stage: str, report: Mapping, file: str | os.PathLike) -> dict[str, Any]:
    """The record for `report` of `stage`, written to `file`, with every credential scrubbed."""
    record = {"run_id": RUN_ID, "stage": stage,
              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "config_hash": config_hash(cfg), "report_url": os.fspath(file), "report": report}
    return json.loads(scrub(json.dumps(record, default=str, ensure_ascii=False), cfg))


def manifest_summary(manifest: Mapping) -> dict[str, Any]:
    """A collection's record body: the manifest without its per-shard list, plus the shard count."""
    return {**{k: v for k, v in manifest.items() if k != "shards"}, "shards": len(manifest.get("shards", []))}


def train_summary(cfg: Mapping, trainer) -> dict[str, Any]:
    """A training run's record body: steps, the last logged metrics and where the checkpoints are."""
    ckpt = trainer.checkpoint_callback
    return {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "checkpoint_dir": str(cfg.paths.checkpoint_dir),
            "best_checkpoint": (ckpt.best_model_path or None) if ckpt else None,
            "last_checkpoint": (getattr(ckpt, "last_model_path", "") or None) if ckpt else None}


# -- configuration ----------------------------------------------------------------------------
def _store(rc: Mapping) -> RecordStore:
    name = rc.get("backend")
    if name not in STORES:
        raise RecordError(f"records.backend={name!r} is not a record store; use one of none, {', '.join(STORES)}")
    return STORES[name]


def _variables(store: RecordStore, rc: Mapping) -> dict[str, str]:
    return {**store.env, **{k: str(v) for k, v in (rc.get("env") or {}).items() if v}}


def _values(store: RecordStore, rc: Mapping) -> dict[str, str]:
    out = {}
    for opt, var in _variables(store, rc).items():
        value = os.environ.get(var, "").strip()
        if value:
            out[opt] = value
    return out


def missing_variables(rc: Mapping) -> list[str]:
    store = _store(rc)
    names, values = _variables(store, rc), _values(store, rc)
    required = rc.get("required") if rc.get("required") is not None else store.required
    return [names[o] for o in required if o not in values]


def _connect_settings(rc: Mapping) -> tuple[RecordStore, Any, dict[str, str]]:
    """(store, driver module, variable values) after checking the driver and the variables."""
    store = _store(rc)
    try:
        driver = importlib.import_module(store.module)
    except ImportError as e:
        raise RecordError(f"record store '{store.name}' needs the package {store.module!r}, which is not installed: "
                          f"pip install 'bitnet-kde[{store.extra}]'") from e
    missing = missing_variables(rc)
    if missing:
        raise RecordError(f"record store '{store.name}': missing environment variable(s): {', '.join(missing)}. "
                          "Set them in .env or the environment (see .env.example and docs/STORAGE.md).")
    return store, driver, _values(store, rc)


# -- the three databases ----------------------------------------------------------------------
def _postgres(driver, values: Mapping[str, str], rc: Mapping, record: Mapping | None) -> str:
    from psycopg import sql
    from psycopg.types.json import Jsonb

    table = sql.Identifier(str(rc.get("table") or "bitnet_kde_runs"))
    with driver.connect(values["url"], connect_timeout=TIMEOUT_S) as conn:
        info = conn.info
        where = f"postgres table {rc.get('table') or 'bitnet_kde_runs'} at {info.host}:{info.port}/{info.dbname}"
        if record is None:
            conn.execute("SELECT 1")
            return where
        conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, run_id text NOT NULL, "
                             "stage text NOT NULL, created_at timestamptz NOT NULL, config_hash text NOT NULL, "
                             "report_url text NOT NULL, report jsonb NOT NULL)").format(table))
        conn.execute(sql.SQL("INSERT INTO {} (run_id, stage, created_at, config_hash, report_url, report) "
                             "VALUES (%s, %s, %s, %s, %s, %s)").format(table),
                     (record["run_id"], record["stage"], record["created_at"], record["config_hash"],
                      record["report_url"], Jsonb(record["report"])))
    return where


DYNAMODB_ITEM_LIMIT = 400 * 1024
"""DynamoDB's largest item, in bytes."""


def _dynamodb(driver, values: Mapping[str, str], rc: Mapping, record: Mapping | None) -> str:
    from botocore.config import Config

    table = str(rc.get("table") or "bitnet_kde_runs")
    client = driver.client(
        "dynamodb", endpoint_url=values.get("endpoint_url"), region_name=values.get("region", "us-east-1"),
        aws_access_key_id=values.get("key"), aws_secret_access_key=values.get("secret"),
        aws_session_token=values.get("token"),
        config=Config(connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 1}))
    where = f"dynamodb table {table} at {values.get('endpoint_url') or values.get('region', 'us-east-1')}"
    if record is None:
        client.list_tables(Limit=1)
        return where
    if table not in client.list_tables()["TableNames"]:
        client.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                            AttributeDefinitions=[{"AttributeName": "run_id", "AttributeType": "S"},
                                                  {"AttributeName": "stage", "AttributeType": "S"}],
                            KeySchema=[{"AttributeName": "run_id", "KeyType": "HASH"},
                                       {"AttributeName": "stage", "KeyType": "RANGE"}])
        client.get_waiter("table_exists").wait(TableName=table)
    # the report as one JSON string: DynamoDB numbers refuse floats such as NaN, and the body
    # keeps exactly the shape of the file
    body = json.dumps(record["report"], ensure_ascii=False)
    if len(body.encode()) > DYNAMODB_ITEM_LIMIT - 1024:
        raise RecordError(f"the report is {len(body.encode())} bytes, more than a DynamoDB item holds (400 KB)")
    client.put_item(TableName=table, Item={
        "run_id": {"S": record["run_id"]}, "stage": {"S": record["stage"]}, "created_at": {"S": record["created_at"]},
        "config_hash": {"S": record["config_hash"]}, "report_url": {"S": record["report_url"]}, "report": {"S": body}})
    return where


def _mongodb(driver, values: Mapping[str, str], rc: Mapping, record: Mapping | None) -> str:
    database, collection = str(rc.get("database") or "bitnet_kde"), str(rc.get("collection") or "runs")
    client = driver.MongoClient(values["url"], serverSelectionTimeoutMS=TIMEOUT_S * 1000,
                                connectTimeoutMS=TIMEOUT_S * 1000)
    try:
        where = f"mongodb collection {database}.{collection} at {storage.redact_urls(values['url'])}"
        if record is None:
            client.admin.command("ping")
        else:
            client[database][collection].insert_one(dict(record))
        return where
    finally:
        client.close()


_WRITERS = {"postgres": _postgres, "dynamodb": _dynamodb, "mongodb": _mongodb}


def _send(cfg: Mapping, record: Mapping | None) -> str:
    rc = cfg.get("records") or {}
    store, driver, values = _connect_settings(rc)
    return _WRITERS[store.name](driver, values, rc, record)


def enabled(cfg: Mapping) -> bool:
    rc = cfg.get("records") if hasattr(cfg, "get") else None
    return bool(rc) and rc.get("backend", "none") not in (None, "none")


def check(cfg: Mapping) -> str:
    """One request to the configured record store (`make check_env`); raises `RecordError` with
    the store and what to fix."""
    try:
        return _send(cfg, None) + " (reachable)"
    except RecordError:
        raise
    except Exception as e:  # noqa: BLE001 - every driver/transport failure becomes one message
        rc = cfg.get("records") or {}
        names = ", ".join(_variables(_store(rc), rc).values())
        raise RecordError(scrub(f"record store '{rc.get('backend')}': {type(e).__name__}: {e}; check {names} "
                                "and that the database is reachable", cfg)) from None


def write(cfg: Mapping, stage: str, report: Mapping, *, file: str | os.PathLike) -> str | None:
    """Write `report` (already written to `file`) as one record of `stage`; returns where it went,
    or None when records are off or the record could not be written (logged as an error)."""
    if not enabled(cfg):
        return None
    backend = cfg["records"].get("backend")
    try:
        where = _send(cfg, make_record(cfg, stage, report, file))
    except Exception as e:  # noqa: BLE001 - the file holds the report; a failed record must not end the stage
        log.error("%s", scrub(f"run record of stage '{stage}' not written to {backend}: {type(e).__name__}: {e}; "
                              f"the report itself is in {os.fspath(file)}", cfg))
        return None
    log.info("run record %s/%s -> %s", RUN_ID, stage, where)
    return where


def write_train_summary(cfg: Mapping, trainer) -> str | Path | None:
    """A training run's summary: `summary.json` next to the run's checkpoint folder, then a record."""
    run_dir = os.fspath(cfg.paths.checkpoint_dir).rstrip("/").rsplit("/", 1)[0]
    summary = train_summary(cfg, trainer)
    out = storage.write_json_atomic(storage.join(run_dir, "summary.json"), summary)
    write(cfg, "train", summary, file=out)
    return out
