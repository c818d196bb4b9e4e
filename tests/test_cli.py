"""The entry points' start-up: `.env`, teacher and storage groups from the environment, resolvers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from bitnet_kde import cli
from conftest import ROOT


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("TEACHER_PROVIDER", "PROVIDER", "STORAGE"):
        # set, then delete: monkeypatch then restores the variable's original state at teardown,
        # including removing what `.env` loading writes into os.environ during a test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_groups_from_the_environment_unless_given_on_the_command_line(clean_env):
    clean_env.setenv("TEACHER_PROVIDER", "openai")
    clean_env.setenv("STORAGE", "s3")
    assert cli.hydra_argv(["eval.py", "x=1"]) == ["eval.py", "x=1", "teacher=openai", "storage=s3"]
    assert cli.hydra_argv(["eval.py", "teacher=vllm", "storage=gcs"]) == ["eval.py", "teacher=vllm", "storage=gcs"]
    # a stage without a teacher takes only the store
    assert cli.hydra_argv(["dryrun.py"], teacher=False) == ["dryrun.py", "storage=s3"]


def test_old_provider_variable_only_where_it_was_read_and_with_a_warning(clean_env, capsys):
    clean_env.setenv("PROVIDER", "anthropic")
    assert cli.hydra_argv(["collect.py"]) == ["collect.py"]  # never read by collect, train, eval
    assert capsys.readouterr().err == ""
    assert cli.hydra_argv(["teacher_baseline.py"], accept_old_provider=True) == [
        "teacher_baseline.py", "teacher=anthropic"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PROVIDER is deprecated" in err and "TEACHER_PROVIDER" in err
    # TEACHER_PROVIDER wins, silently
    clean_env.setenv("TEACHER_PROVIDER", "openai")
    assert cli.hydra_argv(["teacher_baseline.py"], accept_old_provider=True) == [
        "teacher_baseline.py", "teacher=openai"]
    assert capsys.readouterr().err == ""


def test_run_loads_dotenv_registers_resolvers_and_hands_hydra_the_arguments(clean_env, tmp_path):
    (tmp_path / ".env").write_text("TEACHER_PROVIDER=vllm\n")
    clean_env.chdir(tmp_path)
    clean_env.setattr(sys, "argv", ["train.py", "model=tiny"])
    seen = []
    cli.run(lambda: seen.append(list(sys.argv)))
    assert seen == [["train.py", "model=tiny", "teacher=vllm"]]
    assert OmegaConf.has_resolver("local_dir") and OmegaConf.has_resolver("run_dir_on_store")


def test_entry_point_composes_with_the_environment_teacher(tmp_path):
    """A real script: the bootstrap runs before Hydra and the paths resolvers resolve."""
    env = {k: v for k, v in os.environ.items() if k not in ("TEACHER_PROVIDER", "STORAGE")}
    env.update(PROVIDER="openai", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "teacher_baseline.py"), "--cfg", "job", "--resolve",
                           f"paths.root={tmp_path}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.teacher.provider == "openai" and cfg.paths.log_dir == f"{tmp_path}/logs"
    assert "PROVIDER is deprecated" in proc.stderr
