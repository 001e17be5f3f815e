"""Two tokenizers over the same text: teacher rows re-tokenised by the student and aligned.

For a student whose tokenizer differs from the teacher's:

1. the teacher's completion bytes (its token ids through `TokenBytes`, so exactly what it
   sampled) are re-tokenised by the student, whose prompt goes through its own chat template;
2. both tokenisations are cut into *spans* at shared byte boundaries (`kdcore.align`);
3. at the first student token of every span the teacher's top-k candidates are mapped to student ids
   (`kdcore.vocab_map.VocabMap`), colliding candidates summed (`mapped_targets`);
4. every span carries the teacher's summed `token_logprobs` over its tokens (`span_teacher_logprobs`).

kdtrain turns aligned rows into training examples (`kdtrain.crosstok`); kdeval scores students on
them (`kdeval.crosstok`).

Test: `pytest tests/test_kdtrain_crosstok.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcore.align import span_alignment, first_of_span, merge_candidates, valid_utf8_prefix
from kdcore.errors import KdError
from kdcore.teacher import tokenizer_identity
from kdcore.teacher_data import TeacherData, encode_prompts, encode_texts
from kdcore.vocab_map import TokenBytes, VocabMap


@dataclass
class CrossTok:
    """Both tokenizers and the map between them."""

    teacher_tokenizer: object
    student_tokenizer: object
    teacher: TokenBytes
    student: TokenBytes
    vmap: VocabMap

    @classmethod
    def build(cls, teacher_tokenizer, student_tokenizer, vocab_match: str = "prefix", teacher_rows: int | None = None) -> "CrossTok":
        t, s = TokenBytes.from_tokenizer(teacher_tokenizer), TokenBytes.from_tokenizer(student_tokenizer)
        return cls(teacher_tokenizer, student_tokenizer, t, s, VocabMap.build(t, s, vocab_match, teacher_rows))


def load_teacher_tokenizer(spec: str, manifest: dict):
    """The teacher's tokenizer from its model spec, checked against the dataset's tokenizer hash."""
    from kdcore.models import load_tokenizer, resolve
    tok = load_tokenizer(resolve(spec).path)
    want = manifest["tokenizer"]["tokenizer_hash"]
    got = tokenizer_identity(tok, manifest["tokenizer"].get("embedding_rows") or len(tok))["tokenizer_hash"]
    if got != want:
        raise KdError(
            f"the tokenizer of teacher {spec!r} (hash {got[:12]}) is not the one the dataset was written with "
            f"({manifest['tokenizer'].get('class')}, hash {want[:12]}); pass --teacher with the dataset's teacher"
        )
    return tok


# ----------------------------------------------------------------------------------------------
# One row at a time (vectorised inside the row)


@dataclass
class AlignedRow:
    """One teacher row re-tokenised by the student and aligned with it.

    text: the completion text the student sees (the teacher's bytes, valid UTF-8 prefix).
    student_ids [S]: its student tokenisation (+ the student's EOS where the teacher stopped).
    t_span [T] / s_span [S]: span of each teacher / student completion token (-1 = none).
    t_first / s_first [C]: first teacher / student position of each span.
    round_trip: the student's tokens spell exactly the text's bytes (otherwise no spans).
    """

    text: str
    prompt_ids: list[int]
    student_ids: np.ndarray
    t_span: np.ndarray
    s_span: np.ndarray
    t_first: np.ndarray
    s_first: np.ndarray
    round_trip: bool
    cut_bytes: int  # teacher bytes left out (invalid UTF-8 at the end)

    @property
    def n_spans(self) -> int:
        return len(self.t_first)


def align_rows(batch, prompts: list[tuple], ctx: CrossTok) -> list[AlignedRow]:
    """Align every row of a `kdcore.codec.Batch`; prompts[i] = (messages, prompt) of row i."""
    tt, st = ctx.teacher, ctx.student_tokenizer
    rows = batch.num_rows
    t_bytes, texts, cuts = [], [], []
    for i in range(rows):
        ids = batch.completion_ids[batch.offsets[i] : batch.offsets[i + 1]]
        ids = np.where(ids < tt.size, ids, 0)  # ids past the tokenizer (padded rows) spell nothing
        b = tt.gather(ids).tobytes()
        cut = valid_utf8_prefix(b)
        t_bytes.append(b[:cut])
        texts.append(b[:cut].decode("utf-8"))
        cuts.append(len(b) - cut)
    enc = encode_texts(st, texts)
    prompt_ids_all = encode_prompts(st, prompts)
    eos = getattr(st, "eos_token_id", None)
    out = []
    for i in range(rows):
        t_ids = batch.completion_ids[batch.offsets[i] : batch.offsets[i + 1]]
        t_lens = ctx.teacher.lengths[np.where(t_ids < tt.size, t_ids, 0)]
        s_ids = np.asarray(enc[i], np.int64)
        stopped = batch.finish_reasons[i] == "stop" if batch.finish_reasons else False
        if stopped and eos is not None and cuts[i] == 0:
            s_ids = np.append(s_ids, eos)
        s_lens = ctx.student.spell(s_ids, t_bytes[i])
        prompt_ids = prompt_ids_all[i]
        if s_lens is None:
            none_t, none_s = np.full(len(t_ids), -1), np.full(len(s_ids), -1)
            out.append(AlignedRow(texts[i], prompt_ids, s_ids, none_t, none_s, np.zeros(0, np.int64), np.zeros(0, np.int64), False, cuts[i]))
            continue
        if cuts[i]:  # teacher tokens past the valid text stay out of every span
            keep = np.cumsum(t_lens) <= len(t_bytes[i])
            keep &= np.cumsum(~keep) == 0
            t_span_k, s_span, n = span_alignment(t_lens[keep], s_lens)
            t_span = np.full(len(t_ids), -1, np.int64)
            t_span[: keep.sum()] = t_span_k
        else:
            t_span, s_span, n = span_alignment(t_lens, s_lens)
        out.append(
            AlignedRow(texts[i], prompt_ids, s_ids, t_span, s_span, first_of_span(t_span, n), first_of_span(s_span, n), True, cuts[i])
        )
    return out


def iter_aligned(data: TeacherData, ctx: CrossTok, limit: int | None = None, batch_rows: int = 256):
    """(batch, aligned rows) over every dataset, first `limit` rows only when given."""
    seen = 0
    for ds in data.datasets:
        table = ds.read_table(columns=["messages", "prompt"]).to_pylist()
        r = 0
        for b in ds.iter_batches(batch_rows=batch_rows, text=True):
            prompts = [(row["messages"], row["prompt"]) for row in table[r : r + b.num_rows]]
            r += b.num_rows
            aligned = align_rows(b, prompts, ctx)
            if limit is not None and seen + len(aligned) > limit:
                aligned = aligned[: limit - seen]
            yield b, aligned
            seen += len(aligned)
            if limit is not None and seen >= limit:
                return


def mapped_targets(row: AlignedRow, topk_ids: np.ndarray, topk_logprobs: np.ndarray, ctx: CrossTok) -> tuple[np.ndarray, np.ndarray]:
    """Sparse targets on the student's positions: [S, k] student ids and teacher log-probs, the
    teacher's mapped top-k at the first student token of each span, -inf everywhere else."""
    S, k = len(row.student_ids), topk_ids.shape[1]
    ids = np.zeros((S, k), np.int64)
    lps = np.full((S, k), -np.inf, np.float32)
    if row.n_spans:
        t_rows = topk_ids[row.t_first]
        sid = np.where(t_rows < len(ctx.vmap.student_id), ctx.vmap.student_id[np.minimum(t_rows, len(ctx.vmap.student_id) - 1)], -1)
        m_ids, m_lps = merge_candidates(sid, topk_logprobs[row.t_first])
        ids[row.s_first], lps[row.s_first] = m_ids, m_lps
    return ids, lps


def span_teacher_logprobs(row: AlignedRow, token_logprobs: np.ndarray) -> np.ndarray:
    """[C] the teacher's log-prob of each span: its token_logprobs summed over the span."""
    keep = row.t_span >= 0
    return np.bincount(row.t_span[keep], weights=token_logprobs[keep].astype(np.float64), minlength=row.n_spans).astype(np.float32)
