"""Cross-tokenizer logit KD: teacher rows -> student examples with mapped sparse targets.

For a student whose tokenizer differs from the teacher's (`kdtrain run --mode logit`, picked
automatically by tokenizer hash):

1. the teacher's completion bytes (its token ids through `TokenBytes`, so exactly what it
   sampled) are re-tokenised by the student, whose prompt goes through its own chat template;
2. both tokenisations are cut into chunks at shared byte boundaries (`kdtrain.align`);
3. at the first student token of every chunk — where both sides condition on the same text —
   the teacher's top-k candidates are mapped to student ids (`kdtrain.vocab_map.VocabMap`),
   colliding candidates summed; tail and unmapped mass make one residual bucket. The loss there
   is the configured divergence (`kdtrain.losses.sparse_kd_per_token`, unchanged);
4. every chunk also carries the teacher's summed `token_logprobs` over its tokens, for the
   chunk-likelihood term (the student's summed log-probs over its own tokens of the chunk);
5. cross-entropy runs on the student's re-tokenised text.

Examples are a `kdtrain.data.Prepared` whose top-k rows are aligned with the *student's*
completion tokens (all -inf off the chunk starts), plus `chunk_of` [sum S] (chunk index within
the row, -1 = none) and `chunk_logprobs` [sum C] with `chunk_offsets` [rows+1].

    aligned = align_batch(batch, prompts, ctx)          # used by training, map-report and bench
    prepared = crosstok_examples(data, ctx, max_length, overflow, limit)

Test: `pytest tests/test_kdtrain_crosstok.py tests/test_kdtrain_crosstok_train.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kdgen.errors import KdError
from kdgen.teacher import tokenizer_identity
from kdtrain.align import chunk_alignment, first_of_chunk, merge_candidates, valid_utf8_prefix
from kdtrain.data import KDCollator, Prepared, TeacherData, _encode, _finish, _offsets, _overflow, encode_prompts
from kdtrain.vocab_map import TokenBytes, VocabMap


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
    from kdgen.models import resolve
    from kdtrain.student import _load_tokenizer

    tok = _load_tokenizer(resolve(spec).path)
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
    t_chunk [T] / s_chunk [S]: chunk of each teacher / student completion token (-1 = none).
    t_first / s_first [C]: first teacher / student position of each chunk.
    round_trip: the student's tokens spell exactly the text's bytes (otherwise no chunks).
    """

    text: str
    prompt_ids: list[int]
    student_ids: np.ndarray
    t_chunk: np.ndarray
    s_chunk: np.ndarray
    t_first: np.ndarray
    s_first: np.ndarray
    round_trip: bool
    cut_bytes: int  # teacher bytes left out (invalid UTF-8 at the end)

    @property
    def n_chunks(self) -> int:
        return len(self.t_first)


