"""Cross-tokenizer logit KD: teacher rows -> student examples with mapped sparse targets.

For a student whose tokenizer differs from the teacher's (`kdtrain run --mode logit`, picked
automatically by tokenizer hash):

1. the teacher's completion bytes (its token ids through `TokenBytes`, so exactly what it
   sampled) are re-tokenised by the student, whose prompt goes through its own chat template;
2. both tokenisations are cut into spans at shared byte boundaries (`kdcore.align`);
3. at the first student token of every span — where both sides condition on the same text —
   the teacher's top-k candidates are mapped to student ids (`kdcore.vocab_map.VocabMap`),
   colliding candidates summed; tail and unmapped mass make one residual bucket. The loss there
   is the configured divergence (`kdcore.divergences.sparse_kd_per_token`, unchanged);
4. every span also carries the teacher's summed `token_logprobs` over its tokens, for the
   span-likelihood term (the student's summed log-probs over its own tokens of the span);
5. cross-entropy runs on the student's re-tokenised text.

Examples are a `kdtrain.data.Prepared` whose top-k rows are aligned with the *student's*
completion tokens (all -inf off the span starts), plus `span_of` [sum S] (span index within
the row, -1 = none) and `span_logprobs` [sum C] with `span_offsets` [rows+1].

    aligned = align_batch(batch, prompts, ctx)          # used by training, map-report and bench
    prepared = crosstok_examples(data, ctx, max_length, overflow, limit)

Test: `pytest tests/test_kdtrain_crosstok.py tests/test_kdtrain_crosstok_train.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kdcore.crosstok import CrossTok, iter_aligned, mapped_targets, span_teacher_logprobs
from kdcore.teacher_data import TeacherData
from kdtrain.data import KDCollator, Prepared, finish_notes, lengths_to_offsets, overflow_error


# ----------------------------------------------------------------------------------------------
# Training examples


@dataclass
class CrossPrepared(Prepared):
    """`Prepared` plus the span arrays (module docstring)."""

    span_of: np.ndarray | None = None
    span_logprobs: np.ndarray | None = None
    span_offsets: np.ndarray | None = None
    unaligned: int = 0
    stats: dict = field(default_factory=dict)

    def row(self, i: int) -> dict:
        out = super().row(i)
        c, d = self.tok_offsets[i], self.tok_offsets[i + 1]
        out["span_of"] = self.span_of[c:d]
        out["span_logprobs"] = self.span_logprobs[self.span_offsets[i] : self.span_offsets[i + 1]]
        return out


def crosstok_examples(data: TeacherData, ctx: CrossTok, max_length: int, overflow: str, limit: int | None = None) -> CrossPrepared:
    """Rows -> student examples with mapped sparse targets and span log-probs."""
    seqs, starts, t_lens, ids_l, lps_l, span_l, clp_l, c_lens = [], [], [], [], [], [], [], []
    out = CrossPrepared()
    k = data.k
    n_pos = n_kd = n_span_tok = 0
    for b, aligned in iter_aligned(data, ctx, limit):
        for i, row in enumerate(aligned):
            out.rows_in += 1
            a0, a1 = b.offsets[i], b.offsets[i + 1]
            P, S = len(row.prompt_ids), len(row.student_ids)
            if P + S > max_length and overflow == "refuse":
                raise overflow_error("rows are (in student tokens)", 1, P + S, max_length)
            keep = min(S, max(max_length - P, 0))
            if keep <= 0:
                out.dropped += 1
                continue
            if keep < S:
                out.truncated += 1
            out.unaligned += int(not row.round_trip)
            ids, lps = mapped_targets(row, b.topk_ids[a0:a1], b.topk_logprobs[a0:a1], ctx)
            clp = span_teacher_logprobs(row, b.token_logprobs[a0:a1])
            span = row.s_span.copy()
            if keep < S:  # a span cut by the truncation has no complete student side
                span[np.isin(span, span[keep:])] = -1
            seqs += [np.asarray(row.prompt_ids, np.int64), row.student_ids[:keep]]
            starts.append(P)
            t_lens.append(keep)
            ids_l.append(ids[:keep])
            lps_l.append(lps[:keep])
            span_l.append(span[:keep])
            clp_l.append(clp)
            c_lens.append(len(clp))
            n_pos += keep
            n_kd += int(np.isfinite(lps[:keep]).any(-1).sum())
            n_span_tok += int((span[:keep] >= 0).sum())
    if starts:
        out.seq_ids = np.concatenate(seqs).astype(np.int32)
        out.seq_offsets = lengths_to_offsets([s + t for s, t in zip(starts, t_lens)])
        out.completion_start = np.asarray(starts, np.int64)
        out.tok_offsets = lengths_to_offsets(t_lens)
        out.topk_ids = np.concatenate(ids_l).astype(np.int32).reshape(-1, k)
        out.topk_logprobs = np.concatenate(lps_l).astype(np.float32).reshape(-1, k)
        out.span_of = np.concatenate(span_l).astype(np.int32)
        out.span_logprobs = np.concatenate(clp_l).astype(np.float32) if clp_l else np.zeros(0, np.float32)
        out.span_offsets = lengths_to_offsets(c_lens)
    if out.unaligned:
        out.notes.append(
            f"{out.unaligned} row(s) whose student tokens do not spell the teacher's text byte for byte (normaliser or unknown "
            f"tokens) train on cross-entropy only; run `kdtrain map-report` to see the pair's round-trip rate"
        )
    out.stats = {
        "student_positions": n_pos,
        "kd_positions": n_kd,
        "span_positions": n_span_tok,
        "unaligned_rows": out.unaligned,
    }
    return finish_notes(out, max_length)


@dataclass
class CrossKDCollator(KDCollator):
    """`KDCollator` plus the span arrays:
    span_ids [B, L] int64: batch-wide span index of each label position (row * C + span), -1 = none;
    span_logprobs [B, C] float32: the teacher's log-prob of each span (C = most spans in a row).
    """

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = super().__call__(batch)
        ex = self.examples
        rows = np.fromiter((int(e["row"]) for e in batch), np.int64, len(batch))
        n, width = out["input_ids"].shape
        counts = ex.span_offsets[rows + 1] - ex.span_offsets[rows]
        C = max(int(counts.max()), 1)
        span_ids = np.full((n, width), -1, np.int64)
        span_lps = np.zeros((n, C), np.float32)
        for i, r in enumerate(rows):
            s = int(ex.completion_start[r])
            c, d = ex.tok_offsets[r], ex.tok_offsets[r + 1]
            local = ex.span_of[c:d].astype(np.int64)
            span_ids[i, s : s + len(local)] = np.where(local >= 0, local + i * C, -1)
            span_lps[i, : counts[i]] = ex.span_logprobs[ex.span_offsets[r] : ex.span_offsets[r + 1]]
        out["span_ids"] = torch.from_numpy(span_ids)
        out["span_logprobs"] = torch.from_numpy(span_lps)
        return out
