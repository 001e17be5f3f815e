"""Fidelity of a student whose tokenizer differs from the teacher's: span-level measures.

Token-level KL, top-1 and perplexity need the student to predict the teacher's tokens; a student
with another tokenizer predicts its own. The cross-tokenizer design (`kdtrain.crosstok`, issue 4)
gives the comparable units: the teacher's completion bytes are re-tokenised by the student, and
both tokenisations are cut into **spans** where both end a token at the same byte
(`kdcore.align`), so span c is the same text on both sides. (results.json keeps its keys from before the
rename: `chunks`, `chunk_nll`, `chunk_kl`, ... count and score these spans.) Per held-out row, teacher-forcing
the student on its own prompt encoding + its tokens of the teacher's completion:

* **span NLL** (`chunk_nll`, nats per span) — -log p_student(span), the student's log-probs
  summed over its own tokens of the span; `teacher_chunk_nll` is the same from the teacher's
  stored `token_logprobs` summed over its tokens of the span (the floor to compare with). Each
  side scores one tokenisation path of the text, as in training.
* **span KL** (`chunk_kl`) — KL(teacher ‖ student) between the two-bucket distributions
  {this span, anything else} (`kdcore.divergences.span_likelihood`, forward KL): 0 when the student
  gives every span the teacher's probability.
* **sparse KL at span starts** (`chunk_start_kl`) — at the first token of each span both models
  condition on the same text, so their next-token distributions compare: the teacher's top-k
  mapped onto student ids by bytes (`kdcore.vocab_map.VocabMap`, `prefix` matching as kdtrain's
  default), colliding candidates summed, tail + unmapped mass in one residual bucket; KL over those
  buckets (`kdcore.divergences.sparse_kd_per_token`, the same loss cross-tokenizer training uses).
* **top-1 at span starts** (`chunk_top1`) — student argmax = the student id the teacher's most
  likely token maps to; only at span starts where that token maps at all (`chunk_top1_positions`
  says how many), since an unmapped teacher top-1 has no student counterpart.
* **NLL per byte** (`nll_per_byte`, `teacher_nll_per_byte`) — total NLL over the completion bytes:
  independent of the tokenizer, so it compares students with any tokenizers (kdeval.fidelity
  reports it for same-tokenizer students too).

Means are micro averages over all spans (span NLL, span KL, KL at span starts) of the rows
whose student tokens spell the teacher's text byte for byte; other rows (`unaligned_rows`) are
left out. ECE has no span-level counterpart here. `bench/crosstok_quality.py` reports these for
its students. Test: `pytest tests/test_kdeval_crosstok.py` (a naive per-span recomputation and a
Gemma-tokenizer student end to end).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from kdcore.crosstok import AlignedRow, CrossTok, span_teacher_logprobs, iter_aligned, mapped_targets
from kdcore.teacher_data import TeacherData
from kdcore.divergences import sparse_kd_per_token, span_likelihood
from kdeval.fidelity import FKL

VOCAB_MATCH = "prefix"  # kdtrain's default: eval matches what cross-tokenizer training optimises


@dataclass
class SpanSums:
    """Running sums over rows; `summary()` turns them into the reported means."""

    rows: int = 0
    unaligned_rows: int = 0
    spans: int = 0
    bytes: int = 0
    student_nll: float = 0.0
    teacher_nll: float = 0.0
    span_kl: float = 0.0
    span_start_kl: float = 0.0
    top1_hits: int = 0
    top1_positions: int = 0

    def add(self, other: "SpanSums") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def summary(self) -> dict:
        c, n = self.spans, max(self.bytes, 1)
        out = {"rows": self.rows, "unaligned_rows": self.unaligned_rows, "chunks": c, "bytes": self.bytes}
        if c == 0:
            return out
        return {
            **out,
            "chunk_nll": self.student_nll / c,
            "teacher_chunk_nll": self.teacher_nll / c,
            "chunk_kl": self.span_kl / c,
            "chunk_start_kl": self.span_start_kl / c,
            "chunk_top1": self.top1_hits / self.top1_positions if self.top1_positions else None,
            "chunk_top1_positions": self.top1_positions,
            "nll_per_byte": self.student_nll / n,
            "teacher_nll_per_byte": self.teacher_nll / n,
        }


def row_sums(
    student_logp: torch.Tensor, row: AlignedRow, token_logprobs: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray, ctx: CrossTok
) -> SpanSums:
    """Span measures of one aligned row, summed over its spans.

    student_logp:   [S, V] student log-softmax; position s predicts the student's completion token s
    token_logprobs: [T] the teacher's log-prob of its completion tokens
    topk_ids, topk_logprobs: [T, k] the teacher's top-k at each of its completion positions
    """
    out = SpanSums(rows=1, bytes=len(row.text.encode("utf-8")))
    if not row.n_spans:
        out.unaligned_rows = int(not row.round_trip)
        return out
    s_ids = torch.from_numpy(row.student_ids)
    tok_lp = student_logp.gather(1, s_ids[:, None]).squeeze(1)
    spans = torch.from_numpy(row.s_span)
    keep = spans >= 0
    s_span = torch.zeros(row.n_spans, dtype=torch.float64).index_add(0, spans[keep], tok_lp[keep].double())
    t_span = torch.from_numpy(span_teacher_logprobs(row, token_logprobs)).double()
    out.spans = row.n_spans
    out.student_nll = -s_span.sum().item()
    out.teacher_nll = -t_span.sum().item()
    out.span_kl = span_likelihood(tok_lp, spans, t_span.float(), FKL).sum().item()
    m_ids, m_lps = mapped_targets(row, topk_ids, topk_logprobs, ctx)
    beyond = m_ids >= student_logp.shape[1]  # ids past the student's embedding rows: residual bucket
    m_ids, m_lps = np.where(beyond, 0, m_ids), np.where(beyond, -np.inf, m_lps).astype(np.float32)
    first = torch.from_numpy(row.s_first)
    at_first = student_logp[first]  # [C, V]
    out.span_start_kl = sparse_kd_per_token(at_first.gather(1, torch.from_numpy(m_ids[row.s_first])), torch.from_numpy(m_lps[row.s_first]), FKL).sum().item()
    t_top = topk_ids[row.t_first, 0]
    n_map = len(ctx.vmap.student_id)
    want = np.where(t_top < n_map, ctx.vmap.student_id[np.minimum(t_top, n_map - 1)], -1)
    defined = want >= 0
    out.top1_positions = int(defined.sum())
    out.top1_hits = int((at_first.argmax(-1).numpy() == want)[defined].sum())
    return out


@torch.no_grad()
def score_crosstok(model, data: TeacherData, ctx: CrossTok, limit: int | None = None) -> dict:
    """Teacher-force `model` (the student of `ctx`) on every aligned row of `data` (first `limit`
    rows when given); returns `SpanSums.summary()` (module docstring)."""
    device = next(model.parameters()).device
    total = SpanSums()
    for b, rows in iter_aligned(data, ctx, limit):
        for i, row in enumerate(rows):
            a0, a1 = b.offsets[i], b.offsets[i + 1]
            logp = None
            if row.n_spans:
                P = len(row.prompt_ids)
                ids = torch.tensor([list(row.prompt_ids) + row.student_ids.tolist()], device=device)
                logits = model(input_ids=ids).logits[0, P - 1 : -1].float().cpu()  # position t predicts completion token t
                logp = torch.log_softmax(logits, -1)
            total.add(row_sums(logp, row, b.token_logprobs[a0:a1], b.topk_ids[a0:a1], b.topk_logprobs[a0:a1], ctx))
    return total.summary()


def crosstok_context(teacher_tokenizer, student_tokenizer, manifest: dict) -> CrossTok:
    """Both tokenizers' bytes and the teacher -> student id map for one student."""
    return CrossTok.build(teacher_tokenizer, student_tokenizer, VOCAB_MATCH, manifest["tokenizer"].get("embedding_rows"))
