"""Distillation losses on Top-K + Other teacher traces.

All losses are next-token aligned: `logits[:, t]` predicts token `t + 1` and is paired with
the teacher's `topk_*[:, t]`. A position takes part only where its mask is True; masked
positions contribute exactly zero to the value and the gradient, whatever numbers (even
NaN or -inf) the padded teacher tensors hold there.

Sampled traces (schema v2) add `loss.other=rs` (the unbiased sampled estimate of the teacher's whole
distribution, `kd_sampled_loss`) and `hybrid` (exact Top-K head + sampled tail, `kd_hybrid_loss`);
both run through the same chunked and fused paths.

Memory: given logits, the only [B, T, V] tensor needed is the logits themselves. Per position
we keep `logsumexp(z)` and a few gathered values; `chunk_size` processes positions in chunks under
activation checkpointing so even the transient softmax of the backward pass is O(chunk x V).
Given the hidden states and the LM head instead (`ProjectedLogits`, `fused_distillation_loss`),
no [B, T, V] tensor exists at all: each chunk is projected, reduced and differentiated in turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["kd_per_position", "kd_topk_other_loss", "DistillationLoss", "LossConfig", "ProjectedLogits",
           "fused_distillation_loss", "kd_sampled_per_position", "kd_sampled_loss", "kd_hybrid_loss",
           "KD_VARIANTS", "SAMPLED_VARIANTS", "has_draws"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (bf16/fp16 logits are upcast), but float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


_EXACT_TAIL_ABOVE = math.log(0.99)
"""Rows whose top-K hold more than 99% of the student's mass get the exact complement sum."""


def _student_tail(z, lse, s_k, topk_ids) -> torch.Tensor:
    """log of the student's probability mass outside the top-K ids, per row ([N, 1]).

    `log(1 - sum q_k)` is accurate while the tail is not small and costs nothing extra. When
    the top-K hold > 99% of the mass it would cancel (down to log 0 for a tail of 1e-9), so
    those rows use `logsumexp` over the complement itself: one more pass over V, but only
    for the rows that need it.
    """
    covered = torch.logsumexp(s_k, dim=-1, keepdim=True)  # log sum q_k
    exact = covered > _EXACT_TAIL_ABOVE
    # The where keeps rows that take the exact path away from log(0) (and its inf gradient).
    tail = torch.log(-torch.expm1(torch.where(exact, torch.full_like(covered, -1.0), covered)))
    if bool(exact.any()):
        rows = exact.squeeze(-1).nonzero().squeeze(-1)
        rest = z[rows].scatter(-1, topk_ids[rows], -math.inf)
        tail = tail.index_put((rows,), torch.logsumexp(rest, dim=-1, keepdim=True) - lse[rows])
    return tail


def _bucket_kl(z, topk_ids, topk_lp, other_lp, tau: float, other: str, lse=None) -> torch.Tensor:
    """KL(teacher || student) over the K+1 buckets for each row of z [N, V].

    Expects sanitized teacher tensors (see `_safe_teacher`): padded slots hold logprob -inf
    and repeat a valid id, and every row has at least one valid slot. `lse` (the row-wise
    logsumexp of z, [N, 1]) may be passed in when the caller has it and tau == 1.
    """
    z = z.to(_compute_dtype(z.dtype))
    topk_lp, other_lp = topk_lp.to(z.dtype), other_lp.to(z.dtype)
    if tau != 1.0:
        z, lse = z / tau, None
    slot = torch.isfinite(topk_lp)
    if lse is None:
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
    s_k = (z.gather(-1, topk_ids) - lse).masked_fill(~slot, -math.inf)   # student log q_k
    t_k = topk_lp / tau
    if other == "bucket":
        # Floored so that a saturated student (tail exactly 0 in floating point) stays finite.
        tail = _student_tail(z, lse, s_k, topk_ids)
        s = torch.cat([s_k, tail.clamp_min(-1e4)], dim=-1)
        t = torch.cat([t_k, other_lp.unsqueeze(-1) / tau], dim=-1)
    elif other == "renormalize":  # drop the tail on both sides
        s = s_k - torch.logsumexp(s_k, dim=-1, keepdim=True)
        t = t_k
    else:
        raise ValueError(f"unknown Other handling {other!r} (use 'bucket' or 'renormalize')")
    t = t - torch.logsumexp(t, dim=-1, keepdim=True)  # normalize teacher buckets
    p = t.exp()
    # Buckets with zero teacher mass contribute exactly 0; selecting before multiplying keeps
    # -inf - -inf out of both the value and the gradient.
    diff = torch.where(p > 0, t - s, torch.zeros_like(t))
    return (p * diff).sum(-1)


