"""`scripts/bench_train.py --override`: train.yaml's dotted model.* / loss.* settings shape the
benchmarked step, anything else is refused before any work."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_overrides_change_only_the_named_fields_of_the_preset(bench):
    overrides = bench.parse_overrides(["model.d_model=384", "model.n_heads=6", "loss.chunk_size=64"])
    assert overrides == {"model": {"d_model": 384, "n_heads": 6}, "loss": {"chunk_size": 64}}
    cfg = bench.model_config(Namespace(model="mini", vocab=49152, seq=256, overrides=overrides), quantize=False)
    # the d_model 384 preset `mini` had before: 6 layers, 6/2 heads, FFN 1024 (context: the bench's 256)
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.ffn_dim) == (384, 6, 2, 6, 1024)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.quantize) == (49152, 256, False)
    plain = bench.model_config(Namespace(model="mini", vocab=512, seq=1024, overrides=bench.parse_overrides([])))
    assert (plain.d_model, plain.n_heads, plain.vocab_size, plain.max_seq_len) == (512, 8, 512, 1024)


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=3", "only model.<field>=value and loss.<field>=value"),
    ("model=tiny", "only model.<field>=value and loss.<field>=value"),
    ("model.quantize=false", "times the quantized and the dense model both"),
    ("loss.chunk=3", "unknown LossConfig fields ['chunk']"),
])
def test_overrides_that_do_not_shape_the_step_are_refused(bench, monkeypatch, capsys, override, message):
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--override", override])
    with pytest.raises(SystemExit) as ei:
        bench.main()
    assert ei.value.code == 2 and message in capsys.readouterr().err


def test_an_unknown_model_field_is_named(bench):
    args = Namespace(model="tiny", vocab=64, seq=16, overrides=bench.parse_overrides(["model.d_modl=32"]))
    with pytest.raises(ValueError, match=r"unknown BitNetConfig fields \['d_modl'\]"):
        bench.model_config(args)