def align_rows(batch, prompts: list[tuple], ctx: CrossTok) -> list[AlignedRow]:
    """Align every row of a `kdgen.format.Batch`; prompts[i] = (messages, prompt) of row i."""
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
    enc = _encode(st, texts)
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
        if cuts[i]:  # teacher tokens past the valid text stay out of every chunk
            keep = np.cumsum(t_lens) <= len(t_bytes[i])
            keep &= np.cumsum(~keep) == 0
            t_chunk_k, s_chunk, n = chunk_alignment(t_lens[keep], s_lens)
            t_chunk = np.full(len(t_ids), -1, np.int64)
            t_chunk[: keep.sum()] = t_chunk_k
        else:
            t_chunk, s_chunk, n = chunk_alignment(t_lens, s_lens)
        out.append(
            AlignedRow(texts[i], prompt_ids, s_ids, t_chunk, s_chunk, first_of_chunk(t_chunk, n), first_of_chunk(s_chunk, n), True, cuts[i])
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
    teacher's mapped top-k at the first student token of each chunk, -inf everywhere else."""
    S, k = len(row.student_ids), topk_ids.shape[1]
    ids = np.zeros((S, k), np.int64)
    lps = np.full((S, k), -np.inf, np.float32)
    if row.n_chunks:
        t_rows = topk_ids[row.t_first]
        sid = np.where(t_rows < len(ctx.vmap.student_id), ctx.vmap.student_id[np.minimum(t_rows, len(ctx.vmap.student_id) - 1)], -1)
        m_ids, m_lps = merge_candidates(sid, topk_logprobs[row.t_first])
        ids[row.s_first], lps[row.s_first] = m_ids, m_lps
    return ids, lps


def chunk_teacher_logprobs(row: AlignedRow, token_logprobs: np.ndarray) -> np.ndarray:
    """[C] the teacher's log-prob of each chunk: its token_logprobs summed over the chunk."""
    keep = row.t_chunk >= 0
    return np.bincount(row.t_chunk[keep], weights=token_logprobs[keep].astype(np.float64), minlength=row.n_chunks).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Training examples


@dataclass
class CrossPrepared(Prepared):
    """`Prepared` plus the chunk arrays (module docstring)."""

    chunk_of: np.ndarray | None = None
    chunk_logprobs: np.ndarray | None = None
    chunk_offsets: np.ndarray | None = None
    unaligned: int = 0
    stats: dict = field(default_factory=dict)

    def row(self, i: int) -> dict:
        out = super().row(i)
        c, d = self.tok_offsets[i], self.tok_offsets[i + 1]
        out["chunk_of"] = self.chunk_of[c:d]
        out["chunk_logprobs"] = self.chunk_logprobs[self.chunk_offsets[i] : self.chunk_offsets[i + 1]]
        return out


def crosstok_examples(data: TeacherData, ctx: CrossTok, max_length: int, overflow: str, limit: int | None = None) -> CrossPrepared:
    """Rows -> student examples with mapped sparse targets and chunk log-probs."""
    seqs, starts, t_lens, ids_l, lps_l, chunk_l, clp_l, c_lens = [], [], [], [], [], [], [], []
    out = CrossPrepared()
    k = data.k
    n_pos = n_kd = n_chunk_tok = 0
    for b, aligned in iter_aligned(data, ctx, limit):
        for i, row in enumerate(aligned):
            out.rows_in += 1
            a0, a1 = b.offsets[i], b.offsets[i + 1]
            P, S = len(row.prompt_ids), len(row.student_ids)
            if P + S > max_length and overflow == "refuse":
                raise _overflow("rows are (in student tokens)", 1, P + S, max_length)
            keep = min(S, max(max_length - P, 0))
            if keep <= 0:
                out.dropped += 1
                continue
            if keep < S:
                out.truncated += 1
            out.unaligned += int(not row.round_trip)
            ids, lps = mapped_targets(row, b.topk_ids[a0:a1], b.topk_logprobs[a0:a1], ctx)
            clp = chunk_teacher_logprobs(row, b.token_logprobs[a0:a1])
            chunk = row.s_chunk.copy()
            if keep < S:  # a chunk cut by the truncation has no complete student side
                chunk[np.isin(chunk, chunk[keep:])] = -1
            seqs += [np.asarray(row.prompt_ids, np.int64), row.student_ids[:keep]]
            starts.append(P)
            t_lens.append(keep)
            ids_l.append(ids[:keep])
            lps_l.append(lps[:keep])
            chunk_l.append(chunk[:keep])
            clp_l.append(clp)
            c_lens.append(len(clp))
            n_pos += keep
            n_kd += int(np.isfinite(lps[:keep]).any(-1).sum())
            n_chunk_tok += int((chunk[:keep] >= 0).sum())
    if starts:
        out.seq_ids = np.concatenate(seqs).astype(np.int32)
        out.seq_offsets = _offsets([s + t for s, t in zip(starts, t_lens)])
        out.completion_start = np.asarray(starts, np.int64)
        out.tok_offsets = _offsets(t_lens)
        out.topk_ids = np.concatenate(ids_l).astype(np.int32).reshape(-1, k)
        out.topk_logprobs = np.concatenate(lps_l).astype(np.float32).reshape(-1, k)
        out.chunk_of = np.concatenate(chunk_l).astype(np.int32)
        out.chunk_logprobs = np.concatenate(clp_l).astype(np.float32) if clp_l else np.zeros(0, np.float32)
        out.chunk_offsets = _offsets(c_lens)
    if out.unaligned:
        out.notes.append(
            f"{out.unaligned} row(s) whose student tokens do not spell the teacher's text byte for byte (normaliser or unknown "
            f"tokens) train on cross-entropy only; run `kdtrain map-report` to see the pair's round-trip rate"
        )
    out.stats = {
        "student_positions": n_pos,
        "kd_positions": n_kd,
        "chunk_positions": n_chunk_tok,
        "unaligned_rows": out.unaligned,
    }
    return _finish(out, max_length)


@dataclass
class CrossKDCollator(KDCollator):
    """`KDCollator` plus the chunk arrays:
    chunk_ids [B, L] int64: batch-wide chunk index of each label position (row * C + chunk), -1 = none;
    chunk_logprobs [B, C] float32: the teacher's log-prob of each chunk (C = most chunks in a row).
    """

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = super().__call__(batch)
        ex = self.examples
        rows = np.fromiter((int(e["row"]) for e in batch), np.int64, len(batch))
        n, width = out["input_ids"].shape
        counts = ex.chunk_offsets[rows + 1] - ex.chunk_offsets[rows]
        C = max(int(counts.max()), 1)
        chunk_ids = np.full((n, width), -1, np.int64)
        chunk_lps = np.zeros((n, C), np.float32)
        for i, r in enumerate(rows):
            s = int(ex.completion_start[r])
            c, d = ex.tok_offsets[r], ex.tok_offsets[r + 1]
            local = ex.chunk_of[c:d].astype(np.int64)
            chunk_ids[i, s : s + len(local)] = np.where(local >= 0, local + i * C, -1)
            chunk_lps[i, : counts[i]] = ex.chunk_logprobs[ex.chunk_offsets[r] : ex.chunk_offsets[r + 1]]
        out["chunk_ids"] = torch.from_numpy(chunk_ids)
        out["chunk_logprobs"] = torch.from_numpy(chunk_lps)
        return out
