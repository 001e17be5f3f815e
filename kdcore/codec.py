"""Teacher-dataset rows <-> Arrow (format v2): the schema, rows -> table, table -> `Batch` arrays.

Every column means what its name says to any Parquet reader (DuckDB, pandas, polars, Spark,
`datasets`); nothing needed to read a column lives outside it. The contract is docs/FORMAT.md;
the physical choices below come from `bench/storage.py` (Parquet's own encodings only):

* token ids (`prompt_ids`, `completion_ids`, `topk_ids`) are uint16 when the vocabulary has at most
  65,536 rows, else uint32 (Parquet INT32 with an unsigned logical type).
* `topk_ids` / `topk_logprobs` are nested lists, [T][k] per row: `topk_ids[t][0]` is position t's
  top-1 in any reader, with no k from elsewhere (the nesting costs ~0.1 B/token: repetition levels
  of a constant pattern compress to almost nothing).
* log-probs (`token_logprobs`, `topk_logprobs`) are float32, normalised over the full vocabulary,
  rounded to `LOGPROB_MANTISSA_BITS` mantissa bits at write (relative error <= 2^-(bits+1), i.e.
  within max(1e-3, 1e-3*|lp|) of the engine's float32 as the contract asks); the dropped low bits
  are zeros, which BYTE_STREAM_SPLIT puts in byte streams that zstd removes almost for free. The
  sampled token's entry in `token_logprobs` equals its top-k entry bit for bit (same rounding).
  float16 would be as small, but DuckDB refuses BYTE_STREAM_SPLIT on it and its subnormals lose
  the log-probs of confident positions (|lp| < 6e-5) that the tail depends on.
* `tail_logprobs` is log(1 - sum(exp(topk))) per position, computed in float64 from the engine's
  float32 values before rounding, stored with `TAIL_MANTISSA_BITS` (the mass within 0.1% relative
  down to 1e-7; full float32 costs 1.3 B/token more): the mass outside the top-k is exact where
  the teacher is confident (issue 12: v1 decoded 8.5% of positions to "no tail"), which
  1 - sum(exp(topk_logprobs)) of rounded values is not (their absolute errors add up). -inf
  where the top-k holds all the mass to float precision.
* sampled targets (`kdgen --sampled-targets N`, kdcore/sampled_targets.py), only in datasets made
  with them: `sampled_ids` / `sampled_counts` / `sampled_logprobs`, list<list<>> [T][U_t] per row
  (U_t distinct ids among position t's N draws; ragged, so the inner lists carry their lengths);
  counts uint16 (they sum to N per position: the estimator needs nothing from elsewhere);
  log-probs rounded like the top-k's.

Run `pytest tests/test_kdgen_format.py` to exercise it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1 is read (kdcore.codec_v1), never written; `kdgen upgrade` rewrites it
LOGPROB_MANTISSA_BITS = 10  # float32 keeps 23; 10 bits = float16's precision with float32's range
TAIL_MANTISSA_BITS = 12  # tail log-probs: mass within 0.1% relative down to 1e-7 (contract: 1%)
MAX_DRAWS = 65535  # --sampled-targets N: counts are stored as uint16

# ----------------------------------------------------------------------------------------------
# Schema and Parquet options


def id_type(vocab_rows: int) -> pa.DataType:
    return pa.uint16() if vocab_rows <= 65536 else pa.uint32()


SAMPLED_COLUMNS = ("sampled_ids", "sampled_counts", "sampled_logprobs")


def schema(vocab_rows: int, k: int, sampled_targets: int = 0) -> pa.Schema:
    """The v2 schema; the three sampled-target columns only when `sampled_targets` (N) > 0."""
    ids = id_type(vocab_rows)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("messages", pa.list_(message)),
        pa.field("prompt", pa.string()),
        pa.field("prompt_ids", pa.list_(ids), nullable=False),
        pa.field("completion", pa.string(), nullable=False),
        pa.field("completion_ids", pa.list_(ids), nullable=False),
        pa.field("token_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.list_(ids)), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("tail_logprobs", pa.list_(pa.float32()), nullable=False),
    ]
    metadata = {"kd.format_version": str(FORMAT_VERSION), "kd.k": str(k)}
    if sampled_targets:
        fields += [
            pa.field("sampled_ids", pa.list_(pa.list_(ids)), nullable=False),
            pa.field("sampled_counts", pa.list_(pa.list_(pa.uint16())), nullable=False),
            pa.field("sampled_logprobs", pa.list_(pa.list_(pa.float32())), nullable=False),
        ]
        metadata["kd.sampled_targets"] = str(sampled_targets)
    fields.append(pa.field("finish_reason", pa.string(), nullable=False))
    return pa.schema(fields, metadata=metadata)


def leaf_paths(field_: pa.Field, prefix: str = "") -> list[str]:
    """Parquet leaf column paths of an Arrow field (per-column Parquet options are keyed by these):
    a list's values live at `<name>.list.element`, a struct's children at `<name>.<child>`."""
    path = f"{prefix}{field_.name}"
    t = field_.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return leaf_paths(pa.field("element", t.value_type), f"{path}.list.")
    if pa.types.is_struct(t):
        return [leaf for i in range(t.num_fields) for leaf in leaf_paths(t.field(i), f"{path}.")]
    return [path]


def _parquet_options() -> dict:
    """The writer's options, spelled out (each choice measured in bench/storage.py, k=20):
    zstd everywhere, level 9 on the top-k columns (~95% of the bytes), 3 elsewhere; dictionaries only
    on the low-cardinality strings (ids are high-entropy); BYTE_STREAM_SPLIT on numeric lists (a
    uint16 is stored as INT32, a rounded float32 has zero low bytes: splitting gives those bytes
    streams of their own, which zstd removes almost for free); no embedded Arrow schema (the Parquet
    schema restores every type here, uint16 included, via its logical types)."""
    sch = schema(2, 1, sampled_targets=1)
    leaves = {f.name: leaf_paths(f) for f in sch}
    numeric = [leaf for f in sch for leaf in leaves[f.name] if pa.types.is_list(f.type)]
    heavy = ("topk_ids", "topk_logprobs") + SAMPLED_COLUMNS
    return dict(
        compression="zstd",
        compression_level={leaf: (9 if name in heavy else 3) for name, ls in leaves.items() for leaf in ls},
        use_dictionary=["id", "finish_reason"],
        column_encoding={leaf: "BYTE_STREAM_SPLIT" for leaf in numeric if not leaf.startswith("messages.")},
        write_statistics=["id"],
        store_schema=False,
        data_page_size=1 << 20,
    )


PARQUET_OPTIONS = _parquet_options()


def encoding_info(vocab_rows: int) -> dict:
    """The manifest's `encoding` record: how the shards were written (informative: a reader needs
    none of it, every column is plain Parquet)."""
    return {
        "id_type": str(id_type(vocab_rows)),
        "logprob_type": "float32",
        "logprob_mantissa_bits": LOGPROB_MANTISSA_BITS,
        "tail_mantissa_bits": TAIL_MANTISSA_BITS,
        "topk_layout": "list<list<>>: [T][k] per row",
        "parquet": {k: v for k, v in PARQUET_OPTIONS.items() if k not in ("column_encoding", "compression_level")}
        | {"byte_stream_split": sorted(PARQUET_OPTIONS["column_encoding"])},
    }


def _options_for(names: list[str]) -> dict:
    """`PARQUET_OPTIONS` restricted to the columns of a table (the sampled-target ones are optional)."""
    present = set(names)
    keep = lambda leaf: leaf.split(".")[0] in present  # noqa: E731
    out = dict(PARQUET_OPTIONS)
    out["compression_level"] = {k: v for k, v in out["compression_level"].items() if keep(k)}
    out["column_encoding"] = {k: v for k, v in out["column_encoding"].items() if keep(k)}
    return out


def parquet_bytes(table: pa.Table, options: dict | None = None) -> bytes:
    """One shard's Parquet file with `PARQUET_OPTIONS` (or `options`); the table's `kd.*` schema
    metadata is written as Parquet key-value metadata."""
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, **(options or _options_for(table.column_names))) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()})
    return sink.getvalue().to_pybytes()


# ----------------------------------------------------------------------------------------------
# Log-prob values


def round_logprobs(x: np.ndarray, bits: int = LOGPROB_MANTISSA_BITS) -> np.ndarray:
    """float32 values rounded (to nearest, ties to even) to `bits` mantissa bits; still float32.

    Monotonic, so sorted stays sorted and <= 0 stays <= 0; +-inf pass unchanged.
    x: any shape -> same shape float32.
    """
    if bits >= 23:
        return np.asarray(x, dtype=np.float32)
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    drop = np.uint32(23 - bits)
    lsb = (u >> drop) & np.uint32(1)
    half = np.uint32((1 << (23 - bits - 1)) - 1)
    finite = np.isfinite(u.view(np.float32))
    out = np.where(finite, (u + half + lsb) & ~np.uint32((1 << (23 - bits)) - 1), u)
    return out.astype(np.uint32).view(np.float32)


def tail_logprobs(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(topk))) per position, in float64 from the given values: [T, k] -> [T] float64.

    -expm1(logsumexp) keeps it exact where the teacher is sure (top-1 probability 0.9999999:
    tail 1e-7, where 1 - sum(p) in float32 would give 0 or noise). -inf where the top-k holds all of it.
    """
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    if lp.shape[0] == 0:
        return np.zeros(0, np.float64)
    top = lp.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    lse = (top[:, 0] + np.log(np.exp(lp - top).sum(axis=1)))
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(-np.expm1(np.minimum(lse, 0.0)), 0.0))


