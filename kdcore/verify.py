"""`kdgen verify`: checksums plus the contract's invariants, on every shard.

Invariants (docs/FORMAT.md): all per-token arrays have length T; top-k is [T, k]; log-probs
<= 0, not NaN, and sorted; sum(exp(topk)) <= 1 + 1e-3 and sum(exp(topk)) + exp(tail) = 1 within
5e-3; ids < vocab size; token_logprobs[t] equals the top-k entry of the sampled token when it is in
the top-k; with sampled targets, counts summing to N at every position, distinct ids < vocab size,
log-probs <= 0 sorted descending. Plus: row ids unique, finish_reason valid, each shard in the manifest's format version,
shard files exactly those the manifest lists, shard paths inside the dataset directory. Format v1
datasets are checked through the v1 reader (kdcore/codec_v1.py).

`check_table` is the row-level part, used by the tests on every writer.
"""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kdcore import codec
import kdcore.dataset as kds
import kdcore.io as kio
from kdcore.errors import KdError


def _shape_problems(table: pa.Table, k: int, version: int, sampled_targets: int = 0) -> list[str]:
    """Per-token columns of length T, top-k of [T, k], in the shard's format version; the
    sampled-target columns present exactly when the dataset has them (N = `sampled_targets`)."""
    t_len = pc.list_value_length(table["completion_ids"]).to_numpy(zero_copy_only=False)
    if version == 1:
        from kdcore.codec_v1 import COLUMN_LENGTHS

        per_token = {col: (k if width == "k" else width) for col, width in COLUMN_LENGTHS.items()}
    else:  # every list column but the prompt's holds one entry per completion token (top-k: a [k] list)
        per_token = {f.name: 1 for f in codec.schema(2, 1, sampled_targets) if pa.types.is_list(f.type) and f.name not in ("messages", "prompt_ids", "completion_ids")}
    problems = []
    if not sampled_targets and any(c in table.column_names for c in codec.SAMPLED_COLUMNS):
        problems.append("sampled-target columns in a dataset made without --sampled-targets (the manifest has no generation.sampled_targets)")
    for col, width in per_token.items():
        if col not in table.column_names:
            problems.append(f"column {col} is missing (format v{version})")
        elif not np.array_equal(pc.list_value_length(table[col]).to_numpy(zero_copy_only=False), t_len * width):
            problems.append(f"{col} does not hold {'T' if width == 1 else f'T*{k}'} values for every row")
    if version != 1 and not problems:
        for col in ("topk_ids", "topk_logprobs"):
            if not codec.nested_lengths_ok(table[col], k):
                problems.append(f"{col} is not [T, k={k}] for every row")
        if sampled_targets:
            u = pc.list_value_length(pc.list_flatten(table["sampled_ids"])).to_numpy(zero_copy_only=False)
            for col in ("sampled_counts", "sampled_logprobs"):
                if not np.array_equal(pc.list_value_length(pc.list_flatten(table[col])).to_numpy(zero_copy_only=False), u):
                    problems.append(f"{col} does not hold one entry per sampled id at every position")
    return problems


def _sampled_problems(b: codec.Batch, n: int, vocab: int) -> list[str]:
    """The sampled targets' invariants: counts sum to N, ids distinct and < vocab, log-probs <= 0."""
    s, problems = b.sampled, []
    if s is None or not len(s.lengths):
        return problems
    o = s.offsets()
    if (s.lengths < 1).any() or (np.add.reduceat(s.counts, o[:-1]) != n).any() or (s.counts < 1).any():
        problems.append(f"sampled_counts do not sum to N={n} (each >= 1) at every position")
    if s.ids.max() >= vocab:
        problems.append(f"sampled ids >= vocab size {vocab}")
    if (s.logprobs > 0).any() or np.isnan(s.logprobs).any():
        problems.append("positive or NaN sampled_logprobs")
    same_position = np.diff(np.repeat(np.arange(len(s.lengths)), s.lengths)) == 0
    if (np.diff(s.logprobs)[same_position] > 0).any():
        problems.append("sampled_logprobs not sorted descending within a position")
    pos = np.repeat(np.arange(len(s.lengths)), s.lengths).astype(np.int64)
    if len(np.unique(pos * vocab + s.ids)) != len(s.ids):
        problems.append("an id appears twice among one position's sampled ids")
    return problems


