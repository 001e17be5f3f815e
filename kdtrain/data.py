"""Teacher datasets -> tokenised training examples, and the collator that pads teacher arrays.

Reads datasets only through `kdcore.dataset.TeacherDataset` (the format's one reader).

An example is one teacher row. `Prepared` keeps all examples as flat numpy arrays (one copy,
no per-row Python objects):

    seq_ids [sum L] + seq_offsets [rows+1]   prompt ids then completion ids (L = P + T, truncated)
    completion_start [rows]                  P: positions < P are prompt, never in any loss
    topk_ids [sum T, k] int32 + tok_offsets  logit mode only: the teacher's top-k ids
    topk_logprobs [sum T, k] float32         their log-probs (temperature 1); -inf where the id is
                                             beyond the student's embedding rows (-> tail bucket)
    tail_logprobs [sum T] float32            the dataset's tail (mass outside the top-k, exact;
                                             the mass of those -inf entries folded in)
    token_logprobs [sum T] float32           `--loss sampled_rkl` only: the teacher's log-prob of
                                             each completion token (student rows, issue 15)
    target_weights [sum T, U] float32        `--targets sampled` only: topk_ids / topk_logprobs then
                                             hold each position's random-sampled ids and teacher
                                             log-probs ([sum T, U], U = most distinct ids at any
                                             position, padded), these their counts / N (0 on
                                             padding); no tail_logprobs

Teacher arrays are aligned with *labels*: completion token j sits at position P + j, and its top-k
row is the teacher's distribution for that token (predicted from position P + j - 1). The trainer
shifts hidden states, labels and teacher arrays together.

The `datasets.Dataset` handed to the trainer holds only row indices (`to_hf_dataset`), so the
Trainer's samplers, DDP sharding and resume-skipping work on it, while `KDCollator` slices the
arrays directly: HF's per-row numpy formatting would cap loading at a few 100k tokens/s.
`KDCollator` pads a batch of rows into
    input_ids [B, L], attention_mask [B, L], labels [B, L] (-100 on prompt and padding),
    topk_ids [B, L, k] int32, topk_logprobs [B, L, k] and tail_logprobs [B, L] float32 (zeros off the completion),
    token_logprobs [B, L] float32 and target_weights [B, L, k] float32 when the examples carry them.

Test: `pytest tests/test_kdtrain_train.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kdcore.codec import SampledTargets
from kdcore.errors import KdError
from kdcore.teacher_data import TeacherData, encode_prompts, encode_texts


# ----------------------------------------------------------------------------------------------
# Examples


@dataclass
class Prepared:
    """All examples as flat arrays (see the module docstring), plus what happened on the way."""

    seq_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    seq_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    completion_start: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    tail_logprobs: np.ndarray | None = None
    tok_offsets: np.ndarray | None = None
    token_logprobs: np.ndarray | None = None
    target_weights: np.ndarray | None = None
    rows_in: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_topk_entries: int = 0
    dropped_sampled_entries: int = 0
    beyond_vocab: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.completion_start)

    @property
    def num_tokens(self) -> int:
        return int(self.seq_offsets[-1])

    @property
    def k(self) -> int:
        return 0 if self.topk_ids is None else self.topk_ids.shape[1]

    def row(self, i: int) -> dict:
        a, b = self.seq_offsets[i], self.seq_offsets[i + 1]
        out = {"input_ids": self.seq_ids[a:b], "completion_start": int(self.completion_start[i])}
        if self.topk_ids is not None:
            c, d = self.tok_offsets[i], self.tok_offsets[i + 1]
            out["topk_ids"], out["topk_logprobs"] = self.topk_ids[c:d], self.topk_logprobs[c:d]
            if self.tail_logprobs is not None:  # None: cross-tokenizer targets (their residual bucket is derived)
                out["tail_logprobs"] = self.tail_logprobs[c:d]
            if self.token_logprobs is not None:
                out["token_logprobs"] = self.token_logprobs[c:d]
            if self.target_weights is not None:
                out["target_weights"] = self.target_weights[c:d]
        return out


def lengths_to_offsets(lengths) -> np.ndarray:
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


def overflow_error(where: str, n: int, longest: int, max_length: int) -> KdError:
    return KdError(
        f"{n} {where} longer than --max-length {max_length} tokens (longest {longest}); "
        f"raise --max-length (up to the student's context), or pass --overflow truncate to cut them"
    )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges starts[i] .. starts[i] + lengths[i] - 1: [sum lengths] int64 indices."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0) + np.repeat(starts - ends + lengths, lengths)


def _rows_with(values: np.ndarray, offsets: np.ndarray, limit: int) -> np.ndarray:
    """[rows] bool: rows (cut by `offsets`) holding a value >= limit."""
    rows = len(offsets) - 1
    if not values.size or values.max() < limit:  # the usual case: one cheap pass
        return np.zeros(rows, bool)
    row_of = np.repeat(np.arange(rows), np.diff(offsets))
    return np.bincount(row_of[values >= limit], minlength=rows) > 0


def padded_sampled(s: SampledTargets, positions: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first `positions` positions of sampled targets as padded arrays (ids, teacher log-probs,
    weights = counts / n), each [positions, U] with U the most distinct ids at one of them; padding
    entries have id 0, log-prob 0 and weight 0."""
    lengths = s.lengths[:positions]
    width = int(lengths.max()) if positions else 0
    o = s.offsets()
    pos = np.repeat(np.arange(positions), lengths)
    col = np.arange(o[positions]) - np.repeat(o[:positions], lengths)
    ids = np.zeros((positions, width), np.int32)
    lps = np.zeros((positions, width), np.float32)
    w = np.zeros((positions, width), np.float32)
    ids[pos, col] = s.ids[: o[positions]]
    lps[pos, col] = s.logprobs[: o[positions]]
    w[pos, col] = s.counts[: o[positions]] / n
    return ids, lps, w


