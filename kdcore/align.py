"""Byte-offset alignment of two tokenisations of the same text, and the teacher candidates
mapped onto student ids.

The teacher's completion is a sequence of teacher tokens; the student re-tokenises the same text.
With every token's bytes (`kdcore.vocab_map.TokenBytes`), each side's tokens end at known byte
offsets. A **span** ends where both sides end a token at the same byte, so span c covers the
same bytes on both sides: teacher tokens t_first[c].. and student tokens s_first[c]... At the
first token of a span both models condition on the same text prefix, which is where their
next-token distributions can be compared (Minixhofer et al. 2025, "Universal cross-tokenizer
distillation via approximate likelihood matching", call these positions aligned). Special
tokens stand for no bytes; the final EOS pair forms a span of its own.

    t_span, s_span, n = span_alignment(teacher_lengths, student_lengths)
    ids, lps = merge_candidates(vmap.student_id[topk_ids], topk_logprobs)

Test: `pytest tests/test_kdtrain_crosstok.py`.
"""

from __future__ import annotations

import numpy as np


def valid_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that is valid UTF-8 (a sampled completion may end,
    or rarely break, inside a multi-byte character)."""
    try:
        data.decode("utf-8")
        return len(data)
    except UnicodeDecodeError as e:
        return e.start


def span_alignment(t_lens: np.ndarray, s_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Spans of two tokenisations of the same bytes.

    t_lens: [T] bytes per teacher token; s_lens: [S] bytes per student token (0 for special
    tokens); both sum to the same byte count.
    returns (t_span [T], s_span [S], n_spans): the span of each token, numbered in text order;
    -1 for tokens in a span that only one side has tokens in (e.g. a teacher EOS the student
    lacks), and spans so emptied are removed from the numbering.
    """
    t_lens = np.asarray(t_lens, np.int64)
    s_lens = np.asarray(s_lens, np.int64)
    t_end, s_end = np.cumsum(t_lens), np.cumsum(s_lens)
    bounds = np.union1d([0], np.intersect1d(t_end, s_end))  # sorted shared token ends, from 0
    # a token belongs to the span its first byte falls in (zero-length tokens: the span they start)
    t_span = np.searchsorted(bounds, t_end - t_lens, side="right") - 1
    s_span = np.searchsorted(bounds, s_end - s_lens, side="right") - 1
    n = len(bounds)
    both = (np.bincount(t_span, minlength=n) > 0) & (np.bincount(s_span, minlength=n) > 0)
    renum = np.where(both, np.cumsum(both) - 1, -1)
    return renum[t_span], renum[s_span], int(both.sum())


def first_of_span(span: np.ndarray, n_spans: int) -> np.ndarray:
    """[n_spans] the position of the first token of each span (span: [n], -1 = none)."""
    first = np.full(n_spans, -1, np.int64)
    pos = np.nonzero(span >= 0)[0]
    c = span[pos]
    is_first = np.ones(len(c), bool)
    is_first[1:] = c[1:] != c[:-1]
    first[c[is_first]] = pos[is_first]
    return first


def merge_candidates(student_ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Teacher top-k candidates moved onto student ids, colliding candidates summed.

    student_ids: [N, k] the student id of each teacher candidate, -1 where unmapped.
    logprobs:    [N, k] the candidates' teacher log-probs (full-vocabulary normalised).
    returns (ids [N, k] int64, lps [N, k] float32): each distinct student id once, in the slot of
    its first candidate, with the log of the summed mass; -inf (id 0) in unmapped and merged-away
    slots, whose mass — like the tail — is left to the residual bucket. Nothing is renormalised.
    """
    sid = np.asarray(student_ids, np.int64)
    lp = np.asarray(logprobs, np.float64)
    valid = (sid >= 0) & np.isfinite(lp)
    same = (sid[:, :, None] == sid[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # [N, k, k]
    k = sid.shape[1]
    earlier = np.tril(np.ones((k, k), bool), -1)
    leader = valid & ~(same & earlier[None]).any(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(valid, lp, -np.inf).max(-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        mass = (np.exp(np.where(valid, lp, -np.inf) - m)[:, None, :] * same).sum(-1)
        merged = np.log(mass) + m
    out_lp = np.where(leader, merged, -np.inf).astype(np.float32)
    out_id = np.where(leader, sid, 0)
    return out_id, out_lp