def _safe_teacher(topk_ids, topk_lp, other_lp, mask, vocab_size):
    """Teacher tensors that cannot produce NaN anywhere.

    Masked-out positions get a single valid slot (id 0, logprob 0) and Other logprob 0; padded
    slots (non-finite logprob) get logprob -inf and repeat the row's first id so that the
    scatter of the complement only removes real candidates.
    """
    m = mask.unsqueeze(-1)
    lp = topk_lp.to(_compute_dtype(topk_lp.dtype))
    slot = torch.isfinite(lp) & m
    first = torch.zeros_like(slot)
    first[..., 0] = True
    slot = torch.where(m, slot, first)
    lp = torch.where(slot, torch.where(m, lp, 0.0), -math.inf)
    ids = torch.where(m, topk_ids.long(), 0).clamp(0, vocab_size - 1)
    ids = torch.where(slot, ids, ids[..., :1])
    olp = torch.where(mask, other_lp.to(_compute_dtype(other_lp.dtype)), 0.0)
    return ids, lp, olp


def kd_per_position(logits, topk_ids, topk_logprobs, other_logprob, mask, tau: float = 1.0,
                    other: str = "bucket", lse=None) -> torch.Tensor:
    """KL(teacher || student) over {top-K, Other} at every position; exactly 0 where `mask` is False.

    Shapes: logits [..., V]; topk_ids / topk_logprobs [..., K] as read from a trace (padded
    slots: logprob -inf or NaN); other_logprob, mask [...]. Returns [...] in at least float32.
    `other`: `bucket` keeps the teacher's tail mass as one more bucket, `renormalize` drops it
    on both sides. `lse` ([..., 1], the logsumexp of `logits` over V) saves a pass over the
    vocabulary when the caller already has it; it is used only at tau == 1. The KD loss and the
    eval's KL metric are both this function.
    """
    ids, lp, olp = _safe_teacher(topk_ids, topk_logprobs, other_logprob, mask, logits.shape[-1])
    kl = _bucket_kl(logits.flatten(0, -2), ids.flatten(0, -2), lp.flatten(0, -2), olp.flatten(), tau, other,
                    lse=None if lse is None else lse.flatten(0, -2)).view(mask.shape)
    return torch.where(mask, kl, torch.zeros_like(kl))


def kd_topk_other_loss(logits, topk_ids, topk_logprobs, other_logprob, mask, tau: float = 1.0,
                       other: str = "bucket") -> torch.Tensor:
    """`tau**2` x mean over masked-in positions of KL(teacher || student) over {top-K, Other}.

    Shapes: logits [B, T, V]; topk_ids / topk_logprobs [B, T, K] (padded slots: logprob -inf
    or NaN); other_logprob, mask [B, T]. Returns a scalar; 0 (with a gradient path) if the
    mask is empty.
    """
    kl = kd_per_position(logits, topk_ids, topk_logprobs, other_logprob, mask, tau, other)
    return tau**2 * kl.sum() / mask.sum().clamp_min(1)