def _pad_width(parts: list[np.ndarray], width: int) -> np.ndarray:
    """[n_i, u_i] blocks -> one [sum n_i, width] array, zero-padded on the right."""
    return np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1]))) for x in parts])


def logit_examples(
    data: TeacherData, max_length: int, overflow: str, student_rows: int, limit: int | None = None, token_logprobs: bool = False,
    sampled: bool = False,
) -> Prepared:
    """Rows -> examples with teacher top-k arrays (vectorised per read batch: no loop over rows).
    `sampled`: the dataset's random-sampled targets in place of the top-k (`target_weights`, above).

    Where a batch keeps every token (no truncation, nothing dropped) its teacher arrays are taken
    as they were decoded, not copied through a mask; `tests/test_kdtrain_train.py` checks the result
    against a row-by-row reference.
    """
    k = data.k
    parts: dict[str, list] = {"seqs": [], "seq_len": [], "start": [], "t_len": [], "ids": [], "lps": [], "tails": [], "tok": [], "w": []}
    out = Prepared()
    remaining = limit
    for ds in data.datasets:
        for b in ds.iter_batches(batch_rows=1024, text=False, id_dtype=np.int32):
            rows = b.num_rows if remaining is None else min(b.num_rows, remaining)
            if rows <= 0:
                break
            n_tok, n_prompt = int(b.offsets[rows]), int(b.prompt_offsets[rows])
            t_len, p_len = np.diff(b.offsets[: rows + 1]), np.diff(b.prompt_offsets[: rows + 1])
            keep_t = np.minimum(t_len, np.maximum(max_length - p_len, 0))
            too_long = p_len + t_len > max_length
            if too_long.any() and overflow == "refuse":
                raise overflow_error("rows are", int(too_long.sum()), int((p_len + t_len).max()), max_length)
            # rows holding ids the student has no embedding for (sampled from padded teacher rows)
            comp, prompts = b.completion_ids[:n_tok], b.prompt_values[:n_prompt]
            beyond = _rows_with(comp, b.offsets[: rows + 1], student_rows) | _rows_with(prompts, b.prompt_offsets[: rows + 1], student_rows)
            out.beyond_vocab += int(beyond.sum())
            out.truncated += int((too_long & (keep_t > 0) & ~beyond).sum())
            ok = (keep_t > 0) & ~beyond
            out.dropped += int(((keep_t <= 0) & ~beyond).sum())
            out.rows_in += rows
            kept, kt = np.flatnonzero(ok), keep_t[ok]
            tok = slice(0, n_tok) if kt.sum() == n_tok else _ranges(b.offsets[kept], kt)
            if kt.sum() == n_tok:  # every completion token kept: the decoded arrays as they are
                ids, lps, tails = b.topk_ids[:n_tok], b.topk_logprobs[:n_tok], b.tail_logprobs[:n_tok]
            else:  # the first keep_t[i] completion tokens of each kept row
                ids, lps, tails = b.topk_ids[tok], b.topk_logprobs[tok], b.tail_logprobs[tok]
            if token_logprobs:
                parts["tok"].append(b.token_logprobs[tok].astype(np.float32, copy=False))
            if sampled:
                ids, lps, w = (x[tok] for x in padded_sampled(b.sampled, n_tok, ds.sampled_targets))
                bad = ids >= student_rows  # drawn ids in padded teacher rows: no student logit to pull
                if bad.any():
                    out.dropped_sampled_entries += int(bad.sum())
                    ids, lps, w = np.where(bad, 0, ids), np.where(bad, 0.0, lps).astype(np.float32), np.where(bad, 0.0, w).astype(np.float32)
                parts["w"].append(w)
            elif ids.size and ids.max() >= student_rows:
                # teacher ids in padded embedding rows the student lacks: their mass joins the tail
                bad = ids >= student_rows
                out.dropped_topk_entries += int(bad.sum())
                with np.errstate(divide="ignore"):
                    tails = np.logaddexp(tails, np.logaddexp.reduce(np.where(bad, lps, -np.inf), axis=1)).astype(np.float32)
                lps = np.where(bad, -np.inf, lps).astype(np.float32)
                ids = np.where(bad, 0, ids)
            # each kept row's sequence: its prompt, then its kept completion tokens
            source = np.concatenate([prompts, comp])
            starts = np.stack([b.prompt_offsets[kept], n_prompt + b.offsets[kept]], axis=1).reshape(-1)
            parts["seqs"].append(source[_ranges(starts, np.stack([p_len[ok], kt], axis=1).reshape(-1))])
            parts["seq_len"].append(p_len[ok] + kt)
            parts["start"].append(p_len[ok])
            parts["t_len"].append(kt)
            parts["ids"].append(ids.astype(np.int32, copy=False))
            parts["lps"].append(lps.astype(np.float32, copy=False))
            parts["tails"].append(tails.astype(np.float32, copy=False))
            if remaining is not None:
                remaining -= rows
        if remaining is not None and remaining <= 0:
            break
    if parts["start"]:
        out.seq_ids = np.concatenate(parts["seqs"]).astype(np.int32)
        out.seq_offsets = lengths_to_offsets(np.concatenate(parts["seq_len"]))
        out.completion_start = np.concatenate(parts["start"])
        out.tok_offsets = lengths_to_offsets(np.concatenate(parts["t_len"]))
        if sampled:  # ragged per position: pad every read batch to the widest position of all
            width = max(x.shape[1] for x in parts["ids"])
            out.topk_ids, out.topk_logprobs = _pad_width(parts["ids"], width), _pad_width(parts["lps"], width)
            out.target_weights = _pad_width(parts["w"], width)
        else:
            out.topk_ids = np.concatenate(parts["ids"]).reshape(-1, k)
            out.topk_logprobs = np.concatenate(parts["lps"]).reshape(-1, k)
            out.tail_logprobs = np.concatenate(parts["tails"])
        if token_logprobs:
            out.token_logprobs = np.concatenate(parts["tok"])
    return finish_notes(out, max_length)


