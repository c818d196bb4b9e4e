"""Sampled-token KD (RS-KD) and the hybrid against float64 references written from the estimator's
definition, statistical unbiasedness of their gradients, masking, and the module's variants."""

from __future__ import annotations

import math

import pytest
import torch

from bitnet_kde.losses import (
    DistillationLoss,
    LossConfig,
    fused_distillation_loss,
    kd_hybrid_loss,
    kd_sampled_loss,
    kd_sampled_per_position,
)

F64 = torch.float64


def ref_position(z, ids, counts, logq=None, head=None, other_lp=None):
    """Estimate-vs-student KL at one position, plain loops in float64.

    p_hat(v) = c_v / N * p(v)/q(v) for each sampled id (N = sum of counts); with a head, the head
    ids carry their exact probability and the sampled tail is scaled by P(Other). Value:
    sum p_hat (log p_hat - log softmax(z)_v).
    """
    s = torch.log_softmax(z.to(F64), dim=-1)
    real = [j for j in range(len(ids)) if counts[j] > 0]
    n = sum(float(counts[j]) for j in real)
    scale = 1.0 if head is None else math.exp(float(other_lp))
    kl = s.new_zeros(())
    for j in real:
        w = float(counts[j]) / n * scale
        if logq is not None:
            w *= math.exp(-float(logq[j]))
        kl = kl + w * (math.log(w) - s[int(ids[j])])
    for i, lp in head or []:
        kl = kl + math.exp(lp) * (lp - s[i])
    return kl


def sample_counts(p, n, g, size):
    """`size` independent draws of N tokens from p, as [size, V] counts."""
    draws = torch.multinomial(p.expand(size, -1), n, replacement=True, generator=g)
    return torch.zeros(size, p.numel(), dtype=F64).scatter_add_(1, draws, torch.ones_like(draws, dtype=F64))


def dense_case(seed=0, B=2, T=5, V=9, S=4):
    """Logits, sparse sampled columns (padded slots: count 0, garbage id) and a mask."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    ids = torch.stack([torch.randperm(V, generator=g)[:S] for _ in range(B * T)]).view(B, T, S)
    counts = torch.randint(1, 5, (B, T, S), generator=g).to(torch.int32)
    counts[0, 1, 2:] = 0                       # padded slots
    ids[0, 1, 2:] = V + 7                      # ... with an out-of-range id
    logq = torch.randn(B, T, S, generator=g, dtype=F64) * 0.3
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 1] = True
    return logits, ids, counts, logq, mask


@pytest.mark.parametrize("with_logq", [False, True])
def test_rs_loss_matches_reference(with_logq):
    logits, ids, counts, logq, mask = dense_case()
    logits.requires_grad_(True)
    got = kd_sampled_loss(logits, ids, counts, mask, rs_logq=logq if with_logq else None)
    ref = sum(ref_position(logits[b, t], ids[b, t], counts[b, t], logq[b, t] if with_logq else None)
              for b, t in mask.nonzero().tolist()) / int(mask.sum())
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    g_got = torch.autograd.grad(got, logits)[0]
    logits2 = logits.detach().clone().requires_grad_(True)
    ref2 = sum(ref_position(logits2[b, t], ids[b, t], counts[b, t], logq[b, t] if with_logq else None)
               for b, t in mask.nonzero().tolist()) / int(mask.sum())
    g_ref = torch.autograd.grad(ref2, logits2)[0]
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)


def test_hybrid_loss_matches_reference():
    logits, ids, counts, _, mask = dense_case(seed=1)
    B, T, V = logits.shape
    g = torch.Generator().manual_seed(5)
    head_ids = torch.randint(0, V, (B, T, 2), generator=g)
    head_lp = torch.log(torch.rand(B, T, 2, generator=g, dtype=F64) * 0.3)
    head_lp[1, 0, 1] = -math.inf                       # a padded head slot
    other = torch.log1p(-head_lp.exp().sum(-1))
    got = kd_hybrid_loss(logits, head_ids, head_lp, other, ids, counts, mask)
    ref = 0.0
    for b, t in mask.nonzero().tolist():
        head = [(int(i), float(lp)) for i, lp in zip(head_ids[b, t], head_lp[b, t]) if math.isfinite(lp)]
        ref = ref + ref_position(logits[b, t], ids[b, t], counts[b, t], head=head, other_lp=other[b, t])
    assert float(got) == pytest.approx(float(ref) / int(mask.sum()), rel=1e-10)


def test_estimate_equal_to_student_gives_zero():
    """When counts/N equals the student's distribution on its support, the KL is 0."""
    z = torch.log(torch.tensor([[[0.5, 0.25, 0.25, 0.0]]], dtype=F64))
    loss = kd_sampled_loss(z, torch.tensor([[[0, 1, 2]]]), torch.tensor([[[2, 1, 1]]]), torch.tensor([[True]]))
    assert float(loss) == pytest.approx(0.0, abs=1e-12)