# ----------------------------------------------------------------------------------------------
# Rows -> table


@dataclass
class SampledTargets:
    """One row's sampled targets, flat over its T positions.

    lengths:  [T] int64, U_t = distinct ids drawn at position t (1 <= U_t <= N)
    ids:      [sum U] int64, position t's ids are ids[o[t]:o[t+1]] (o = offsets()), most likely first
    counts:   [sum U] int64, how many of the N draws gave each id (they sum to N per position)
    logprobs: [sum U] float32, the teacher's log-prob of each id at temperature 1 (full vocabulary)
    """

    lengths: np.ndarray
    ids: np.ndarray
    counts: np.ndarray
    logprobs: np.ndarray

    def offsets(self) -> np.ndarray:
        """[T + 1] int64 cut points of the flat arrays."""
        out = np.zeros(len(self.lengths) + 1, np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    def position(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, counts, logprobs) of position t."""
        o = self.offsets()
        return self.ids[o[t] : o[t + 1]], self.counts[o[t] : o[t + 1]], self.logprobs[o[t] : o[t + 1]]

    @staticmethod
    def empty() -> "SampledTargets":
        return SampledTargets(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    @staticmethod
    def concat(parts: list["SampledTargets"]) -> "SampledTargets":
        """Positions of several pieces one after the other (e.g. one decode step each)."""
        if not parts:
            return SampledTargets.empty()
        return SampledTargets(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("lengths", "ids", "counts", "logprobs")))


@dataclass
class Row:
    """One prompt x sample, as a backend produces it (the engine's values, before rounding)."""

    id: str
    messages: list[dict] | None
    prompt: str | None
    prompt_ids: list[int]
    completion: str
    completion_ids: list[int]
    token_logprobs: np.ndarray  # [T] float32
    topk_ids: np.ndarray  # [T, k] int
    topk_logprobs: np.ndarray  # [T, k] float32, sorted descending
    finish_reason: str
    tail_logprobs: np.ndarray | None = None  # [T] float32; None: computed from topk_logprobs
    sampled: SampledTargets | None = None  # --sampled-targets: T positions of draws (else None)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return out


def _lists(arrays: list[np.ndarray], dtype, arrow_type: pa.DataType) -> pa.ListArray:
    """list<arrow_type> from per-row 1-d arrays, without a Python loop over values."""
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate([np.asarray(a).reshape(-1) for a in arrays]).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(_offsets(lengths)), pa.array(flat, type=arrow_type))


def _ragged(values: list[np.ndarray], lengths: list[np.ndarray], dtype, arrow_type: pa.DataType) -> pa.ListArray:
    """list<list<arrow_type>> from per-row flat values cut into positions of the given lengths."""
    inner = pa.ListArray.from_arrays(pa.array(_offsets(np.concatenate(lengths) if lengths else np.zeros(0, np.int64))), _lists(values, dtype, arrow_type).values)
    rows = np.fromiter((len(n) for n in lengths), dtype=np.int64, count=len(lengths))
    return pa.ListArray.from_arrays(pa.array(_offsets(rows)), inner)


def _nested(arrays: list[np.ndarray], k: int, dtype, arrow_type: pa.DataType) -> pa.ListArray:
    """list<list<arrow_type>> from per-row [T, k] arrays."""
    inner = _lists(arrays, dtype, arrow_type)  # flat T*k per row
    total = len(inner.values) // k if k else 0
    positions = pa.ListArray.from_arrays(pa.array(np.arange(total + 1, dtype=np.int32) * k), inner.values)
    rows = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    return pa.ListArray.from_arrays(pa.array(_offsets(rows)), positions)


def checked_token_logprobs(row: Row) -> np.ndarray:
    """[T] float32 token log-probs, taken from the top-k entry wherever the sampled token is in the
    top-k, so the two columns agree bit for bit. Checks the engine invariant on the way: both come
    from one tensor, so a gap above 1e-3 nats means a broken backend (ValueError naming the row)."""
    ids = np.asarray(row.completion_ids, dtype=np.int64)
    lp = np.array(row.token_logprobs, dtype=np.float32)
    topk = np.asarray(row.topk_logprobs, dtype=np.float32)
    hit = np.asarray(row.topk_ids) == ids[:, None]
    found = hit.any(axis=1)
    if found.any():
        at = topk[found, hit[found].argmax(axis=1)]
        gap = np.abs(at.astype(np.float64) - lp[found]).max()
        if gap > 1e-3:
            raise ValueError(f"row {row.id}: sampled-token log-prob differs from its top-k entry by {gap:.4f} nats")
        lp[found] = at
    return lp


def rows_to_table(rows: list[Row], vocab_rows: int, k: int, sampled_targets: int = 0) -> pa.Table:
    """Rows -> an Arrow table in the v2 schema (vectorised over the batch); with `sampled_targets`
    = N > 0 every row must carry its `sampled` draws (N per position)."""
    sch = schema(vocab_rows, k, sampled_targets)
    ids_np = np.uint16 if id_type(vocab_rows) == pa.uint16() else np.uint32
    ids_pa = id_type(vocab_rows)
    for r in rows:
        t = len(r.completion_ids)
        if np.shape(r.topk_ids) != (t, k) or np.shape(r.topk_logprobs) != (t, k) or len(r.token_logprobs) != t:
            raise ValueError(f"row {r.id}: per-token arrays disagree with T={t}, k={k}")
        if sampled_targets:
            d = r.sampled
            if d is None or len(d.lengths) != t:
                raise ValueError(f"row {r.id}: sampled targets missing or not one entry per completion token (T={t})")
            if t and not (np.add.reduceat(d.counts, d.offsets()[:-1]) == sampled_targets).all():
                raise ValueError(f"row {r.id}: sampled-target counts do not sum to N={sampled_targets} at every position")
    tails = [r.tail_logprobs if r.tail_logprobs is not None else tail_logprobs(r.topk_logprobs) for r in rows]
    columns = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "messages": pa.array([r.messages for r in rows], sch.field("messages").type),
        "prompt": pa.array([r.prompt for r in rows], pa.string()),
        "prompt_ids": _lists([np.asarray(r.prompt_ids) for r in rows], ids_np, ids_pa),
        "completion": pa.array([r.completion for r in rows], pa.string()),
        "completion_ids": _lists([np.asarray(r.completion_ids) for r in rows], ids_np, ids_pa),
        "token_logprobs": _lists([round_logprobs(checked_token_logprobs(r)) for r in rows], np.float32, pa.float32()),
        "topk_ids": _nested([np.asarray(r.topk_ids) for r in rows], k, ids_np, ids_pa),
        "topk_logprobs": _nested([round_logprobs(r.topk_logprobs) for r in rows], k, np.float32, pa.float32()),
        "tail_logprobs": _lists([round_logprobs(t, TAIL_MANTISSA_BITS) for t in tails], np.float32, pa.float32()),
    }
    if sampled_targets:
        lengths = [r.sampled.lengths for r in rows]
        columns["sampled_ids"] = _ragged([r.sampled.ids for r in rows], lengths, ids_np, ids_pa)
        columns["sampled_counts"] = _ragged([r.sampled.counts for r in rows], lengths, np.uint16, pa.uint16())
        columns["sampled_logprobs"] = _ragged([round_logprobs(r.sampled.logprobs) for r in rows], lengths, np.float32, pa.float32())
    columns["finish_reason"] = pa.array([r.finish_reason for r in rows], pa.string())
    return pa.Table.from_pydict(columns, schema=sch)


