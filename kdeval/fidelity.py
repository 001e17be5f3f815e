"""Fidelity of a student to its teacher on a held-out teacher dataset (same tokenizer).

For every completion token of every row, the student is teacher-forced on prompt + completion and
compared with the teacher's stored top-k log-probs:

* **sparse KL(teacher || student) with the tail bucket** — both distributions coarse-grained onto
  the teacher's k top ids plus one bucket holding everything else (teacher tail mass
  ``1 - sum(exp(topk))``, student tail = its mass outside those k ids). This is the exact KL between
  the coarse-grained distributions, a lower bound of the full-vocabulary KL (data processing
  inequality), equal to it when k = vocab. Renormalising over the top-k instead would be biased.
* **top-1 agreement** — student argmax equals the teacher's most likely token.
* **ECE** — expected calibration error of the student's top-1 prediction against the token the
  teacher actually emitted (Guo et al. 2017, 15 equal-width confidence bins).
* **perplexity** — exp of the student's mean NLL of the teacher's completion tokens.
* **NLL per byte** — the same NLL summed and divided by the completion's bytes (given the bytes of
  every token id): unlike perplexity it does not depend on the tokenizer, so it compares these
  students with those of other tokenizers (scored chunk-wise by `kdeval.crosstok`).

Token-level means (micro averages over all completion tokens). The teacher's own perplexity on its
completions, from the stored token log-probs, comes along as a floor. Run
`pytest tests/test_kdeval_metrics.py tests/test_kdeval_e2e.py` (sparse KL against a dense reference,
ECE by hand, every measure of a run against a dense recomputation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kdcore.divergences import LOGITS_BUDGET, SparseKD, sparse_kd_per_token

ECE_BINS = 15
FKL = SparseKD(loss="fkl", tail="bucket", temperature=1.0)  # what kdeval reports as "kl" (token and span level)


def sparse_kl(teacher_topk: torch.Tensor, student_topk: torch.Tensor, teacher_tail: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k ids plus one tail bucket, per token: the
    training loss's forward KL (`kdcore.divergences`, tails floored, so a student whose top-k holds
    all of its mass in floating point gives a finite KL), in float64.

    teacher_topk: [N, k] teacher log-probs (normalised over the full vocabulary; -inf = dropped)
    student_topk: [N, k] student log-probs at the same ids (normalised over the full vocabulary)
    teacher_tail: [N] the dataset's tail log-prob (dropped entries' mass included), or None: derived
    returns:      [N] float64 nats
    """
    tail = teacher_tail.double() if teacher_tail is not None else None
    return sparse_kd_per_token(student_topk.double(), teacher_topk.double(), FKL, tail)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b| over equal-width bins of (0, 1].

    confidence: [N] in [0, 1]; correct: [N] bool. Bin b holds (b/B, (b+1)/B] (0 joins the first bin).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.size == 0:
        return float("nan")
    idx = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    conf_sum = np.bincount(idx, weights=confidence, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=bins)
    return float(np.abs(acc_sum - conf_sum).sum() / confidence.size)


@dataclass
class TokenStats:
    """Per-token measurements, concatenated over rows (all [N])."""

    kl: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)
    confidence: list[np.ndarray] = field(default_factory=list)
    correct: list[np.ndarray] = field(default_factory=list)
    nll: list[np.ndarray] = field(default_factory=list)
    teacher_nll: list[np.ndarray] = field(default_factory=list)
    bytes: list[np.ndarray] = field(default_factory=list)  # [N] bytes of each completion token (when known)

    def add(self, **arrays: np.ndarray) -> None:
        for name, a in arrays.items():
            getattr(self, name).append(np.asarray(a))

    def summary(self) -> dict:
        cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.__dict__.items()}
        n = int(cat["kl"].size)
        if n == 0:
            return {"tokens": 0}
        out = {
            "tokens": n,
            "kl": float(cat["kl"].mean()),
            "top1": float(cat["top1"].mean()),
            "ece": expected_calibration_error(cat["confidence"], cat["correct"]),
            "ppl": float(np.exp(cat["nll"].mean())),
            "teacher_ppl": float(np.exp(cat["teacher_nll"].mean())),
        }
        if cat["bytes"].size == n and cat["bytes"].sum() > 0:
            out["nll_per_byte"] = float(cat["nll"].sum() / cat["bytes"].sum())
            out["teacher_nll_per_byte"] = float(cat["teacher_nll"].sum() / cat["bytes"].sum())
        return out


