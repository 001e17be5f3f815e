"""Teacher datasets -> tokenised training examples, and the collator that pads teacher arrays.

Reads datasets only through `kdgen.format.TeacherDataset` (the format's one reader).

An example is one teacher row:

    input_ids         [L]      prompt ids then completion ids (L = P + T, after truncation)
    completion_start  int      P: positions < P are prompt and never enter any loss
    topk_ids          [T*k]    logit mode only: the teacher's top-k ids, flat, position-major
    topk_logprobs     [T*k]    logit mode only: their log-probs (temperature 1); -inf where the id
                               is beyond the student's embedding rows (the loss moves it to the tail)

Teacher arrays are aligned with *labels*: completion token j sits at position P + j, and its top-k
row is the teacher's distribution for that token (predicted from position P + j - 1). The trainer
shifts hidden states, labels and teacher arrays together.

`KDCollator` pads a list of examples into
    input_ids [B, L], attention_mask [B, L], labels [B, L] (-100 on prompt and padding),
    topk_ids [B, L, k] int32 and topk_logprobs [B, L, k] float32 (zeros off the completion).

Test: `pytest tests/test_kdtrain_data.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from kdgen.errors import KdError
from kdgen.format import TeacherDataset
from kdgen.verify import require_valid
from kdgen.teacher import tokenizer_identity


# ----------------------------------------------------------------------------------------------
# Opening and checking the datasets


@dataclass
class TeacherData:
    """One or more teacher datasets of the same teacher, tokenizer and k."""

    datasets: list[TeacherDataset]

    @property
    def manifest(self) -> dict:
        return self.datasets[0].manifest

    @property
    def k(self) -> int:
        return self.datasets[0].k

    @property
    def num_rows(self) -> int:
        return sum(d.num_rows for d in self.datasets)

    @property
    def num_tokens(self) -> int:
        return sum(d.num_tokens for d in self.datasets)

    def describe(self) -> list[dict]:
        """What kd_config.json records about each dataset."""
        return [
            {
                "url": d.url,
                "fingerprint": d.fingerprint,
                "teacher": d.manifest["teacher"]["source"],
                "teacher_weights_hash": d.manifest["teacher"]["weights_hash"],
                "tokenizer_hash": d.manifest["tokenizer"]["tokenizer_hash"],
                "k": d.k,
                "rows": d.num_rows,
                "tokens": d.num_tokens,
            }
            for d in self.datasets
        ]


def open_teacher_data(urls: list[str]) -> TeacherData:
    """Open, verify (checksums) and cross-check the datasets; KdError on the first problem."""
    opened = []
    for url in urls:
        ds = TeacherDataset(url)
        require_valid(ds.url)
        if ds.num_rows == 0 or ds.num_tokens == 0:
            raise KdError(f"--data {url}: the dataset is empty ({ds.num_rows} rows, {ds.num_tokens} tokens); nothing to train on")
        opened.append(ds)
    first = opened[0]
    for ds in opened[1:]:
        for what, key in (("teacher", ("teacher", "weights_hash")), ("tokenizer", ("tokenizer", "tokenizer_hash"))):
            a, b = first.manifest[key[0]][key[1]], ds.manifest[key[0]][key[1]]
            if a != b:
                raise KdError(
                    f"--data {ds.url} has a different {what} ({ds.manifest['teacher']['source']}, {b[:12]}) than "
                    f"--data {first.url} ({first.manifest['teacher']['source']}, {a[:12]}); train on one teacher's datasets at a time"
                )
        if ds.k != first.k:
            raise KdError(f"--data {ds.url} has k={ds.k} but --data {first.url} has k={first.k}; mixed datasets must share k")
    return TeacherData(opened)


def same_tokenizer(manifest: dict, tokenizer, embedding_rows: int) -> bool:
    """Whether the student's tokenizer is the teacher's (by tokenizer hash; embedding rows may differ)."""
    return tokenizer_identity(tokenizer, embedding_rows)["tokenizer_hash"] == manifest["tokenizer"]["tokenizer_hash"]


# ----------------------------------------------------------------------------------------------
# Examples


@dataclass
class Prepared:
    """Examples as Arrow columns plus what happened on the way (for the log and kd_config.json)."""

    table: pa.Table
    rows_in: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_topk_entries: int = 0
    beyond_vocab: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(pa.compute.sum(pa.compute.list_value_length(self.table["input_ids"])).as_py() or 0)


def _list_array(offsets: np.ndarray, values: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int64), pa.int64()), pa.array(values, arrow_type)).cast(pa.large_list(arrow_type))


def _overflow(where: str, n: int, longest: int, max_length: int) -> KdError:
    return KdError(
        f"{n} {where} longer than --max-length {max_length} tokens (longest {longest}); "
        f"raise --max-length (up to the student's context), or pass --overflow truncate to cut them"
    )


def logit_examples(data: TeacherData, max_length: int, overflow: str, student_rows: int, limit: int | None = None) -> Prepared:
    """Rows -> examples with teacher top-k arrays (vectorised per read batch)."""
    k = data.k
    parts: dict[str, list] = {"input_ids": [], "completion_start": [], "topk_ids": [], "topk_logprobs": []}
    out = Prepared(table=None)  # type: ignore[arg-type]
    remaining = limit
    for ds in data.datasets:
        for b in ds.iter_batches(batch_rows=1024, text=False):
            rows = b.num_rows if remaining is None else min(b.num_rows, remaining)
            if rows <= 0:
                break
            t_len = np.diff(b.offsets)[:rows]
            p_len = np.fromiter((len(p) for p in b.prompt_ids[:rows]), np.int64, rows)
            keep_t = np.minimum(t_len, np.maximum(max_length - p_len, 0))
            too_long = p_len + t_len > max_length
            if too_long.any() and overflow == "refuse":
                raise _overflow("rows are", int(too_long.sum()), int((p_len + t_len).max()), max_length)
            # rows holding ids the student has no embedding for (sampled from padded teacher rows)
            row_of_tok = np.repeat(np.arange(rows), t_len)
            beyond = np.bincount(row_of_tok[b.completion_ids[: b.offsets[rows]] >= student_rows], minlength=rows) > 0
            beyond |= np.fromiter((p.size > 0 and p.max() >= student_rows for p in b.prompt_ids[:rows]), bool, rows)
            out.beyond_vocab += int(beyond.sum())
            out.truncated += int((too_long & (keep_t > 0) & ~beyond).sum())
            ok = (keep_t > 0) & ~beyond
            out.dropped += int(((keep_t <= 0) & ~beyond).sum())
            out.rows_in += rows
            # token mask: the first keep_t[i] completion tokens of each kept row
            pos = np.arange(b.offsets[rows]) - np.repeat(b.offsets[:rows], t_len)
            tok_keep = pos < np.repeat(np.where(ok, keep_t, 0), t_len)
            ids = b.topk_ids[: b.offsets[rows]][tok_keep]
            lps = b.topk_logprobs[: b.offsets[rows]][tok_keep]
            comp = b.completion_ids[: b.offsets[rows]][tok_keep]
            bad = ids >= student_rows
            if bad.any():  # teacher ids in padded embedding rows the student lacks: their mass joins the tail
                out.dropped_topk_entries += int(bad.sum())
                lps = np.where(bad, -np.inf, lps).astype(np.float32)
                ids = np.where(bad, 0, ids)
            kt = keep_t[ok]
            comp_off = np.zeros(len(kt) + 1, np.int64)
            np.cumsum(kt, out=comp_off[1:])
            kept_prompts = [p for p, o in zip(b.prompt_ids[:rows], ok) if o]
            seqs = [np.concatenate([p, comp[comp_off[i] : comp_off[i + 1]]]) for i, p in enumerate(kept_prompts)]
            seq_off = np.zeros(len(seqs) + 1, np.int64)
            np.cumsum([len(s) for s in seqs], out=seq_off[1:])
            parts["input_ids"].append(_list_array(seq_off, np.concatenate(seqs).astype(np.int32) if seqs else np.zeros(0, np.int32), pa.int32()))
            parts["completion_start"].append(pa.array(p_len[ok].astype(np.int32), pa.int32()))
            parts["topk_ids"].append(_list_array(comp_off * k, ids.reshape(-1).astype(np.int32), pa.int32()))
            parts["topk_logprobs"].append(_list_array(comp_off * k, lps.reshape(-1).astype(np.float32), pa.float32()))
            if remaining is not None:
                remaining -= rows
        if remaining is not None and remaining <= 0:
            break
    out.table = pa.table({name: pa.chunked_array(chunks) for name, chunks in parts.items()}) if parts["input_ids"] else None
    return _finish(out, max_length)


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
            for row in table.to_pylist():
                p = _encode_prompt(tokenizer, row["messages"], row["prompt"])
                c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
                if row["finish_reason"] == "stop" and tokenizer.eos_token_id is not None:
                    c = c + [tokenizer.eos_token_id]
                seqs.append(np.asarray(p + c, np.int64))
                starts.append(len(p))
        if limit is not None and len(seqs) >= limit:
            break
    if limit is not None:
        seqs, starts = seqs[:limit], starts[:limit]
    out = Prepared(table=None, rows_in=len(seqs))  # type: ignore[arg-type]
    lengths = np.asarray([len(s) for s in seqs], np.int64)
    too_long = lengths > max_length
    if too_long.any() and overflow == "refuse":
        raise _overflow("rows are", int(too_long.sum()), int(lengths.max()), max_length)
    keep = [i for i in range(len(seqs)) if starts[i] < max_length and len(seqs[i]) > starts[i]]
    out.truncated = int(sum(1 for i in keep if too_long[i]))
    out.dropped = len(seqs) - len(keep)
    kept = [seqs[i][:max_length] for i in keep]
    off = np.zeros(len(kept) + 1, np.int64)
    np.cumsum([len(s) for s in kept], out=off[1:])
    if kept:
        out.table = pa.table(
            {
                "input_ids": _list_array(off, np.concatenate(kept).astype(np.int32), pa.int32()),
                "completion_start": pa.array([starts[i] for i in keep], pa.int32()),
            }
        )
    return _finish(out, max_length)


def _encode_prompt(tokenizer, messages: list[dict] | None, prompt: str | None) -> list[int]:
    if messages:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # no chat template: the turns as plain paragraphs
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    else:
        text = prompt or ""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _finish(out: Prepared, max_length: int) -> Prepared:
    if out.truncated:
        out.notes.append(f"{out.truncated} row(s) longer than --max-length {max_length} were truncated (their completion ends early)")
    if out.dropped:
        out.notes.append(f"{out.dropped} row(s) dropped: their prompt alone fills --max-length {max_length}")
    if out.beyond_vocab:
        out.notes.append(f"{out.beyond_vocab} row(s) dropped: they hold token ids beyond the student's embedding rows")
    if out.dropped_topk_entries:
        out.notes.append(f"{out.dropped_topk_entries} teacher top-k entries name ids beyond the student's embedding rows; their mass goes to the tail bucket")
    if out.table is None or out.table.num_rows == 0:
        why = "; ".join(out.notes) or "the dataset holds no completion tokens"
        raise KdError(f"no trainable rows left (of {out.rows_in}): {why}")
    return out


# ----------------------------------------------------------------------------------------------
# Collator


@dataclass
class KDCollator:
    """Pads examples (numpy-formatted rows of a `Prepared.table`) into a batch; see the module doc."""

    pad_id: int
    k: int = 0  # 0: no teacher arrays (text mode)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        n = len(examples)
        lengths = [len(e["input_ids"]) for e in examples]
        width = max(lengths)
        input_ids = np.full((n, width), self.pad_id, np.int64)
        labels = np.full((n, width), -100, np.int64)
        mask = np.zeros((n, width), np.int64)
        if self.k:
            topk_ids = np.zeros((n, width, self.k), np.int32)
            topk_lps = np.zeros((n, width, self.k), np.float32)
        for i, e in enumerate(examples):
            ids, start, L = e["input_ids"], int(e["completion_start"]), lengths[i]
            input_ids[i, :L] = ids
            labels[i, start:L] = ids[start:]
            mask[i, :L] = 1
            if self.k:
                topk_ids[i, start:L] = np.asarray(e["topk_ids"]).reshape(-1, self.k)
                topk_lps[i, start:L] = np.asarray(e["topk_logprobs"]).reshape(-1, self.k)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels),
        }
        if self.k:
            batch["topk_ids"] = torch.from_numpy(topk_ids)
            batch["topk_logprobs"] = torch.from_numpy(topk_lps)
        return batch


def to_hf_dataset(prepared: Prepared):
    """The examples as a `datasets.Dataset` yielding numpy rows (what `SFTTrainer` takes)."""
    import datasets

    return datasets.Dataset(prepared.table).with_format("numpy")
