"""Warm start from a pretrained Llama-family model: conversion parity with transformers, layer
selection, the quantization warm-up (blend, flip, eval), checkpoints that reload without the
source, and one clear error for each kind of bad input."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers

from bitnet_kde import settings
from bitnet_kde.checkpoint import load_student
from bitnet_kde.data import KDTraceDataModule
from bitnet_kde.eval.evaluate import load_eval_student
from bitnet_kde.model.packed import packed_copy
from bitnet_kde.model.pretrained import PretrainedError, calibrate_subln, from_llama, select_layers
from bitnet_kde.settings import SettingsError
from bitnet_kde.tokenizer import load_tokenizer, tokenizer_hash
from bitnet_kde.training import ActivationFlip, DistillationModule
from bitnet_kde.training.module import quant_lambda
from bitnet_kde.training.warmstart import calibration_ids, check_tokenizer, from_pretrained, locate

from conftest import ROOT, small_source

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[1, 17, 42, 3, 99, 7, 250, 8, 64], [5, 200, 13, 13, 77, 31, 2, 190, 4]])


def llama(tmp_path, name="llama", *, tie=False, vocab=256, layers=4, tokenizer=False, theta=5000.0):
    """A random LlamaForCausalLM saved as a Hugging Face folder (no download)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=theta, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms at 1 would hide a norm mapped to the wrong place
        for n, p in lm.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    folder = tmp_path / name
    lm.save_pretrained(folder)
    if tokenizer:
        words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(folder)
    return folder, lm


