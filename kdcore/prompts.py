"""Read prompts (and, for `kdgen score`, completions) and turn them into the teacher's token ids.

Sources: JSONL, Parquet, CSV, an HF dataset directory (`save_to_disk` output, or a folder of
data files), or a teacher dataset (a directory holding manifest.json, or its fsspec URL): its rows' prompts, completions
and `completion_ids`. Given `completion_ids`, `kdgen score` scores exactly those tokens instead of
re-tokenising the text (a student's samples, issue 15: decoding then re-encoding can change them). A prompt is either chat `messages` (a list of {role, content}) or plain text.
Chat prompts go through the tokenizer's own chat template, applied here, then are tokenised
without adding special tokens again (the template already holds the BOS: no double BOS).
Plain text is tokenised as is, with the tokenizer's usual special tokens.

Test: `pytest tests/test_kdgen_generate.py -k prompt` (every prompt source reads the same) and tests/test_kdgen_errors.py (bad prompt files).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from kdcore.artifacts import MANIFEST
from kdcore.errors import KdError
from kdcore.io import canonical_json, sha256_hex

AUTO_COLUMNS = ("messages", "prompt", "text", "instruction", "question", "input")


@dataclass
class Prompt:
    index: int  # position in the source (0-based, after dropping duplicates)
    messages: list[dict] | None
    text: str | None
    completion: str | None = None  # only for `kdgen score`
    completion_ids: list[int] | None = None  # `kdgen score`: the exact tokens to score, when given

    @property
    def content_hash(self) -> str:
        body = {"messages": self.messages} if self.messages is not None else {"text": self.text}
        if self.completion is not None:
            body["completion"] = self.completion
        if self.completion_ids is not None:
            body["completion_ids"] = list(self.completion_ids)
        return sha256_hex(canonical_json(body))


def read_records(path: Path, split: str) -> list[dict]:
    """Rows of a prompt file as dicts."""
    if not path.exists():
        raise KdError(f"--prompts {path}: no such file or directory")
    if (path / MANIFEST).is_file():
        return teacher_dataset_records(str(path))
    if path.is_dir():
        import datasets

        try:
            if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(str(path))
        except Exception as e:
            raise KdError(f"--prompts {path}: not a readable HF dataset directory ({type(e).__name__}: {e})") from None
        if isinstance(ds, (datasets.DatasetDict, dict)):
            if split not in ds:
                raise KdError(f"--prompts {path}: no split {split!r}; it has {', '.join(ds)} (choose with --split)")
            ds = ds[split]
        return ds.to_list()
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        if path.suffix.lower() != ".parquet":
            raise KdError(
                f"--prompts {path}: not valid UTF-8 (line {line}, byte {e.start}); re-encode it, e.g. "
                f"`iconv -f latin1 -t utf-8`"
            ) from None
        text = ""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise KdError(f"--prompts {path}: invalid JSON ({e})") from None
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise KdError(f"--prompts {path}: line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise KdError(f"--prompts {path}: line {n} is not a JSON object")
            out.append(rec)
        return out
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:
            raise KdError(f"--prompts {path}: not a readable Parquet file ({e})") from None
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
    raise KdError(f"--prompts {path}: unknown file type {suffix!r}; use .jsonl, .parquet, .csv or an HF dataset directory")


def teacher_dataset_records(url: str) -> list[dict]:
    """A teacher dataset's rows as prompt records: `messages` or `prompt` (whichever the row has),
    `completion` and `completion_ids` (the exact tokens, EOS included where it was produced)."""
    from kdcore.dataset import TeacherDataset

    ds = TeacherDataset(url)
    table = ds.read_table(columns=["messages", "prompt", "completion"]).to_pylist()
    ids = [b.completion_ids[b.offsets[i] : b.offsets[i + 1]].tolist() for b in ds.iter_batches(text=False) for i in range(b.num_rows)]
    out = []
    for row, cids in zip(table, ids):
        rec = {"messages": row["messages"]} if row["messages"] is not None else {"prompt": row["prompt"]}
        out.append({**rec, "completion": row["completion"], "completion_ids": cids})
    return out


def _as_messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)  # CSV cells hold JSON
        except json.JSONDecodeError:
            raise KdError(f"{where}: messages must be a list of {{role, content}}, got a plain string") from None
    if not isinstance(value, list) or not value:
        raise KdError(f"{where}: messages must be a non-empty list of {{role, content}}")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise KdError(f"{where}: each message needs string 'role' and 'content'")
        if not m["content"].strip():
            raise KdError(f"{where}: a {m['role']} message is empty; remove the row or fill it in")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def load_prompts(
    path: str | Path,
    column: str | None = None,
    split: str = "train",
    completion_column: str | None = None,
    limit: int | None = None,
) -> tuple[list[Prompt], dict]:
    """Read prompts; returns them and a description (source, column, count, dropped duplicates).

    `column=None` picks the first of AUTO_COLUMNS present. A `messages` column (or any column of
    lists) is chat input; a string column is plain text.
    """
    # a URL (s3://, hf://, ...) can only be a teacher dataset: prompt files are read locally
    records = teacher_dataset_records(str(path)) if "://" in str(path) else read_records(Path(path), split)
    path = str(path) if "://" in str(path) else Path(path)
    if not records:
        raise KdError(f"--prompts {path}: the file holds no prompts")
    keys = list(records[0].keys())
    if column is None:
        column = next((c for c in AUTO_COLUMNS if c in keys), None)
        if column is None:
            raise KdError(
                f"--prompts {path}: no prompt column found (looked for {', '.join(AUTO_COLUMNS)}; the file has "
                f"{', '.join(keys)}); name it with --prompt-column"
            )
    elif column not in keys:
        raise KdError(f"--prompt-column {column!r} is not in {path}; it has: {', '.join(keys)}")
    if completion_column is not None and completion_column not in keys:
        raise KdError(f"--completion-column {completion_column!r} is not in {path}; it has: {', '.join(keys)}")

    prompts: list[Prompt] = []
    seen: set[str] = set()
    dropped = 0
    for n, rec in enumerate(records):
        where = f"--prompts {path}: row {n + 1}"
        value = rec.get(column)
        if value is None:
            raise KdError(f"{where}: column {column!r} is empty")
        chat = column == "messages" or isinstance(value, list) or (
            isinstance(value, str) and value.lstrip().startswith("[{")
        )
        if chat:
            p = Prompt(0, _as_messages(value, where), None)
        else:
            if not isinstance(value, str):
                raise KdError(f"{where}: column {column!r} must be text, got {type(value).__name__}")
            if not value.strip():
                raise KdError(f"{where}: the prompt is empty; remove the row or fill it in")
            p = Prompt(0, None, value)
        if completion_column is not None:
            comp, ids = rec.get(completion_column), rec.get("completion_ids")
            if ids is not None:  # exact tokens given: the text may be empty (an immediate EOS)
                if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                    raise KdError(f"{where}: column 'completion_ids' must be a non-empty list of token ids")
                p.completion_ids = ids
                comp = comp if isinstance(comp, str) else ""
            elif not isinstance(comp, str) or not comp:
                raise KdError(f"{where}: column {completion_column!r} must be non-empty text")
            p.completion = comp
        h = p.content_hash
        if h in seen:
            dropped += 1
            continue
        seen.add(h)
        p.index = len(prompts)
        prompts.append(p)
        if limit is not None and len(prompts) >= limit:
            break
    info = {
        "source": str(path),
        "column": column,
        "count": len(prompts),
        "duplicates_dropped": dropped,
        "content_hash": sha256_hex("\n".join(p.content_hash for p in prompts)),
    }
    return prompts, info


def chat_template_of(tokenizer) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    return t if isinstance(t, str) and t else None


def encode_prompt(prompt: Prompt, tokenizer) -> list[int]:
    """Token ids the teacher sees for this prompt (chat template applied for chat input)."""
    if prompt.messages is not None:
        if chat_template_of(tokenizer) is None:
            raise KdError(
                "the tokenizer has no chat template but the prompts are chat messages; give plain-text "
                "prompts (--prompt-column with a text column) or a model with a chat template"
            )
        text = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt.text)["input_ids"]
