"""The dataset card (README.md) written beside every teacher dataset.

It carries the Hugging Face YAML header (`configs` / `data_files`) so `load_dataset` and the Hub
viewer find the shards, and says in plain words what the columns hold and how to decode them.
"""

from __future__ import annotations

import json

from kdcore import format as fmt

CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
tags:
- knowledge-distillation
- kd-teacher-dataset
---

# Teacher dataset `{fingerprint}`

Completions of **{teacher}** with its top-{k} next-token log-probabilities at every completion
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

| column | meaning |
|---|---|
| `id` | stable row id: hash of the prompt content and the sample index |
| `messages` / `prompt` | the input as given (chat messages, or plain text) |
| `prompt_ids` | the exact token ids the teacher saw (its chat template applied) |
| `completion`, `completion_ids` | the teacher's text and token ids (EOS included when produced) |
| `token_logprob_codes` | log-prob of each completion token under the teacher (temperature 1): 0 = same as its top-k entry, else `round(-logprob * {scale}) + 1` |
| `topk_ids` | the teacher's {k} most likely next tokens per completion position, flat (T*{k} values, position-major) |
| `topk_logprob_deltas` | their log-probs, quantised and delta-coded (below) |
| `finish_reason` | `stop` (EOS) or `length` |

Log-probs are normalised over the full vocabulary, so the mass outside the top-k,
`1 - sum(exp(topk_logprobs))`, is recoverable.

## Decoding the top-k log-probs

`topk_logprob_deltas` holds, per position, `q_0, q_1 - q_0, ...` with `q_j = round(-logprob_j * {scale})`;
so `logprob = -cumsum(deltas) / {scale}` (within {err:.1e} nats of the engine's value). In Python:

```python
from kdcore.format import TeacherDataset
ds = TeacherDataset("{url_hint}")
batch = next(ds.iter_batches())        # batch.topk_ids / batch.topk_logprobs: [tokens, {k}]
```

or by hand with numpy: `-np.cumsum(np.array(deltas).reshape(-1, {k}), axis=1) / {scale}`.

The full provenance (teacher, tokenizer, generation settings, shard checksums) is in `manifest.json`.
"""


def write_card(fs, dataset_dir: str, manifest: dict) -> None:
    g, t = manifest["generation"], manifest["totals"]
    text = CARD.format(
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
        scale=manifest["encoding"]["logprob_scale"],
        err=0.5 / manifest["encoding"]["logprob_scale"],
        url_hint=f"path/to/{manifest['fingerprint']}",
    )
    fmt.write_bytes_atomic(fs, fmt.join(dataset_dir, fmt.CARD), text.encode("utf-8"))


__all__ = ["write_card", "json"]