# -- sampled-token KD (RS-KD) ------------------------------------------------------------------
# Sparse Logit Sampling (Anshumann et al., 2025): per position the trace holds N tokens drawn from a
# proposal q, stored as distinct ids with counts. The estimate of the teacher's distribution,
#     p_hat(v) = (c_v / N) * p(v) / q(v)          (= c_v / N when q = p),
# is unbiased, and the loss sum_v p_hat(v) (log p_hat(v) - log s(v)) is linear in p_hat wherever it
# depends on the student, so its gradient is an unbiased estimate of the full-vocabulary KD gradient.
# `rs_logq` holds log(q(v) / p(v)) of each sampled id (absent or 0 when q = p). The hybrid keeps
# the exact Top-K head and samples only the tail (q = p restricted to the tail, renormalized), so
# a tail sample stands for P(Other) * c_v / N. N is the sum of a position's counts: after the strings
# projection has dropped the draws that map to no student token that is fewer than were drawn, and
# the estimate is biased (docs/TRACE_FORMAT.md, "Sampled draws on the strings path").


def _sampled_weights(rs_counts, rs_logq, valid, scale):
    """p_hat per slot ([..., S]) and the slot mask: counts / N times the importance ratio, times `scale`."""
    c = torch.where(valid, rs_counts.to(scale.dtype), torch.zeros_like(scale))
    n = c.sum(-1, keepdim=True).clamp_min(1)
    w = c / n * scale
    if rs_logq is not None:
        w = w * torch.exp(-torch.where(valid, rs_logq.to(scale.dtype), torch.zeros_like(w)))
    return w, valid & (w > 0)


def kd_sampled_per_position(logits, rs_ids, rs_counts, mask, rs_logq=None, topk_ids=None,
                            topk_logprobs=None, other_logprob=None, lse=None) -> torch.Tensor:
    """Sampled-estimate KL(p_hat || student) at every position; exactly 0 where `mask` is False.

    Shapes: logits [..., V]; rs_ids / rs_counts (/ rs_logq) [..., S] (padded slots: count 0, any id
    or logq); mask [...]. Without `topk_*` this is RS-KD: p_hat(v) = c_v / N * exp(-rs_logq_v).
    With `topk_ids` / `topk_logprobs` [..., K] and `other_logprob` [...] it is the hybrid: the exact
    head p_k plus the sampled tail, each tail sample weighted exp(other_logprob) * c_v / N.
    The draws are made at temperature 1, so there is no `tau`: softening only the student would
    move its optimum from p to p^tau (`DistillationLoss` refuses tau != 1 with these variants).
    Returns [...] in at least float32; `lse` ([..., 1], logsumexp of `logits`) saves a pass over V.
    """
    z = logits.to(_compute_dtype(logits.dtype))
    if lse is None:
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
    m = mask.unsqueeze(-1)
    vocab = z.shape[-1]
    counts = rs_counts.to(z.dtype)
    valid = m & torch.isfinite(counts) & (counts > 0)
    if rs_logq is not None:
        valid = valid & torch.isfinite(rs_logq.to(z.dtype))
    scale = torch.ones_like(counts)
    if topk_ids is not None:
        olp = torch.where(mask, other_logprob.to(z.dtype), torch.zeros_like(other_logprob, dtype=z.dtype))
        scale = scale * olp.exp().unsqueeze(-1)
    w, valid = _sampled_weights(counts, rs_logq, valid, scale)
    ids = torch.where(valid, rs_ids.long(), 0).clamp(0, vocab - 1)
    # Selected before the log so that empty slots put neither -inf nor NaN into value or gradient.
    w_safe = torch.where(valid, w, torch.ones_like(w))
    s = z.gather(-1, ids) - lse
    kl = torch.where(valid, w_safe * (w_safe.log() - s), torch.zeros_like(w)).sum(-1)
    if topk_ids is not None:
        lp = topk_logprobs.to(z.dtype)
        head = m & torch.isfinite(lp)
        hids = torch.where(head, topk_ids.long(), 0).clamp(0, vocab - 1)
        lp_safe = torch.where(head, lp, torch.zeros_like(lp))
        hs = z.gather(-1, hids) - lse
        kl = kl + torch.where(head, lp_safe.exp() * (lp_safe - hs), torch.zeros_like(lp)).sum(-1)
    return torch.where(mask, kl, torch.zeros_like(kl))