# ----------------------------------------------------------------------------------------------
# Table -> arrays


@dataclass
class Batch:
    """A batch of rows as arrays. Per-token arrays are concatenated over rows; `offsets` cuts them.

    offsets:        [rows + 1] int64, row i owns tokens offsets[i]:offsets[i+1]
    completion_ids: [sum T] int64
    token_logprobs: [sum T] float32
    topk_ids:       [sum T, k] int64 (int32 where the reader was asked for `id_dtype=np.int32`)
    topk_logprobs:  [sum T, k] float32 (sorted descending, normalised over the full vocabulary)
    tail_logprobs:  [sum T] float32, log of the mass outside the top-k (-inf: none)
    prompt_values:  [sum P] int64, row i's prompt ids are prompt_values[prompt_offsets[i]:prompt_offsets[i+1]]
    prompt_offsets: [rows + 1] int64
    sampled:        sampled targets of all sum T positions (`SampledTargets`, ids int64), or None
                    when the dataset has none
    """

    ids: list[str]
    offsets: np.ndarray
    completion_ids: np.ndarray
    token_logprobs: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logprobs: np.ndarray
    prompt_values: np.ndarray
    prompt_offsets: np.ndarray
    completions: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    sampled: SampledTargets | None = None

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    @property
    def prompt_ids(self) -> list[np.ndarray]:
        """[P_i] int64 arrays, views of prompt_values."""
        return np.split(self.prompt_values, self.prompt_offsets[1:-1]) if self.num_rows else []

    def tail_mass(self) -> np.ndarray:
        """[sum T] float64 probability mass outside the top-k."""
        return np.exp(self.tail_logprobs.astype(np.float64))

    def row(self, i: int) -> dict:
        a, b = self.offsets[i], self.offsets[i + 1]
        return {
            "id": self.ids[i],
            "prompt_ids": self.prompt_ids[i],
            "completion_ids": self.completion_ids[a:b],
            "token_logprobs": self.token_logprobs[a:b],
            "topk_ids": self.topk_ids[a:b],
            "topk_logprobs": self.topk_logprobs[a:b],
            "tail_logprobs": self.tail_logprobs[a:b],
            "completion": self.completions[i] if self.completions else None,
            "finish_reason": self.finish_reasons[i] if self.finish_reasons else None,
            "sampled": self.sampled_rows(a, b),
        }

    def sampled_rows(self, a: int, b: int) -> SampledTargets | None:
        """The sampled targets of positions a..b-1 (None without sampled targets)."""
        if self.sampled is None:
            return None
        o = self.sampled.offsets()
        s = self.sampled
        return SampledTargets(s.lengths[a:b], s.ids[o[a] : o[b]], s.counts[o[a] : o[b]], s.logprobs[o[a] : o[b]])

    def to_rows(self) -> list[Row]:
        """The batch as `Row`s (text columns must have been read), e.g. to write it again."""
        out = []
        for i in range(self.num_rows):
            r = self.row(i)
            out.append(Row(r["id"], None, None, r["prompt_ids"].tolist(), r["completion"], r["completion_ids"].tolist(),
                           r["token_logprobs"], r["topk_ids"], r["topk_logprobs"], r["finish_reason"], r["tail_logprobs"], r["sampled"]))
        return out


