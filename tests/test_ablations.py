"""The ablation experiments differ from the reference only where they should; the script runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from test_configs import cfg_with


def flat(cfg) -> dict:
    d = OmegaConf.to_container(cfg, resolve=False)
    d.pop("hydra", None)
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = node
    walk("", d)
    return out


@pytest.mark.parametrize("name, changed", [
    ("ce_only", {"loss.ce_only": True}),
    ("renormalize", {"loss.other": "renormalize"}),
    ("a8_only", {"callbacks.activation_flip.enabled": False}),
])
def test_each_ablation_changes_one_thing(tmp_path, name, changed):
    ref = flat(cfg_with(tmp_path, "experiment=ablation_kd"))
    abl = flat(cfg_with(tmp_path, f"experiment=ablation_{name}"))
    diff = {k: abl[k] for k in abl if abl.get(k) != ref.get(k) and k != "task_name"}
    assert diff == changed
    # the reference is the default training run: same model, data, steps, flip at 90%
    default = flat(cfg_with(tmp_path))
    assert {k: v for k, v in ref.items() if k != "task_name"} == {k: v for k, v in default.items() if k != "task_name"}
    assert ref["callbacks.activation_flip.flip_fraction"] == 0.9 and ref["model.name"] == "mini"


@pytest.mark.slow
def test_run_ablations_script_end_to_end(tmp_path):
    """Two ablations at tiny scale through the script: reports, table, shared teacher figures."""
    out = tmp_path / "RESULTS.md"
    short = "collection.sampling.max_new_tokens=16"
    cmd = [sys.executable, str(ROOT / "scripts" / "run_ablations.py"), "--root", str(tmp_path), "--out", str(out),
           "--only", "kd,a8_only",
           "--train", "model=tiny", "collection.prompts.limit=16", "data.val_fraction=0.3", "trainer.max_steps=4",
           "trainer.val_check_interval=2", "data.num_workers=0", "collection.progress=false", short,
           "--eval", short, "collection.prompts.categories=[qa]", "speed.prompts=1", "speed.max_new_tokens=4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kd, a8 = (json.loads((tmp_path / "reports" / "ablations" / f"{n}.json").read_text()) for n in ("kd", "a8_only"))
    assert kd["student"]["activation_bits"] == 4 and a8["student"]["activation_bits"] == 8
    assert kd["speed"]["teacher"]["source"] == "measured" and a8["speed"]["teacher"]["source"] == "config"
    assert a8["qei"]["tps_teacher"] == pytest.approx(kd["qei"]["tps_teacher"])
    text = out.read_text()
    assert "| (a) KD Top-K + Other, A8→A4 at 90% | A4 |" in text and "| (d) KD Top-K + Other, A8 only | A8 |" in text
    assert "--only kd,a8_only" in text and f"{kd['metrics']['overall']['kl']:.3f}" in text