@pytest.mark.parametrize("tie", [False, True])
def test_hf_folder_logits_equal_the_transformers_forward(tmp_path, tie):
    folder, lm = llama(tmp_path, tie=tie)
    student = from_pretrained(str(folder), subln=False, quantize=False).eval()
    with torch.no_grad():
        want = lm(IDS).logits
        got = student(IDS)
    assert student.cfg.ffn_act == "swiglu" and student.cfg.rope_theta == 5000.0
    assert student.cfg.tie_embeddings is tie and student.cfg.max_seq_len == 128
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_gguf_teacher_logits_equal_the_transformers_forward():
    """The embedded SmolLM2-135M GGUF (Q4_1, de-quantized to fp32 by transformers) as a source."""
    folder, name = locate("teacher")
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    student = from_pretrained("teacher", subln=False, quantize=False).eval()
    tok = load_tokenizer(folder, name)
    ids = torch.tensor([tok("The capital of France is Paris, and the capital of Italy is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(student(ids), lm(ids).logits, atol=1e-4, rtol=1e-5)
    c = student.cfg
    assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (576, 30, 9, 3, 1536, 49152)


@pytest.mark.parametrize("layers, kept", [(2, [0, 2]), ([1, 3], [1, 3]), ([3], [3])])
def test_layer_selection_copies_the_selected_blocks(tmp_path, layers, kept):
    folder, lm = llama(tmp_path)
    student = from_pretrained(str(folder), layers=layers, subln_init="one")
    assert student.cfg.n_layers == len(kept) and len(student.blocks) == len(kept)
    for j, i in enumerate(kept):
        src, dst = lm.model.layers[i], student.blocks[j]
        assert torch.equal(dst.attn.k_proj.weight, src.self_attn.k_proj.weight)
        assert torch.equal(dst.ffn.down_proj.weight, src.mlp.down_proj.weight)
        assert torch.equal(dst.ffn_norm.weight, src.post_attention_layernorm.weight)
        # SubLN (on by default) has no source counterpart; subln_init="one" starts it at 1
        assert torch.equal(dst.attn.sub_norm.weight, torch.ones(64))
        assert torch.equal(dst.ffn.sub_norm.weight, torch.ones(96))
    assert torch.equal(student.norm.weight, lm.model.norm.weight)


def test_layer_subset_matches_the_same_subset_of_the_source(tmp_path):
    folder, lm = llama(tmp_path)
    student = from_pretrained(str(folder), layers=[0, 3], subln=False, quantize=False).eval()
    lm.model.layers = torch.nn.ModuleList([lm.model.layers[0], lm.model.layers[3]])
    lm.config.num_hidden_layers = 2
    for i, layer in enumerate(lm.model.layers):
        layer.self_attn.layer_idx = i
    with torch.no_grad():
        torch.testing.assert_close(student(IDS), lm(IDS).logits, atol=2e-5, rtol=1e-5)


def test_lambda_zero_is_full_precision_and_one_is_ternary(tmp_path):
    folder, _ = llama(tmp_path, tokenizer=True)
    student = from_pretrained(str(folder)).eval()
    dense = from_pretrained(str(folder), quantize=False).eval()
    with torch.no_grad():
        student.set_quant_lambda(0.0)
        assert torch.equal(student(IDS), dense(IDS))
        student.set_quant_lambda(1.0)
        # the packed form computes the quantized forward from 2-bit codes: an independent path
        assert torch.equal(student(IDS), packed_copy(student)(IDS))
        assert not torch.allclose(student(IDS), dense(IDS))


def test_calibrated_subln_keeps_a_typical_token_unchanged(tmp_path):
    """Each SubLN weight is the median per-token RMS of its input in the full-precision forward, with
    the blocks before it already calibrated: recomputed here by hand, block by block, from the
    converted model without SubLN (whose forward is the source's)."""
    folder, _ = llama(tmp_path, layers=3)
    plain = from_pretrained(str(folder), subln=False, quantize=False).eval()
    student = from_pretrained(str(folder), subln_init="one")
    weights = calibrate_subln(student, IDS)
    # block 0 sees exactly the source's activations: its attention SubLN input is the source's o_proj input
    seen = []
    plain.blocks[0].attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        plain(IDS)
    want = seen[0].pow(2).mean(-1).sqrt().median()
    torch.testing.assert_close(student.blocks[0].attn.sub_norm.weight, want.expand(64), rtol=1e-6, atol=0)
    assert len(weights) == 6 and weights[0] == pytest.approx(float(want), rel=1e-6)
    assert all(b.ffn.sub_norm.weight[0].item() == w for b, w in zip(student.blocks, weights[1::2], strict=True))
    assert student.quant_lambda == 1.0  # restored after the full-precision pass
    # calibrated, the converted model stays closer to the source than with SubLN at weight 1
    one = from_pretrained(str(folder), subln_init="one", quantize=False).eval()
    calibrated = from_pretrained(str(folder), subln_init="one", quantize=False).eval()
    calibrate_subln(calibrated, IDS)
    with torch.no_grad():
        ref = plain(IDS)
        assert (calibrated(IDS) - ref).abs().mean() < 0.5 * (one(IDS) - ref).abs().mean()


def test_from_pretrained_calibrates_subln_on_the_shipped_prompts(tmp_path):
    folder, _ = llama(tmp_path, tokenizer=True)
    ids = calibration_ids(load_tokenizer(str(folder)), max_len=128)
    assert ids.shape == (4, 128)
    student = from_pretrained(str(folder), quantize=False)
    reference = from_pretrained(str(folder), subln_init="one", quantize=False)
    calibrate_subln(reference, ids)
    assert torch.equal(student.state_dict()["blocks.1.ffn.sub_norm.weight"],
                       reference.state_dict()["blocks.1.ffn.sub_norm.weight"])
    assert not torch.equal(student.blocks[1].ffn.sub_norm.weight, torch.ones(96))
    with pytest.raises(PretrainedError, match="init_subln='rms': use one of median_rms, one"):
        from_pretrained(str(folder), subln_init="rms")


def test_quant_lambda_schedule_is_linear_then_one():
    assert [quant_lambda(s, 4) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert quant_lambda(0, 0) == 1.0


# -- bad input ------------------------------------------------------------------------------------

def test_non_llama_source_is_refused(tmp_path):
    folder = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(folder)
    with pytest.raises(PretrainedError, match="architecture 'gpt2'.*supported: Llama-family"):
        from_pretrained(str(folder))


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "nowhere", "does not exist"),
    (lambda p: p, "folder without config.json"),
    (lambda p: (p / "w.bin").write_bytes(b"x") and p / "w.bin", "is not a .gguf file"),
])
def test_missing_or_wrong_file_is_refused(tmp_path, make, match):
    with pytest.raises(PretrainedError, match=match):
        from_pretrained(str(make(tmp_path)))


def test_rope_scaling_is_refused():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0}).to_dict()
    with pytest.raises(PretrainedError, match="RoPE type 'linear'"):
        from_llama(cfg, {})


@pytest.mark.parametrize("layers, match", [
    ([0, 4], r"init_layers \[4\] out of range: the source has 4 blocks"),
    ([2, 1], "strictly increasing"),
    (0, "stride must be >= 1"),
    ([], "non-empty list"),
])
def test_bad_layer_selection_is_refused(layers, match):
    with pytest.raises(PretrainedError, match=match):
        select_layers(layers, 4, "src")


def test_vocabulary_size_mismatch_is_refused_before_training(tmp_path):
    folder, _ = llama(tmp_path)
    with pytest.raises(PretrainedError, match="vocabulary of 256 ids.*vocab_size=512"):
        DistillationModule({"name": "tiny", "vocab_size": 512, "init_from": str(folder)})
    with pytest.raises(PretrainedError, match="no usable tokenizer stored with it"):
        DistillationModule({"name": "tiny", "vocab_size": 256, "init_from": str(folder)})


