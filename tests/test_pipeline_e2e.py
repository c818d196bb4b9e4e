"""`python pipeline.py experiment=smoke` end to end with the embedded teacher: a failed stage stops
the chain, the rerun continues from it, and quality gates pass or fail from real eval reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

STAGES = ["teacher_baseline", "collect", "train", "eval", "dryrun"]
KEY_FIGURES = {"teacher_baseline": ["tokens_per_second"], "collect": ["traces", "tokens"],
               "train": ["val_loss", "train_loss", "tokens_seen", "step"],
               "eval": ["kl", "top1_agreement", "json_validity", "teacher_json_validity", "qei"],
               "dryrun": ["peak_rss_bytes", "parameters"]}


def run_pipeline(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "TEACHER_PROVIDER", "STORAGE")}
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "experiment=smoke", f"paths.root={root}", *overrides]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)


def summary(root: Path) -> dict:
    """The summary after a run, with the eval report it points at as it was then (`_eval_report`):
    the next run overwrites that file."""
    s = json.loads((root / "reports" / "pipeline_summary.json").read_text())
    report = root / "reports" / "evaluation.json"
    s["_eval_report"] = json.loads(report.read_text()) if report.exists() else None
    return s


def pipeline_runs(root: Path) -> list[Path]:
    return sorted((root / "logs" / "pipeline" / "runs").iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs in one folder: eval broken (a teacher without its key), fixed with a gate that
    passes, then with a gate no student can pass."""
    root = tmp_path_factory.mktemp("pipeline")
    smoke_eval = list(OmegaConf.load(ROOT / "configs" / "pipeline" / "experiment_smoke.yaml").overrides.eval)
    broken = "pipeline.overrides.eval=[" + ",".join(f"'{o}'" for o in [*smoke_eval, "teacher=openai"]) + "]"
    failed = run_pipeline(root, broken)
    first = summary(root)
    passed = run_pipeline(root, "pipeline.gate=true", "pipeline.gates.kl_max=1000", "pipeline.gates.top1_agreement=0")
    second = summary(root)
    gated = run_pipeline(root, "pipeline.gate=true", "pipeline.gates.top1_agreement=1.01")
    return root, (failed, first), (passed, second), (gated, summary(root))


def test_failed_stage_stops_the_chain_with_its_error(runs):
    _, (proc, s), _, _ = runs
    assert proc.returncode == 1
    assert "error: stage eval failed" in proc.stderr and "OPENAI_API_KEY" in proc.stderr
    assert s["status"] == "failed" and s["failed_stage"] == "eval" and list(s["stages"]) == STAGES
    assert s["_eval_report"] is None
    assert [s["stages"][st]["status"] for st in STAGES] == ["ok", "ok", "ok", "failed", "not_run"]
    assert "OPENAI_API_KEY" in s["stages"]["eval"]["error"] and s["stages"]["eval"]["exit_code"] == 1
    for stage in ("teacher_baseline", "collect", "train"):
        assert s["stages"][stage]["wall_s"] > 0
    train = s["stages"]["train"]
    assert Path(train["artefacts"]["checkpoint"]).exists() and Path(train["artefacts"]["health"]).exists()
    health = json.loads(Path(train["artefacts"]["health"]).read_text())
    assert train["figures"]["val_loss"] == health["val_loss"] and train["figures"]["step"] == health["step"] == 30
    manifest = json.loads((Path(s["stages"]["collect"]["artefacts"]["manifest"])).read_text())
    assert s["stages"]["collect"]["figures"]["traces"] == manifest["rows"] > 0


def test_rerun_continues_from_the_failed_stage_and_fills_every_figure(runs):
    root, (_, first), (proc, s), _ = runs
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s["stages"][st]["status"] for st in STAGES] == ["reused", "reused", "reused", "ok", "ok"]
    # nothing was redone: the reused stages have no run folder in the second pipeline run
    second_run = pipeline_runs(root)[1]
    assert sorted(p.name for p in second_run.iterdir() if p.is_dir() and p.name != ".hydra") == ["dryrun", "eval"]
    for stage in ("teacher_baseline", "collect", "train"):
        assert s["stages"][stage]["figures"] == first["stages"][stage]["figures"]
    for stage, names in KEY_FIGURES.items():
        for name in names:
            value = s["stages"][stage]["figures"][name]
            assert isinstance(value, (int, float)) and math.isfinite(value), (stage, name, value)
    report = s["_eval_report"]
    assert report["checkpoint"] == first["stages"]["train"]["artefacts"]["checkpoint"]
    assert s["stages"]["eval"]["figures"]["kl"] == report["metrics"]["overall"]["kl"]
    assert s["gates"] == report["gates"] and s["gates"]["passed"] is True and s["status"] == "ok"
    assert {c["gate"] for c in s["gates"]["checks"]} == {"kl_max", "top1_agreement"}
    dry = json.loads(Path(s["stages"]["dryrun"]["artefacts"]["report"]).read_text())
    assert s["stages"]["dryrun"]["figures"]["peak_rss_bytes"] == dry["memory"]["peak_rss"]


def test_failed_gate_marks_report_and_summary_and_exits_2(runs):
    _, _, (_, before), (proc, s) = runs
    assert proc.returncode == 2, proc.stderr[-3000:]
    # new gate thresholds are new eval arguments: eval ran again, the dry-run was reused
    assert [s["stages"][st]["status"] for st in STAGES] == ["reused", "reused", "reused", "ok", "reused"]
    assert s["status"] == "gate_failed" and s["gates"]["passed"] is False
    (check,) = s["gates"]["checks"]
    assert check["gate"] == "top1_agreement" and check["threshold"] == pytest.approx(1.01)
    assert check["student"] == s["stages"]["eval"]["figures"]["top1_agreement"] and not check["passed"]
    assert s["_eval_report"]["gates"] == s["gates"]
    assert s["stages"]["eval"]["fingerprint"] != before["stages"]["eval"]["fingerprint"]
