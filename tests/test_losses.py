"""Top-K + Other distillation loss against an independent float64 reference, and the total loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_kde.losses import DistillationLoss, LossConfig, fused_distillation_loss, kd_per_position, kd_topk_other_loss

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# independent reference (plain loops, float64)
# --------------------------------------------------------------------------------------------


def ref_kl_position(z, ids, lp, olp, tau, other="bucket", tail="complement"):
    """KL(teacher || student) at one position, float64, differentiable in z.

    Slots whose teacher logprob is not finite are padding and are skipped.
    tail="one_minus": student Other = 1 - sum of the K student probabilities (the textbook form);
    tail="complement": the same quantity summed directly over the non-top-K ids (no cancellation).
    """
    z = z.to(F64) / tau
    p = torch.exp(z - z.max())
    p = p / p.sum()                                   # student softmax over the full vocab
    real = [k for k in range(len(ids)) if math.isfinite(num(lp[k]))]
    kid = [int(ids[k]) for k in real]
    ps_k = p[kid]
    t_logit = torch.stack([lp[k].to(F64) / tau for k in real])
    if other == "bucket":
        if tail == "one_minus":
            ps_o = 1.0 - ps_k.sum()
        else:
            in_top = torch.zeros(p.numel(), dtype=torch.bool)
            in_top[kid] = True
            ps_o = p[~in_top].sum()
        ps = torch.cat([ps_k, ps_o.reshape(1)])
        t_logit = torch.cat([t_logit, (olp.to(F64) / tau).reshape(1)])
    elif other == "renormalize":
        ps = ps_k / ps_k.sum()
    else:
        raise AssertionError(other)
    pt = torch.exp(t_logit - t_logit.max())
    pt = pt / pt.sum()                                # teacher buckets at temperature tau
    kl = z.new_zeros(())
    for i in range(pt.numel()):
        if pt[i] > 0:
            kl = kl + pt[i] * (torch.log(pt[i]) - torch.log(ps[i]))
    return kl


def ref_mean_kl(logits, ids, lp, olp, mask, tau, **kw):
    """Mean over masked positions of the per-position KL (WITHOUT the tau**2 factor)."""
    B, T, _ = logits.shape
    total, n = logits.new_zeros((), dtype=F64), 0
    for b in range(B):
        for t in range(T):
            if bool(mask[b, t]):
                total = total + ref_kl_position(logits[b, t], ids[b, t], lp[b, t], olp[b, t], tau, **kw)
                n += 1
    return total / max(n, 1)


def ref_loss(logits, ids, lp, olp, mask, tau, **kw):
    return tau**2 * ref_mean_kl(logits, ids, lp, olp, mask, tau, **kw)


def make_teacher(B, T, V, K, gen, *, dtype=F64, random_ids=False, sharpness=2.0):
    """Teacher top-K from a random full distribution: ids (top-K or random distinct), logprobs, Other."""
    q = torch.softmax(torch.randn(B, T, V, generator=gen, dtype=F64) * sharpness, dim=-1)
    if random_ids:
        ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(B * T)]).view(B, T, K)
    else:
        ids = q.topk(K, dim=-1).indices
    lp = q.gather(-1, ids).log()
    in_top = torch.zeros(B, T, V, dtype=torch.bool).scatter(-1, ids, True)
    other = torch.where(in_top, 0.0, q).sum(-1).log()  # = log(1 - sum of the K probabilities)
    return ids, lp.to(dtype), other.to(dtype), q


def num(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def rel_err(a, b):
    return abs(num(a) - num(b)) / max(abs(num(b)), 1e-300)


# --------------------------------------------------------------------------------------------
# kd_topk_other_loss vs reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("random_ids", [False, True])
def test_kd_matches_float64_reference(tau, random_ids):
    g = torch.Generator().manual_seed(10 + int(tau * 10) + random_ids)
    B, T, V, K = 2, 5, 23, 5
    logits = (torch.randn(B, T, V, generator=g, dtype=F64) * 1.5).requires_grad_(True)
    ids, lp, other, _ = make_teacher(B, T, V, K, g, random_ids=random_ids)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    mask[1, 4] = False

    loss = kd_topk_other_loss(logits, ids, lp, other, mask, tau=tau)
    expected = ref_loss(logits, ids, lp, other, mask, tau, tail="one_minus")
    assert loss.shape == ()
    assert num(expected) > 1e-3  # a non-trivial value
    assert rel_err(loss, expected) <= 1e-6

    # gradients agree as well
    (g_impl,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(ref_loss(logits, ids, lp, other, mask, tau), logits)
    assert torch.allclose(g_impl.to(F64), g_ref, rtol=1e-6, atol=1e-9)
    assert bool((g_impl[~mask] == 0).all())


@pytest.mark.parametrize("tau, other", [(1.0, "bucket"), (2.0, "bucket"), (1.0, "renormalize")])
def test_kd_per_position_matches_reference_and_is_zero_off_mask(tau, other):
    g = torch.Generator().manual_seed(21)
    B, T, V, K = 2, 4, 19, 4
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 1.5
    ids, lp, olp, _ = make_teacher(B, T, V, K, g)
    lp[0, 1, -1] = math.nan  # a padded slot
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0, 1], mask[1, 3] = True, False
    kl = kd_per_position(logits, ids, lp, olp, mask, tau, other)
    assert kl.shape == (B, T)
    assert bool((kl[~mask] == 0).all())
    for b, t in mask.nonzero().tolist():
        real = torch.isfinite(lp[b, t])
        expected = ref_kl_position(logits[b, t], ids[b, t][real], lp[b, t][real], olp[b, t], tau, other=other)
        assert rel_err(kl[b, t], expected) <= 1e-6
    # the logsumexp a caller already has gives the same values; the loss is tau^2 x their mean
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    assert torch.equal(kd_per_position(logits, ids, lp, olp, mask, tau, other, lse=lse), kl)
    loss = kd_topk_other_loss(logits, ids, lp, olp, mask, tau, other)
    assert num(loss) == pytest.approx(tau**2 * num(kl.sum()) / int(mask.sum()), rel=1e-12)


def test_kd_float32_inputs_close_to_reference():
    g = torch.Generator().manual_seed(3)
    B, T, V, K = 2, 4, 50, 8
    logits = torch.randn(B, T, V, generator=g) * 2
    ids, lp, other, _ = make_teacher(B, T, V, K, g, dtype=torch.float32)
    mask = torch.ones(B, T, dtype=torch.bool)
    loss = kd_topk_other_loss(logits, ids, lp, other, mask, tau=1.0)
    expected = ref_loss(logits.to(F64), ids, lp.to(F64), other.to(F64), mask, 1.0)
    assert loss.dtype == torch.float32
    assert rel_err(loss, expected) <= 1e-5


def test_kd_bf16_logits_are_upcast():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(1, 3, 30, generator=g) * 2).to(torch.bfloat16)
    ids, lp, other, _ = make_teacher(1, 3, 30, 4, g, dtype=torch.float32)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss = kd_topk_other_loss(logits, ids, lp, other, mask)
    expected = ref_loss(logits.to(F64), ids, lp.to(F64), other.to(F64), mask, 1.0)
    assert rel_err(loss, expected) <= 1e-5


# --------------------------------------------------------------------------------------------
# property test: masks, garbage at masked-out positions
# --------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 6),
    V=st.integers(8, 40),
    k_frac=st.floats(0.0, 1.0),
    tau=st.floats(0.5, 4.0),
    seed=st.integers(0, 2**31 - 1),
    mask_bits=st.lists(st.booleans(), min_size=18, max_size=18),
    n_pad=st.integers(0, 2),
    pad_kind=st.sampled_from(["-inf", "nan"]),
)
def test_kd_property_masked_positions(B, T, V, k_frac, tau, seed, mask_bits, n_pad, pad_kind):
    K = 1 + int(k_frac * (min(8, V) - 1))
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=F64) * 3).requires_grad_(True)
    ids, lp, other, _ = make_teacher(B, T, V, K, g, random_ids=bool(seed % 2))
    mask = torch.tensor(mask_bits[: B * T]).view(B, T)

    # trailing padded slots at the valid positions (id 0, logprob -inf or NaN)
    if n_pad:
        pad_val = -math.inf if pad_kind == "-inf" else math.nan
        ids = torch.cat([ids, torch.zeros(B, T, n_pad, dtype=torch.long)], dim=-1)
        lp = torch.cat([lp, torch.full((B, T, n_pad), pad_val, dtype=F64)], dim=-1)
    # garbage wherever the mask is False
    off = ~mask
    lp = lp.clone()
    lp[off] = torch.tensor([math.nan, math.inf, -math.inf] * 4, dtype=F64)[: lp.shape[-1]]
    ids = ids.clone()
    ids[off] = torch.tensor([V + 7, -5, 10**6] * 4)[: ids.shape[-1]]
    other = other.clone()
    other[off] = math.nan

    loss = kd_topk_other_loss(logits, ids, lp, other, mask, tau=tau)
    assert torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all()
    assert bool((grad[off] == 0).all())
    if not mask.any():
        assert num(loss) == 0.0
        assert bool((grad == 0).all())
    else:
        assert num(loss) >= -1e-12
        expected = ref_loss(logits.detach(), ids, lp, other, mask, tau)
        assert abs(num(loss) - num(expected)) <= 1e-6 * abs(num(expected)) + 1e-9


def test_kd_all_false_mask_is_zero_with_gradient_path():
    logits = torch.randn(2, 3, 10, requires_grad=True)
    ids = torch.full((2, 3, 4), 99)
    lp = torch.full((2, 3, 4), math.nan)
    other = torch.full((2, 3), math.nan)
    loss = kd_topk_other_loss(logits, ids, lp, other, torch.zeros(2, 3, dtype=torch.bool), tau=2.0)
    assert num(loss) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# --------------------------------------------------------------------------------------------
# temperature scaling and the zero of the loss
# --------------------------------------------------------------------------------------------


def test_tau_squared_scaling():
    g = torch.Generator().manual_seed(7)
    B, T, V, K = 1, 4, 17, 4
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 2
    ids, lp, other, _ = make_teacher(B, T, V, K, g)
    mask = torch.ones(B, T, dtype=torch.bool)
    for tau in (0.5, 1.0, 2.0, 4.0):
        kl_mean = num(ref_mean_kl(logits, ids, lp, other, mask, tau))
        loss = num(kd_topk_other_loss(logits, ids, lp, other, mask, tau=tau))
        assert kl_mean > 1e-4
        assert loss == pytest.approx(tau**2 * kl_mean, rel=1e-6)
        if tau != 1.0:  # the factor really is applied
            assert abs(loss - kl_mean) > 0.1 * kl_mean


def test_student_equal_to_teacher_gives_zero_at_tau1():
    g = torch.Generator().manual_seed(8)
    B, T, V, K = 2, 3, 29, 6
    ids, lp, other, q = make_teacher(B, T, V, K, g)
    logits = q.log()  # the student IS the teacher's full distribution
    mask = torch.ones(B, T, dtype=torch.bool)
    loss = kd_topk_other_loss(logits, ids, lp, other, mask, tau=1.0)
    assert abs(num(loss)) < 1e-10
    # any shift of the student away from it increases the loss
    bumped = logits.clone()
    bumped[..., 0] += 0.5
    assert num(kd_topk_other_loss(bumped, ids, lp, other, mask, tau=1.0)) > 1e-4
    # adding a per-position constant to the logits changes nothing
    shifted = logits + torch.randn(B, T, 1, generator=g, dtype=F64) * 10
    assert abs(num(kd_topk_other_loss(shifted, ids, lp, other, mask, tau=1.0))) < 1e-10


# --------------------------------------------------------------------------------------------
# renormalize variant
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_renormalize_matches_reference_and_differs_from_bucket(tau):
    g = torch.Generator().manual_seed(9)
    B, T, V, K = 2, 3, 19, 4
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 2
    # flat-ish teacher: its Other mass is large (>> 1e-3)
    ids, lp, other, _ = make_teacher(B, T, V, K, g, sharpness=0.5)
    assert num(other.exp().min()) > 0.3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2] = False
    ren = kd_topk_other_loss(logits, ids, lp, other, mask, tau=tau, other="renormalize")
    expected = ref_loss(logits, ids, lp, other, mask, tau, other="renormalize")
    assert rel_err(ren, expected) <= 1e-6
    # the Other value is ignored by renormalize
    ren2 = kd_topk_other_loss(logits, ids, lp, other - 3.0, mask, tau=tau, other="renormalize")
    assert num(ren2) == pytest.approx(num(ren), rel=1e-12)
    bucket = kd_topk_other_loss(logits, ids, lp, other, mask, tau=tau, other="bucket")
    assert abs(num(bucket) - num(ren)) > 1e-3
    with pytest.raises(ValueError):
        kd_topk_other_loss(logits, ids, lp, other, mask, other="drop")


# --------------------------------------------------------------------------------------------
# padded slots and tiny student tail
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [-math.inf, math.nan])
@pytest.mark.parametrize("other_mode", ["bucket", "renormalize"])
def test_padded_topk_slots_are_ignored(pad, other_mode):
    g = torch.Generator().manual_seed(11)
    B, T, V, K = 2, 3, 20, 3
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 2
    # real ids never include 0, so a padded id 0 removed from the tail would change the value
    q = torch.softmax(torch.randn(B, T, V, generator=g, dtype=F64), -1)
    ids = (q[..., 1:].topk(K, -1).indices + 1)
    lp = q.gather(-1, ids).log()
    other = (1 - lp.exp().sum(-1)).log()
    mask = torch.ones(B, T, dtype=torch.bool)
    ids5 = torch.cat([ids, torch.zeros(B, T, 2, dtype=torch.long)], -1)
    lp5 = torch.cat([lp, torch.full((B, T, 2), pad, dtype=F64)], -1)
    l3 = kd_topk_other_loss(logits, ids, lp, other, mask, other=other_mode)
    l5 = kd_topk_other_loss(logits, ids5, lp5, other, mask, other=other_mode)
    assert torch.isfinite(l5)
    assert num(l5) == pytest.approx(num(l3), rel=1e-9, abs=1e-12)
    assert num(l3) == pytest.approx(num(ref_loss(logits, ids, lp, other, mask, 1.0, other=other_mode)), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tiny_student_tail_is_exact(dtype):
    # top-4 logits [2, 1, 0.5, 0]: sum exp = 12.756 ; 12 tail logits of -27.57 each carry exp(-27.57)*12
    # ~ 1.3e-11 / 12.756 ~ 1e-12 of the student's mass. Teacher: top-4 with Other mass 0.05.
    V, K = 16, 4
    z = torch.full((1, 1, V), -27.57, dtype=F64)
    z[0, 0, :K] = torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=F64)
    z[0, 0, K:] += torch.linspace(-0.2, 0.2, V - K, dtype=F64)
    ids = torch.arange(K).view(1, 1, K)
    lp = torch.tensor([0.5, 0.25, 0.15, 0.05], dtype=F64).log().view(1, 1, K)
    other = torch.tensor([[math.log(0.05)]], dtype=F64)
    mask = torch.ones(1, 1, dtype=torch.bool)

    p = torch.softmax(z[0, 0], -1)
    tail_mass = num(p[K:].sum())
    assert 1e-13 < tail_mass < 1e-11

    logits = z.to(dtype).requires_grad_(True)
    loss = kd_topk_other_loss(logits, ids, lp.to(dtype), other.to(dtype), mask)
    expected = ref_loss(logits.detach().to(F64), ids, lp, other, mask, 1.0, tail="complement")
    assert torch.isfinite(loss)
    # the Other term alone is 0.05 * log(0.05 / 1e-12) ~ 1.2 ; cancellation (log(1 - sum)) would blow it up
    assert num(expected) > 1.0
    assert rel_err(loss, expected) <= (1e-9 if dtype == F64 else 1e-5)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all()
    # d/dz_j of -0.05 * log(tail) pushes tail logits up: gradient on each tail logit is negative
    assert bool((grad[0, 0, K:] < 0).all())


# --------------------------------------------------------------------------------------------
# DistillationLoss
# --------------------------------------------------------------------------------------------


def make_batch(B=3, T=9, V=31, K=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    loss_mask = torch.rand(B, T, generator=g) < 0.8
    loss_mask[:, -1] = False          # the last position has no next token
    loss_mask[0, :2] = False          # a "prompt"
    kd_valid = torch.rand(B, T, generator=g) < 0.7
    format_mask = torch.rand(B, T, generator=g) < 0.4
    ids, lp, other, _ = make_teacher(B, T, V, K, g, dtype=dtype, random_ids=True)
    # padded teacher values where kd is not valid (must not matter)
    bad = ~(loss_mask & kd_valid)
    lp = lp.clone()
    lp[bad] = math.nan
    other = other.clone()
    other[bad] = math.nan
    ids = ids.clone()
    ids[bad] = V + 3
    batch = dict(input_ids=input_ids, loss_mask=loss_mask, kd_valid=kd_valid, format_mask=format_mask,
                 topk_ids=ids, topk_logprobs=lp, other_logprob=other)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    return logits, batch


def ce_ref(logits, batch, mask):
    targets = batch["input_ids"][:, 1:]
    m = mask[:, :-1]
    if not m.any():
        return torch.zeros((), dtype=logits.dtype)
    return F.cross_entropy(logits[:, :-1][m].to(F64), targets[m])


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_distillation_loss_terms(tau):
    logits, batch = make_batch(dtype=F64)
    assert not bool(batch["loss_mask"].all()) and bool((batch["loss_mask"] & batch["kd_valid"]).any())
    assert bool((batch["loss_mask"] & ~batch["kd_valid"]).any())
    cfg = LossConfig(kd_weight=0.7, ce_weight=0.3, format_weight=0.2, tau=tau, chunk_size=None)
    out = DistillationLoss(cfg)(logits, batch)

    kd_mask = batch["loss_mask"] & batch["kd_valid"]
    fmt_mask = batch["loss_mask"] & batch["format_mask"]
    ce = ce_ref(logits, batch, batch["loss_mask"])
    fmt = ce_ref(logits, batch, fmt_mask)
    kd = kd_topk_other_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["other_logprob"], kd_mask,
                            tau=tau)
    kd_r = ref_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["other_logprob"], kd_mask, tau)

    assert num(out["ce"]) == pytest.approx(num(ce), rel=1e-6)
    assert num(out["format"]) == pytest.approx(num(fmt), rel=1e-6)
    assert num(out["kd"]) == pytest.approx(num(kd), rel=1e-6)
    assert num(out["kd"]) == pytest.approx(num(kd_r), rel=1e-6)
    assert num(out["loss"]) == pytest.approx(0.7 * num(kd) + 0.3 * num(ce) + 0.2 * num(fmt), rel=1e-6)
    assert int(out["n_tokens"]) == int(batch["loss_mask"].sum())
    assert int(out["n_kd_tokens"]) == int(kd_mask.sum())
    assert int(out["n_format_tokens"]) == int(fmt_mask.sum())
    for v in (out["ce"], out["kd"], out["format"]):
        assert num(v) > 0.1


def test_distillation_loss_default_weights_and_renormalize():
    logits, batch = make_batch(seed=1)
    out = DistillationLoss()(logits, batch)  # defaults 1.0 / 0.5 / 0.1
    assert num(out["loss"]) == pytest.approx(
        num(out["kd"]) + 0.5 * num(out["ce"]) + 0.1 * num(out["format"]), rel=1e-6)
    kd_mask = batch["loss_mask"] & batch["kd_valid"]
    ren = DistillationLoss(other="renormalize")(logits, batch)
    expected = kd_topk_other_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["other_logprob"],
                                  kd_mask, other="renormalize")
    assert num(ren["kd"]) == pytest.approx(num(expected), rel=1e-5)
    assert abs(num(ren["kd"]) - num(out["kd"])) > 1e-3
    with pytest.raises(ValueError):
        DistillationLoss(other="nope")


def test_ce_only_drops_kd_but_reports_it():
    logits, batch = make_batch(seed=2)
    cfg = dict(kd_weight=1.0, ce_weight=0.5, format_weight=0.1, chunk_size=None)
    full = DistillationLoss(LossConfig(**cfg))(logits, batch)
    only = DistillationLoss(LossConfig(ce_only=True, **cfg))(logits, batch)
    assert num(only["kd"]) == pytest.approx(num(full["kd"]), rel=1e-6)
    assert num(only["kd"]) > 0.1
    assert num(only["loss"]) == pytest.approx(0.5 * num(only["ce"]) + 0.1 * num(only["format"]), rel=1e-6)
    assert num(full["loss"]) - num(only["loss"]) == pytest.approx(num(full["kd"]), rel=1e-5)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_chunked_equals_unchunked(dtype, tol, tau):
    logits0, batch = make_batch(B=3, T=11, seed=3, dtype=dtype)
    assert int(batch["loss_mask"].sum()) > 3 * 3  # several chunks of 3
    results = {}
    for cs in (3, None, 2048):
        logits = logits0.clone().requires_grad_(True)
        out = DistillationLoss(LossConfig(tau=tau, chunk_size=cs))(logits, batch)
        out["loss"].backward()
        results[cs] = (out, logits.grad)
    (oc, gc), (ou, gu) = results[3], results[None]
    for key in ("loss", "kd", "ce", "format", "top1_agree"):
        assert torch.allclose(oc[key].to(F64), ou[key].to(F64), rtol=tol, atol=tol), key
    assert torch.allclose(gc, gu, rtol=tol, atol=tol)
    assert torch.allclose(results[2048][1], gu, rtol=tol, atol=tol)
    # gradient only at loss-bearing positions
    assert bool((gu[~batch["loss_mask"]] == 0).all())
    assert num(gu.abs().max()) > 1e-4


def test_empty_loss_mask():
    logits0, batch = make_batch(seed=4)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    batch["topk_logprobs"] = torch.full_like(batch["topk_logprobs"], math.nan)
    batch["other_logprob"] = torch.full_like(batch["other_logprob"], math.nan)
    for cs in (3, None):
        logits = logits0.clone().requires_grad_(True)
        out = DistillationLoss(LossConfig(chunk_size=cs))(logits, batch)
        for key in ("loss", "kd", "ce", "format", "top1_agree"):
            assert torch.isfinite(out[key]) and num(out[key]) == 0.0, key
        out["loss"].backward()
        assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))
        assert int(out["n_tokens"]) == 0


def test_top1_agree():
    logits, batch = make_batch(B=2, T=10, seed=5)
    kd_mask = batch["loss_mask"] & batch["kd_valid"]
    # force agreement at every other kd position
    pos = kd_mask.nonzero().tolist()
    assert len(pos) >= 4
    for i, (b, t) in enumerate(pos):
        if i % 2 == 0:
            logits[b, t, batch["topk_ids"][b, t, 0]] = 100.0
    out = DistillationLoss()(logits, batch)
    expected = (logits.argmax(-1) == batch["topk_ids"][..., 0])[kd_mask].float().mean()
    assert num(expected) >= 0.5 and num(expected) < 1.0
    assert num(out["top1_agree"]) == pytest.approx(num(expected), abs=1e-7)
    assert not out["top1_agree"].requires_grad


def test_distillation_loss_under_bf16_autocast_is_finite_and_masked():
    """Mixed precision (as on GPUs; here CPU autocast): bf16 logits, fp32 loss, exact zeros."""
    from bitnet_kde.model import BitNetConfig, BitNetLM

    torch.manual_seed(0)
    model = BitNetLM(BitNetConfig.from_name("tiny", vocab_size=40))
    b, t, k = 2, 7, 4
    ids = torch.randint(0, 40, (b, t))
    loss_mask = torch.zeros(b, t, dtype=torch.bool)
    loss_mask[:, 2:6] = True
    loss_mask[1, 4:] = False  # padding in row 1
    lp = torch.log_softmax(torch.randn(b, t, k + 1), -1)
    batch = {"input_ids": ids, "loss_mask": loss_mask, "kd_valid": torch.ones(b, t, dtype=torch.bool),
             "format_mask": torch.zeros(b, t, dtype=torch.bool), "topk_ids": torch.randint(0, 40, (b, t, k)),
             "topk_logprobs": torch.where(loss_mask.unsqueeze(-1), lp[..., :k], torch.nan),
             "other_logprob": torch.where(loss_mask, lp[..., k], torch.inf)}
    batch["topk_ids"][..., 1:] = batch["topk_ids"][..., :1] + torch.arange(1, k)  # distinct ids
    batch["topk_ids"] %= 40
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
        assert logits.dtype == torch.bfloat16
        logits.retain_grad()
        out = DistillationLoss(LossConfig(chunk_size=3))(logits, batch)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~loss_mask] == 0).all() and (logits.grad[loss_mask] != 0).any()


# --------------------------------------------------------------------------------------------
# fused head + loss against the unfused loss on explicit logits
# --------------------------------------------------------------------------------------------


def fused_case(seed, pad_slots=True, d=6):
    """Hidden states, head weight and a batch with masked positions and padded top-K slots."""
    _, batch = make_batch(B=3, T=11, V=31, K=5, seed=seed, dtype=F64)
    valid = batch["loss_mask"] & batch["kd_valid"]
    if pad_slots:  # the last two slots of every other valid position are padding (-inf / NaN)
        lp = batch["topk_logprobs"].clone()
        pos = valid.nonzero()[::2]
        lp[pos[:, 0], pos[:, 1], -1] = -math.inf
        lp[pos[:, 0], pos[:, 1], -2] = math.nan
        batch["topk_logprobs"] = lp
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(3, 11, d, generator=g, dtype=F64), torch.randn(31, d, generator=g, dtype=F64), batch


def both_losses(hidden0, weight0, batch, cfg, pick=lambda out: out["loss"]):
    """(unfused outputs, grads) and (fused outputs, grads) of `pick(out)` for hidden and weight."""
    results = []
    for fused in (False, True):
        h, w = hidden0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
        out = fused_distillation_loss(h, w, batch, cfg) if fused else DistillationLoss(cfg)(h @ w.T, batch)
        pick(out).backward()
        results.append((out, h.grad, w.grad))
    return results


@pytest.mark.parametrize("cfg", [
    LossConfig(),
    LossConfig(tau=2.0, chunk_size=4),
    LossConfig(tau=0.5, other="renormalize", chunk_size=3),
    LossConfig(ce_only=True, format_weight=0.7),
    LossConfig(chunk_size=None, kd_weight=0.3),
], ids=["default", "tau2-chunk4", "tau0.5-renormalize", "ce_only", "unchunked"])
def test_fused_loss_equals_unfused_float64(cfg):
    hidden, weight, batch = fused_case(seed=6)
    kd_mask = batch["loss_mask"] & batch["kd_valid"]
    assert bool((~batch["loss_mask"]).any()) and bool((batch["loss_mask"] & ~batch["kd_valid"]).any())
    assert int(kd_mask.sum()) > 4 and not bool(torch.isfinite(batch["topk_logprobs"][kd_mask]).all())
    (ref, gh_ref, gw_ref), (out, gh, gw) = both_losses(hidden, weight, batch, cfg)
    assert set(out) == set(ref)
    for key in ref:
        assert torch.allclose(out[key].to(F64), ref[key].to(F64), rtol=1e-12, atol=1e-12), key
    assert num(ref["kd"]) > 0.1 and num(ref["loss"]) > 0.1
    assert torch.allclose(gh, gh_ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gw, gw_ref, rtol=1e-10, atol=1e-12)
    assert num(gw.abs().max()) > 1e-3
    assert bool((gh[~batch["loss_mask"]] == 0).all())  # masked positions get no gradient


@pytest.mark.parametrize("term", ["kd", "ce", "format"])
def test_fused_loss_single_terms_have_the_unfused_gradients(term):
    """Any term can be differentiated on its own (it goes through the recomputing backward)."""
    hidden, weight, batch = fused_case(seed=7)
    cfg = LossConfig(tau=1.5, chunk_size=4)
    (ref, gh_ref, gw_ref), (out, gh, gw) = both_losses(hidden, weight, batch, cfg,
                                                       pick=lambda o: 2.0 * o[term] + 0.5 * o["loss"])
    assert torch.allclose(gh, gh_ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gw, gw_ref, rtol=1e-10, atol=1e-12)


def test_fused_loss_all_masked_is_zero_not_nan():
    hidden, weight, batch = fused_case(seed=8)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    batch["topk_logprobs"] = torch.full_like(batch["topk_logprobs"], math.nan)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = fused_distillation_loss(h, w, batch, LossConfig(chunk_size=3))
    for key in ("loss", "kd", "ce", "format", "top1_agree"):
        assert num(out[key]) == 0.0, key
    out["loss"].backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_fused_loss_without_grad_matches_and_holds_no_graph():
    hidden, weight, batch = fused_case(seed=9)
    with torch.no_grad():
        out = fused_distillation_loss(hidden, weight, batch, LossConfig(chunk_size=5))
        ref = DistillationLoss(LossConfig(chunk_size=5))(hidden @ weight.T, batch)
    assert not out["loss"].requires_grad
    assert torch.allclose(out["loss"], ref["loss"], rtol=1e-12)


def test_fused_loss_never_allocates_batch_by_vocab():
    """No tensor with as many elements as [rows, V] exists at once in forward or backward."""
    hidden, weight, batch = fused_case(seed=10)
    n_rows, vocab, chunk = int(batch["loss_mask"].sum()), weight.shape[0], 4
    assert n_rows > 2 * chunk
    seen = []

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(result):
                if isinstance(t, torch.Tensor):
                    seen.append(t.numel())
            return result

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with Watch():
        fused_distillation_loss(h, w, batch, LossConfig(chunk_size=chunk))["loss"].backward()
    assert max(seen) < n_rows * vocab
    assert chunk * vocab in seen  # the chunk's logits did exist