def test_masked_positions_contribute_exactly_zero_even_with_nan():
    logits, ids, counts, logq, mask = dense_case(seed=2)
    mask[1, 3] = False
    counts = counts.to(F64)
    counts[1, 3] = math.nan
    logq[1, 3] = math.nan
    ids[1, 3] = -5
    logits.requires_grad_(True)
    per = kd_sampled_per_position(logits, ids, counts, mask, rs_logq=logq)
    assert bool((per[~mask] == 0).all()) and bool(torch.isfinite(per).all())
    loss = kd_sampled_loss(logits, ids, counts, mask, rs_logq=logq)
    (grad,) = torch.autograd.grad(loss, logits)
    assert bool(torch.isfinite(grad).all()) and bool((grad[~mask] == 0).all())
    empty = kd_sampled_loss(logits, ids, counts, torch.zeros_like(mask))
    assert float(empty) == 0.0 and empty.requires_grad


def full_kd_grad(z, p):
    """d/dz KL(p || softmax(z)) = softmax(z) - p."""
    return torch.softmax(z, -1) - p


def mean_sampled_grad(z, columns, mask, hybrid=None, logq=None):
    """Mean over M positions (all with the same logits z) of the per-position loss gradient."""
    M = mask.numel()
    zz = z.expand(1, M, -1).clone().requires_grad_(True)
    ids, counts = columns
    if hybrid is None:
        loss = kd_sampled_loss(zz, ids, counts, mask, rs_logq=logq)
    else:
        loss = kd_hybrid_loss(zz, *hybrid, ids, counts, mask, rs_logq=logq)
    (g,) = torch.autograd.grad(loss, zz)
    per = g[0] * M                       # gradient of each position's own term
    return per.mean(0), per.std(0) / math.sqrt(M)


TEACHER = torch.tensor([0.45, 0.2, 0.12, 0.1, 0.06, 0.04, 0.02, 0.01], dtype=F64)
STUDENT = torch.tensor([0.3, -0.2, 0.5, 0.0, -1.0, 0.4, -0.3, 0.1], dtype=F64)


def dense_columns(counts):
    """rs columns holding every vocabulary id (zero counts are padding)."""
    M, V = counts.shape
    return torch.arange(V).expand(1, M, V), counts.unsqueeze(0)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_rs_gradient_is_unbiased(beta):
    """The mean of many N=4 sampled gradients converges to the full-distribution KD gradient."""
    g = torch.Generator().manual_seed(11)
    M, N = 20000, 4
    q = TEACHER**beta / (TEACHER**beta).sum()
    counts = sample_counts(q, N, g, M)
    logq = (q.log() - TEACHER.log()).expand(1, M, -1) if beta != 1.0 else None
    mean, se = mean_sampled_grad(STUDENT, dense_columns(counts), torch.ones(1, M, dtype=torch.bool), logq=logq)
    target = full_kd_grad(STUDENT, TEACHER)
    assert bool(((mean - target).abs() < 5 * se + 1e-9).all()), (mean, target, se)
    # A biased estimator (Top-2 renormalized) is far off by the same yardstick.
    top2 = torch.zeros_like(TEACHER)
    top2[:2] = TEACHER[:2] / TEACHER[:2].sum()
    assert bool(((full_kd_grad(STUDENT, top2) - target).abs() > 5 * se).any())


def test_hybrid_gradient_is_unbiased():
    """Exact head (2 ids) + tail sampled from the teacher restricted to the tail, N=2."""
    g = torch.Generator().manual_seed(12)
    M, N, K = 20000, 2, 2
    tail = TEACHER.clone()
    tail[:K] = 0
    p_other = float(tail.sum())
    counts = sample_counts(tail / p_other, N, g, M)
    head = (torch.arange(K).expand(1, M, K), TEACHER[:K].log().expand(1, M, K),
            torch.full((1, M), math.log(p_other), dtype=F64))
    mean, se = mean_sampled_grad(STUDENT, dense_columns(counts), torch.ones(1, M, dtype=torch.bool), hybrid=head)
    target = full_kd_grad(STUDENT, TEACHER)
    assert bool(((mean - target).abs() < 5 * se + 1e-9).all()), (mean, target, se)


