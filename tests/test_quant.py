"""Quantizers of BitNet b1.58: ternary weights, per-token activations, 2-bit packing, STE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitnet_kde.model import BitLinear
from bitnet_kde.quant import (
    fake_quant_activations,
    fake_quant_weight,
    pack_ternary,
    quantize_activations,
    ternary_weight,
    unpack_ternary,
)

# --------------------------------------------------------------------------------------------
# ternary_weight
# --------------------------------------------------------------------------------------------


def test_ternary_weight_hand_computed():
    # sum|w| = 0.6 + 1.5 + 0.3 + 0.05 + 2.0 + 0.75 = 5.2 ; mean|w| = 5.2 / 6 = 0.8666667
    # scale = 0.8666667 + 1e-5 = 0.8666767
    # w / scale = [[ 0.692, -1.731, -0.346],      round -> [[1, -2, 0],   clamp -> [[1, -1,  0],
    #              [ 0.058,  2.308, -0.865]]               [0,  2, -1]]             [0,  1, -1]]
    w = torch.tensor([[0.6, -1.5, -0.3], [0.05, 2.0, -0.75]])
    wq, scale = ternary_weight(w)
    assert wq.shape == w.shape and wq.dtype == w.dtype
    assert torch.equal(wq, torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]]))
    assert scale.dim() == 0
    assert scale.item() == pytest.approx(5.2 / 6 + 1e-5, rel=1e-6)


def test_ternary_weight_second_example_and_clamp():
    # w = [[0.5, -1.5], [0.05, 2.0]] -> mean|w| = 4.05 / 4 = 1.0125, scale = 1.01251
    # w / scale = [[0.494, -1.481], [0.049, 1.975]] -> round [[0, -1], [0, 2]] -> clamp [[0, -1], [0, 1]]
    w = torch.tensor([[0.5, -1.5], [0.05, 2.0]])
    wq, scale = ternary_weight(w)
    assert torch.equal(wq, torch.tensor([[0.0, -1.0], [0.0, 1.0]]))
    assert scale.item() == pytest.approx(1.01251, rel=1e-6)
    # dequantized weight
    assert torch.allclose(wq * scale, torch.tensor([[0.0, -1.01251], [0.0, 1.01251]]), rtol=1e-6)


def test_ternary_weight_all_zero_is_finite():
    wq, scale = ternary_weight(torch.zeros(3, 4))
    assert torch.equal(wq, torch.zeros(3, 4))
    assert scale.item() == pytest.approx(1e-5)


# --------------------------------------------------------------------------------------------
# quantize_activations
# --------------------------------------------------------------------------------------------

X2 = [[1.0, -0.4, 0.25, 0.003], [-2.0, 0.7, 0.0, 1.3]]


def test_quantize_activations_8bit_hand_computed():
    # Q = 127. token 0: max|x| = 1.0, step = 1/127
    #   x * 127 = [127, -50.8, 31.75, 0.381] -> round [127, -51, 32, 0] -> * 1/127
    # token 1: max|x| = 2.0, step = 2/127
    #   x * 63.5 = [-127, 44.45, 0, 82.55] -> round [-127, 44, 0, 83] -> * 2/127
    x = torch.tensor(X2)
    xq = quantize_activations(x, bits=8)
    expected = torch.tensor([[1.0, -51 / 127, 32 / 127, 0.0], [-2.0, 88 / 127, 0.0, 166 / 127]])
    assert xq.shape == x.shape and xq.dtype == x.dtype
    assert torch.allclose(xq, expected, rtol=0, atol=1e-6)


def test_quantize_activations_4bit_hand_computed():
    # Q = 7. token 0: step = 1/7 ; x * 7 = [7, -2.8, 1.75, 0.021] -> [7, -3, 2, 0]
    # token 1: step = 2/7 ; x * 3.5 = [-7, 2.45, 0, 4.55] -> [-7, 2, 0, 5]
    x = torch.tensor(X2)
    xq = quantize_activations(x, bits=4)
    expected = torch.tensor([[1.0, -3 / 7, 2 / 7, 0.0], [-2.0, 4 / 7, 0.0, 10 / 7]])
    assert torch.allclose(xq, expected, rtol=0, atol=1e-6)
    # at most 2*Q+1 = 15 distinct grid levels per token
    assert len(torch.unique(torch.round(xq[0] * 7))) <= 15


def test_quantize_activations_clamp_range_is_asymmetric():
    # absmean scale: m = 2.5 * mean|x|. x = [-4, 4, 0.4, 0.4]: mean|x| = 8.8/4 = 2.2, m = 5.5,
    # step = 5.5/7 = 0.785714 ; x/step = [-5.09, 5.09, 0.509, 0.509] -> round [-5, 5, 1, 1] (no clamp)
    # x = [-4, 0.4, 0.4, 0.4]: mean|x| = 1.3, m = 3.25, step = 3.25/7 = 0.4642857
    #   x/step = [-8.615, 0.862, 0.862, 0.862] -> round [-9, 1, 1, 1] -> clamp [-8, 1, 1, 1]  (-Q-1 = -8)
    # x = [4, 0.4, 0.4, 0.4] -> [9, 1, 1, 1] -> clamp [7, 1, 1, 1]  (Q = 7)
    x = torch.tensor([[-4.0, 4.0, 0.4, 0.4], [-4.0, 0.4, 0.4, 0.4], [4.0, 0.4, 0.4, 0.4]])
    xq = quantize_activations(x, bits=4, scale_mode="absmean")
    s1, s2 = 5.5 / 7, 3.25 / 7
    expected = torch.tensor([[-5 * s1, 5 * s1, s1, s1], [-8 * s2, s2, s2, s2], [7 * s2, s2, s2, s2]])
    assert torch.allclose(xq, expected, rtol=0, atol=1e-6)


def test_quantize_activations_dtype_preserved_float64():
    x = torch.tensor(X2, dtype=torch.float64)
    xq = quantize_activations(x, bits=8)
    assert xq.dtype == torch.float64 and xq.shape == x.shape
    expected = torch.tensor([[1.0, -51 / 127, 32 / 127, 0.0], [-2.0, 88 / 127, 0.0, 166 / 127]], dtype=torch.float64)
    assert torch.allclose(xq, expected, rtol=0, atol=1e-6)


def test_quantize_activations_batched_shape_and_per_token():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    xq = quantize_activations(x, bits=8)
    assert xq.shape == x.shape
    # per-token: scaling one token does not change the others
    x2 = x.clone()
    x2[1, 2] *= 100.0
    xq2 = quantize_activations(x2, bits=8)
    same = torch.ones(2, 3, dtype=torch.bool)
    same[1, 2] = False
    assert torch.equal(xq[same], xq2[same])
    # the absmax element of each token is reproduced exactly (up to fp rounding)
    idx = x.abs().argmax(-1, keepdim=True)
    assert torch.allclose(xq.gather(-1, idx), x.gather(-1, idx), rtol=1e-6, atol=0)
    # error is at most half a step
    step = x.abs().amax(-1, keepdim=True) / 127
    assert bool(((xq - x).abs() <= step / 2 + 1e-6).all())


def test_quantize_activations_zero_token_stays_zero():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0]])
    for bits in (8, 4):
        xq = quantize_activations(x, bits=bits)
        assert torch.isfinite(xq).all()
        assert torch.equal(xq[0], torch.zeros(3))
        assert xq[1, 2].item() == pytest.approx(3.0)


def test_quantize_activations_rejects_bad_args():
    with pytest.raises(ValueError):
        quantize_activations(torch.ones(2, 2), bits=1)
    with pytest.raises(ValueError):
        quantize_activations(torch.ones(2, 2), bits=8, scale_mode="nope")


# --------------------------------------------------------------------------------------------
# pack / unpack
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (1,), (3,), (4,), (5,), (7, 3), (2, 3, 5), (16, 8), (1, 0, 4)])
def test_pack_unpack_roundtrip(shape):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    wq = torch.randint(-1, 2, shape, generator=g).float()
    packed = pack_ternary(wq)
    n = wq.numel()
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == (n + 3) // 4
    out = unpack_ternary(packed, wq.shape)
    assert out.shape == wq.shape and out.dtype == torch.float32
    assert torch.equal(out, wq)
    # other dtypes
    assert torch.equal(unpack_ternary(packed, wq.shape, dtype=torch.int8), wq.to(torch.int8))


def test_pack_roundtrip_from_ternary_weight():
    torch.manual_seed(1)
    w = torch.randn(33, 17)
    wq, scale = ternary_weight(w)
    packed = pack_ternary(wq)
    assert packed.numel() == (33 * 17 + 3) // 4
    assert torch.equal(unpack_ternary(packed, w.shape) * scale, wq * scale)


def test_pack_bit_layout_by_hand():
    # values [-1, 0, 1, 1, -1] -> codes w+1 = [0, 1, 2, 2, 0]
    # byte 0 = 0<<0 | 1<<2 | 2<<4 | 2<<6 = 0 + 4 + 32 + 128 = 164
    # byte 1 = 0<<0 | pad code 1 (value 0) at bits 2, 4, 6 = 4 + 16 + 64 = 84
    packed = pack_ternary(torch.tensor([-1.0, 0.0, 1.0, 1.0, -1.0]))
    assert packed.tolist() == [164, 84]
    # [1, 1, 1, 1] -> codes 2 -> 0b10101010 = 170 ; [-1]*4 -> 0
    assert pack_ternary(torch.tensor([1, 1, 1, 1])).tolist() == [170]
    assert pack_ternary(torch.tensor([-1, -1, -1, -1])).tolist() == [0]
    # element 2 alone set to -1 among zeros: codes [1,1,0,1] -> 1 + 4 + 0 + 64 = 69
    assert pack_ternary(torch.tensor([0, 0, -1, 0])).tolist() == [69]


def test_pack_rejects_non_ternary():
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([0.0, 0.5]))


def test_unpack_rejects_wrong_size():
    packed = pack_ternary(torch.zeros(8))  # 2 bytes
    with pytest.raises(ValueError):
        unpack_ternary(packed, (9,))  # needs 3 bytes
    with pytest.raises(ValueError):
        unpack_ternary(packed, (4,))  # needs 1 byte
    with pytest.raises(ValueError):
        unpack_ternary(packed.to(torch.int32), (8,))  # wrong dtype
    assert unpack_ternary(packed, (2, 3)).shape == (2, 3)  # 6 elements -> 2 bytes is fine


# --------------------------------------------------------------------------------------------
# straight-through estimator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1.0, 0.5])
@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quant_activations_ste_identity(lam, bits):
    torch.manual_seed(2)
    x = torch.randn(3, 5, 12, requires_grad=True)
    g = torch.randn(3, 5, 12)
    (gx,) = torch.autograd.grad(fake_quant_activations(x, bits=bits, lam=lam), x, g)
    assert torch.equal(gx, g)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_fake_quant_weight_ste_identity(lam):
    torch.manual_seed(3)
    w = torch.randn(7, 9, requires_grad=True)
    g = torch.randn(7, 9)
    (gw,) = torch.autograd.grad(fake_quant_weight(w, lam=lam), w, g)
    assert torch.equal(gw, g)


def test_fake_quant_forward_lambda_blend():
    torch.manual_seed(4)
    x = torch.randn(4, 16)
    w = torch.randn(6, 16)
    xq = quantize_activations(x, bits=8)
    wq, s = ternary_weight(w)
    assert torch.equal(fake_quant_activations(x, lam=0.0), x)
    assert torch.equal(fake_quant_activations(x, lam=1.0), xq)
    assert torch.allclose(fake_quant_activations(x, lam=0.5), 0.5 * (x + xq), atol=1e-6)
    assert not torch.allclose(xq, x)
    assert torch.equal(fake_quant_weight(w, lam=0.0), w)
    assert torch.allclose(fake_quant_weight(w, lam=1.0), wq * s, rtol=0, atol=1e-7)
    assert torch.allclose(fake_quant_weight(w, lam=0.25), 0.75 * w + 0.25 * wq * s, atol=1e-6)
    # fake-quantized weight takes exactly three values
    assert len(torch.unique(fake_quant_weight(w, lam=1.0))) == 3


def test_bitlinear_forward_and_backward_are_ste():
    torch.manual_seed(5)
    layer = BitLinear(16, 8)
    torch.nn.init.normal_(layer.weight, std=0.5)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, 8)

    wq_t, scale = ternary_weight(layer.weight.detach())
    wq = wq_t * scale                                  # dequantized ternary weight [8, 16]
    xq = quantize_activations(x.detach(), bits=8)
    assert torch.allclose(y, F.linear(xq, wq), rtol=1e-5, atol=1e-6)

    g = torch.randn(2, 3, 8)
    gx, gw = torch.autograd.grad(y, (x, layer.weight), g)
    assert torch.allclose(gx, g @ wq, rtol=1e-5, atol=1e-6)
    expected_gw = g.reshape(-1, 8).T @ xq.reshape(-1, 16)
    assert torch.allclose(gw, expected_gw, rtol=1e-5, atol=1e-6)
    # the gradient is *not* the full-precision one (weights / activations really are quantized)
    assert not torch.allclose(gx, g @ layer.weight.detach(), rtol=1e-3, atol=1e-4)


def test_bitlinear_a4_uses_4bit_grid():
    torch.manual_seed(6)
    layer = BitLinear(16, 4, activation_bits=4)
    x = torch.randn(5, 16)
    wq_t, scale = ternary_weight(layer.weight.detach())
    expected = F.linear(quantize_activations(x, bits=4), wq_t * scale)
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(layer(x), F.linear(quantize_activations(x, bits=8), wq_t * scale), atol=1e-4)


# --------------------------------------------------------------------------------------------
# ternary_linear: the BitLinear product that keeps the latent weight for backward
# --------------------------------------------------------------------------------------------


def reference_bitlinear(layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """What BitLinear computed before ternary_linear: F.linear on the dequantized weight."""
    return F.linear(layer.quantize_input(x), fake_quant_weight(layer.weight, layer.quant_lambda))


@pytest.mark.parametrize("lam", [1.0, 0.4])
@pytest.mark.parametrize("bits,scale_mode", [(8, "absmax"), (4, "absmax"), (4, "absmean")])
def test_bitlinear_gradients_equal_the_dequantized_reference_float64(lam, bits, scale_mode):
    torch.manual_seed(0)
    layer = BitLinear(24, 10, activation_bits=bits, a4_scale=scale_mode).double()
    layer.quant_lambda = lam
    x0 = torch.randn(3, 5, 24, dtype=torch.float64)
    g = torch.randn(3, 5, 10, dtype=torch.float64)
    results = []
    for fn in (reference_bitlinear, lambda m, x: m(x)):
        layer.weight.grad = None
        x = x0.clone().requires_grad_(True)
        y = fn(layer, x)
        y.backward(g)
        results.append((y.detach(), x.grad, layer.weight.grad.clone()))
    (y_ref, gx_ref, gw_ref), (y, gx, gw) = results
    assert torch.equal(y, y_ref)
    assert torch.allclose(gx, gx_ref, rtol=1e-13, atol=1e-14)
    assert torch.allclose(gw, gw_ref, rtol=1e-13, atol=1e-14)
    # the STE gradients themselves: g W_q for the input, g^T x_q for the weight
    xq = layer.quantize_input(x0)
    wq = fake_quant_weight(layer.weight.detach(), lam)
    assert torch.allclose(gw, g.reshape(-1, 10).T @ xq.reshape(-1, 24), rtol=1e-12)
    assert torch.allclose(gx, g @ wq, rtol=1e-12)


def saved_tensors(fn):
    """The tensors autograd keeps for backward while `fn()` runs, and its result."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_bitlinear_saves_its_input_and_latent_weight_only(lam):
    torch.manual_seed(1)
    layer = BitLinear(64, 48)
    layer.quant_lambda = lam
    x = torch.randn(2, 7, 64, requires_grad=True)
    saved, y = saved_tensors(lambda: layer(x))
    params = {layer.weight.data_ptr()}
    extra = [t for t in saved if t.data_ptr() not in params]
    # per layer: the quantized input (2 x 7 x 64 fp32), nothing of the weight's size
    assert sum(t.numel() * t.element_size() for t in extra) == 2 * 7 * 64 * 4
    assert any(t.data_ptr() == layer.weight.data_ptr() for t in saved)
    # the previous form kept a dequantized copy: 48 x 64 fp32 = 12,288 bytes more
    ref_saved, _ = saved_tensors(lambda: reference_bitlinear(layer, x))
    ref_extra = sum(t.numel() * t.element_size() for t in ref_saved if t.data_ptr() not in params)
    assert ref_extra == 2 * 7 * 64 * 4 + 48 * 64 * 4
    y.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def test_bitlinear_under_autocast_keeps_bf16_input_and_matches_reference():
    torch.manual_seed(2)
    layer = BitLinear(32, 16)
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved, y = saved_tensors(lambda: layer(x))
        y_ref = reference_bitlinear(layer, x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    assert [t.dtype for t in saved if t.data_ptr() != layer.weight.data_ptr()] == [torch.bfloat16]
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
