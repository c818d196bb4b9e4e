"""Quality gates against hand-computed thresholds; the pipeline: routing of overrides, and the chain
with stand-in stage scripts (order, failure, reuse by fingerprint, force, resume, records kept across
runs, credentials scrubbed, train's checkpoint folder and allocator settings)."""

from __future__ import annotations

import pytest

from bitnet_kde.eval.gates import GateConfigError, check_gates, describe, gate_settings
from bitnet_kde.pipeline import fingerprint, merge, route

OVERALL = {"top1_agreement": 0.42, "kl": 1.5, "json_validity": 0.25, "teacher_json_validity": 0.5,
           "exact_match": 0.1}


def test_gates_pass_and_fail_relative_to_the_teacher():
    r = check_gates(OVERALL, {"top1_agreement": 0.4, "json_validity": 0.5, "kl_max": 2.0, "exact_match": None})
    assert r["passed"] is True
    by = {c["gate"]: c for c in r["checks"]}
    assert set(by) == {"top1_agreement", "json_validity", "kl_max"}  # null: not gated
    assert by["top1_agreement"]["threshold"] == pytest.approx(0.4)  # the teacher agrees with itself: 1
    assert by["json_validity"]["teacher"] == 0.5 and by["json_validity"]["threshold"] == pytest.approx(0.25)
    assert by["kl_max"]["rule"] == "<=" and by["kl_max"]["threshold"] == 2.0

    r = check_gates(OVERALL, {"top1_agreement": 0.43, "json_validity": 0.51, "kl_max": 1.5})
    assert r["passed"] is False
    assert {c["gate"]: c["passed"] for c in r["checks"]} == {"top1_agreement": False, "json_validity": False,
                                                             "kl_max": True}
    assert describe(r) == ("gates failed: top1_agreement 0.42 >= 0.43 FAILED; json_validity 0.25 >= 0.255 FAILED; "
                           "kl_max 1.5 <= 1.5")


def test_unmeasured_metric_fails_its_gate_and_no_gate_is_not_a_pass():
    r = check_gates({"top1_agreement": 0.9, "kl": 0.1}, {"json_validity": 0.1})
    assert r["passed"] is False and "json_validity was not measured" in r["checks"][0]["note"]
    assert check_gates(OVERALL, {"top1_agreement": None}) == {"passed": None, "checks": []}
    assert describe({"passed": None, "checks": []}) == "gates not set"
    # a teacher that never writes valid JSON makes the relative threshold 0: not a pass either
    r = check_gates({**OVERALL, "teacher_json_validity": 0.0}, {"json_validity": 0.5})
    assert r["passed"] is False and r["checks"][0]["threshold"] is None
    assert "teacher's own teacher_json_validity is 0" in r["checks"][0]["note"]
    assert describe(r) == "gates failed: json_validity 0.25 >= n/a FAILED"


@pytest.mark.parametrize("gates, match", [({"top1": 0.3}, "gates.top1: unknown gate"),
                                          ({"kl_max": -1}, "must be a number >= 0"),
                                          ({"exact_match": "high"}, "must be a number >= 0")])
def test_bad_gate_settings_are_refused(gates, match):
    with pytest.raises(GateConfigError, match=match):
        gate_settings(gates)


def test_overrides_reach_the_stages_whose_config_has_their_key():
    args = ["storage=s3", "paths.root=/x", "teacher=openai", "+teacher.timeout_s=5", "collection.prompts.limit=8",
            "model=tiny", "trainer.max_steps=5", "experiment=ablation_kd", "pipeline.force=[train]",
            "hydra.verbose=true"]
    assert route(args, "teacher_baseline") == ["storage=s3", "paths.root=/x", "teacher=openai", "+teacher.timeout_s=5"]
    assert route(args, "collect") == [*route(args, "teacher_baseline"), "collection.prompts.limit=8"]
    assert route(args, "train") == [*route(args, "collect"), "model=tiny", "trainer.max_steps=5",
                                    "experiment=ablation_kd"]
    assert route(args, "eval") == route(args, "teacher_baseline")
    assert route(args, "dryrun") == ["storage=s3", "paths.root=/x"]
    assert "experiment=ablation_kd" not in route(args, "train", forward_experiment=False)


