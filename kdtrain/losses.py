"""Sparse top-k KD fused with the LM head: the training loss of `kdtrain run --mode logit`.

The divergences themselves (buckets, tail, temperature, the seven divergences) live in
`kdcore.divergences`, shared with `kdeval`. This module adds the training-only part:

`fused_sparse_kd` never materialises a [batch, time, vocab] tensor: it projects the hidden
states through the LM head ``tile`` tokens at a time, and computes the gradients of the hidden
states and of the head weight inside the forward pass (one [tile, V] block of logits alive at a time, no
recomputation in the backward; the same trick as Liger's fused linear cross-entropy).
`fused_kd_losses` also computes the cross-tokenizer span term (`kdcore.divergences.span_likelihood`)
inside the same LM-head pass, and, given the teacher's log-prob of each label (`label_logprobs`),
the sampled-token reverse-KL estimator on student rows (`kdcore.divergences.sampled_rkl_per_token`)
in place of the top-k divergence; given `target_weights`, the forward KL on random-sampled teacher
targets (`kdcore.divergences.sampled_fkl_per_token`: the same [N, U] gather as the top-k's).

Test: ``pytest tests/test_kdtrain_losses.py`` (every divergence against a dense reference),
``tests/test_kdtrain_crosstok.py`` (residual bucket and span term against dense references).
"""

from __future__ import annotations

import bisect

import torch
from torch import Tensor

from kdcore.divergences import LOGITS_BUDGET, SparseKD, sampled_fkl_per_token, sampled_rkl_per_token, sparse_kd_per_token, span_likelihood


# ----------------------------------------------------------------------------------------------
# Fused with the LM head


def _tiles(n: int, tile: int, span_ids: Tensor | None):
    """[a, b) tiles of about `tile` positions; with span_ids, never cutting through a span."""
    if span_ids is None:
        yield from ((a, min(a + tile, n)) for a in range(0, n, tile))
        return
    ids = span_ids.detach().cpu()
    cut_ok = torch.ones(n + 1, dtype=torch.bool)  # cut_ok[p]: a tile may end before position p
    cut_ok[1:n] = (ids[1:] < 0) | (ids[1:] != ids[:-1])
    cuts = torch.nonzero(cut_ok).flatten().tolist()
    a = 0
    while a < n:
        want = min(a + tile, n)
        i = bisect.bisect_right(cuts, want) - 1
        b = cuts[i] if cuts[i] > a else cuts[bisect.bisect_right(cuts, a)]
        yield a, b
        a = b


