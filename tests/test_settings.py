"""Settings refused up front: every checked key, the shipped configs, and the entry points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bitnet_kde import settings
from bitnet_kde.settings import SettingsError

from conftest import ROOT

CONFIGS = str(ROOT / "configs")


def composed(config: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config, overrides=list(overrides))


@pytest.mark.parametrize("config, overrides", [
    ("train", ()), ("train", ("experiment=smoke",)), ("train", ("data=parquet", "model=tiny")), ("train", ("model=tiny",)), ("train", ("model=7b",)),
    ("train", ("experiment=ablation_ce_only",)), ("train", ("teacher=openai",)),
    ("collect", ()), ("collect", ("teacher=openai",)), ("eval", ()), ("teacher_baseline", ()),
])
def test_shipped_configs_pass(config, overrides):
    settings.check(composed(config, *overrides))


# (stage, key, refused value, accepted value): every rule, with a value just outside its range
CASES = [
    ("train", "loss.tau", "0", "0.5"),
    ("train", "loss.tau", "-1", "2"),
    ("train", "loss.tau", "nan", "1"),
    ("train", "loss.kd_weight", "-0.1", "0"),
    ("train", "loss.ce_weight", "-1", "0"),
    ("train", "loss.format_weight", "-1", "0"),
    ("train", "loss.chunk_size", "0", "null"),
    ("train", "optim.lr", "0", "1e-4"),
    ("train", "optim.lr", "inf", "1e-4"),
    ("train", "optim.weight_decay", "-0.1", "0"),
    ("train", "optim.eps", "0", "1e-6"),
    ("train", "optim.warmup_steps", "-1", "0"),
    ("train", "optim.warmup_steps", "2.5", "3"),
    ("train", "optim.min_lr_ratio", "1.5", "1"),
    ("train", "optim.quant_warmup_steps", "-5", "5"),
    ("train", "optim.betas", "[0.9,1.0]", "[0.8,0.99]"),
    ("train", "data.batch_size", "0", "1"),
    ("train", "data.vocab_size", "0", "64"),
    ("train", "data.k_max", "0", "8"),
    ("train", "data.max_seq_len", "1", "128"),
    ("train", "data.max_seq_len", "1024", "512"),      # > the mini student's 512
    ("train", "data.val_fraction", "0", "0.2"),
    ("train", "data.val_fraction", "1", "0.99"),
    ("train", "data.num_workers", "-1", "0"),
    ("train", "trainer.max_steps", "0", "-1"),
    ("train", "trainer.max_epochs", "0", "null"),
    ("train", "trainer.accumulate_grad_batches", "0", "4"),
    ("train", "trainer.log_every_n_steps", "0", "1"),
    ("train", "trainer.gradient_clip_val", "-1", "null"),
    ("train", "callbacks.activation_flip.flip_fraction", "0", "1"),
    ("train", "callbacks.activation_flip.flip_fraction", "1.5", "0.95"),
    ("train", "callbacks.activation_flip.flip_at_tokens", "0", "1000"),
    ("train", "callbacks.activation_flip.token_budget", "-10", "10000"),
    ("train", "callbacks.quant_stats.every_n_steps", "0", "10"),
    ("train", "callbacks.throughput.window_size", "0", "2"),
    ("train", "callbacks.model_checkpoint.save_top_k", "-2", "-1"),
    ("collect", "collection.chunk_size", "0", "1"),
    ("collect", "collection.num_shards", "0", "2"),
    ("collect", "collection.shard_index", "-1", "0"),
    ("collect", "collection.shard_index", "1", "0"),    # == num_shards (1)
    ("collect", "collection.prompts.limit", "0", "null"),
    ("collect", "collection.prompts.limit", "-4", "4"),
    ("collect", "collection.sampling.top_k", "-3", "1"),
    ("collect", "collection.sampling.top_k", "0", "20"),
    ("collect", "collection.sampling.max_new_tokens", "0", "1"),
    ("collect", "collection.sampling.temperature", "-0.5", "0"),
    ("collect", "collection.sampling.seed", "1.5", "7"),
    ("collect", "teacher.batch_size", "0", "2"),
    ("collect", "teacher.device", None, "cpu"),          # not a checked key: anything passes
    ("train", "data.source.num_sequences", "0", "8"),
    ("train", "data.source.k", "0", "4"),
    ("eval", "batch_size", "0", "2"),
    ("eval", "max_new_tokens", "0", "16"),
    ("eval", "speed.prompts", "-1", "0"),
    ("eval", "speed.max_new_tokens", "0", "8"),
    ("eval", "speed.teacher_tokens_per_s", "0", "null"),
    ("eval", "teacher_weight_bytes", "0", "1000"),
    ("eval", "report_answers", "-1", "0"),
    ("eval", "activation_bits", "6", "4"),
    ("eval", "collection.prompts.limit", "0", "4"),
    ("teacher_baseline", "max_new_tokens", "-1", "1"),
    ("teacher_baseline", "prompts.limit", "0", "null"),
]
API_CASES = [
    ("teacher.max_concurrency", "0", "16"),
    ("teacher.max_retries", "-1", "0"),
    ("teacher.timeout_s", "0", "0.5"),
    ("teacher.max_prompts", "0", "null"),
    ("teacher.max_total_tokens", "0", "100"),
]


def stage_overrides(stage: str, key: str) -> tuple[str, ...]:
    # the synthetic source is where data.source.* exists
    return ("data=synthetic",) if key.startswith("data.source.") else ()


@pytest.mark.parametrize("stage, key, bad, good", CASES, ids=[f"{c[1]}={c[2]}" for c in CASES])
def test_bad_value_refused_good_value_passes(stage, key, bad, good):
    base = stage_overrides(stage, key)
    settings.check(composed(stage, *base, f"{key}={good}"))
    if bad is None:
        return
    with pytest.raises(SettingsError) as e:
        settings.check(composed(stage, *base, f"{key}={bad}"))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"invalid setting {key}=") and "must be" in msg


@pytest.mark.parametrize("key, bad, good", API_CASES, ids=[f"{c[0]}={c[1]}" for c in API_CASES])
def test_api_teacher_settings(key, bad, good):
    settings.check(composed("collect", "teacher=openai", f"{key}={good}"))
    with pytest.raises(SettingsError, match=f"invalid setting {key}="):
        settings.check(composed("collect", "teacher=openai", f"{key}={bad}"))


def test_messages_name_key_value_and_range():
    def refused(stage, *overrides):
        with pytest.raises(SettingsError) as e:
            settings.check(composed(stage, *overrides))
        return str(e.value)

    assert refused("train", "loss.tau=0") == "invalid setting loss.tau=0: must be a number > 0"
    assert refused("train", "data.val_fraction=1.0") == "invalid setting data.val_fraction=1.0: must be a number in (0, 1)"
    assert refused("collect", "collection.prompts.limit=0") == (
        "invalid setting collection.prompts.limit=0: must be an integer >= 1, or null (null = every prompt)")
    assert refused("train", "trainer.max_steps=0") == (
        "invalid setting trainer.max_steps=0: must be an integer >= 1, or -1 (-1 = no step limit)")
    assert refused("train", "model=tiny", "data.max_seq_len=512") == (
        "invalid setting data.max_seq_len=512: must be <= the student's max_seq_len (256 for model=tiny)")
    # a model override of max_seq_len counts, not only the preset's
    settings.check(composed("train", "model=tiny", "model.max_seq_len=512", "data.max_seq_len=512"))
    assert "must be a number" in refused("train", "loss.tau=abc")
    assert "must be a number" in refused("train", "loss.tau=true")


def test_missing_keys_are_skipped():
    from omegaconf import OmegaConf

    settings.check(OmegaConf.create({"loss": {"tau": 1.0}}))
    with pytest.raises(SettingsError):
        settings.check(OmegaConf.create({"loss": {"tau": -1.0}}))


def run_entry(script: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), f"paths.root={tmp_path}", *overrides],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tau", ["0", "-1"])
def test_train_py_refuses_tau_before_any_work(tmp_path, tau):
    proc = run_entry("train.py", tmp_path, "experiment=smoke", f"loss.tau={tau}")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1] == f"error: invalid setting loss.tau={tau}: must be a number > 0", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt")), "no checkpoint is written"
    assert not (tmp_path / "data").exists(), "no trace is written"


@pytest.mark.parametrize("override, key", [("collection.prompts.limit=0", "collection.prompts.limit"),
                                           ("collection.sampling.top_k=-3", "collection.sampling.top_k")])
def test_collect_py_refuses_before_any_work(tmp_path, override, key):
    proc = run_entry("collect.py", tmp_path, "teacher=none", override)
    assert proc.returncode != 0
    assert f"error: invalid setting {key}=" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "data").exists()