def check_table(table: pa.Table, k: int, vocab: int, sampled_targets: int | None = None) -> list[str]:
    """Problems with the rows of one shard, v2 or v1 (empty list when it keeps every invariant);
    `sampled_targets`: the dataset's N (`kdcore.dataset.sampled_targets(manifest)`); None takes the
    shard's own `kd.sampled_targets`."""
    version = codec.table_version(table.schema.metadata)
    if sampled_targets is None:
        sampled_targets = codec.table_sampled_targets(table.schema.metadata)
    problems = _shape_problems(table, k, version, sampled_targets)
    if problems:
        return problems
    b = codec.decode_any(table, k, text=True)
    if b.completion_ids.size:
        if b.topk_ids.max() >= vocab or b.completion_ids.max() >= vocab:
            problems.append(f"token ids >= vocab size {vocab}")
        if (b.topk_logprobs > 0).any() or (b.token_logprobs > 1e-4).any() or (b.tail_logprobs > 0).any():
            problems.append("positive log-probs")
        if np.isnan(b.topk_logprobs).any() or np.isnan(b.token_logprobs).any() or np.isnan(b.tail_logprobs).any():
            problems.append("NaN log-probs")
        if (np.diff(b.topk_logprobs, axis=1) > 0).any():
            problems.append("top-k log-probs not sorted descending")
        mass = np.exp(b.topk_logprobs.astype(np.float64)).sum(1)
        if (mass > 1 + 1e-3).any():
            problems.append(f"top-k probability mass above 1 (max {mass.max():.4f})")
        # the top-k and the tail make one distribution (v2 rounds the top-k to 11 significant bits:
        # the sum moves by at most 2^-11 * sum(p*|lp|), < 5e-3 for any k up to thousands)
        total = mass + b.tail_mass()
        if (np.abs(total - 1.0) > 5e-3).any():
            problems.append(f"sum(exp(topk_logprobs)) + exp(tail_logprobs) is not 1 (worst {total[np.abs(total - 1).argmax()]:.5f})")
        # token_logprobs[t] equals the top-k entry of the sampled token when it is in the top-k (the
        # writer takes it from there); outside, it must not beat the k-th entry
        hit = b.topk_ids == b.completion_ids[:, None]
        found = hit.any(axis=1)
        at = b.topk_logprobs[np.arange(len(found)), hit.argmax(axis=1)]
        if (b.token_logprobs[found] != at[found]).any():
            problems.append("token_logprobs differ from the sampled token's top-k entry")
        outside = ~found
        if outside.any() and (b.token_logprobs[outside] > b.topk_logprobs[outside, -1] + 2e-3).any():
            problems.append("a sampled token outside the top-k has a higher log-prob than the k-th entry")
    problems += _sampled_problems(b, sampled_targets, vocab)
    if len(b.prompt_ids) and max((p.max() for p in b.prompt_ids if p.size), default=0) >= vocab:
        problems.append(f"prompt ids >= vocab size {vocab}")
    bad = set(b.finish_reasons) - {"stop", "length"}
    if bad:
        problems.append(f"unknown finish_reason {sorted(bad)}")
    if len(set(b.ids)) != len(b.ids):
        problems.append("duplicate row ids within the shard")
    return problems


def _row_prompt_hashes(table: pa.Table) -> list[str]:
    """Each row's prompt content hash, as `kdcore.prompts.Prompt.content_hash` computes it."""
    cols = set(table.column_names)
    messages = table["messages"].to_pylist() if "messages" in cols else [None] * table.num_rows
    texts = table["prompt"].to_pylist() if "prompt" in cols else [None] * table.num_rows
    return [
        kio.sha256_hex(kio.canonical_json({"messages": m} if m is not None else {"text": t}))
        for m, t in zip(messages, texts)
    ]


def _ids_not_from_their_prompts(table: pa.Table, manifest: dict) -> int:
    """How many rows' ids are not row_id(their prompt's content hash, sample index < n). Generated
    rows only: a scored row's id also covers the given completion text, which is not stored verbatim."""
    if manifest["generation"].get("kind") != "generate":
        return 0
    n = manifest["generation"]["n"]
    ids = table["id"].to_pylist()
    return sum(rid not in {kds.row_id(h, s) for s in range(n)} for rid, h in zip(ids, _row_prompt_hashes(table)))


def _prompt_hashes(table: pa.Table, manifest: dict) -> list[str]:
    """The shard's prompts in order (each prompt's n samples are consecutive rows)."""
    n = manifest["generation"]["n"]
    return _row_prompt_hashes(table)[::n] if manifest["generation"].get("kind") == "generate" else []