def module_batch(seed=3, V=11, T=6):
    g = torch.Generator().manual_seed(seed)
    B, K, S = 2, 3, 4
    logits, ids, counts, logq, kd_valid = dense_case(seed=seed, B=B, T=T, V=V, S=S)
    topk_lp = torch.log(torch.rand(B, T, K, generator=g, dtype=F64) * 0.3)
    batch = {"input_ids": torch.randint(0, V, (B, T), generator=g), "loss_mask": torch.ones(B, T, dtype=torch.bool),
             "kd_valid": kd_valid, "format_mask": torch.zeros(B, T, dtype=torch.bool),
             "topk_ids": torch.randint(0, V, (B, T, K), generator=g), "topk_logprobs": topk_lp,
             "other_logprob": torch.log1p(-topk_lp.exp().sum(-1)), "rs_ids": ids, "rs_counts": counts, "rs_logq": logq}
    batch["loss_mask"][1, -1] = False
    return logits, batch


@pytest.mark.parametrize("variant", ["rs", "hybrid"])
def test_module_variant_equals_function_and_fused_path(variant):
    logits, batch = module_batch()
    kd_mask = batch["loss_mask"] & batch["kd_valid"]
    out = DistillationLoss(LossConfig(other=variant, chunk_size=4))(logits, batch)
    if variant == "rs":
        want = kd_sampled_loss(logits, batch["rs_ids"], batch["rs_counts"], kd_mask, rs_logq=batch["rs_logq"])
    else:
        want = kd_hybrid_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["other_logprob"],
                              batch["rs_ids"], batch["rs_counts"], kd_mask, rs_logq=batch["rs_logq"])
    assert float(out["kd"]) == pytest.approx(float(want), rel=1e-10)
    assert float(out["kd"]) != pytest.approx(float(DistillationLoss(LossConfig())(logits, batch)["kd"]), rel=1e-3)
    # The fused head + loss supports the sampled variants: same loss and gradients.
    g = torch.Generator().manual_seed(4)
    h0, w0 = torch.randn(*logits.shape[:2], 5, generator=g, dtype=F64), torch.randn(logits.shape[-1], 5, generator=g,
                                                                                   dtype=F64)
    grads = []
    for fused in (False, True):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        cfg = LossConfig(other=variant, chunk_size=3)
        o = fused_distillation_loss(h, w, batch, cfg) if fused else DistillationLoss(cfg)(h @ w.T, batch)
        o["loss"].backward()
        grads.append((float(o["loss"]), h.grad, w.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-10)
    torch.testing.assert_close(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[0][2], grads[1][2])


def test_sampled_variant_without_sampled_columns_is_refused():
    logits, batch = module_batch()
    for key in ("rs_ids", "rs_counts", "rs_logq"):
        batch.pop(key)
    with pytest.raises(ValueError, match="rs_ids / rs_counts.*collection.rs.n"):
        DistillationLoss(LossConfig(other="rs"))(logits, batch)
    with pytest.raises(ValueError, match="loss.other must be one of bucket, renormalize, rs, hybrid"):
        DistillationLoss(LossConfig(other="sampled"))


@pytest.mark.parametrize("variant", ["rs", "hybrid"])
def test_sampled_variants_refuse_a_temperature(variant):
    """The draws are made at temperature 1: a tau would soften the student only."""
    with pytest.raises(ValueError, match=f"loss.tau=2.0 with loss.other={variant}: .*p\\^tau.*set loss.tau=1"):
        DistillationLoss(LossConfig(other=variant, tau=2.0))
    DistillationLoss(LossConfig(other=variant, tau=1.0))
    DistillationLoss(LossConfig(other="bucket", tau=2.0))


def test_rs_positions_without_draws_are_left_out_of_the_mean():
    """A KD-valid position whose draws all mapped to no student token (strings projection) has no
    estimate: it must not count as a KL of 0 and dilute the mean. The hybrid keeps it (exact head)."""
    logits, batch = module_batch()
    kd_mask = batch["loss_mask"] & batch["kd_valid"]
    b, t = kd_mask.nonzero()[0].tolist()
    batch["rs_counts"][b, t] = 0
    per = kd_sampled_per_position(logits, batch["rs_ids"], batch["rs_counts"], kd_mask, batch["rs_logq"])
    assert float(per[b, t]) == 0.0
    want = float(per.sum()) / (int(kd_mask.sum()) - 1)
    assert float(kd_sampled_loss(logits, batch["rs_ids"], batch["rs_counts"], kd_mask, batch["rs_logq"])) == \
        pytest.approx(want, rel=1e-10)
    for fused in (False, True):
        cfg = LossConfig(other="rs", chunk_size=4)
        h = torch.eye(logits.shape[-1], dtype=F64)
        out = fused_distillation_loss(logits, h, batch, cfg) if fused else DistillationLoss(cfg)(logits, batch)
        assert float(out["kd"]) == pytest.approx(want, rel=1e-10)
        assert int(out["n_kd_tokens"]) == int(kd_mask.sum()) - 1
    assert int(DistillationLoss(LossConfig(other="hybrid"))(logits, batch)["n_kd_tokens"]) == int(kd_mask.sum())