def token_measures(
    student_logp: torch.Tensor, completion_ids: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_logprobs: torch.Tensor | None = None
) -> dict:
    """Per-token fidelity measures from the student's full log-softmax at completion positions.

    student_logp:   [N, V] float32 log-softmax (position t predicts completion token t)
    completion_ids: [N] the teacher's tokens; topk_ids: [N, k]; topk_logprobs: [N, k]; tail_logprobs: [N] or None
    returns dict of [N] numpy arrays: kl, top1, confidence, correct, nll
    """
    # teacher ids beyond the student's rows (a padded teacher vocabulary) are dropped into the tail
    # bucket, the rule training follows (`kdtrain.data.logit_examples`)
    beyond = topk_ids >= student_logp.shape[-1]
    s_topk = student_logp.gather(-1, topk_ids.masked_fill(beyond, 0))
    t_topk = topk_logprobs.masked_fill(beyond, float("-inf"))
    if tail_logprobs is not None and beyond.any():
        tail_logprobs = torch.logaddexp(tail_logprobs.double(), torch.logsumexp(topk_logprobs.double().masked_fill(~beyond, float("-inf")), -1))
    best_lp, best = student_logp.max(-1)
    return {
        "kl": sparse_kl(t_topk, s_topk, tail_logprobs).numpy(),
        "top1": (best == topk_ids[:, 0]).numpy(),
        "confidence": best_lp.double().exp().numpy(),
        "correct": (best == completion_ids).numpy(),
        "nll": (-student_logp.gather(-1, completion_ids[:, None])[:, 0]).double().numpy(),
    }


def _row_chunks(lengths: list[int], vocab: int, batch_rows: int) -> list[list[int]]:
    """Group rows so each forward holds at most `batch_rows` rows and ~LOGITS_BUDGET logits."""
    groups, cur, cur_len = [], [], 0
    for i, n in enumerate(lengths):
        longest = max(cur_len, n)
        if cur and (len(cur) >= batch_rows or (len(cur) + 1) * longest * vocab > LOGITS_BUDGET):
            groups.append(cur)
            cur, longest = [], n
        cur.append(i)
        cur_len = longest
    if cur:
        groups.append(cur)
    return groups


@torch.no_grad()
def score_model(model, dataset, batch_rows: int = 8, limit: int | None = None, token_bytes: np.ndarray | None = None) -> dict:
    """Teacher-force `model` on every row of `dataset` (a `kdcore.dataset.TeacherDataset`).

    Rows are right-padded (positions start at 0 in every row, so causal attention needs no shift).
    token_bytes: [V] bytes each token id stands for (0 for special tokens), for NLL per byte.
    Returns `TokenStats.summary()`: tokens, kl, top1, ece, ppl, teacher_ppl (+ nll_per_byte,
    teacher_nll_per_byte with token_bytes).
    """
    stats = TokenStats()
    device = next(model.parameters()).device
    vocab_rows = model.get_output_embeddings().weight.shape[0]
    seen = 0
    for batch in dataset.iter_batches(batch_rows=max(batch_rows, 64), text=False):
        rows = list(range(batch.num_rows))
        if limit is not None:
            rows = rows[: max(0, limit - seen)]
        seen += len(rows)
        full = [np.concatenate([batch.prompt_ids[i], batch.completion_ids[batch.offsets[i] : batch.offsets[i + 1]]]) for i in rows]
        for group in _row_chunks([len(f) for f in full], vocab_rows, batch_rows):
            width = max(len(full[j]) for j in group)
            ids = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for r, j in enumerate(group):
                ids[r, : len(full[j])] = torch.from_numpy(full[j])
                mask[r, : len(full[j])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            for r, j in enumerate(group):
                i = rows[j]
                a, b = batch.offsets[i], batch.offsets[i + 1]
                if b == a:
                    continue
                p = len(batch.prompt_ids[i])
                logp = torch.log_softmax(logits[r, p - 1 : p - 1 + (b - a)], dim=-1)  # position t predicts token t+1
                m = token_measures(
                    logp,
                    torch.from_numpy(batch.completion_ids[a:b]),
                    torch.from_numpy(batch.topk_ids[a:b]),
                    torch.from_numpy(batch.topk_logprobs[a:b]),
                    torch.from_numpy(batch.tail_logprobs[a:b]),
                )
                ids = batch.completion_ids[a:b]
                if token_bytes is not None:  # ids past the tokenizer (padded embedding rows) spell nothing
                    m["bytes"] = np.where(ids < len(token_bytes), token_bytes[np.minimum(ids, len(token_bytes) - 1)], 0)
                stats.add(**m, teacher_nll=-batch.token_logprobs[a:b].astype(np.float64))
        if limit is not None and seen >= limit:
            break
    return stats.summary()