def test_merge_keeps_the_last_value_of_a_key_and_fingerprint_sees_order():
    assert merge(["model=tiny", "a.b=1"], ["+a.b=2", "c=3"]) == ["model=tiny", "+a.b=2", "c=3"]
    assert fingerprint(["a=1", "b=2"]) != fingerprint(["b=2", "a=1"])
    assert fingerprint(["a=1"]) == fingerprint(["a=1"]) and len(fingerprint([])) == 16


# --------------------------------------------------------------------------------------------
# the chain with stand-in stage scripts: order, failure, reuse, force, resume
# --------------------------------------------------------------------------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from hydra import compose, initialize_config_dir  # noqa: E402

from bitnet_kde.pipeline import Pipeline, PipelineError  # noqa: E402

from conftest import ROOT  # noqa: E402

STAND_IN = '''
import json, os, sys
from pathlib import Path
stage = Path(sys.argv[0]).stem
args = dict(a.split("=", 1) for a in sys.argv[1:])
malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps([stage, sys.argv[1:], malloc]) + "\\n")
if os.environ.get("CRASH") == stage:
    raise RuntimeError("stand-in crash with " + " ".join(sys.argv[1:]))
if os.environ.get("FAIL") == stage:
    print("error: stand-in failure of " + stage, file=sys.stderr)
    sys.exit(1)
run = Path(args["hydra.run.dir"])
run.mkdir(parents=True, exist_ok=True)
root = Path(args["paths.root"])
if stage == "collect":
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "manifest.json").write_text(json.dumps({"trace_set": "abc", "rows": 5, "shards": []}))
elif stage == "train":
    ckpt = Path(args["paths.checkpoint_dir"])
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "last.ckpt").write_text("weights")
    flip = {"flipped": True, "step": 9}
    (ckpt / "last_health.json").write_text(json.dumps({"step": 10, "val_loss": 1.5, "flip": flip}))
else:
    Path(args["report_path"]).parent.mkdir(parents=True, exist_ok=True)
    Path(args["report_path"]).write_text(json.dumps({"summary": {"tokens_per_second": 2.0}}))
if os.environ.get("FAIL_LATE") == stage:  # killed after writing its outputs
    print("error: stand-in failure of " + stage + " at the end", file=sys.stderr)
    sys.exit(1)
'''


def stand_in_scripts(folder: Path) -> Path:
    folder.mkdir()
    for stage in ("teacher_baseline", "collect", "train", "eval", "dryrun"):
        (folder / f"{stage}.py").write_text(STAND_IN)
    return folder


def chain(tmp_path, run: str, *overrides: str) -> Pipeline:
    args = [f"paths.root={tmp_path}", "model=tiny", *overrides]
    run_dir = tmp_path / "logs" / run
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        own = [] if any(o.startswith("pipeline.checkpoint_dir=") for o in args) else \
            [f"pipeline.checkpoint_dir={run_dir}/train/checkpoints"]
        cfg = compose("pipeline", overrides=[*args, f"pipeline.stage_dir={run_dir}", *own])
    return Pipeline(cfg, args, scripts_dir=tmp_path / "scripts")