def verify(url: str, deep: bool = True) -> tuple[dict | None, list[str]]:
    """Returns (manifest, problems). Each problem names the shard and what is wrong with it."""
    fs, path = kio.open_fs(url)
    manifest = kds.read_manifest(fs, path)
    if manifest is None:
        if fs.exists(kio.join(path, kds.DATA_DIR)):
            return None, [f"{url}: no manifest.json — the generation did not finish; re-run `kdgen generate` to resume"]
        return None, [f"{url}: not a teacher dataset (no manifest.json)"]
    problems = []
    try:
        core = {key: manifest[key] for key in ("teacher", "tokenizer", "generation", "prompts")}
        core["format_version"] = manifest["format_version"]
        if kds.fingerprint(core) != manifest["fingerprint"]:
            problems.append("manifest.json: the fingerprint does not match its recorded settings (edited manifest?)")
        k, vocab = manifest["generation"]["k"], manifest["tokenizer"]["vocab_size"]
        listed = manifest["shards"]
    except (KeyError, TypeError) as e:
        return manifest, [f"manifest.json: missing field {e}; the manifest is damaged"]
    if posixpath.basename(path.rstrip("/")) != manifest["fingerprint"]:
        problems.append(f"directory name {posixpath.basename(path)} differs from the fingerprint {manifest['fingerprint']}")
    names = set()
    prompt_hashes: list[str] = []
    seen_ids: set[str] = set()
    rows = tokens = 0
    for s in listed:
        rel = s.get("path", "") if isinstance(s, dict) else s
        if not kds.is_safe_shard_path(rel):
            problems.append(f"{rel}: shard path is not data/train-NNNNN-of-NNNNN.parquet inside the dataset directory; refusing to read it")
            continue
        names.add(posixpath.basename(rel))
        full = kio.join(path, rel)
        if not fs.exists(full):
            problems.append(f"{rel}: missing")
            continue
        with fs.open(full, "rb") as f:
            data = f.read()
        if len(data) != s["bytes"]:
            problems.append(f"{rel}: size {len(data)} bytes, manifest says {s['bytes']} (truncated or replaced)")
            continue
        if kio.sha256_hex(data) != s["sha256"]:
            problems.append(f"{rel}: sha256 mismatch (corrupted or replaced)")
            continue
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as e:
            problems.append(f"{rel}: unreadable Parquet ({e})")
            continue
        if table.num_rows != s["rows"]:
            problems.append(f"{rel}: {table.num_rows} rows, manifest says {s['rows']}")
        meta = table.schema.metadata or {}
        if meta.get(b"kd.k", str(k).encode()) != str(k).encode():
            problems.append(f"{rel}: written with k={meta[b'kd.k'].decode()}, the dataset has k={k} (a shard from another dataset?)")
            continue
        if codec.table_version(meta) != manifest["format_version"]:
            problems.append(f"{rel}: written in format v{codec.table_version(meta)}, the manifest says v{manifest['format_version']}")
            continue
        if codec.table_sampled_targets(meta) != kds.sampled_targets(manifest):
            problems.append(f"{rel}: written with --sampled-targets {codec.table_sampled_targets(meta)}, the dataset has {kds.sampled_targets(manifest)}")
            continue
        own = meta.get(b"kd.fingerprint")
        if own is not None and own.decode() != manifest["fingerprint"]:
            problems.append(f"{rel}: rows of another dataset (its shard metadata says fingerprint {own.decode()}, this dataset is {manifest['fingerprint']})")
            continue
        bad_ids = _ids_not_from_their_prompts(table, manifest)
        if bad_ids:
            problems.append(f"{rel}: {bad_ids} row id(s) do not derive from the row's own prompt (rows edited or assembled by hand)")
        prompt_hashes += _prompt_hashes(table, manifest)
        rows += table.num_rows
        tokens += s["tokens"]
        ids = table["id"].to_pylist()
        dup = seen_ids.intersection(ids)
        if dup:
            problems.append(f"{rel}: {len(dup)} row id(s) also in another shard")
        seen_ids.update(ids)
        if deep:
            problems += [f"{rel}: {p}" for p in check_table(table, k, vocab, kds.sampled_targets(manifest))]
    for extra in sorted(set(kds.list_shards(fs, path)) - names):
        problems.append(f"{kds.DATA_DIR}/{extra}: shard file not listed in the manifest (from another run or dataset?)")
    if not problems and manifest["generation"].get("kind") == "generate":
        # the rows, in shard order, must be exactly the manifest's prompt set (prompts.content_hash)
        if kio.sha256_hex("\n".join(prompt_hashes)) != manifest["prompts"].get("content_hash"):
            problems.append("the rows' prompts, in shard order, are not the manifest's prompt set (prompts.content_hash): shards from another dataset, or rows missing or reordered")
    totals = manifest.get("totals", {})
    if not problems and (totals.get("rows") != rows or totals.get("tokens") != tokens):
        problems.append(f"manifest totals ({totals.get('rows')} rows, {totals.get('tokens')} tokens) differ from the shards ({rows}, {tokens})")
    return manifest, problems


def require_valid(url: str) -> None:
    """Raise a one-line `KdError` if the dataset fails verification (used by kdtrain / kdeval)."""
    _, problems = verify(url, deep=False)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise KdError(f"{url} fails verification: {problems[0]}{more}; run `kdgen verify {url}` for the full list")
