"""The BitNet b1.58 student: configs, architecture invariants, quantization switches, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitnet_kde.model import BitLinear, BitNetConfig, BitNetLM
from bitnet_kde.model.packed import pack, packed_copy
from bitnet_kde.model.sizing import measure_flops_per_token
from bitnet_kde.quant import quantize_activations, ternary_weight

PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny(**kw) -> BitNetLM:
    torch.manual_seed(kw.pop("seed", 0))
    return BitNetLM(BitNetConfig.from_name("tiny", vocab_size=kw.pop("vocab_size", 97), **kw)).eval()


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def test_presets():
    t = BitNetConfig.from_name("tiny")
    assert (t.d_model, t.n_layers, t.n_heads, t.n_kv_heads, t.ffn_dim) == (64, 2, 4, 2, 192)
    assert t.head_dim == 16
    m = BitNetConfig.from_name("mini")
    assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim) == (512, 6, 8, 2, 1024)
    b = BitNetConfig.from_name("7b")
    assert (b.vocab_size, b.d_model, b.n_layers, b.n_heads, b.n_kv_heads, b.ffn_dim) == (32000, 4096, 32, 32, 32, 11008)
    assert b.head_dim == 128 and b.max_seq_len == 2048
    for c in (t, m, b):
        assert c.quantize and c.tie_embeddings and c.activation_bits == 8 and c.ffn_act == "relu2"


def test_overrides_do_not_mutate_presets():
    c = BitNetConfig.from_name("mini", vocab_size=512, n_layers=3, activation_bits=4)
    assert (c.vocab_size, c.n_layers, c.activation_bits, c.d_model) == (512, 3, 4, 512)
    fresh = BitNetConfig.from_name("mini")
    assert (fresh.vocab_size, fresh.n_layers, fresh.activation_bits) == (49152, 6, 8)
    assert c.to_dict()["vocab_size"] == 512


def test_unknown_preset_or_field():
    with pytest.raises(ValueError):
        BitNetConfig.from_name("13b")
    with pytest.raises(ValueError):
        BitNetConfig.from_name("tiny", n_layer=3)  # typo


@pytest.mark.parametrize(
    "kw",
    [
        dict(d_model=64, n_heads=5),              # d_model % n_heads != 0
        dict(n_heads=4, n_kv_heads=3),            # n_kv_heads does not divide n_heads
        dict(d_model=60, n_heads=4, n_kv_heads=2),  # head_dim 15 is odd (RoPE)
        dict(ffn_act="gelu"),
        dict(activation_bits=2),
    ],
)
def test_invalid_configs(kw):
    with pytest.raises(ValueError):
        BitNetConfig.from_name("tiny", **kw)


# --------------------------------------------------------------------------------------------
# architecture
# --------------------------------------------------------------------------------------------


def test_output_shape_and_finite():
    m = tiny()
    ids = torch.randint(0, 97, (3, 11))
    out = m(ids)
    assert out.shape == (3, 11, 97)
    assert torch.isfinite(out).all()


def test_sequence_too_long_raises():
    m = tiny(max_seq_len=8)
    m(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError):
        m(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("j", [1, 5, 9])
def test_causality(j):
    m = tiny()
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2, 10))
    ids2 = ids.clone()
    ids2[:, j] = (ids[:, j] + 13) % 97
    with torch.no_grad():
        a, b = m(ids), m(ids2)
    assert torch.allclose(a[:, :j], b[:, :j], rtol=0, atol=1e-5)
    # ... while position j itself (and later ones) do change
    assert (a[:, j:] - b[:, j:]).abs().amax() > 1e-3


def test_no_biases_and_bitlinear_inside_blocks():
    m = tiny()
    names = [n for n, _ in m.named_parameters()]
    assert not [n for n in names if "bias" in n]
    assert all(mod.bias is None for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    for block in m.blocks:
        linears = [(n, mod) for n, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)]
        assert len(linears) == 7
        assert all(isinstance(mod, BitLinear) for _, mod in linears)
        assert sorted(n.split(".")[-1] for n, _ in linears) == sorted(PROJ_NAMES)
    assert len(list(m.bitlinears())) == 7 * m.cfg.n_layers
    # embedding and lm_head stay full precision
    assert type(m.lm_head) is torch.nn.Linear and not isinstance(m.lm_head, BitLinear)


def test_subln_norms():
    m = tiny()
    for block in m.blocks:
        assert block.attn.sub_norm.weight.shape == (m.cfg.d_model,)
        assert block.ffn.sub_norm.weight.shape == (m.cfg.ffn_dim,)
        assert block.attn_norm.weight.shape == (m.cfg.d_model,)
        assert block.ffn_norm.weight.shape == (m.cfg.d_model,)
    # both SubLNs really sit in the path: changing their weights changes the output
    ids = torch.randint(0, 97, (1, 6))
    for norm in (m.blocks[0].attn.sub_norm, m.blocks[0].ffn.sub_norm):
        with torch.no_grad():
            before = m(ids)
            norm.weight.mul_(torch.linspace(0.2, 3.0, norm.weight.numel()))
            after = m(ids)
        assert (before - after).abs().amax() > 1e-4


def test_tied_and_untied_embeddings():
    m = tiny()
    assert m.lm_head.weight is m.embed.weight
    n_tied = sum(p.numel() for p in m.parameters())
    u = tiny(tie_embeddings=False)
    assert u.lm_head.weight is not u.embed.weight
    assert sum(p.numel() for p in u.parameters()) == n_tied + 97 * 64
    assert m.num_parameters() == n_tied
    assert m.num_parameters(exclude_embedding=True) == n_tied - 97 * 64


def test_set_activation_bits():
    m = tiny()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a8 = m(ids)
        m.set_activation_bits(4)
        a4 = m(ids)
    assert m.activation_bits == 4 and m.cfg.activation_bits == 4
    assert all(b.activation_bits == 4 for b in m.bitlinears())
    assert (a8 - a4).abs().amax() > 1e-4
    with pytest.raises(ValueError):
        m.set_activation_bits(3)
    assert all(b.activation_bits == 4 for b in m.bitlinears())
    m.set_activation_bits(8)
    with torch.no_grad():
        assert torch.allclose(m(ids), a8, rtol=0, atol=1e-6)


def test_quant_lambda_zero_is_dense():
    q = tiny()
    d = tiny(quantize=False)
    d.load_state_dict(q.state_dict())
    ids = torch.randint(0, 97, (2, 7))
    q.set_quant_lambda(0.0)
    with torch.no_grad():
        assert torch.allclose(q(ids), d(ids), rtol=1e-5, atol=1e-5)
    q.set_quant_lambda(5.0)  # clamped to 1
    assert all(b.quant_lambda == 1.0 for b in q.bitlinears())


def test_dense_model_and_bitlinear_math():
    q = tiny()
    d = tiny(quantize=False)
    d.load_state_dict(q.state_dict())
    assert all(not b.quantize for b in d.bitlinears())
    x = torch.randn(2, 5, 64)
    layer = d.blocks[0].attn.q_proj
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    # the quantized layer with the same weights computes on quantized values instead
    ql = q.blocks[0].attn.q_proj
    wq, s = ternary_weight(ql.weight.detach())
    with torch.no_grad():
        assert torch.allclose(ql(x), F.linear(quantize_activations(x, 8), wq * s), rtol=1e-5, atol=1e-6)
        ids = torch.randint(0, 97, (2, 7))
        assert (q(ids) - d(ids)).abs().amax() > 1e-4


def test_swiglu_variant():
    m = tiny(ffn_act="swiglu")
    out = m(torch.randint(0, 97, (2, 6)))
    assert out.shape == (2, 6, 97) and torch.isfinite(out).all()
    r = tiny(ffn_act="relu2")
    r.load_state_dict(m.state_dict())
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert (m(ids) - r(ids)).abs().amax() > 1e-5


def test_gqa_and_mha_variants_run():
    for kv in (1, 4):
        m = tiny(n_kv_heads=kv)
        assert m.blocks[0].attn.k_proj.weight.shape == (kv * 16, 64)
        assert m(torch.randint(0, 97, (1, 5))).shape == (1, 5, 97)


# --------------------------------------------------------------------------------------------
# 7B parameter count on the meta device
# --------------------------------------------------------------------------------------------


def test_7b_param_count_on_meta():
    cfg = BitNetConfig.from_name("7b")
    with torch.device("meta"):
        m = BitNetLM(cfg)
    assert all(p.is_meta for p in m.parameters())
    V, d, L, ffn = 32000, 4096, 32, 11008
    n_kv, hd = 32, 128
    per_layer = (
        d * d                  # q
        + 2 * d * (n_kv * hd)  # k, v
        + d * d                # o
        + 3 * d * ffn          # gate, up, down
        + d + d                # attn_norm, ffn_norm
        + d + ffn              # attn.sub_norm, ffn.sub_norm
    )
    expected = V * d + L * per_layer + d  # tied embedding + blocks + final norm
    assert expected == 6_607_826_944
    assert m.num_parameters() == expected
    assert sum(p.numel() for p in m.parameters()) == expected
    # untied adds one V x d head
    with torch.device("meta"):
        u = BitNetLM(BitNetConfig.from_name("7b", tie_embeddings=False))
    assert u.num_parameters() == expected + V * d


# --------------------------------------------------------------------------------------------
# training sanity
# --------------------------------------------------------------------------------------------


def test_overfits_single_batch():
    torch.manual_seed(0)
    m = BitNetLM(BitNetConfig.from_name("tiny", vocab_size=32)).train()
    x = torch.randint(0, 32, (4, 24))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        logits = m(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 32), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(32.0)).item(), abs=0.3)
    assert losses[-1] < 0.5 * losses[0]
    # latent weights received gradients through the STE and are still ternarized in the forward
    stats = m.blocks[0].attn.q_proj.ternary_stats()
    assert stats["neg"] + stats["zero"] + stats["pos"] == pytest.approx(1.0)


@pytest.mark.parametrize("bits, a4_scale", [(8, "absmax"), (4, "absmax"), (4, "absmean")])
def test_layers_sharing_an_input_quantize_it_identically(bits, a4_scale):
    """q/k/v and gate/up quantize their common input once; valid only if each would do the same."""
    model = BitNetLM(BitNetConfig.from_name("tiny", vocab_size=32, a4_scale=a4_scale))
    model.set_activation_bits(bits)
    x = torch.randn(2, 5, 64)
    for block in model.blocks:
        a, f = block.attn, block.ffn
        xq = a.q_proj.quantize_input(x)
        for layer in (a.k_proj, a.v_proj):
            assert torch.equal(layer.quantize_input(x), xq)
            assert torch.equal(layer(x), layer(xq, input_quantized=True))
        assert torch.equal(f.up_proj.quantize_input(x), f.gate_proj.quantize_input(x))
    # quantization of a shared input is not a no-op (the test would be vacuous otherwise)
    assert not torch.equal(xq, x)


# --------------------------------------------------------------------------------------------
# KV cache, greedy decoding, packed inference form
# --------------------------------------------------------------------------------------------


def varied(**kw) -> BitNetLM:
    """A random tiny model whose greedy continuations are not one repeated token, in float64.

    float64 because the cache must reproduce recomputation exactly as an algorithm: in fp32,
    different matmul shapes round differently (~1e-7), and at A4 such a difference can move
    an activation across a quantization level and change a later token.
    """
    return tiny(init_std=0.5, seed=kw.pop("seed", 3), **kw).double()


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_cached_greedy_equals_full_recomputation(bits):
    m = varied()
    m.set_activation_bits(bits)
    prompt = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    cached = m.generate(prompt, 40, use_cache=True)
    assert m.embed.weight.dtype == torch.float64
    full = m.generate(prompt, 40, use_cache=False)
    assert cached.shape == (3, 40)
    assert torch.equal(cached, full)
    assert len(set(cached[0].tolist())) > 3  # a real test: the continuation varies


def test_kv_cache_logits_match_in_any_chunking():
    from bitnet_kde.model import KVCache

    m = varied()
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(m.cfg, batch_size=2, max_len=30, dtype=torch.float64)
        parts = [m(ids[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 21), (21, 30))]
    assert cache.pos == 30
    assert torch.allclose(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="full"):
        m(ids[:, :1], cache)


def test_generate_stops_at_eos_and_pads_with_it():
    m = varied()
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    free = m.generate(prompt, 20)
    eos = int(free[0, 3])  # row 0 emits this token at step 3 (row 1 maybe later or never)
    out = m.generate(prompt, 20, eos_id=eos)
    first = (out[0] == eos).nonzero()[0].item()
    assert first <= 3 and torch.equal(out[0, :first], free[0, :first])
    assert (out[0, first:] == eos).all()  # finished rows repeat EOS while others continue
    assert out.shape[1] == 20 or (out == eos).any(dim=1).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_form_is_bit_identical(bits):
    from bitnet_kde.model import PackedBitLinear

    m = varied()
    m.set_activation_bits(bits)
    m.float()  # the packed form is fp32 like training; equality must hold there
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        ref = m(ids)
        n_ternary = sum(layer.weight.numel() for layer in m.bitlinears())
        pack(m)
        out = m(ids)
    assert torch.equal(out, ref)
    assert m.is_packed and not any(isinstance(x, BitLinear) for x in m.modules())
    layers = list(m.bitlinears())
    assert len(layers) == 7 * m.cfg.n_layers and all(isinstance(x, PackedBitLinear) for x in layers)
    assert all(x.activation_bits == bits for x in layers)
    # 2 bits per ternary weight (+ one fp32 scale per matrix); the embedding stays fp32
    wb = m.weight_bytes()
    assert wb["ternary"] == sum((x.in_features * x.out_features + 3) // 4 + 4 for x in layers)
    assert wb["ternary"] < n_ternary * 4 / 15
    assert wb["other"] == sum(p.numel() * 4 for p in m.parameters())
    # switching modes still works on the packed form
    m.set_activation_bits(12 - bits)
    with torch.no_grad():
        assert not torch.equal(m(ids), ref)


def test_pack_refuses_a_dense_model():
    with pytest.raises(ValueError, match="dense"):
        pack(tiny(quantize=False))
    with pytest.raises(ValueError, match="dense"):
        packed_copy(tiny(quantize=False))


@pytest.mark.parametrize("tie", [True, False])
def test_packed_copy_leaves_the_model_and_shares_its_embedding(tie):
    from bitnet_kde.model import PackedBitLinear

    m = tiny(tie_embeddings=tie)
    m.set_activation_bits(4)
    ids = torch.randint(0, 97, (2, 13))
    copy = packed_copy(m)
    with torch.no_grad():
        assert torch.equal(copy(ids), m(ids))
    assert not m.is_packed and copy.is_packed and not copy.training
    assert all(isinstance(x, PackedBitLinear) and x.activation_bits == 4 for x in copy.bitlinears())
    assert copy.embed.weight is m.embed.weight and copy.norm.weight is m.norm.weight
    assert (copy.lm_head.weight is copy.embed.weight) == tie
    assert not any(t.is_meta for t in [*copy.parameters(), *copy.buffers()])


def test_packed_layer_says_when_it_keeps_an_unpacked_weight():
    layer = pack(tiny()).blocks[0].ffn.down_proj
    x = torch.randn(1, 3, layer.in_features)
    layer(x)
    assert not layer.keeps_unpacked  # unpacked per call, then freed
    layer.cache_unpacked = True
    assert layer.keeps_unpacked
    layer(x)
    layer.cache_unpacked = False
    assert layer.keeps_unpacked  # the cached weight is still held


def test_config_from_spec_is_a_preset_with_overrides():
    spec = {"name": "tiny", "vocab_size": 97, "ffn_act": "swiglu"}
    assert BitNetConfig.from_spec(spec) == BitNetConfig.from_name("tiny", vocab_size=97, ffn_act="swiglu")
    assert spec == {"name": "tiny", "vocab_size": 97, "ffn_act": "swiglu"}  # the caller's mapping is untouched


@pytest.mark.parametrize("name", ["tiny", "mini"])
def test_flops_per_token_equal_lightnings_count(name):
    """The torch-only FLOP count gives what Lightning's `measure_flops` gave (the ThroughputMonitor's input)."""
    from lightning.fabric.utilities.throughput import measure_flops

    cfg = BitNetConfig.from_name(name)
    seq_len = min(256, cfg.max_seq_len)
    with torch.device("meta"):
        model = BitNetLM(cfg)
        x = torch.zeros(1, seq_len, dtype=torch.long)
        expected = measure_flops(model, lambda: model(x), loss_fn=torch.Tensor.sum) / seq_len
    assert measure_flops_per_token(cfg, seq_len) == expected > 0
