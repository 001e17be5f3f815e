"""Sparse top-k divergences over k+1 buckets: the one implementation training and evaluation share.

The teacher dataset holds, per completion token, the teacher's k most likely ids and their
log-probs (normalised over the full vocabulary). The student side is its log-softmax gathered at
those ids. Both sides become distributions over K categories:

* ``tail="bucket"`` (default), K = k+1: the k top-k entries plus one **tail bucket** holding the
  rest of the mass, ``log(1 - sum(exp(topk)))``, on each side — on the teacher's side the dataset's
  stored ``tail_logprobs`` when given (format v2, docs/FORMAT.md: exact where the teacher is
  confident, which 1 - sum of its rounded top-k is not; the k+1 buckets are then renormalised). Mass-preserving: the divergence is
  the exact divergence between the two distributions coarse-grained onto {top-k ids, everything
  else} — a lower bound of the full-vocabulary one (data processing inequality). DistillKit's
  ``missing=SYMMETRIC_UNIFORM`` is the same loss at temperature 1.
* ``tail="teacher_renorm"``, K = k: the **field's common top-k KD** — Axolotl's KD plugin default
  and DistillKit's ``missing=ZERO``. The teacher is renormalised over its top-k; the student side is
  its full-vocabulary log-softmax gathered at those ids and *not* renormalised, so the mass the
  student puts outside the top-k still counts: for fkl the loss is ``sum_i t_i (log t_i - log s_i)``,
  which equals renorm's value minus ``log S`` (S = the student's mass on the top-k; it pulls S to 1,
  past the teacher's own top-k mass). The other divergences apply their formula as written to the
  unnormalised student entries (as Axolotl's JSD/RKL over top-k do). With temperature the student is
  tempered over the full vocabulary, ``log_softmax(z / tau)`` at the ids (the caller supplies it:
  `sparse_kd_per_token`'s ``student_tempered``; `kdtrain.losses` does).
* ``tail="renorm"``, K = k: both sides renormalised over the top-k ids (log-softmax over the k
  entries): Axolotl's opt-in ``kd_normalize_topk``. Biased in a worse way than teacher_renorm: it is
  exactly invariant to how much mass the student puts outside the top-k, so that mass gets no
  gradient at all (a student with 99% of its mass elsewhere can score 0). Kept as a baseline.

Temperature ``tau`` is applied the same way to both sides (teacher_renorm's student: above), on the K bucket log-probs:
``log_softmax(logp / tau)``. For the top-k entries this is ordinary tempering of those entries
relative to each other; **the tail bucket is tempered as if it were one token** (its mass m becomes
m^(1/tau) before renormalising), whereas tempering the full vocabulary would raise every tail token
separately (sum p_j^(1/tau) >= m^(1/tau) for tau > 1). So at tau > 1 the tail gets less weight than
full-vocabulary tempering would give it; at tau = 1 nothing changes. The divergence is multiplied
by tau^2 (Hinton et al. 2015) so gradient magnitudes stay comparable across temperatures.

Divergences (t = teacher, s = student, both [N, K] log-probs, each row a distribution — except the
student's under teacher_renorm, which sums to <= 1):

==========  =================================================================================
fkl         KL(t || s)                         forward KL, mode-covering (standard KD)
rkl         KL(s || t)                         reverse KL, mode-seeking (MiniLLM)
skl         KL(t || a*t + (1-a)*s)             skew forward KL, alpha = a (DistiLLM, 0.1)
srkl        KL(s || (1-a)*t + a*s)             skew reverse KL (DistiLLM)
jsd         b*KL(t||m) + (1-b)*KL(s||m),       generalised JSD, m = b*t + (1-b)*s (GKD, b = beta)
tvd         0.5 * sum |t - s|                  total variation distance
symkl       KL(t || s) + KL(s || t)            symmetric (Jeffreys) KL
==========  =================================================================================

Entries that are invalid for a token (teacher ids beyond the student's embedding rows) carry a
teacher log-prob of -inf; they are dropped from both sides and their mass joins the tails.
Log-probs are floored at ``LOG_FLOOR`` so that 0 * log 0 terms stay 0, and each tail mass is
floored at ``TAIL_FLOOR`` (keeps the reverse KL finite when the top-k holds all the mass).

On a student's own samples (on-policy rows, issue 15) one more loss needs no top-k at all:
``sampled_rkl``, the per-token sampled estimator of the reverse KL, `sampled_rkl_per_token`.

On random-sampled teacher targets (`kdgen --sampled-targets N`, RS-KD, Anshumann et al. 2025)
`sampled_fkl_per_token` is the forward KL estimated from the draws: unbiased, with the
full-vocabulary forward-KL gradient in expectation (kdcore/sampled_targets.py).

Cross-tokenizer KD adds `span_likelihood`: the teacher's and the student's log-prob of the same
text span (the alignment unit of `kdcore.align`) as two-bucket distributions, compared with the same
divergence; `fused_kd_losses` computes it inside the same LM-head pass.

Test: ``pytest tests/test_kdtrain_losses.py`` (every divergence against a dense reference),
``tests/test_kdtrain_crosstok.py`` (residual bucket and span term against dense references).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd", "symkl")
SAMPLED_RKL = "sampled_rkl"  # per-token estimator on the sampled token (student rows only)
TAILS = ("bucket", "teacher_renorm", "renorm")
LOG_FLOOR = -1.0e4  # exp(LOG_FLOOR) == 0 in float32: zero-probability entries contribute exactly 0
TAIL_FLOOR = 1.0e-10
LOGITS_BUDGET = 1 << 25  # float32 elements per [tile, V] logits tile, training and evaluation alike (128 MB)


@dataclass(frozen=True)
class SparseKD:
    """How the soft loss is computed (validated by `kdtrain.config`)."""

    loss: str = "fkl"
    tail: str = "bucket"
    temperature: float = 1.0
    alpha: float = 0.1  # skew KL mixing weight (skl, srkl)
    beta: float = 0.5  # JSD interpolation weight


# ----------------------------------------------------------------------------------------------
# Divergences between two distributions over the same K categories


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row. logp, logq: [N, K] -> [N]."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _mix(logp: Tensor, logq: Tensor, w: float) -> Tensor:
    """log(w*p + (1-w)*q), stably. logp, logq: [N, K]; 0 <= w < 1."""
    if w == 0.0:
        return logq
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def divergence(t: Tensor, s: Tensor, loss: str, alpha: float = 0.1, beta: float = 0.5) -> Tensor:
    """Per-row divergence between teacher and student.

    t: [N, K] teacher log-probs; s: [N, K] student log-probs (rows are distributions, entries
    >= LOG_FLOOR; under tail="teacher_renorm" the student's rows sum to <= 1). Returns [N].
    """
    if loss == "fkl":
        return _kl(t, s)
    if loss == "rkl":
        return _kl(s, t)
    if loss == "skl":
        return _kl(t, _mix(t, s, alpha))
    if loss == "srkl":
        return _kl(s, _mix(s, t, alpha))
    if loss == "jsd":
        m = _mix(t, s, beta)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    if loss == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    if loss == "symkl":
        return _kl(t, s) + _kl(s, t)
    raise ValueError(f"unknown divergence {loss!r}; choose one of {', '.join(DIVERGENCES)}")


# ----------------------------------------------------------------------------------------------
# Buckets


def _log1mexp(x: Tensor) -> Tensor:
    """log(max(1 - exp(x), TAIL_FLOOR)) for x = log of a mass (<= ~0). [..] -> [..]."""
    return torch.log(torch.clamp(-torch.expm1(torch.clamp(x, max=0.0)), min=TAIL_FLOOR))


def bucket_logprobs(top: Tensor, tail: str, temperature: float, tail_logprob: Tensor | None = None) -> Tensor:
    """One side's top-k log-probs -> tempered bucket log-probs.

    top: [N, k] log-probs normalised over the full vocabulary (-inf where an entry is dropped).
    tail_logprob: [N] log of the mass outside `top` when it is known exactly (a teacher dataset's
    `tail_logprobs`, dropped entries' mass included); None derives it as log(1 - sum(exp(top))),
    which loses a confident teacher's tail when `top` is rounded (issue 12).
    returns: [N, k+1] for tail="bucket" (last column is the tail), [N, k] for tail="renorm" and
    "teacher_renorm" (the teacher side of both); each row a distribution, entries floored at LOG_FLOOR.
    """
    if tail == "bucket":
        if tail_logprob is None:
            rest = _log1mexp(torch.logsumexp(top, -1, keepdim=True))
        else:
            rest = torch.clamp(tail_logprob.to(top.dtype)[:, None], min=math.log(TAIL_FLOOR), max=0.0)
        top = torch.cat([top, rest], dim=-1)
    elif tail not in TAILS:
        raise ValueError(f"unknown tail mode {tail!r}; choose one of {', '.join(TAILS)}")
    if temperature != 1.0 or tail != "bucket" or tail_logprob is not None:
        # a stored tail beside rounded top-k values sums to 1 only within their rounding: normalise,
        # so the divergence sees a distribution (the error goes to the big entries, not the tail)
        top = F.log_softmax(top / temperature, dim=-1)
    return top.clamp(min=LOG_FLOOR)


def sparse_kd_per_token(
    student_topk: Tensor,
    teacher_topk: Tensor,
    spec: SparseKD,
    teacher_tail: Tensor | None = None,
    student_tempered: Tensor | None = None,
) -> Tensor:
    """Per-token soft loss from gathered log-probs.

    student_topk: [N, k] student log-softmax (temperature 1) at the teacher's top-k ids.
    teacher_topk: [N, k] teacher log-probs (temperature 1), -inf for dropped entries.
    teacher_tail: [N] the teacher's stored tail log-prob (see `bucket_logprobs`), or None.
    student_tempered: [N, k] the student's full-vocabulary ``log_softmax(z / temperature)`` at the
        ids; only tail="teacher_renorm" at temperature != 1 reads it (and then needs it), because
        that side is not a function of the temperature-1 top-k alone.
    returns: [N], already multiplied by temperature^2.
    """
    dropped = torch.isneginf(teacher_topk)
    dtype = torch.promote_types(teacher_topk.dtype, torch.float32)  # float64 stays float64 (evaluation)
    t = bucket_logprobs(teacher_topk.to(dtype), spec.tail, spec.temperature, teacher_tail)
    if spec.tail == "teacher_renorm":
        if spec.temperature != 1.0:
            if student_tempered is None:
                raise ValueError("tail='teacher_renorm' at temperature != 1 needs student_tempered")
            student_topk = student_tempered
        s = student_topk.to(dtype).masked_fill(dropped, float("-inf")).clamp(min=LOG_FLOOR)
    else:
        s = bucket_logprobs(student_topk.masked_fill(dropped, float("-inf")).to(dtype), spec.tail, spec.temperature)
    return divergence(t, s, spec.loss, spec.alpha, spec.beta) * spec.temperature**2


def span_likelihood(student_token_logprobs: Tensor, span_ids: Tensor, span_logprobs: Tensor, spec: SparseKD) -> Tensor:
    """Per-span loss between the teacher's and the student's likelihood of the same text span.

    Cross-tokenizer KD (ALM, Minixhofer et al. 2025): a span is text both tokenizations
    cut at the same bytes; the teacher's log-prob of it is the sum of its token log-probs, the
    student's the sum over its own tokens. Each side becomes a two-bucket distribution
    {the span, anything else} — `bucket_logprobs` with k = 1 — and the configured divergence
    compares them (tempered like the token buckets, scaled by T^2).

    student_token_logprobs: [n] student log-prob of each position's label (differentiable).
    span_ids: [n] span index per position, -1 = none. span_logprobs: [C] teacher span log-probs.
    returns: [U] one loss per span present in span_ids.
    """
    keep = span_ids >= 0
    if not keep.any():
        return student_token_logprobs.new_zeros(0)
    spans, inverse = torch.unique(span_ids[keep], return_inverse=True)
    s = student_token_logprobs.new_zeros(len(spans)).index_add(0, inverse, student_token_logprobs[keep])
    t = span_logprobs[spans].to(s.dtype)
    return sparse_kd_per_token(s[:, None], t[:, None], replace(spec, tail="bucket"))


def sampled_fkl_per_token(student_logprobs: Tensor, teacher_logprobs: Tensor, weights: Tensor) -> Tensor:
    """Forward KL estimated from random-sampled teacher targets (RS-KD, Anshumann et al. 2025).

    With c_i of N draws from the teacher t on id i, t_hat_i = c_i / N is unbiased for t_i, so
    sum_i t_hat_i (log t_i - log q_i) is an unbiased estimate of KL(t || q) over the full
    vocabulary. Its gradient in the student's logits z is (sum_i t_hat_i) q_j - t_hat_j = q_j - t_hat_j,
    whose expectation q_j - t_j is the full-vocabulary forward-KL gradient — where a top-k loss
    leaves the tail unsupervised. Temperature 1 only (the draws are from the temperature-1 teacher).

    student_logprobs: [N, U] the student's full-vocabulary log-softmax at the sampled ids.
    teacher_logprobs: [N, U] the teacher's log-probs at those ids (any finite value where weight = 0).
    weights: [N, U] t_hat = counts / N; 0 on padding (a position with fewer distinct ids).
    returns: [N].
    """
    dtype = torch.promote_types(teacher_logprobs.dtype, torch.float32)
    w = weights.to(dtype)
    return (w * (teacher_logprobs.to(dtype) - student_logprobs.to(dtype))).sum(-1)


def sampled_rkl_per_token(student_token_logprobs: Tensor, teacher_token_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """The sampled-token estimator of the reverse KL, for rows the student sampled itself.

    With x_t drawn from the student, d_t = log p_s(x_t) - log p_t(x_t) is an unbiased one-sample
    estimate of KL(p_s || p_t) at position t (MiniLLM, Gu et al. 2024; "on-policy distillation",
    Thinking Machines 2025; Lightning OPD precomputes log p_t(x_t) offline). Its gradient is the
    score-function one, E_x[d(x) * grad log p_s(x)] (the E_x[grad log p_s(x)] term is zero), so the
    differentiable surrogate is stop_grad(d_t) * log p_s(x_t): per token, no future-token credit
    (discount 0). Temperature does not apply.

    student_token_logprobs: [N] log p_s of each sampled token (differentiable).
    teacher_token_logprobs: [N] the teacher's log-prob of the same tokens (`token_logprobs` of a
                            `kdgen score` dataset: stored even outside the top-k).
    returns: (estimate [N] without gradient, surrogate [N] whose gradient is the estimator's).
    """
    d = (student_token_logprobs - teacher_token_logprobs.to(student_token_logprobs.dtype)).detach()
    return d, d * student_token_logprobs
