"""Dense full-vocabulary KD fused with both LM heads: the logit loss of `kdtrain run --online`.

Online, the teacher runs on each batch, so its whole next-token distribution is at hand instead of
a stored top-k. `fused_dense_kd` takes the final hidden states of both models at the scored
positions and projects them through their LM heads ``tile`` positions at a time, so no
[batch, time, vocab] tensor of either model is ever whole. Per tile, both sides become tempered
full-vocabulary log-probs, ``log_softmax(z / T)`` floored at ``LOG_FLOOR``, and
`kdcore.divergences.divergence` — the one implementation of fkl/rkl/skl/srkl/jsd/tvd/symkl,
shared with the sparse loss — compares them (times T^2, Hinton et al. 2015). The hard loss is
the student's cross-entropy on the labels at temperature 1.

Gradients use the trick of `kdtrain.losses.fused_sparse_kd` (Liger's fused linear cross-entropy):
inside the forward, a small autograd graph over one [tile, V] tile of student logits gives
dL/dz, and the gradients of the student's hidden states and head weight are accumulated there;
the backward only scales them. The teacher side carries no gradient.

With k = the whole vocabulary the sparse tail-bucket loss equals this one (the tail is empty):
tests/test_kdtrain_online.py checks that, and every divergence against a float64 dense reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdcore.divergences import LOG_FLOOR, LOGITS_BUDGET, SparseKD, divergence

# tiles hold a few [tile, V] float32 buffers of each side (logits, log-probs, their graph):
# a quarter of the sparse loss's budget keeps the peak of a tile about the same
DENSE_BUDGET = LOGITS_BUDGET // 4


def dense_tile(vocab: int, tile: int = 0) -> int:
    """Positions per tile: `tile` if > 0, else about DENSE_BUDGET logits per side."""
    return tile if tile > 0 else max(8, DENSE_BUDGET // max(vocab, 1))


def _logits(h: Tensor, w: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """[n, H] @ [V, H]^T in float32, soft-capped; also the raw logits when capped (for the gradient)."""
    z = (h @ w.to(h.dtype).t()).float()
    if softcap is None:
        return z, None
    return torch.tanh(z / softcap) * softcap, z


def dense_kd_per_token(student_logits: Tensor, teacher_logits: Tensor, spec: SparseKD) -> Tensor:
    """Per-position divergence over the full vocabulary.

    student_logits, teacher_logits: [n, V] (float32 or float64). returns: [n], times T^2.
    Only spec.loss, temperature, alpha and beta apply (there is no tail: nothing is left out).
    """
    T = spec.temperature
    s = torch.log_softmax(student_logits / T, -1).clamp(min=LOG_FLOOR)
    t = torch.log_softmax(teacher_logits.to(s.dtype) / T, -1).clamp(min=LOG_FLOOR)
    return divergence(t, s, spec.loss, spec.alpha, spec.beta) * T**2


class _FusedDenseKD(torch.autograd.Function):
    """See `fused_dense_kd`. Gradients are computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, labels, spec, ce_weight, kd_weight, tile, softcap, t_softcap):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        use_kd = kd_weight != 0.0
        for a in range(0, hidden.shape[0], tile):
            b = min(a + tile, hidden.shape[0])
            h = hidden[a:b]
            z, raw = _logits(h, weight, softcap)  # [n, V]
            lab = labels[a:b]
            with torch.enable_grad():
                z_l = z.detach().requires_grad_(True)
                ce_tok = torch.logsumexp(z_l, -1) - z_l.gather(1, lab[:, None]).squeeze(1)
                total = ce_weight * ce_tok.sum()
                if use_kd:
                    with torch.no_grad():
                        zt, _ = _logits(t_hidden[a:b], t_weight, t_softcap)
                    kd_tok = dense_kd_per_token(z_l, zt, spec)
                    total = total + kd_weight * kd_tok.sum()
                    kd_sum += kd_tok.detach().sum()
                (g,) = torch.autograd.grad(total, (z_l,)) if (need_h or need_w) else (None,)
            ce_sum += ce_tok.detach().sum()
            if g is None:
                continue
            # the gradient GEMMs run in float32 even under autocast (bf16 rounding biases them)
            with torch.autocast(hidden.device.type, enabled=False):
                if raw is not None:
                    g = g * (1.0 - torch.tanh(raw / softcap).square())
                if need_h:
                    grad_h[a:b] = g @ weight.float()
                if need_w:
                    grad_w.addmm_(g.t(), h.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return ce_weight * ce_sum + kd_weight * kd_sum, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_total, _g_kd, _g_ce):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_total).to(h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_total).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None


def fused_dense_kd(
    hidden: Tensor,
    weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    spec: SparseKD,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    tile: int = 0,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hard + dense soft loss summed over positions, straight from both models' hidden states.

    hidden:         [N, H] student final hidden states at the N scored positions (row i predicts labels[i]).
    weight:         [V, H] student LM head.
    teacher_hidden: [N, H_t] teacher final hidden states at the same positions (no gradient).
    teacher_weight: [V, H_t] teacher LM head (same V: the same tokenizer and embedding rows).
    labels:         [N] next tokens (hard target).
    returns: (ce_weight * ce_sum + kd_weight * kd_sum, kd_sum, ce_sum); only the first carries
             gradient (to hidden and weight). Divide by the token count outside.
    """
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher head has {teacher_weight.shape[0]} rows, student head {weight.shape[0]}: dense KD needs the same vocabulary")
    return _FusedDenseKD.apply(
        hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), labels, spec, float(ce_weight), float(kd_weight),
        dense_tile(weight.shape[0], tile), softcap, teacher_softcap,
    )
