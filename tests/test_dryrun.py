"""The 7B dry-run: exact size, memory plan, packed materialization, A8/A4 forward, entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bitnet_kde.model import BitLinear, BitNetConfig, BitNetLM, PackedBitLinear
from bitnet_kde.model.packed import CODE_CHUNK, fill_random_codes, materialize_packed
from bitnet_kde.model.sizing import activation_elems_per_token_block, count_parameters, memory_plan
from bitnet_kde.quant import unpack_ternary

ROOT = Path(__file__).resolve().parents[1]


def hand_count(cfg: BitNetConfig) -> int:
    """Parameters of a tied BitNet student, written out from the architecture."""
    d, f, hd = cfg.d_model, cfg.ffn_dim, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # q, o and k, v
    ffn = 3 * d * f                                                 # gate, up, down
    norms = 3 * d + f                                               # attn, attn SubLN, ffn norms + ffn SubLN
    return cfg.n_layers * (attn + ffn + norms) + cfg.vocab_size * d + d  # + tied embedding + final norm


def run_dryrun_app(root: Path, *overrides: str, timeout: int = 600) -> tuple[dict, str, float]:
    cmd = [sys.executable, str(ROOT / "dryrun.py"), f"paths.root={root}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise AssertionError(f"dryrun.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    report = json.loads((root / "reports" / "dryrun_7b.json").read_text())
    return report, proc.stdout, wall


# --------------------------------------------------------------------------------------------
# size and plan (meta device: no memory)
# --------------------------------------------------------------------------------------------


def test_7b_parameter_count_is_exact():
    cfg = BitNetConfig.from_name("7b")
    c = count_parameters(cfg)
    assert c["total"] == hand_count(cfg) == 6_607_826_944
    assert c["embedding"] == 32000 * 4096
    assert c["bitlinear"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert c["total"] == c["bitlinear"] + c["embedding"] + c["norm"]
    assert c["bitlinear_matrices"] == 32 * 7 and c["largest_matrix"] == 4096 * 11008
    assert c["packed_ternary_bytes"] == c["bitlinear"] // 4 + 4 * c["bitlinear_matrices"]


@pytest.mark.parametrize("kw", [dict(n_layers=2), dict(n_kv_heads=8, ffn_act="swiglu"), dict(tie_embeddings=False)])
def test_parameter_count_formula_variants(kw):
    cfg = BitNetConfig.from_name("7b", **kw)
    c = count_parameters(cfg)
    extra = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    assert c["total"] == hand_count(cfg) + extra
    assert c["lm_head_untied"] == extra


def test_memory_plan_arithmetic():
    cfg = BitNetConfig.from_name("7b")
    c = count_parameters(cfg)
    plan = memory_plan(cfg, c, gpus=(1, 8, 64), train_seq_len=2048, train_micro_batch=1)
    inf, p = plan["inference"], c["total"]
    assert inf["bf16"] == 2 * p and inf["fp32"] == 4 * p
    assert inf["packed_ternary_fp16_embedding"] == c["packed_ternary_bytes"] + 2 * c["embedding"] + 4 * c["norm"]
    # 2-bit weights: the packed model is ~6x smaller than bf16 even with the fp16 embedding
    assert 1.8e9 < inf["packed_ternary_fp16_embedding"] < 2.0e9 and inf["bf16"] / inf["packed_ternary_fp16_embedding"] > 6
    assert inf["kv_cache_bf16_per_token"] == 2 * 32 * 4096 * 2
    rows = {(r["gpus"], r["activation_checkpointing"]): r for r in plan["training_per_gpu"]}
    assert set(rows) == {(n, ac) for n in (1, 8, 64) for ac in ("none", "per_block_checkpointing")}
    for n in (1, 8, 64):
        assert rows[(n, "none")]["sharded_states"] == int(16 * p / n)
        assert rows[(n, "per_block_checkpointing")]["activations"] < rows[(n, "none")]["activations"]
    # 16 B/param does not fit one 80 GB GPU; sharded over 8 it does with checkpointing
    assert not rows[(1, "none")]["fits_80GB"] and rows[(8, "per_block_checkpointing")]["fits_80GB"]
    assert rows[(64, "none")]["total"] < rows[(8, "none")]["total"] < rows[(1, "none")]["total"]


def test_activation_formula_matches_saved_tensors():
    """The per-token activation count of the plan equals what autograd really saves for a block."""
    torch.manual_seed(0)
    cfg = BitNetConfig.from_name("tiny", d_model=128, n_heads=4, n_kv_heads=2, ffn_dim=352, vocab_size=64)
    model = BitNetLM(cfg)
    block, t = model.blocks[0], 24
    x = torch.randn(1, t, cfg.d_model, requires_grad=True)
    cos, sin = model.rope_cos[:t], model.rope_sin[:t]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rope = {model.rope_cos.untyped_storage().data_ptr(), model.rope_sin.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(tensor):
        s = tensor.untyped_storage()
        if s.data_ptr() not in params | rope | {x.untyped_storage().data_ptr()}:
            saved[s.data_ptr()] = s.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x, cos, sin)
    # BitLinears keep their latent weight (a parameter), no dequantized copy: all of it is activations
    per_token = sum(saved.values()) / (4 * t)  # fp32 elements per token
    expected = activation_elems_per_token_block(cfg) - cfg.d_model  # the block input x belongs to the previous block
    # small per-token extras: RMSNorm inverse RMS (4 norms), attention logsumexp (one per head)
    assert expected <= per_token <= expected + 4 + cfg.n_heads + 1


# --------------------------------------------------------------------------------------------
# packed materialization
# --------------------------------------------------------------------------------------------


def test_random_codes_are_ternary_and_seeded():
    buf = torch.empty(3 * CODE_CHUNK + 5, dtype=torch.uint8)  # several chunks and a ragged tail
    fill_random_codes(buf, torch.Generator().manual_seed(1))
    values = unpack_ternary(buf, (buf.numel() * 4,), dtype=torch.int8)
    counts = torch.bincount((values + 1).long(), minlength=4).double() / values.numel()
    assert counts[3] == 0  # no invalid code
    assert torch.allclose(counts[:3], torch.tensor([0.25, 0.5, 0.25], dtype=torch.double), atol=3e-3)
    again = torch.empty_like(buf)
    fill_random_codes(again, torch.Generator().manual_seed(1))
    assert torch.equal(buf, again)
    fill_random_codes(again, torch.Generator().manual_seed(2))
    assert not torch.equal(buf, again)


def test_materialized_model_is_packed_and_finite():
    cfg = BitNetConfig.from_name("tiny", vocab_size=101, n_layers=3)
    seen = []
    model = materialize_packed(cfg, seed=3, on_block=lambda i, m: seen.append(i))
    assert seen == [0, 1, 2]
    assert model.is_packed and not any(isinstance(m, BitLinear) for m in model.modules())
    assert all(isinstance(m, PackedBitLinear) and m.packed.dtype == torch.uint8 for m in model.bitlinears())
    assert model.lm_head.weight is model.embed.weight
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.num_parameters() + sum(m.in_features * m.out_features for m in model.bitlinears()) \
        == count_parameters(cfg)["total"]
    ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        a8 = model(ids)
        model.set_activation_bits(4)
        a4 = model(ids)
    assert torch.isfinite(a8).all() and torch.isfinite(a4).all() and not torch.equal(a8, a4)
    # the same seed gives the same model
    again = materialize_packed(cfg, seed=3)
    with torch.no_grad():
        assert torch.equal(again(ids), a8)


# --------------------------------------------------------------------------------------------
# the entry point on 7b widths with 2 blocks, and the full 7B
# --------------------------------------------------------------------------------------------


def test_dryrun_reduced_7b_widths(tmp_path):
    report, stdout, _ = run_dryrun_app(tmp_path, "model.n_layers=2", "seq_len=32", "device=cpu")
    cfg = BitNetConfig.from_name("7b", n_layers=2)
    p, mem, fwd = report["parameters"], report["memory"], report["forward"]
    assert p["total"] == hand_count(cfg)
    assert report["model"]["n_layers"] == 2 and report["model"]["d_model"] == 4096
    for bits in ("A8", "A4"):
        assert fwd[bits]["finite"] and fwd[bits]["seconds_per_token"] > 0
    assert 0.0 <= fwd["agreement"]["top1_match"] <= 1.0 and fwd["agreement"]["kl_a8_a4_mean"] >= 0.0
    assert fwd["seq_len"] == 32 and len(report["memory_plan"]["training_per_gpu"]) == 6

    plan = report["memory_plan"]["inference"]
    held = mem["weights_held_bytes"]
    assert held == plan["packed_ternary_fp32_embedding"]  # what is held is exactly the analytic packed size
    fp32_weights = plan["fp32"]
    largest_fp32 = 4 * p["largest_matrix"]
    # Materializing allocates the packed weights and nothing else ...
    grew = mem["rss_after_materialize"] - mem["rss_before_materialize"]
    assert 0.9 * held < grew < held + 64 * 2**20
    # ... and the forward pass adds about one unpacked matrix at a time, never the fp32 model.
    assert mem["peak_rss_growth"] < held + 3 * largest_fp32 < 0.6 * fp32_weights
    for title in ("Parameters", "Inference memory", "Training memory per GPU", "A8", "peak RSS"):
        assert title in stdout


@pytest.mark.slow
def test_dryrun_full_7b(tmp_path):
    """The real 7B on CPU: peak RSS <= 3.0 GB and <= 5 minutes (2-core development machine)."""
    report, stdout, wall = run_dryrun_app(tmp_path, "device=cpu", timeout=900)
    assert report["parameters"]["total"] == 6_607_826_944
    fwd, mem = report["forward"], report["memory"]
    assert fwd["A8"]["finite"] and fwd["A4"]["finite"] and fwd["seq_len"] == 128
    assert mem["peak_rss"] <= 3.0e9, f"peak RSS {mem['peak_rss'] / 1e9:.2f} GB"
    assert wall <= 300, f"dry-run took {wall:.0f} s"
    assert "Packed forward pass" in stdout