def has_draws(rs_counts) -> torch.Tensor:
    """[...] True where a position holds at least one draw (`rs_counts` [..., S], padding 0).

    Under RS-KD a position without draws has no estimate at all (the strings projection drops the
    draws that map to no student token, sometimes all of them), so it is left out of the mean
    instead of counting as a KL of 0."""
    return (rs_counts > 0).any(-1)


def kd_sampled_loss(logits, rs_ids, rs_counts, mask, rs_logq=None) -> torch.Tensor:
    """Mean over masked-in positions with draws (`has_draws`) of the RS-KD loss (`kd_sampled_per_position`).

    Shapes: logits [B, T, V]; rs_ids / rs_counts (/ rs_logq) [B, T, S]; mask [B, T]. Per position:
    the cross-entropy of the student against the sampled estimate p_hat minus the entropy of
    p_hat. Returns a scalar; 0 (with a gradient path) if no masked-in position has draws.
    """
    kl = kd_sampled_per_position(logits, rs_ids, rs_counts, mask, rs_logq)
    return kl.sum() / (mask & has_draws(rs_counts)).sum().clamp_min(1)


def kd_hybrid_loss(logits, topk_ids, topk_logprobs, other_logprob, rs_ids, rs_counts, mask,
                   rs_logq=None) -> torch.Tensor:
    """Mean over masked-in positions of the hybrid loss: exact Top-K head + sampled tail."""
    kl = kd_sampled_per_position(logits, rs_ids, rs_counts, mask, rs_logq, topk_ids, topk_logprobs, other_logprob)
    return kl.sum() / mask.sum().clamp_min(1)


KD_VARIANTS = ("bucket", "renormalize", "rs", "hybrid")
"""Values of `LossConfig.other`: what the KD term is computed over."""
SAMPLED_VARIANTS = ("rs", "hybrid")
"""Variants that need sampled trace columns (`rs_ids`, `rs_counts`, optional `rs_logq`)."""


@dataclass
class LossConfig:
    """Weights and variants of the total distillation loss."""

    kd_weight: float = 1.0
    """Weight of the Top-K + Other KL term."""
    ce_weight: float = 0.5
    """Weight of cross-entropy on the teacher's actual next token."""
    format_weight: float = 0.1
    """Weight of cross-entropy restricted to JSON structural tokens."""
    tau: float = 1.0
    """Distillation temperature (exact at 1; the Other atom is an approximation otherwise). Must be 1
    with `rs` / `hybrid`: their draws are made at temperature 1."""
    other: str = "bucket"
    """KD target: `bucket` keeps the teacher's tail mass as an Other bucket; `renormalize` drops it;
    `rs` uses the sampled estimate of the whole distribution; `hybrid` the exact Top-K head plus the
    sampled tail (both need sampled traces, schema v2)."""
    ce_only: bool = False
    """Train on CE (+ format) only; KD is still computed and logged, with weight 0 (ablation)."""
    chunk_size: int | None = 2048
    """Positions per chunk (bounds peak memory at O(chunk x V)); None = all at once."""


class ProjectedLogits(NamedTuple):
    """Logits `hidden @ head_weight.T` in factored form: `DistillationLoss` then projects a chunk of
    positions at a time (`fused_distillation_loss`) instead of reading a [B, T, V] tensor."""

    hidden: torch.Tensor
    """Final normed hidden states [B, T, d]."""
    head_weight: torch.Tensor
    """LM head weight [V, d]."""


