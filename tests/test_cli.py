"""The entry points' start-up: `.env`, teacher and storage groups from the environment, resolvers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT
from omegaconf import OmegaConf

from bitnet_kde import cli


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
    clean_env.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / ".env").write_text("TEACHER_PROVIDER=vllm\n")
    clean_env.chdir(tmp_path)
    clean_env.setattr(sys, "argv", ["train.py", "model=tiny"])
    seen = []
    cli.run(lambda: seen.append(list(sys.argv)))
    assert seen == [["train.py", "model=tiny", "teacher=vllm"]]
    assert "HYDRA_FULL_ERROR" not in os.environ  # set for Hydra during the run only
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


# ---------------------------------------------------------------------------------------------
# errors: one line for a user error, the traceback in the run's log file
# ---------------------------------------------------------------------------------------------

def _raise(exc: BaseException):
    def main():
        raise exc
    return main


@pytest.fixture
def log_file(clean_env, tmp_path):
    """A run's log file, as Hydra's job logging attaches it to the root logger."""
    import logging

    clean_env.chdir(tmp_path)
    clean_env.setattr(sys, "argv", ["collect.py"])
    clean_env.delenv(cli.DEBUG_VARIABLE, raising=False)
    clean_env.delenv("HYDRA_FULL_ERROR", raising=False)
    handler = logging.FileHandler(tmp_path / "collect.log")
    logging.getLogger().addHandler(handler)
    yield tmp_path / "collect.log"
    logging.getLogger().removeHandler(handler)
    handler.close()


def test_user_error_is_one_line_and_its_traceback_goes_to_the_log(log_file, capsys):
    from hydra.errors import InstantiationException

    from bitnet_kde.teachers import TeacherError

    try:  # as Hydra's instantiate wraps what a teacher's constructor raises
        raise InstantiationException("Error in call to target 'OpenAITeacher':\nTeacherError(...)") \
            from TeacherError("openai/gpt: no API key: OPENAI_API_KEY is not set; see http://u:pw@host/v1")
    except InstantiationException as e:
        wrapped = e
    with pytest.raises(SystemExit) as ei:
        cli.run(_raise(wrapped))
    assert ei.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: openai/gpt: no API key: OPENAI_API_KEY is not set"), err
    assert "http://***@host/v1" in err and "pw@" not in err
    assert str(log_file) in err and "Traceback" not in err
    logged = log_file.read_text()
    assert "Traceback" in logged and "InstantiationException" in logged and "no API key" in logged
    assert "pw@" not in logged


def test_config_errors_are_one_line_naming_the_key(log_file, capsys):
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError

    try:
        _ = OmegaConf.create({"data": {"source": {"num_sequences": 96}}}).data.source.is_complete
    except ConfigAttributeError as e:
        missing = e
    with pytest.raises(SystemExit):
        cli.run(_raise(missing))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: config: Missing key is_complete")
    assert "data.source.is_complete" in err


def test_debug_flag_prints_the_traceback_too(log_file, capsys, clean_env):
    clean_env.setenv(cli.DEBUG_VARIABLE, "1")
    with pytest.raises(SystemExit):
        cli.run(_raise(FileNotFoundError("prompts.jsonl: no such file")))
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1] == "error: prompts.jsonl: no such file"


def test_unexpected_errors_keep_their_traceback(log_file):
    with pytest.raises(ZeroDivisionError):
        cli.run(_raise(ZeroDivisionError("a bug")))
    with pytest.raises(ValueError, match="plain"):  # a ValueError that is not one of our own classes
        cli.run(_raise(ValueError("plain")))


def test_trace_and_prompt_errors_are_user_errors_without_importing_pyarrow_at_start():
    from bitnet_kde.kd.prompts import PromptLoadError
    from bitnet_kde.kd.traces import TraceValidationError

    for exc in (PromptLoadError("prompts.jsonl line 3: no 'prompt' field"),
                TraceValidationError("shard-0.parquet row 7: top_logprobs is not finite")):
        assert cli.user_error(exc) is exc
    # the entry points import cli first; pyarrow (~80 MB of RSS, counted by the 7B dry-run's
    # peak memory) loads only where traces or prompts are read
    probe = "import sys, bitnet_kde.cli, bitnet_kde.dryrun; print('pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("script, args, says", [
    ("teacher_baseline.py", ["teacher=openai", "prompts.limit=1"], "OPENAI_API_KEY is not set"),
    ("train.py", ["model=nosuch"], "config: In 'train': Could not find 'model/nosuch'"),
    # checked before the student tokenizer, the prompts or any model load
    ("collect.py", ["teacher=openai"], "OPENAI_API_KEY is not set"),
    # configs that cannot combine: smoke sizes data=synthetic's source, parquet has none
    ("train.py", ["experiment=smoke", "data=parquet"], "do not combine with this one"),
])
def test_entry_points_end_a_user_error_with_one_line(tmp_path, script, args, says):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TEACHER_PROVIDER", "STORAGE", "OPENAI_API_KEY", cli.DEBUG_VARIABLE, "HYDRA_FULL_ERROR")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / script), *args, f"paths.root={tmp_path}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr and "Error executing job" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], proc.stderr[-3000:]
    assert not list(tmp_path.rglob("*.parquet"))