def flat_list(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Values and offsets of a list column (one chunk), without copying per row."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)
    base = offsets[0]
    return values[base : offsets[-1]], offsets - base


def flat_nested(col: pa.ChunkedArray | pa.Array, k: int) -> np.ndarray:
    """A list<list<x>> column whose inner lists all hold k values -> [sum T, k] array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)  # flatten() honours slicing


def nested_lengths_ok(col: pa.ChunkedArray | pa.Array, k: int) -> bool:
    """Every inner list of a list<list<x>> column holds exactly k values."""
    lengths = pc.list_value_length(pc.list_flatten(col)).to_numpy(zero_copy_only=False)
    return bool((lengths == k).all())


def decode_table(table: pa.Table | pa.RecordBatch, k: int, text: bool = True, id_dtype: type = np.int64) -> Batch:
    """Arrow table in the v2 schema (one shard's rows) -> `Batch` (vectorised: no loop over tokens).

    `id_dtype` is the dtype of `Batch.topk_ids` (int32 halves the bytes the widening writes). The
    log-prob arrays are copies (writable: Arrow's buffers are read-only; the copy costs ~2% of a read)."""
    cids, offsets = flat_list(table["completion_ids"])
    pids, poff = flat_list(table["prompt_ids"])
    sampled = None
    if "sampled_ids" in table.column_names:  # made with --sampled-targets
        ids_, per_pos = flat_list(pc.list_flatten(table["sampled_ids"]))
        sampled = SampledTargets(
            lengths=np.diff(per_pos),
            ids=ids_.astype(np.int64),
            counts=flat_list(pc.list_flatten(table["sampled_counts"]))[0].astype(np.int64),
            logprobs=flat_list(pc.list_flatten(table["sampled_logprobs"]))[0].copy(),
        )
    return Batch(
        ids=table["id"].to_pylist(),
        offsets=offsets,
        completion_ids=cids.astype(np.int64),
        token_logprobs=flat_list(table["token_logprobs"])[0].copy(),
        topk_ids=flat_nested(table["topk_ids"], k).astype(id_dtype),
        topk_logprobs=flat_nested(table["topk_logprobs"], k).copy(),
        tail_logprobs=flat_list(table["tail_logprobs"])[0].copy(),
        prompt_values=pids.astype(np.int64),
        prompt_offsets=poff,
        completions=table["completion"].to_pylist() if text else [],
        finish_reasons=table["finish_reason"].to_pylist() if text else [],
        sampled=sampled,
    )


def table_version(metadata: dict | None) -> int:
    """A shard's format version from its key-value metadata (`kd.format_version`)."""
    return int((metadata or {}).get(b"kd.format_version", b"1"))


def table_sampled_targets(metadata: dict | None) -> int:
    """A shard's N of sampled targets from its key-value metadata (`kd.sampled_targets`; 0 = none)."""
    return int((metadata or {}).get(b"kd.sampled_targets", b"0"))


def decode_any(table: pa.Table | pa.RecordBatch, k: int, text: bool = True, id_dtype: type = np.int64, metadata: dict | None = None) -> Batch:
    """`decode_table` for a shard of either version (v1 through `kdcore.codec_v1`)."""
    meta = metadata if metadata is not None else table.schema.metadata
    if table_version(meta) == 1:
        from kdcore import codec_v1

        return codec_v1.decode_table(table, k, text=text, metadata=meta, id_dtype=id_dtype)
    return decode_table(table, k, text=text, id_dtype=id_dtype)


def text_free_columns(version: int, sampled_targets: int = 0) -> list[str]:
    """The columns a reader needs when it skips the text (`iter_batches(text=False)`)."""
    if version == 1:
        from kdcore import codec_v1

        return codec_v1.ARRAY_COLUMNS
    return [c for c in schema(2, 1, sampled_targets).names if c not in ("messages", "prompt", "completion", "finish_reason")]