class DistillationLoss(torch.nn.Module):
    """`total = w_kd * KD + w_ce * CE + w_fmt * format`, computed from one pass over the logits.

    `batch` holds (all [B, T] unless noted): `input_ids`, `loss_mask` (position t predicts a
    completion token), `kd_valid`, `format_mask`, `topk_ids`/`topk_logprobs` [B, T, K],
    `other_logprob`. Returns a dict of scalar tensors: `loss`, `kd`, `ce`, `format`,
    `top1_agree` (student argmax == teacher top-1 on KD positions, no gradient), and counts.
    """

    def __init__(self, cfg: LossConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg or LossConfig(**kwargs)
        if self.cfg.other not in KD_VARIANTS:
            raise ValueError(f"loss.other must be one of {', '.join(KD_VARIANTS)}, got {self.cfg.other!r}")
        if self.cfg.other in SAMPLED_VARIANTS and self.cfg.tau != 1.0:
            raise ValueError(
                f"loss.tau={self.cfg.tau} with loss.other={self.cfg.other}: the sampled draws are made at temperature "
                "1, so tau would soften the student only and train it towards p^tau instead of the teacher's p; "
                "set loss.tau=1 (or use loss.other=bucket to distil at a temperature)")

    def _chunk_terms(self, z, targets, ids, lp, olp, kd_mask, rs=None):
        z = z.to(_compute_dtype(z.dtype))
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        ce = (lse - z.gather(-1, targets.unsqueeze(-1))).squeeze(-1)
        if self.cfg.other == "rs":
            kd = kd_sampled_per_position(z, rs[0], rs[1], kd_mask, rs[2], lse=lse)
        elif self.cfg.other == "hybrid":
            kd = kd_sampled_per_position(z, rs[0], rs[1], kd_mask, rs[2], ids, lp, olp, lse=lse)
        else:
            kd = kd_per_position(z, ids, lp, olp, kd_mask, self.cfg.tau, self.cfg.other, lse=lse)
        # slot 0 holds the teacher's most probable candidate; ids are clamped into V as for the KL
        agree = (z.argmax(-1) == ids[:, 0].long().clamp(0, z.shape[-1] - 1)).float()
        return ce, kd, agree

    def _rows(self, batch: dict) -> dict:
        """The loss-bearing positions (flat indices `rows` into [B * T]) and their per-row inputs."""
        loss_mask = batch["loss_mask"]
        kd_mask = loss_mask & batch["kd_valid"]
        rs = self._sampled_columns(batch)
        if self.cfg.other == "rs":
            kd_mask = kd_mask & has_draws(rs[1])  # no draw, no estimate: not a KL of 0 in the mean
        fmt_mask = loss_mask & batch["format_mask"]
        rows = loss_mask.flatten().nonzero().squeeze(-1)
        targets = batch["input_ids"][:, 1:]
        targets = torch.cat([targets, torch.zeros_like(targets[:, :1])], dim=1).flatten()[rows]
        return {"rows": rows, "targets": targets, "ids": batch["topk_ids"].flatten(0, 1)[rows],
                "lp": batch["topk_logprobs"].flatten(0, 1)[rows], "olp": batch["other_logprob"].flatten()[rows],
                "kd_sel": kd_mask.flatten()[rows], "fmt_sel": fmt_mask.flatten()[rows],
                "counts": (loss_mask.sum(), kd_mask.sum(), fmt_mask.sum()),
                "rs": None if rs is None else tuple(None if x is None else x.flatten(0, 1)[rows] for x in rs)}

    def _sampled_columns(self, batch: dict) -> tuple | None:
        """(rs_ids, rs_counts, rs_logq or None) [B, T, S] of the batch, for the sampled variants."""
        if self.cfg.other not in SAMPLED_VARIANTS:
            return None
        if "rs_ids" not in batch or "rs_counts" not in batch:
            raise ValueError(f"loss.other={self.cfg.other} needs sampled traces (rs_ids / rs_counts columns, "
                             "trace schema v2): collect them from a local teacher with collection.rs.n > 0, "
                             "or use loss.other=bucket")
        return batch["rs_ids"], batch["rs_counts"], batch.get("rs_logq")

    def _chunks(self, n: int):
        step = self.cfg.chunk_size or max(n, 1)
        return [slice(s, s + step) for s in range(0, n, step)]

    def _summary(self, ce, kd, agree, sel: dict, zero) -> dict[str, torch.Tensor]:
        """The output dict from per-row CE / KL / agreement; `zero` carries the graph to the input."""
        kd_sel, fmt_sel = sel["kd_sel"], sel["fmt_sel"]
        n_rows = sel["rows"].numel()

        def masked_mean(x, m):
            return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp_min(1) + zero

        n_tokens, n_kd, n_fmt = sel["counts"]
        out = {
            "ce": ce.sum() / max(n_rows, 1) + zero,
            "kd": self.cfg.tau**2 * masked_mean(kd, kd_sel),
            "format": masked_mean(ce, fmt_sel),
            "top1_agree": masked_mean(agree, kd_sel).detach(),
            "n_tokens": n_tokens,
            "n_kd_tokens": n_kd,
            "n_format_tokens": n_fmt,
        }
        out["loss"] = self.kd_weight * out["kd"] + self.cfg.ce_weight * out["ce"] + self.cfg.format_weight * out["format"]
        return out

    @property
    def kd_weight(self) -> float:
        return 0.0 if self.cfg.ce_only else self.cfg.kd_weight

    def forward(self, logits: torch.Tensor | ProjectedLogits, batch: dict) -> dict[str, torch.Tensor]:
        """The loss of `logits` [B, T, V], or of `ProjectedLogits` computed without materializing them."""
        if isinstance(logits, ProjectedLogits):
            return self._fused(logits.hidden, logits.head_weight, batch)
        sel = self._rows(batch)
        rows = sel["rows"]
        flat = logits.flatten(0, 1)
        chunks = self._chunks(rows.numel())
        parts = []
        for sl in chunks:
            args = (flat[rows[sl]], *_row_args(sel, sl))
            if self.cfg.chunk_size and torch.is_grad_enabled() and len(chunks) > 1:
                parts.append(checkpoint(self._chunk_terms, *args, use_reentrant=False))
            else:
                parts.append(self._chunk_terms(*args))
        if parts:
            ce, kd, agree = (torch.cat(x) for x in zip(*parts))
        else:
            ce = kd = agree = logits.new_zeros(0, dtype=_compute_dtype(logits.dtype))
        zero = logits.sum() * 0.0                                   # keeps the graph when all masks are empty
        return self._summary(ce, kd, agree, sel, zero)

    def _fused(self, hidden, head_weight, batch: dict) -> dict[str, torch.Tensor]:
        sel = self._rows(batch)
        h = hidden.flatten(0, 1)[sel["rows"]]
        a_ce, a_kd = self.row_weights(sel, _compute_dtype(hidden.dtype))
        need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
        loss, ce, kd, agree = _FusedHeadLoss.apply(h, head_weight, self, sel, a_ce, a_kd, need_grad)
        # The function's outputs depend on both inputs even with no row, so no zero term is needed.
        out = self._summary(ce, kd, agree, sel, 0.0)
        out["loss"] = loss
        return out

    def row_weights(self, sel: dict, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """d loss / d ce_row and d loss / d kd_row: the total loss is linear in the per-row terms."""
        n_tokens, n_kd, n_fmt = (c.clamp_min(1).to(dtype) for c in sel["counts"])
        fmt = sel["fmt_sel"].to(dtype)
        a_ce = self.cfg.ce_weight / n_tokens + self.cfg.format_weight * fmt / n_fmt
        a_kd = self.kd_weight * self.cfg.tau**2 * sel["kd_sel"].to(dtype) / n_kd
        return a_ce, a_kd


class _FusedHeadLoss(torch.autograd.Function):
    """Per-row CE, KL and top-1 agreement of `h @ W.T` without a full [N, V] logits tensor.

    Outputs `(loss, ce, kd, agree)`: `loss = sum(a_ce * ce + a_kd * kd)` is the training loss,
    and its gradients for `h` and `W` are computed *in the forward pass*, chunk by chunk (each
    chunk's logits live only while it is processed), and kept for backward: the logits are
    projected once, not twice as under recomputation. `ce` / `kd` stay differentiable too: a
    gradient arriving through them (anything but `loss`) recomputes each chunk's logits in
    backward. `agree` has no gradient.
    """

    @staticmethod
    def forward(ctx, h, w, loss_fn, sel, a_ce, a_kd, need_grad):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        cdt = _compute_dtype(h.dtype)
        n = h.shape[0]
        ce = torch.empty(n, dtype=cdt, device=h.device)
        kd, agree = torch.empty_like(ce), torch.empty_like(ce)
        gh = torch.zeros_like(h) if need_grad else None
        gw = torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device) \
            if need_grad else None
        wh = w.to(h.dtype)  # no copy unless the head and the hidden states differ in dtype
        for sl in loss_fn._chunks(n):
            z = h[sl] @ wh.T
            with torch.enable_grad():
                z.requires_grad_(need_grad)
                c, k, a = loss_fn._chunk_terms(z, *_row_args(sel, sl))
                if need_grad:
                    (gz,) = torch.autograd.grad((a_ce[sl] * c + a_kd[sl] * k).sum(), z)
            ce[sl], kd[sl], agree[sl] = c.detach(), k.detach(), a
            if need_grad:
                gh[sl] = gz.to(h.dtype) @ wh
                gw.addmm_(gz.T.to(gw.dtype), h[sl].to(gw.dtype))
            del z
        loss = (a_ce * ce + a_kd * kd).sum()
        ctx.loss_fn, ctx.sel, ctx.grads = loss_fn, sel, (gh, gw)
        ctx.save_for_backward(h, w)
        ctx.mark_non_differentiable(agree)
        return loss, ce, kd, agree

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_kd, _g_agree):  # type: ignore[override]
        h, w = ctx.saved_tensors
        gh, gw = ctx.grads
        ctx.grads = None
        if g_loss is None:
            gh = gw = None
        elif not bool(g_loss == 1):
            gh, gw = gh.mul_(g_loss), gw.mul_(g_loss)
        if g_ce is not None or g_kd is not None:
            g_ce = torch.zeros(h.shape[0], dtype=_compute_dtype(h.dtype), device=h.device) if g_ce is None else g_ce
            g_kd = torch.zeros_like(g_ce) if g_kd is None else g_kd
            gh = torch.zeros_like(h) if gh is None else gh
            gw = torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device) \
                if gw is None else gw
            wh = w.to(h.dtype)
            for sl in ctx.loss_fn._chunks(h.shape[0]):
                with torch.enable_grad():
                    z = (h[sl] @ wh.T).requires_grad_(True)
                    c, k, _ = ctx.loss_fn._chunk_terms(z, *_row_args(ctx.sel, sl))
                    (gz,) = torch.autograd.grad((g_ce[sl] * c + g_kd[sl] * k).sum(), z)
                gh[sl] += gz.to(h.dtype) @ wh
                gw.addmm_(gz.T.to(gw.dtype), h[sl].to(gw.dtype))
        return gh, None if gw is None else gw.to(w.dtype), None, None, None, None, None


def _row_args(sel: dict, sl: slice) -> tuple:
    rs = None if sel["rs"] is None else tuple(None if x is None else x[sl] for x in sel["rs"])
    return sel["targets"][sl], sel["ids"][sl], sel["lp"][sl], sel["olp"][sl], sel["kd_sel"][sl], rs


def fused_distillation_loss(hidden: torch.Tensor, head_weight: torch.Tensor, batch: dict,
                            cfg: LossConfig | None = None) -> dict[str, torch.Tensor]:
    """`DistillationLoss(cfg)(hidden @ head_weight.T, batch)` without ever holding [B, T, V] logits.

    `hidden` [B, T, d] are the final (normed) hidden states, `head_weight` [V, d] the LM head.
    Only loss-bearing positions are projected, `cfg.chunk_size` of them at a time, so the largest
    temporaries are O(chunk x V) in forward and backward alike. Same dict, same values and same
    gradients (for `hidden` and `head_weight`) as the unfused loss; the gradient of `loss` is
    computed during the forward pass (see `_FusedHeadLoss`).
    """
    return DistillationLoss(cfg)(ProjectedLogits(hidden, head_weight), batch)