def text_examples(data: TeacherData, tokenizer, same: bool, max_length: int, overflow: str, limit: int | None = None) -> Prepared:
    """Rows -> SFT examples on the teacher's completions.

    Same tokenizer: the teacher's own prompt and completion ids. Otherwise the prompt is re-encoded
    with the student's chat template (plain text prompts raw) and the completion text re-tokenised,
    ending with the student's EOS where the teacher stopped.
    """
    seqs: list[np.ndarray] = []
    starts: list[int] = []
    for ds in data.datasets:
        if same:
            for b in ds.iter_batches(batch_rows=1024, text=False):
                for i in range(b.num_rows):
                    c = b.completion_ids[b.offsets[i] : b.offsets[i + 1]]
                    seqs.append(np.concatenate([b.prompt_ids[i], c]))
                    starts.append(len(b.prompt_ids[i]))
        else:
            table = ds.read_table(columns=["messages", "prompt", "completion", "finish_reason"])
            if limit is not None:
                table = table.slice(0, limit - len(seqs))
            rows = table.to_pylist()
            prompts = encode_prompts(tokenizer, [(r["messages"], r["prompt"]) for r in rows])
            completions = encode_texts(tokenizer, [r["completion"] for r in rows])
            for row, p, c in zip(rows, prompts, completions):
                if row["finish_reason"] == "stop" and tokenizer.eos_token_id is not None:
                    c = c + [tokenizer.eos_token_id]
                seqs.append(np.asarray(p + c, np.int64))
                starts.append(len(p))
        if limit is not None and len(seqs) >= limit:
            break
    if limit is not None:
        seqs, starts = seqs[:limit], starts[:limit]
    return sequence_examples(seqs, starts, max_length, overflow)


