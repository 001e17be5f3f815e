"""The dataset card (README.md) written beside every teacher dataset.

Its YAML header declares the Hugging Face `configs` (where the shards are) and
`dataset_info.features` (every column's type, derived from the shards' schema), so
`datasets.load_dataset(<dataset dir>)` and the Hub viewer return typed columns; the body says in
plain words what each column holds (the contract: docs/FORMAT.md).

Test: `pytest tests/test_kdgen_format_v2.py -k card` (declared features match the files).
"""

from __future__ import annotations

import pyarrow as pa
import yaml

import kdcore.dataset as kds
import kdcore.io as kio
from kdcore import codec

COLUMNS = {  # what each v2 column means (docs/FORMAT.md has the full contract)
    "id": "stable row id: hash of the prompt content and the sample index",
    "messages": "the input as given: chat messages (null for a plain-text prompt)",
    "prompt": "the input as given: plain text (null for chat messages)",
    "prompt_ids": "the exact token ids the teacher saw (its chat template applied)",
    "completion": "the teacher's text",
    "completion_ids": "its token ids (EOS included when produced); T per row",
    "token_logprobs": "[T] log-prob of each completion token under the teacher at temperature 1",
    "topk_ids": "[T][k] token ids of the teacher's k most likely next tokens per position, most likely first",
    "topk_logprobs": "[T][k] their log-probs (temperature 1, normalised over the full vocabulary, sorted descending)",
    "tail_logprobs": "[T] log of the probability mass outside the top-k: log(1 - sum(exp(topk_logprobs))); -inf = none",
    "sampled_ids": "[T][U_t] the distinct token ids among N draws from the teacher's full distribution at temperature 1 per position (--sampled-targets N), most likely first",
    "sampled_counts": "[T][U_t] how many of the N draws gave each id (they sum to N per position; count / N estimates the teacher's probability without bias)",
    "sampled_logprobs": "[T][U_t] the teacher's log-prob of each sampled id (temperature 1, normalised over the full vocabulary)",
    "finish_reason": "`stop` (EOS) or `length`",
}
SCORED = {  # where a `kdgen score` dataset's columns mean something else: the text was given, not generated
    "id": "stable row id: hash of the prompt content together with the scored completion (so not the id of that row in a source dataset)",
    "completion": "the scored text, as given to `kdgen score` (teacher-forced: not the teacher's own text)",
    "finish_reason": "`stop` when the given completion ends in the teacher's EOS, else `length`",
}

BODY = """
# Teacher dataset `{fingerprint}`

{what} with its top-{k} next-token log-probabilities at every completion
token, written by `kdgen` {version} (format v{format_version}) for offline knowledge distillation.

| | |
|---|---|
| teacher | `{teacher}` (weights sha256 `{weights}`, {dtype}) |
| prompts | `{prompt_source}` ({prompt_count:,} prompts) |
| rows | {rows:,} ({n} sample(s) per prompt) |
| completion tokens | {tokens:,} |
| size | {bytes:,} bytes ({bpt} bytes per token) |
| generation | {kind}, backend {backend} ({engine}), temperature {temperature}, top_p {top_p}, max_new_tokens {max_new_tokens}, seed {seed} |

## Columns

Every column is plain Parquet and means what its name says: no decoding, no kd needed.

| column | type | meaning |
|---|---|---|
{columns}

Log-probs are rounded to 11 significant bits (within 5e-4 x |log-prob| of the teacher's float32);
`tail_logprobs` is computed before rounding, so the tail is exact where the teacher is confident.

## Reading it without kd

```sql
-- DuckDB: each position's top-1 id and the mass outside the top-k
SELECT id, t, topk_ids[t][1] AS top1_id, exp(tail_logprobs[t]) AS tail_mass
FROM (SELECT *, unnest(range(1, len(completion_ids) + 1)) AS t FROM 'data/*.parquet');
```

```python
import numpy as np, pandas as pd
df = pd.read_parquet("data")
row = df.iloc[0]
top1 = [ids[0] for ids in row.topk_ids]          # [T]
tail_mass = np.exp(row.tail_logprobs)            # [T]
```

The full provenance (teacher, tokenizer, generation settings, shard checksums) is in `manifest.json`.
"""


DTYPES = {"string": "string", "uint16": "uint16", "uint32": "uint32", "float": "float32"}  # Arrow -> HF names


def feature_entry(t: pa.DataType) -> dict:
    """An Arrow type as a `dataset_info.features` YAML entry, in the form `datasets` itself writes."""
    if pa.types.is_list(t):
        inner = feature_entry(t.value_type)
        if "struct" in inner:  # a list of structs lists the struct's fields directly
            return {"list": inner["struct"]}
        return {"list": inner.get("dtype", inner)}
    if pa.types.is_struct(t):
        return {"struct": [{"name": t.field(i).name, **feature_entry(t.field(i).type)} for i in range(t.num_fields)]}
    return {"dtype": DTYPES[str(t)]}


def header(manifest: dict) -> dict:
    """The card's YAML header: HF configs and dataset_info (features, split sizes)."""
    sch = codec.schema(manifest["tokenizer"]["embedding_rows"], manifest["generation"]["k"], kds.sampled_targets(manifest))
    return {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"{kds.DATA_DIR}/train-*.parquet"}]}],
        "dataset_info": {
            "features": [{"name": f.name, **feature_entry(f.type)} for f in sch],
            "splits": [{"name": "train", "num_bytes": manifest["totals"]["bytes"], "num_examples": manifest["totals"]["rows"]}],
        },
        "tags": ["knowledge-distillation", "kd-teacher-dataset"],
    }


def card_text(manifest: dict) -> str:
    g, t = manifest["generation"], manifest["totals"]
    sch = codec.schema(manifest["tokenizer"]["embedding_rows"], g["k"], kds.sampled_targets(manifest))
    meaning = {**COLUMNS, **SCORED} if g["kind"] == "score" else COLUMNS
    columns = "\n".join(f"| `{f.name}` | `{f.type}` | {meaning[f.name]} |" for f in sch)
    what = (f"Given completions scored by **{manifest['teacher']['source']}** (teacher-forced)" if g["kind"] == "score"
            else f"Completions of **{manifest['teacher']['source']}**")
    body = BODY.format(
        what=what,
        fingerprint=manifest["fingerprint"],
        teacher=manifest["teacher"]["source"],
        weights=manifest["teacher"]["weights_hash"][:16],
        dtype=manifest["teacher"]["dtype"],
        version=manifest["kdgen_version"],
        format_version=manifest["format_version"],
        k=g["k"],
        prompt_source=manifest["prompts"]["source"],
        prompt_count=manifest["prompts"]["count"],
        rows=t["rows"],
        n=g["n"],
        tokens=t["tokens"],
        bytes=t["bytes"],
        bpt=t["bytes_per_token"],
        kind=g["kind"],
        backend=g["backend"],
        engine=g["engine_version"],
        temperature=g["temperature"],
        top_p=g["top_p"],
        max_new_tokens=g["max_new_tokens"],
        seed=g["seed"],
        columns=columns,
    )
    return "---\n" + yaml.safe_dump(header(manifest), sort_keys=False, allow_unicode=True) + "---\n" + body


def write_card(fs, dataset_dir: str, manifest: dict) -> None:
    kio.write_bytes_atomic(fs, kio.join(dataset_dir, kds.CARD), card_text(manifest))
