"""End-to-end runs through the real entry point `python train.py` with tmp_path outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, run_train

SMOKE = ("experiment=smoke", "data.source.num_sequences=64", "trainer.val_check_interval=5")


def only_run_dir(root: Path) -> Path:
    runs = sorted((root / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def flip_state(ckpt: Path) -> dict:
    return torch.load(ckpt, weights_only=False)["callbacks"]["ActivationFlip"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    proc = run_train(root, *SMOKE, "trainer.max_steps=10", "callbacks.activation_flip.flip_at_tokens=100000")
    return root, only_run_dir(root), proc


def test_train_writes_checkpoint_tensorboard_and_config(first_run):
    root, run, proc = first_run
    last = run / "checkpoints" / "last.ckpt"
    assert last.exists()
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 10
    assert ckpt["activation_bits"] == 8
    assert flip_state(last)["tokens_seen"] > 0
    assert (run / ".hydra" / "config.yaml").exists()
    assert any((root / "data").iterdir()), "synthetic traces are written under paths.data_dir"

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/kd", "train/ce", "train/format", "val/loss", "val/kd", "val/top1_agree",
                "train/tokens_seen", "train/activation_bits", "lr-AdamW/decay"):
        assert tag in tags, f"{tag} missing from TensorBoard scalars {sorted(tags)[:40]}"
    assert any(t.startswith("quant/b0.attn.q_proj/") for t in tags)
    assert any("items_per_sec" in t for t in tags), "throughput (tokens/s) is logged"
    assert "quant/scales" in acc.Tags()["histograms"]
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert all(torch.isfinite(torch.tensor(loss)))
    # The HPARAMS tab: an hparams summary with the final validation metrics.
    assert any("hp/val/loss" in t for t in tags)
    assert "checkpoints:" in proc.stderr + proc.stdout


def test_resume_continues_step_and_token_counters(first_run, tmp_path):
    root, run, _ = first_run
    last = run / "checkpoints" / "last.ckpt"
    before = flip_state(last)["tokens_seen"]
    run_train(tmp_path, *SMOKE, "trainer.max_steps=15", f"ckpt_path={last}", f"paths.data_dir={root / 'data'}",
              "callbacks.activation_flip.flip_at_tokens=100000")
    new_last = only_run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(new_last, weights_only=False)
    assert ckpt["global_step"] == 15
    after = flip_state(new_last)["tokens_seen"]
    # 5 more steps of batch 8: more tokens, but far fewer than a restart from zero would give.
    assert before < after < 2 * before


def test_flip_happens_in_a_full_run_and_is_saved(tmp_path):
    run_train(tmp_path, *SMOKE, "trainer.max_steps=12", "callbacks.activation_flip.flip_fraction=0.5")
    ckpt = torch.load(only_run_dir(tmp_path) / "checkpoints" / "last.ckpt", weights_only=False)
    state = ckpt["callbacks"]["ActivationFlip"]
    assert state["flipped"] and ckpt["activation_bits"] == 4
    assert 1 <= state["flip_step"] <= 12


def test_multirun_produces_one_run_per_value(tmp_path):
    proc = run_train(tmp_path, *SMOKE, "trainer.max_steps=4", "loss.kd_weight=0.5,1.0", multirun=True)
    sweeps = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    weights = []
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").exists()
        hp = torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
        weights.append(hp["loss"]["kd_weight"])
    assert weights == [0.5, 1.0]
    assert "#0" in proc.stdout + proc.stderr and "#1" in proc.stdout + proc.stderr


def test_bad_trace_file_stops_training_with_a_clear_error(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "traces"
    bad.mkdir()
    (bad / "kd-0.parquet").write_bytes(b"PAR1 this is not parquet")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "data=parquet", f"data.trace_dir={bad}",
                           "data.vocab_size=64", "model=tiny", f"paths.root={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "kd-0.parquet" in proc.stderr and "not a readable Parquet file" in proc.stderr


def test_diverging_run_stops_with_the_step_and_writes_no_checkpoint(tmp_path):
    import subprocess
    import sys

    # lr=1e30 is a valid setting, but the first update blows the weights up: the loss turns NaN
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"paths.root={tmp_path}", "data.num_workers=0",
                           *SMOKE, "data.source.num_sequences=32", "optim.lr=1e30", "optim.warmup_steps=0",
                           "trainer.max_steps=6", "trainer.val_check_interval=3"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    # one line for the user (the traceback is in the run's log file)
    assert "error: non-finite training loss at step " in proc.stderr and "Traceback" not in proc.stderr
    assert "kd=nan" in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_optuna_sweep_returns_the_optimized_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    run_train(tmp_path, *SMOKE, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "trainer.max_steps=4",
              multirun=True)
    results = list((tmp_path / "logs" / "train" / "multiruns").glob("*/optimization_results.yaml"))
    assert len(results) == 1
    import yaml

    best = yaml.safe_load(results[0].read_text())
    assert best["best_value"] > 0 and set(best["best_params"]) == {"optim.lr", "loss.kd_weight", "loss.ce_weight"}


@pytest.mark.slow
def test_ddp_through_train_py_counts_tokens_of_both_ranks(tmp_path):
    """`trainer=ddp` on 2 CPU processes: Lightning relaunches train.py per rank with the same
    Hydra overrides; the checkpoint's token count is the sum over both ranks for one epoch."""
    from bitnet_kde.data import KDTraceDataModule
    from bitnet_kde.kd.synthetic import BigramTraceSource

    n = 48
    while True:  # an even number of train rows, so DistributedSampler adds no duplicates
        d = tmp_path / "data" / f"synthetic-bigram-v512-n{n}"
        BigramTraceSource(vocab_size=512, k=20, num_sequences=n, seed=0).write(d)
        dm = KDTraceDataModule(str(d), vocab_size=512, max_seq_len=256, num_workers=0)
        dm.setup()
        if len(dm.train_set) % 2 == 0:
            break
        n += 1
    run_train(tmp_path, "experiment=smoke", f"data.source.num_sequences={n}", "trainer=ddp", "trainer.devices=2",
              "trainer.accelerator=cpu", "trainer.max_steps=-1", "trainer.max_epochs=1",
              "callbacks.activation_flip.flip_fraction=1.0")
    ckpt = only_run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    state = flip_state(ckpt)
    assert state["tokens_seen"] == dm.train_tokens_per_epoch()
    assert state["flipped"]  # the budget is exactly one epoch of both ranks' tokens


def test_optim_yaml_lists_the_optimconfig_defaults():
    """`configs/optim/adamw.yaml` (what `python train.py` runs with) holds exactly `OptimConfig`'s defaults,
    so a module built without an optim config trains as `train.py` does."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from bitnet_kde.training import OptimConfig

    yaml = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "optim" / "adamw.yaml"))
    defaults = asdict(OptimConfig())
    assert yaml == {**defaults, "betas": list(defaults["betas"])}