def calls(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_chain_stops_at_a_failure_then_continues_there_and_reuses_by_fingerprint(tmp_path, monkeypatch):
    stand_in_scripts(tmp_path / "scripts")
    for var in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CALLS", str(log))
    monkeypatch.setenv("FAIL", "train")
    with pytest.raises(PipelineError, match="stage train failed: stand-in failure of train"):
        chain(tmp_path, "r1").run()
    s = json.loads((tmp_path / "reports" / "pipeline_summary.json").read_text())
    assert [r["status"] for r in s["stages"].values()] == ["ok", "ok", "failed", "not_run", "not_run"]
    assert s["status"] == "failed" and s["failed_stage"] == "train"
    assert s["stages"]["train"]["error"] == "stand-in failure of train" and s["stages"]["train"]["exit_code"] == 1
    assert s["stages"]["collect"]["figures"]["traces"] == 5
    first = calls(log)
    assert [c[0] for c in first] == ["teacher_baseline", "collect", "train"]
    # routing: model=tiny reaches train only; paths.root reaches every stage
    assert "model=tiny" in first[2][1] and "model=tiny" not in first[0][1] + first[1][1]
    # train alone runs with its allocator settings (as under make train)
    assert first[2][2] == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    assert first[0][2] == first[1][2] == {}

    monkeypatch.delenv("FAIL")
    s = chain(tmp_path, "r2").run()
    assert [r["status"] for r in s["stages"].values()] == ["reused", "reused", "ok", "ok", "ok"]
    assert [c[0] for c in calls(log)[3:]] == ["train", "eval", "dryrun"]
    train = s["stages"]["train"]
    assert train["figures"]["val_loss"] == 1.5 and train["figures"]["flip_step"] == 9
    # eval reads this run's checkpoint
    assert f"ckpt_path={train['artefacts']['checkpoint']}" in calls(log)[4][1]

    # a third run with nothing changed runs nothing; a train change reruns train and eval only
    s = chain(tmp_path, "r3").run()
    assert {r["status"] for r in s["stages"].values()} == {"reused"} and len(calls(log)) == 6
    s = chain(tmp_path, "r4", "trainer.max_steps=7").run()
    assert [r["status"] for r in s["stages"].values()] == ["reused", "reused", "ok", "ok", "reused"]
    assert "trainer.max_steps=7" in calls(log)[6][1]
    # force redoes a stage whose arguments did not change
    s = chain(tmp_path, "r5", "trainer.max_steps=7", "pipeline.force=[teacher_baseline]").run()
    assert [r["status"] for r in s["stages"].values()] == ["ok", "reused", "reused", "reused", "reused"]


def test_credentials_in_overrides_are_neither_stored_nor_logged(tmp_path, monkeypatch, caplog):
    stand_in_scripts(tmp_path / "scripts")
    monkeypatch.setenv("CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("CRASH", "train")
    monkeypatch.setenv("WEBDAV_PASSWORD", "pässwört-42")  # a configured secret, here also in an argument
    secret = "+extra.url=webdav://user:hunter2pw@127.0.0.1:1/x"
    with caplog.at_level("INFO", logger="bitnet_kde.pipeline"), pytest.raises(PipelineError) as e:
        chain(tmp_path, "r1", "pipeline.stages=[train]", secret, "+extra.note='pässwört-42'").run()
    # the child got the credentials it needs; nothing the pipeline writes or says holds them
    assert secret in calls(tmp_path / "calls.jsonl")[0][1]
    text = (tmp_path / "reports" / "pipeline_summary.json").read_text()
    s = json.loads(text)
    assert "+extra.url=webdav://***@127.0.0.1:1/x" in s["overrides"]
    assert "+extra.url=webdav://***@127.0.0.1:1/x" in s["stages"]["train"]["args"]
    assert "RuntimeError: stand-in crash with" in s["stages"]["train"]["error"]
    assert "webdav://***@127.0.0.1:1/x" in s["stages"]["train"]["error"]
    assert "webdav://***@" in caplog.text
    assert "+extra.note='***'" in s["stages"]["train"]["args"]
    for word in ("hunter2pw", "pässwört-42"):
        assert word not in json.dumps(s, ensure_ascii=False) + caplog.text + str(e.value)


def test_a_run_keeps_the_records_of_stages_it_did_not_run(tmp_path, monkeypatch):
    stand_in_scripts(tmp_path / "scripts")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CALLS", str(log))
    chain(tmp_path, "r1").run()
    s = chain(tmp_path, "r2", "pipeline.stages=[dryrun]").run()
    assert list(s["stages"]) == ["teacher_baseline", "collect", "train", "eval", "dryrun"]
    assert [r["status"] for r in s["stages"].values()] == ["ok", "ok", "ok", "ok", "reused"]
    s = chain(tmp_path, "r3").run()
    assert {r["status"] for r in s["stages"].values()} == {"reused"} and len(calls(log)) == 5
    # a training that fails alone does not make the next full run redo the stages before it
    monkeypatch.setenv("FAIL", "train")
    with pytest.raises(PipelineError):
        chain(tmp_path, "r4", "trainer.max_steps=7", "pipeline.stages=[train]").run()
    monkeypatch.delenv("FAIL")
    s = chain(tmp_path, "r5", "trainer.max_steps=7").run()
    assert [r["status"] for r in s["stages"].values()] == ["reused", "reused", "ok", "ok", "reused"]
    assert [c[0] for c in calls(log)[5:]] == ["train", "train", "eval"]


def test_eval_never_takes_the_checkpoint_of_a_training_that_did_not_finish(tmp_path, monkeypatch):
    stand_in_scripts(tmp_path / "scripts")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CALLS", str(log))
    chain(tmp_path, "r1", "pipeline.stages=[train,eval]").run()
    monkeypatch.setenv("FAIL_LATE", "train")  # its last.ckpt exists, but the training failed
    with pytest.raises(PipelineError):
        chain(tmp_path, "r2", "trainer.max_steps=7", "pipeline.stages=[train]").run()
    monkeypatch.delenv("FAIL_LATE")
    with pytest.raises(PipelineError, match="the latest training did not finish.*ckpt_path="):
        chain(tmp_path, "r3", "pipeline.stages=[eval]").run()
    s = json.loads((tmp_path / "reports" / "pipeline_summary.json").read_text())
    assert s["failed_stage"] == "eval" and s["stages"]["eval"]["exit_code"] is None
    assert [c[0] for c in calls(log)] == ["train", "eval", "train"]  # eval was not started
    # a checkpoint given to eval is evaluated
    s = chain(tmp_path, "r4", "pipeline.stages=[eval]", "pipeline.overrides.eval=['ckpt_path=/my.ckpt']").run()
    assert s["stages"]["eval"]["status"] == "ok" and "ckpt_path=/my.ckpt" in calls(log)[-1][1]


def test_train_writes_where_the_pipeline_looks_and_a_retraining_is_evaluated_again(tmp_path, monkeypatch):
    stand_in_scripts(tmp_path / "scripts")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CALLS", str(log))
    folder = tmp_path / "ckpts"
    s = chain(tmp_path, "r1", "pipeline.stages=[train,eval]", f"pipeline.checkpoint_dir={folder}").run()
    train = s["stages"]["train"]
    assert train["artefacts"]["checkpoint"] == str(folder / "last.ckpt") and (folder / "last.ckpt").is_file()
    assert train["figures"]["step"] == 10 and f"paths.checkpoint_dir={folder}" in calls(log)[0][1]
    assert f"ckpt_path={folder / 'last.ckpt'}" in calls(log)[1][1]
    # the folder is where the run works, not what it does: a second run reuses both stages
    s = chain(tmp_path, "r2", "pipeline.stages=[train,eval]", f"pipeline.checkpoint_dir={folder}").run()
    assert [r["status"] for r in s["stages"].values()] == ["reused", "reused"] and len(calls(log)) == 2
    # a training forced again writes the same checkpoint path; its evaluation is not stale
    s = chain(tmp_path, "r3", "pipeline.stages=[train,eval]", f"pipeline.checkpoint_dir={folder}",
              "pipeline.force=[train]").run()
    assert [r["status"] for r in s["stages"].values()] == ["ok", "ok"]
    assert [c[0] for c in calls(log)[2:]] == ["train", "eval"]
    with pytest.raises(PipelineError, match=r"paths.checkpoint_dir=/x: .* set pipeline.checkpoint_dir=<folder>"):
        chain(tmp_path, "r4", "paths.checkpoint_dir=/x")


def test_a_failed_training_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    stand_in_scripts(tmp_path / "scripts")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CALLS", str(log))
    p = chain(tmp_path, "r1", "pipeline.stages=[train]")
    p.run()
    # the training "failed" after writing a checkpoint (e.g. killed): mark it so in the summary
    summary_path = tmp_path / "reports" / "pipeline_summary.json"
    s = json.loads(summary_path.read_text())
    s["stages"]["train"]["status"] = "failed"
    summary_path.write_text(json.dumps(s))
    s = chain(tmp_path, "r2", "pipeline.stages=[train]").run()
    assert s["stages"]["train"]["resumed_from"] == str(tmp_path / "logs" / "r1" / "train" / "checkpoints" / "last.ckpt")
    assert f"ckpt_path={s['stages']['train']['resumed_from']}" in calls(log)[-1][1]


def test_an_interrupted_training_is_recorded_running_and_resumed(tmp_path, monkeypatch):
    import bitnet_kde.pipeline as pipeline

    stand_in_scripts(tmp_path / "scripts")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CALLS", str(log))
    real = pipeline.run_child

    def interrupted(cmd, **kwargs):  # Ctrl-C after the child wrote its checkpoint
        real(cmd, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_child", interrupted)
    with pytest.raises(KeyboardInterrupt):
        chain(tmp_path, "r1", "pipeline.stages=[train,eval]").run()
    s = json.loads((tmp_path / "reports" / "pipeline_summary.json").read_text())
    assert s["status"] == "running" and s["stages"]["train"]["status"] == "running"
    assert s["stages"]["eval"]["status"] == "not_run"
    monkeypatch.setattr(pipeline, "run_child", real)
    s = chain(tmp_path, "r2", "pipeline.stages=[train,eval]").run()
    ckpt = str(tmp_path / "logs" / "r1" / "train" / "checkpoints" / "last.ckpt")
    assert s["stages"]["train"]["status"] == "ok" and s["stages"]["train"]["resumed_from"] == ckpt
    assert [c[0] for c in calls(log)] == ["train", "train", "eval"] and f"ckpt_path={ckpt}" in calls(log)[1][1]


def test_gate_without_a_threshold_and_unknown_stages_are_refused(tmp_path):
    with pytest.raises(PipelineError, match="no gate is set"):
        chain(tmp_path, "r", "pipeline.gate=true")
    with pytest.raises(PipelineError, match=r"pipeline.gate=true .* has no eval"):
        chain(tmp_path, "r", "pipeline.gate=true", "pipeline.gates.top1_agreement=0.3", "pipeline.stages=[dryrun]")
    with pytest.raises(PipelineError, match=r"pipeline.force: unknown stage\(s\) \['trian'\]"):
        chain(tmp_path, "r", "pipeline.force=[trian]")
    with pytest.raises(PipelineError, match=r"pipeline.stages: unknown stage\(s\) \['all'\].*is for pipeline.force"):
        chain(tmp_path, "r", "pipeline.stages=[all]")


def test_smoke_preset_replaces_train_experiment():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("pipeline", overrides=["experiment=smoke"])
        plain = compose("pipeline", overrides=["experiment=ablation_kd"])
    assert cfg.pipeline.forward_experiment is False and "model=tiny" in cfg.pipeline.overrides.shared
    assert plain.pipeline.forward_experiment is True and list(plain.pipeline.overrides.shared) == []