def auto_tile(vocab: int, tile: int = 0) -> int:
    """Tokens per [tile, vocab] logits tile: `tile` if > 0, else about LOGITS_BUDGET elements."""
    return tile if tile > 0 else max(16, LOGITS_BUDGET // max(vocab, 1))


class _FusedSparseKD(torch.autograd.Function):
    """See `fused_sparse_kd`. Gradients are computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, topk_ids, topk_logprobs, spec, ce_weight, kd_weight, tile, softcap, span_ids, span_logprobs, span_weight, teacher_tail, label_logprobs, target_weights):
        n_tok = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        span_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        use_sampled = label_logprobs is not None and kd_weight != 0.0
        use_kd = kd_weight != 0.0 and topk_ids.shape[-1] > 0 and not use_sampled
        use_span = span_ids is not None and span_weight != 0.0
        # teacher_renorm tempers the student over the full vocabulary: one more log-sum-exp, log_softmax(z/T)
        tempered = use_kd and spec.tail == "teacher_renorm" and spec.temperature != 1.0 and target_weights is None
        tau = spec.temperature
        w = weight
        for a, b in _tiles(n_tok, tile, span_ids if use_span else None):
            h = hidden[a:b]
            z = (h @ w.to(h.dtype).t()).float()  # [n, V]
            if softcap is not None:
                raw = z
                z = torch.tanh(raw / softcap) * softcap
            lse = torch.logsumexp(z, -1)  # [n]
            lse_tau = torch.logsumexp(z / tau, -1) if tempered else None  # [n]
            lab = labels[a:b]
            z_lab = z.gather(1, lab[:, None]).squeeze(1)  # [n]
            # small graph over [n, k] quantities: its gradients give the whole [n, V] gradient
            with torch.enable_grad():
                lse_l = lse.detach().requires_grad_(True)
                zl_l = z_lab.detach().requires_grad_(True)
                ce_tok = lse_l - zl_l
                total = ce_weight * ce_tok.sum()
                if use_kd:
                    ids = topk_ids[a:b]
                    zk_l = z.gather(1, ids).detach().requires_grad_(True)
                    tail = teacher_tail[a:b] if teacher_tail is not None else None
                    lse_tau_l = lse_tau.detach().requires_grad_(True) if tempered else None
                    s_tau = zk_l / tau - lse_tau_l[:, None] if tempered else None
                    if target_weights is not None:  # random-sampled targets: ids, teacher log-probs, counts / N
                        kd_tok = sampled_fkl_per_token(zk_l - lse_l[:, None], topk_logprobs[a:b], target_weights[a:b])
                    else:
                        kd_tok = sparse_kd_per_token(zk_l - lse_l[:, None], topk_logprobs[a:b], spec, teacher_tail=tail, student_tempered=s_tau)
                    total = total + kd_weight * kd_tok.sum()
                    kd_sum += kd_tok.detach().sum()
                if use_sampled:
                    est, surrogate = sampled_rkl_per_token(zl_l - lse_l, label_logprobs[a:b])
                    total = total + kd_weight * surrogate.sum()
                    kd_sum += est.sum()
                if use_span:
                    span_tok = span_likelihood(-ce_tok, span_ids[a:b], span_logprobs, spec)
                    total = total + span_weight * span_tok.sum()
                    span_sum += span_tok.detach().sum()
                inputs = (lse_l, zl_l) + ((zk_l,) if use_kd else ()) + ((lse_tau_l,) if tempered else ())
                g_lse, g_lab, *g_rest = torch.autograd.grad(total, inputs)
            ce_sum += ce_tok.detach().sum()
            if not (need_h or need_w):
                continue
            # dL/dz = g_lse * softmax(z) + scatter(g at the gathered ids); built in place in z.
            # The gradient GEMMs run in float32 even under autocast (bf16 rounding biases them).
            with torch.autocast(hidden.device.type, enabled=False):
                # teacher_renorm at T != 1: d lse(z/T) / dz = softmax(z/T) / T (before z is overwritten)
                g_tau = (z / tau).sub_(lse_tau[:, None]).exp_().mul_(g_rest[1][:, None] / tau) if tempered else None
                g = z.sub_(lse[:, None]).exp_().mul_(g_lse[:, None])
                if tempered:
                    g.add_(g_tau)
                g.scatter_add_(1, lab[:, None], g_lab[:, None])
                if use_kd:
                    g.scatter_add_(1, ids, g_rest[0])
                if softcap is not None:
                    g.mul_(1.0 - torch.tanh(raw / softcap).square_())
                if need_h:
                    grad_h[a:b] = g @ w.float()
                if need_w:
                    grad_w.addmm_(g.t(), h.float())
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(kd_sum, ce_sum, span_sum)
        total = ce_weight * ce_sum + kd_weight * kd_sum + (span_weight * span_sum if use_span else 0.0)
        return total, kd_sum, ce_sum, span_sum

    @staticmethod
    def backward(ctx, grad_total, _g_kd, _g_ce, _g_span):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_total).to(h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_total).to(w_dtype) if grad_w is not None else None
        return (gh, gw) + (None,) * 14  # one per non-tensor-gradient input of forward


def fused_sparse_kd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    spec: SparseKD,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    tile: int = 0,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hard + soft loss summed over tokens, straight from hidden states.

    hidden:        [N, H] final hidden states of the N scored positions (already shifted: row i
                   predicts labels[i]); only completion positions, no padding.
    weight:        [V, H] LM head weight (V >= every id below).
    labels:        [N] the teacher's sampled token at each position (hard target).
    topk_ids:      [N, k] teacher top-k ids (k may be 0 for a CE-only loss).
    topk_logprobs: [N, k] teacher log-probs at temperature 1, -inf for dropped entries.
    returns: (ce_weight * ce_sum + kd_weight * kd_sum, kd_sum, ce_sum) — scalar sums over tokens;
             only the first carries gradient. Divide by the token count outside.
    """
    return fused_kd_losses(hidden, weight, labels, topk_ids, topk_logprobs, spec, ce_weight, kd_weight, tile, softcap)[:3]


def fused_kd_losses(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    spec: SparseKD,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    tile: int = 0,
    softcap: float | None = None,
    span_ids: Tensor | None = None,
    span_logprobs: Tensor | None = None,
    span_weight: float = 0.0,
    teacher_tail: Tensor | None = None,
    label_logprobs: Tensor | None = None,
    target_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`fused_sparse_kd` plus the span-likelihood term of cross-tokenizer KD (`span_likelihood`).

    span_ids:      [N] span index of each position, -1 = in no span; a span's positions
                   are contiguous (LM-head tiles are cut between spans, so each span's summed
                   log-prob is complete inside one tile).
    span_logprobs: [C] the teacher's log-prob of each span.
    teacher_tail:  [N] the teacher's stored tail log-prob (format v2 `tail_logprobs`, mass of dropped
                   top-k entries folded in); None derives it from topk_logprobs.
    label_logprobs: [N] the teacher's log-prob of each label (student rows): the KD term becomes the
                   sampled-token reverse-KL estimator (`sampled_rkl_per_token`; kd_sum sums its
                   estimates, the gradient is its surrogate's) and the top-k arrays are not used.
    target_weights: [N, U] random-sampled targets (`kdgen --sampled-targets`): topk_ids / topk_logprobs
                   then hold each position's sampled ids and teacher log-probs, these their counts / N
                   (0 on padding); the KD term is `sampled_fkl_per_token` (spec's loss, tail and
                   temperature do not apply: forward KL at temperature 1).
    returns: (total, kd_sum, ce_sum, span_sum); total = ce_weight*ce + kd_weight*kd + span_weight*span.
    """
    tile = auto_tile(weight.shape[0], tile)
    return _FusedSparseKD.apply(
        hidden, weight, labels, topk_ids, topk_logprobs, spec, float(ce_weight), float(kd_weight), tile, softcap,
        span_ids, span_logprobs, float(span_weight), teacher_tail, label_logprobs, target_weights,
    )
