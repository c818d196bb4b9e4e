"""The teacher baseline stage against a real OpenAI-compatible HTTP server, and the report header."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from bitnet_kde.eval.teacher_baseline import baseline
from bitnet_kde.kd.prompts import load_prompts
from bitnet_kde.runinfo import describe, run_info
from fault_server import FaultServer, status

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def test_baseline_reports_answers_failures_and_its_header(tmp_path, monkeypatch):
    monkeypatch.setenv("BASELINE_TEST_KEY", "sk-test")
    prompts = load_prompts(split=["test"], limit=3)
    with FaultServer() as server:
        server.script(prompts[1].prompt, status(500, "server down"))  # no retries: a failure record
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            cfg = compose("teacher_baseline", overrides=[
                f"paths.root={tmp_path}", "teacher=openai", f"teacher.base_url={server.openai_base_url}",
                "teacher.model=fake-model", "teacher.api_key_env=BASELINE_TEST_KEY", "teacher.max_retries=0",
                "prompts.limit=3", "max_new_tokens=8"])
        report = baseline(cfg)
    s = report["summary"]
    assert report["teacher"].endswith("fake-model")
    assert report["prompts"] == {"source": "shipped", "split": ["test"], "count": 3}
    assert s["answered"] == 2 and s["failed"] == 1 and s["failures_by_reason"] == {"server_error": 1}
    assert [a["id"] for a in report["answers"]] == [prompts[0].id, prompts[2].id]
    assert report["failures"][0]["id"] == prompts[1].id
    assert s["completion_tokens"] == sum(a["completion_tokens"] for a in report["answers"]) > 0
    assert s["tokens_per_second"] > 0 and all(a["latency_s"] > 0 for a in report["answers"])
    assert set(report["machine"]) == set(run_info()["machine"]) and report["created_at"].endswith("+00:00")


def test_run_info_names_the_machine_of_every_report():
    info = run_info(device="cpu")
    m = info["machine"]
    assert set(m) == {"platform", "processor", "python", "cpu_count", "torch", "threads", "device"}
    assert m["device"] == "cpu" and m["threads"] >= 1 and m["cpu_count"] >= 1
    assert describe(m) == f"{m['processor']}, {m['threads']} threads, torch {m['torch']}, cpu"
