"""kdeval's metrics against independent computations on fixed inputs: the local ROUGE/BLEU
`evaluate` modules against `rouge_score`/`sacrebleu` called directly, the sparse KL with tail
bucket against a dense KL with the full softmax, ECE and the memory meter by hand.
Run: `pytest tests/test_kdeval_metrics.py` (seconds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdeval.fidelity import expected_calibration_error, sparse_kl, token_measures
from kdeval.quality import load_metric, load_references, quality_scores
from kdcore.errors import KdError

PREDICTIONS = [
    "The cat sat on the mat.",
    "Paris is the capital of France",
    "seven times eight is fifty-six",
    "",
]
REFERENCES = [
    "A cat was sitting on the mat.",
    "The capital of France is Paris.",
    "7 x 8 = 56, fifty-six",
    "nothing here",
]


def test_rouge_module_matches_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    per = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES)]
    got = load_metric("rouge").compute(predictions=PREDICTIONS, references=REFERENCES)
    for t in ("rouge1", "rouge2", "rougeL"):
        assert got[t] == pytest.approx(np.mean([s[t].fmeasure for s in per]), abs=1e-12)
    # one pair by hand: "the cat sat on the mat" vs "a cat was sitting on the mat"
    # unigram overlap {cat, on, the, mat} = 4: P = 4/6, R = 4/7 -> F1 = 2PR/(P+R) = 8/13
    one = load_metric("rouge").compute(predictions=PREDICTIONS[:1], references=REFERENCES[:1])
    assert one["rouge1"] == pytest.approx(8 / 13)


def test_bleu_module_matches_sacrebleu():
    import sacrebleu

    want = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    got = load_metric("bleu").compute(predictions=PREDICTIONS, references=[[r] for r in REFERENCES])
    assert got["score"] == pytest.approx(want, abs=1e-9)
    assert quality_scores(PREDICTIONS, REFERENCES, ["bleu"])["bleu"] == pytest.approx(want, abs=1e-9)
    same = "the very same five words"  # BLEU needs 4-grams: shorter identical texts score 0
    assert quality_scores([same], [same], ["rouge", "bleu"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "bleu": 100.0}
    )


def _dense_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_sparse_kl_equals_dense_kl_when_k_is_the_vocab():
    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(5, 12, generator=g) * 3, torch.randn(5, 12, generator=g) * 3
    t_lp, ids = torch.log_softmax(t_logits, -1).topk(12, dim=-1)
    s_lp = torch.log_softmax(s_logits, -1).gather(-1, ids)
    assert torch.allclose(sparse_kl(t_lp, s_lp), _dense_kl(t_logits, s_logits), atol=1e-5)


def test_sparse_kl_is_the_dense_kl_of_the_coarse_grained_distributions():
    """k < V: KL between {top-k ids, one bucket for the rest} computed densely from full softmaxes."""
    g = torch.Generator().manual_seed(1)
    V, k = 50, 4
    t_logits, s_logits = torch.randn(7, V, generator=g) * 2, torch.randn(7, V, generator=g) * 2
    t_full, s_full = torch.log_softmax(t_logits.double(), -1), torch.log_softmax(s_logits.double(), -1)
    t_lp, ids = t_full.topk(k, dim=-1)
    rest = torch.ones_like(t_full, dtype=torch.bool).scatter(-1, ids, False)
    p = torch.cat([t_lp.exp(), (t_full.exp() * rest).sum(-1, keepdim=True)], -1)
    q = torch.cat([s_full.gather(-1, ids).exp(), (s_full.exp() * rest).sum(-1, keepdim=True)], -1)
    want = (p * (p.log() - q.log())).sum(-1)
    got = sparse_kl(t_lp.float(), s_full.gather(-1, ids).float())
    assert torch.allclose(got, want, atol=1e-5)
    assert (got <= _dense_kl(t_logits, s_logits) + 1e-6).all()  # a lower bound of the full KL


def test_sparse_kl_zero_tail_and_identity():
    # teacher puts all its mass on its top-2: the tail term is 0 * log(0 / q) = 0, not NaN
    t = torch.log(torch.tensor([[0.75, 0.25]]))
    s = torch.log(torch.tensor([[0.5, 0.25]]))
    want = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(1.0)
    assert sparse_kl(t, s).item() == pytest.approx(want)
    same = torch.log(torch.tensor([[0.5, 0.2, 0.1]]))
    assert sparse_kl(same, same).item() == pytest.approx(0.0, abs=1e-12)


def test_ece_by_hand():
    conf = np.array([0.95, 0.95, 0.55, 0.55, 0.55, 0.05])
    correct = np.array([1, 0, 1, 1, 0, 0], dtype=bool)
    # bins (15 wide): 0.95 -> bin 14 (acc 0.5, conf 0.95), 0.55 -> bin 8 (acc 2/3, conf 0.55), 0.05 -> bin 0
    want = (2 / 6) * abs(0.5 - 0.95) + (3 / 6) * abs(2 / 3 - 0.55) + (1 / 6) * abs(0.0 - 0.05)
    assert expected_calibration_error(conf, correct) == pytest.approx(want)
    assert expected_calibration_error(np.ones(4), np.ones(4, dtype=bool)) == pytest.approx(0.0)


def test_token_measures_by_hand():
    logp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.0, 0.0]]), -1)
    m = token_measures(logp, torch.tensor([0, 2]), torch.tensor([[0, 1], [1, 0]]), torch.log(torch.tensor([[0.6, 0.3], [0.9, 0.05]])))
    assert m["top1"].tolist() == [True, True]
    assert m["correct"].tolist() == [True, False]
    assert m["confidence"] == pytest.approx(logp.exp().max(-1).values.double().numpy())
    assert m["nll"] == pytest.approx([-logp[0, 0].item(), -logp[1, 2].item()], rel=1e-6)


def test_token_measures_at_the_qwen_shape_drop_teacher_ids_beyond_the_student_rows():
    """A Qwen-style padded teacher vocabulary (152,064 embedding rows) against a student with
    151,936 rows: top-k ids past the student's rows join the tail bucket (kdtrain's rule) instead
    of raising IndexError; the KL equals the one with those entries left out of the top-k."""
    student_rows, teacher_rows = 151_936, 152_064
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, student_rows, generator=g) * 3, -1)
    ids = torch.tensor([[5, teacher_rows - 1, 7], [student_rows, 9, student_rows - 1], [11, 12, 13]])
    lps = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.4, 0.3, 0.1], [0.3, 0.2, 0.1]]))
    m = token_measures(logp, torch.tensor([5, 9, 11]), ids, lps)
    assert np.isfinite(m["kl"]).all()
    for row, keep in enumerate([[0, 2], [1, 2], [0, 1, 2]]):
        alone = sparse_kl(lps[row : row + 1, keep], logp[row : row + 1].gather(1, ids[row : row + 1, keep]))
        assert m["kl"][row] == pytest.approx(alone.item(), rel=1e-9)
    assert m["top1"].tolist() == [(logp[r].argmax() == ids[r, 0]).item() for r in range(3)]


def test_memory_meter_sees_an_allocation():
    from kdeval.generate import MemoryMeter

    with MemoryMeter() as m:
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
        del block
    assert m.peak >= 60 * 1024 * 1024


def test_load_references(tmp_path):
    (tmp_path / "r.txt").write_text("one\ntwo\n\n")
    assert load_references(str(tmp_path / "r.txt")) == ["one", "two"]
    (tmp_path / "r.jsonl").write_text('{"output": "a"}\n{"output": "b"}\n')
    assert load_references(str(tmp_path / "r.jsonl")) == ["a", "b"]
    with pytest.raises(KdError, match="no a column named"):
        (tmp_path / "x.jsonl").write_text('{"zzz": "a"}\n')
        load_references(str(tmp_path / "x.jsonl"))
    with pytest.raises(KdError, match="holds no references"):
        (tmp_path / "e.txt").write_text("\n")
        load_references(str(tmp_path / "e.txt"))


def test_verdict_is_computed_from_the_numbers():
    from kdeval.verdict import verdict

    def model(name, role, kl, top1, rouge):
        return {"name": name, "role": role, "eval_key": "e", "metrics": {"kl": kl, "top1": top1, "rougeL": rouge}}

    teacher = model("teacher", "teacher", 0.0, 1.0, 1.0)
    a, b = model("logit-kd", "student", 1.5, 0.6, 0.30), model("text-kd", "student", 2.5, 0.5, 0.35)
    text = verdict([teacher, a, b])
    assert "**logit-kd** is closest to the teacher by KL to the teacher (1.500 vs text-kd 2.500)" in text
    assert "also leads on top-1 agreement (0.600 vs 0.500)" in text and "text-kd leads on ROUGE-L (0.350 vs 0.300)" in text
    a["metrics"], b["metrics"] = b["metrics"], a["metrics"]  # swap the numbers: the sentence swaps
    assert "**text-kd** is closest" in verdict([teacher, a, b])
    assert verdict([teacher, a]) is None
