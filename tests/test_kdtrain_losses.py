"""Every sparse divergence against a naive dense reference on a small vocabulary (values and
gradients), with the three top-k modes (tail bucket, teacher-only renormalisation, both-sides
renormalisation), temperature and chunking."""

from __future__ import annotations

import math

import pytest
import torch

from kdcore.divergences import DIVERGENCES, SparseKD
from kdtrain.losses import fused_sparse_kd
from kdtrain_helpers import ALPHA, BETA, dense_divergence, dense_kd_reference

V, H, N = 40, 8, 9


def _setup(k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    teacher_logp = (torch.randn(N, V, generator=g) * 2).log_softmax(-1)
    top = teacher_logp.topk(k, dim=-1)
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, teacher_logp, top.indices, top.values, labels


CASES = [(loss, tail, k, tau) for loss in DIVERGENCES for (tail, k, tau) in [("bucket", V, 1.0), ("bucket", 6, 1.0), ("bucket", 6, 2.0), ("renorm", 6, 1.0), ("renorm", V, 1.5), ("teacher_renorm", 6, 1.0), ("teacher_renorm", 6, 2.0), ("teacher_renorm", V, 1.0)]]


@pytest.mark.parametrize("loss,tail,k,tau", CASES)
def test_sparse_matches_dense_reference(loss, tail, k, tau):
    hidden, weight, teacher_logp, ids, vals, labels = _setup(k)
    spec = SparseKD(loss=loss, tail=tail, temperature=tau, alpha=ALPHA, beta=BETA)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, kd, ce = fused_sparse_kd(h1, w1, labels, ids, vals, spec, ce_weight=0.3, kd_weight=1.0, tile=4)
    total.backward()
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_total, ref_kd = dense_kd_reference(h2 @ w2.t(), teacher_logp, ids, labels, loss, tail, tau, 0.3)
    ref_total.backward()
    assert kd.item() == pytest.approx(ref_kd.item(), rel=1e-4, abs=1e-5)
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad.float(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad.float(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("loss", DIVERGENCES)
def test_k_equals_vocab_is_the_dense_divergence(loss):
    """k = V: the bucketed loss is the plain full-vocabulary divergence (the tail holds nothing)."""
    hidden, weight, teacher_logp, ids, vals, labels = _setup(V, seed=1)
    _, kd, _ = fused_sparse_kd(hidden, weight, labels, ids, vals, SparseKD(loss=loss, alpha=ALPHA, beta=BETA))
    dense = dense_divergence(teacher_logp.double().exp(), (hidden @ weight.t()).double().softmax(-1), loss).sum()
    assert kd.item() == pytest.approx(dense.item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("loss", DIVERGENCES)
def test_student_equal_to_teacher_gives_zero(loss):
    hidden, weight, _, _, _, labels = _setup(8, seed=2)
    student_logp = (hidden @ weight.t()).log_softmax(-1)
    top = student_logp.topk(8, dim=-1)
    _, kd, _ = fused_sparse_kd(hidden, weight, labels, top.indices, top.values, SparseKD(loss=loss, temperature=2.0))
    assert abs(kd.item()) < 1e-5


def test_bucket_and_renorm_differ_and_bucket_is_a_lower_bound():
    """Coarse-graining can only lose divergence (data processing inequality); renorm is a different quantity."""
    hidden, weight, teacher_logp, ids, vals, labels = _setup(4, seed=3)
    _, kd_bucket, _ = fused_sparse_kd(hidden, weight, labels, ids, vals, SparseKD(tail="bucket"))
    _, kd_renorm, _ = fused_sparse_kd(hidden, weight, labels, ids, vals, SparseKD(tail="renorm"))
    full = dense_divergence(teacher_logp.double().exp(), (hidden @ weight.t()).double().softmax(-1), "fkl").sum()
    assert kd_bucket.item() <= full.item() + 1e-5
    assert not math.isclose(kd_bucket.item(), kd_renorm.item(), rel_tol=1e-3)


def test_dropped_entries_join_the_tail():
    """A -inf teacher entry (id beyond the student's rows) counts as tail mass on both sides."""
    hidden, weight, teacher_logp, ids, vals, labels = _setup(5, seed=4)
    dropped = vals.clone()
    dropped[:, -1] = float("-inf")
    _, kd, _ = fused_sparse_kd(hidden, weight, labels, ids, dropped, SparseKD())
    _, ref, _ = fused_sparse_kd(hidden, weight, labels, ids[:, :4], vals[:, :4], SparseKD())
    assert kd.item() == pytest.approx(ref.item(), rel=1e-5)


def test_chunking_does_not_change_the_result():
    hidden, weight, _, ids, vals, labels = _setup(6, seed=5)
    outs = []
    for chunk in (1, 4, 1000):
        h = hidden.clone().requires_grad_()
        total, _, _ = fused_sparse_kd(h, weight, labels, ids, vals, SparseKD(loss="jsd"), ce_weight=0.5, tile=chunk)
        total.backward()
        outs.append((total.detach(), h.grad))
    for t, g in outs[1:]:
        torch.testing.assert_close(t, outs[0][0])
        torch.testing.assert_close(g, outs[0][1])


def test_the_three_top_k_modes_on_a_student_with_its_mass_elsewhere():
    """Same ratios on the top-k as the teacher, but 99% of the student's mass outside it: renorm
    sees nothing (0), teacher_renorm is renorm - log S (Axolotl's default = DistillKit ZERO), bucket
    the coarse-grained KL."""
    from kdcore.divergences import sparse_kd_per_token

    t = torch.log(torch.tensor([[0.6, 0.3]], dtype=torch.float64))
    s = t + math.log(0.01)
    val = {tail: sparse_kd_per_token(s, t, SparseKD(tail=tail)).item() for tail in ("renorm", "teacher_renorm", "bucket")}
    assert val["renorm"] == pytest.approx(0.0, abs=1e-12)
    assert val["teacher_renorm"] == pytest.approx(-math.log(0.009), rel=1e-9)  # sum_i t_i (log t_i - log s_i), t renormalised
    p, q = [0.6, 0.3, 0.1], [0.006, 0.003, 0.991]
    assert val["bucket"] == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-9)