def sequence_examples(seqs: list[np.ndarray], starts: list[int], max_length: int, overflow: str) -> Prepared:
    """Token sequences (loss from position starts[i] on) -> examples: truncate or refuse, drop
    rows whose prompt alone fills max_length. Shared by text mode and online mode's prompt files."""
    out = Prepared(rows_in=len(seqs))
    lengths = np.asarray([len(s) for s in seqs], np.int64)
    too_long = lengths > max_length
    if too_long.any() and overflow == "refuse":
        raise overflow_error("rows are", int(too_long.sum()), int(lengths.max()), max_length)
    keep = [i for i in range(len(seqs)) if starts[i] < max_length and len(seqs[i]) > starts[i]]
    out.truncated = int(sum(1 for i in keep if too_long[i]))
    out.dropped = len(seqs) - len(keep)
    kept = [seqs[i][:max_length] for i in keep]
    if kept:
        out.seq_ids = np.concatenate(kept).astype(np.int32)
        out.seq_offsets = lengths_to_offsets([len(x) for x in kept])
        out.completion_start = np.asarray([starts[i] for i in keep], np.int64)
    return finish_notes(out, max_length)


def finish_notes(out: Prepared, max_length: int) -> Prepared:
    if out.truncated:
        out.notes.append(f"{out.truncated} row(s) longer than --max-length {max_length} were truncated (their completion ends early)")
    if out.dropped:
        out.notes.append(f"{out.dropped} row(s) dropped: their prompt alone fills --max-length {max_length}")
    if out.beyond_vocab:
        out.notes.append(f"{out.beyond_vocab} row(s) dropped: they hold token ids beyond the student's embedding rows")
    if out.dropped_topk_entries:
        out.notes.append(f"{out.dropped_topk_entries} teacher top-k entries name ids beyond the student's embedding rows; their mass goes to the tail bucket")
    if out.dropped_sampled_entries:
        out.notes.append(f"{out.dropped_sampled_entries} sampled teacher ids are beyond the student's embedding rows; their draws are left out of the loss")
    if out.num_rows == 0:
        why = "; ".join(out.notes) or "the dataset holds no completion tokens"
        raise KdError(f"no trainable rows left (of {out.rows_in}): {why}")
    return out


# ----------------------------------------------------------------------------------------------
# Collator


@dataclass
class KDCollator:
    """Pads the rows named by a batch of `{"row": i}` examples into tensors (module docstring).

    `with_topk=False` leaves the teacher arrays out (text mode, or plain SFT on the same rows).
    """

    examples: Prepared
    pad_id: int
    with_topk: bool = True

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        ex = self.examples
        rows = np.fromiter((int(e["row"]) for e in batch), np.int64, len(batch))
        a, b = ex.seq_offsets[rows], ex.seq_offsets[rows + 1]
        lengths, starts = b - a, ex.completion_start[rows]
        n, width = len(rows), int(lengths.max())
        input_ids = np.full((n, width), self.pad_id, np.int64)
        labels = np.full((n, width), -100, np.int64)
        mask = np.arange(width)[None, :] < lengths[:, None]
        k = ex.k if self.with_topk else 0
        tok_lps = np.zeros((n, width), np.float32) if k and ex.token_logprobs is not None else None
        weights = np.zeros((n, width, k), np.float32) if k and ex.target_weights is not None else None
        if k:
            topk_ids = np.zeros((n, width, k), np.int32)
            topk_lps = np.zeros((n, width, k), np.float32)
            tails = np.zeros((n, width), np.float32) if ex.tail_logprobs is not None else None
            c = ex.tok_offsets[rows]
        for i in range(n):
            seq, s, L = ex.seq_ids[a[i] : b[i]], starts[i], lengths[i]
            input_ids[i, :L] = seq
            labels[i, s:L] = seq[s:]
            if k:
                topk_ids[i, s:L] = ex.topk_ids[c[i] : c[i] + L - s]
                topk_lps[i, s:L] = ex.topk_logprobs[c[i] : c[i] + L - s]
                if tails is not None:
                    tails[i, s:L] = ex.tail_logprobs[c[i] : c[i] + L - s]
                if tok_lps is not None:
                    tok_lps[i, s:L] = ex.token_logprobs[c[i] : c[i] + L - s]
                if weights is not None:
                    weights[i, s:L] = ex.target_weights[c[i] : c[i] + L - s]
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": torch.from_numpy(labels),
        }
        if k:
            out["topk_ids"] = torch.from_numpy(topk_ids)
            out["topk_logprobs"] = torch.from_numpy(topk_lps)
            if tails is not None:
                out["tail_logprobs"] = torch.from_numpy(tails)
        if tok_lps is not None:
            out["token_logprobs"] = torch.from_numpy(tok_lps)
        if weights is not None:
            out["target_weights"] = torch.from_numpy(weights)
        return out


def to_hf_dataset(prepared: Prepared):
    """A `datasets.Dataset` of row indices (what `SFTTrainer` takes; `KDCollator` holds the data)."""
    import datasets

    return datasets.Dataset.from_dict({"row": np.arange(prepared.num_rows, dtype=np.int64)})