class _Source:
    def __init__(self, h):
        self.tokenizer_hash = h


class _Data:
    def __init__(self, h):
        self.source = _Source(h)


def test_tokenizer_mismatch_is_refused(tmp_path):
    record = {"source": "src", "tokenizer_hash": "aaaa", "layers": [0]}
    check_tokenizer(record, _Data("aaaa"))
    with pytest.raises(PretrainedError, match="its tokenizer \\(hash aaaa\\) is not the traces' student tokenizer "
                                              "\\(hash bbbb\\)"):
        check_tokenizer(record, _Data("bbbb"))


def test_tokenizer_of_traces_without_a_source_is_read_from_the_shards(trace_dir):
    dm = KDTraceDataModule(str(trace_dir), vocab_size=64)  # data=parquet: no source to ask
    record = {"source": "src", "tokenizer_hash": "not-the-traces", "layers": [0]}
    with pytest.raises(PretrainedError, match=f"traces' student tokenizer \\(hash {small_source().tokenizer_hash}\\)"):
        check_tokenizer(record, dm)
    check_tokenizer({**record, "tokenizer_hash": small_source().tokenizer_hash}, dm)


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("override, message", [
    ("model.init_layers=0", "model.init_layers=0: must be an integer stride >= 1"),
    ("model.init_layers=[1,-2]", "model.init_layers=[1, -2]: must be an integer stride"),
    ("optim.quant_warmup_steps=200", "optim.quant_warmup_steps=200: must be < trainer.max_steps (200)"),
    ("model.init_subln=ones", "model.init_subln=ones: must be one of median_rms, one"),
])
def test_settings_refuse_warm_start_keys(override, message):
    settings.check(composed("experiment=warmstart"))
    settings.check(composed("experiment=warmstart_gpu"))
    with pytest.raises(SettingsError, match=re.escape(message)):
        settings.check(composed("experiment=warmstart", override))


def test_init_layers_without_a_source_is_refused():
    with pytest.raises(SettingsError, match="null without model.init_from"):
        settings.check(composed("model.init_layers=2"))


# -- training, checkpoints and eval ---------------------------------------------------------------

def trainer(callbacks, max_steps, tmp_path):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                      default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)


class Lambdas(pl.Callback):
    """(lambda, activation bits) each training step ran with."""

    def __init__(self):
        self.rows: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((pl_module.model.quant_lambda, pl_module.model.activation_bits))


def test_flip_waits_for_the_end_of_the_warm_up(trace_dir, tmp_path):
    dm = KDTraceDataModule(str(trace_dir), vocab_size=64, batch_size=4, num_workers=0)
    module = DistillationModule({"name": "tiny", "vocab_size": 64}, optim={"warmup_steps": 1, "quant_warmup_steps": 4})
    flip, rec = ActivationFlip(flip_at_tokens=1), Lambdas()
    trainer([rec, flip], 7, tmp_path).fit(module, datamodule=dm)
    # the token budget is reached after step 0, but the flip waits for the first step run at lambda 1
    # (rec runs before the flip callback: it sees the bits each step ran with)
    assert [lam for lam, _ in rec.rows] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert flip.flip_step == 5 and [b for _, b in rec.rows] == [8, 8, 8, 8, 8, 4, 4]


def test_warm_started_checkpoint_reloads_without_the_source(trace_dir, tmp_path):
    folder, _ = llama(tmp_path, layers=3, tokenizer=True)
    module = DistillationModule({"name": "tiny", "vocab_size": 256, "max_seq_len": 64, "init_from": str(folder),
                                 "init_layers": [0, 2], "subln": False})
    assert module.hparams["warm_start"] == {"source": str(folder), "layers": [0, 2], "subln_init": None,
                                            "tokenizer_hash": tokenizer_hash(load_tokenizer(str(folder)))}
    module.model.set_quant_lambda(0.5)
    ckpt = tmp_path / "m.ckpt"
    t = trainer([], 1, tmp_path)
    t.strategy.connect(module)  # Lightning writes the checkpoint, as a run's ModelCheckpoint would
    t.save_checkpoint(ckpt)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    loaded = load_student(ckpt)
    c = loaded.cfg
    assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.subln, c.max_seq_len) == (64, 2, 4, 2, 96,
                                                                                                   False, 64)
    assert loaded.quant_lambda == 0.5
    with torch.no_grad():
        assert torch.equal(loaded(IDS), module.model.eval()(IDS))
    # a student saved in the middle of its warm-up is not fully ternary: eval refuses it
    cfg = OmegaConf.create({"ckpt_path": str(ckpt), "activation_bits": None, "paths": {"log_dir": str(tmp_path)}})
    with pytest.raises(ValueError, match="lambda=0.500, not fully ternary"):
        load_eval_student(cfg)
