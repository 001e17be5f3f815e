"""The teacher-dataset format (v1): schema, encoding, manifest, fingerprint, writer and reader.

This is the one module that knows how a teacher dataset is laid out. `kdgen` writes through
`ShardWriter`; `kdtrain` and `kdeval` read only through `TeacherDataset` (see ../shared/DESIGN.md).

Layout at any fsspec URL::

    <root>/<fingerprint>/
      manifest.json                          # written last: present means complete
      README.md                              # dataset card (HF YAML header)
      data/train-00000-of-00012.parquet ...  # each written to a temp name, then renamed

Physical encoding (chosen by `bench/storage.py`; see the README's storage table):

* token ids (`prompt_ids`, `completion_ids`, `topk_ids`) are uint16 when the vocabulary has at most
  65,536 rows, else uint32.
* `topk_ids` is stored flat per row: T*k values, position-major (k is in the manifest and in the
  Parquet schema metadata), as **frequency codes**: each shard ranks the ids of its top-k by how
  often they occur and stores the rank (the order table, zstd + base64, sits in the shard's
  schema metadata `kd.topk_id_order`): id = order[code]. Common tokens dominate top-k lists, so
  ranks are mostly small and compress ~15% better than raw ids. The reader returns ids, [T, k].
* top-k log-probs are stored as `topk_logprob_deltas` (uint16, T*k flat): with
  q_j = round(-logprob_j * scale), the column holds q_0, q_1 - q_0, ..., q_{k-1} - q_{k-2}.
  Sorted log-probs make these small non-negative integers that compress well; the reader
  rebuilds logprob_j = -cumsum(deltas)_j / scale, exact to 0.5/scale nats (scale = 512 gives
  9.8e-4, inside the 1e-3 budget; each halving of the scale saves ~2.5 B/token at k=20).
  float16 cannot do this: its step is already 0.0039 nats at |logprob| in [4, 8).
  A gap of more than 65535/scale nats (128) between neighbours is clipped — only -inf-like values.
* `token_logprobs` is stored as `token_logprob_codes` (uint32): 0 where the sampled token is in
  the top-k (its log-prob is that entry: the engine computes both from one tensor; ~99% of
  positions), else round(-logprob * scale) + 1. Saves ~3.5 B/token against float32.
* Parquet: zstd, no dictionary on numeric lists (ids are high-entropy), BYTE_STREAM_SPLIT on
  the integer lists (Parquet stores uint16 as INT32; splitting puts the zero high bytes in their
  own stream, which zstd removes almost for free; -8% on ids, -25% on deltas, bench/storage.py).

Run `pytest tests/test_format.py` to exercise it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import posixpath
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcore.errors import KdError

FORMAT_VERSION = 1
LOGPROB_SCALE = 512
MAX_DELTA = np.iinfo(np.uint16).max
MANIFEST = "manifest.json"
CARD = "README.md"
DATA_DIR = "data"
SHARD_RE = re.compile(r"^train-(\d{5})-of-(\d{5})\.parquet$")
TMP_PREFIX = ".tmp-"

# Everything that changes the rows goes into the fingerprint; nothing else does. This is the one
# list (documented in the README): anything not named here — batch sizes, engine memory settings,
# shard size, output paths, timestamps, kdgen version — never changes the key. Engine layout
# (tensor/pipeline/data parallel size, replicas, a served or Ray-run engine) is left out too: the
# same weights give the same rows on any layout; weight quantization is in (issue 13,
# kdcore/engine_options.py).
FINGERPRINT_FIELDS = (
    "format_version",
    "teacher.weights_hash",
    "teacher.dtype",
    "tokenizer.tokenizer_hash",
    "tokenizer.chat_template_hash",
    "generation.backend",
    "generation.temperature",
    "generation.top_p",
    "generation.top_k",
    "generation.max_new_tokens",
    "generation.n",
    "generation.seed",
    "generation.k",
    "generation.logprob_mode",
    "generation.kind",
    "generation.quantization",
    "prompts.content_hash",
)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def dig(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def fingerprint(manifest_core: dict) -> str:
    """Content key of a dataset: sha256 over `FINGERPRINT_FIELDS` of the manifest, first 16 hex."""
    keyed = {name: dig(manifest_core, name) for name in FINGERPRINT_FIELDS}
    return sha256_hex(canonical_json(keyed))[:16]


def id_type(vocab_rows: int) -> pa.DataType:
    return pa.uint16() if vocab_rows <= 65536 else pa.uint32()


def row_id(prompt_hash: str, sample_index: int) -> str:
    """Stable row id: hash of the prompt's content and the sample index."""
    return sha256_hex(f"{prompt_hash}:{sample_index}")[:24]


def schema(vocab_rows: int, k: int) -> pa.Schema:
    ids = id_type(vocab_rows)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("messages", pa.list_(message)),
        pa.field("prompt", pa.string()),
        pa.field("prompt_ids", pa.list_(ids), nullable=False),
        pa.field("completion", pa.string(), nullable=False),
        pa.field("completion_ids", pa.list_(ids), nullable=False),
        pa.field("token_logprob_codes", pa.list_(pa.uint32()), nullable=False),
        pa.field("topk_ids", pa.list_(ids), nullable=False),
        pa.field("topk_logprob_deltas", pa.list_(pa.uint16()), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
    ]
    meta = {
        "kd.format_version": str(FORMAT_VERSION),
        "kd.k": str(k),
        "kd.logprob_scale": str(LOGPROB_SCALE),
        "kd.layout": "topk_ids and topk_logprob_deltas are flat T*k per row, position-major; "
        "logprob = -cumsum(deltas over k)/scale; token_logprob_codes: 0 = the top-k entry of the "
        "sampled token, else code = round(-logprob*scale)+1",
    }
    return pa.schema(fields, metadata=meta)


# Parquet settings, spelled out: see the module docstring for why.
_INT_LIST_COLUMNS = ["prompt_ids", "completion_ids", "token_logprob_codes", "topk_ids", "topk_logprob_deltas"]
_LEAVES = {  # Parquet leaf column paths of the v1 schema (per-column options are keyed by these)
    "id": ["id"],
    "messages": ["messages.list.element.role", "messages.list.element.content"],
    "prompt": ["prompt"],
    "prompt_ids": ["prompt_ids.list.element"],
    "completion": ["completion"],
    "completion_ids": ["completion_ids.list.element"],
    "token_logprob_codes": ["token_logprob_codes.list.element"],
    "topk_ids": ["topk_ids.list.element"],
    "topk_logprob_deltas": ["topk_logprob_deltas.list.element"],
    "finish_reason": ["finish_reason"],
}
# The two top-k columns are ~95% of the bytes: zstd-9 there (1-2% smaller than zstd-3, same read
# speed; brotli-5 is no smaller with frequency-coded ids and reads 2x slower), zstd-3 elsewhere.
# bench/storage.py ("codec variants") measures the alternatives on real teacher output.
_TOPK = ("topk_ids", "topk_logprob_deltas")
PARQUET_OPTIONS = dict(
    compression="zstd",
    compression_level={leaf: (9 if col in _TOPK else 3) for col, leaves in _LEAVES.items() for leaf in leaves},
    use_dictionary=["id", "finish_reason"],
    # keys are Parquet column paths: a list column's values live at "<name>.list.element"
    column_encoding={f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in _INT_LIST_COLUMNS},
    write_statistics=["id"],
    # no embedded Arrow schema: it would repeat the key-value metadata (the id order table) base64'd
    # again; the Parquet schema alone restores every type here (uint16 via its logical type)
    store_schema=False,
    data_page_size=1 << 20,
)


# ----------------------------------------------------------------------------------------------
# Encoding of the top-k log-probs


def encode_topk_logprobs(logprobs: np.ndarray, scale: int = LOGPROB_SCALE) -> np.ndarray:
    """Quantise and delta-code sorted log-probs.

    logprobs: [T, k] float, each row sorted descending, <= 0.
    returns:  [T, k] uint16 deltas (see module docstring).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    lp = np.where(np.isfinite(lp), lp, -1e9)
    q = np.rint(np.minimum(-lp, 1e9) * scale).astype(np.int64)
    q = np.maximum(q, 0)
    q = np.maximum.accumulate(q, axis=-1)  # sorted input already; guards float ties
    deltas = np.diff(q, axis=-1, prepend=0)
    return np.minimum(deltas, MAX_DELTA).astype(np.uint16)


def decode_topk_logprobs(deltas: np.ndarray, scale: int = LOGPROB_SCALE) -> np.ndarray:
    """Inverse of `encode_topk_logprobs`. deltas: [T, k] uint16 -> [T, k] float32 log-probs."""
    k = deltas.shape[-1]
    if k * MAX_DELTA < 2**24 and scale & (scale - 1) == 0:
        # Fast path, bit-identical to the float64 one below and ~2.5x faster (no float64 temporaries):
        # every q < 2^24 is exact in float32, and dividing by a power of two is exact.
        out = np.cumsum(deltas, axis=-1, dtype=np.int32).astype(np.float32)
        out *= np.float32(-1.0 / scale)
        return out
    q = np.cumsum(deltas, axis=-1, dtype=np.int64)
    return (q.astype(np.float64) * (-1.0 / scale)).astype(np.float32)


def encode_token_logprobs(row: "Row", scale: int = LOGPROB_SCALE) -> np.ndarray:
    """[T] uint32 codes: 0 where the sampled token is in the top-k, else round(-logprob*scale)+1.

    Checks the engine invariant on the way: a sampled token found in the top-k must carry the
    same log-prob there (both come from one tensor), else the backend is broken.
    """
    ids = np.asarray(row.completion_ids, dtype=np.int64)
    lp = np.asarray(row.token_logprobs, dtype=np.float64)
    hit = row.topk_ids == ids[:, None]
    found = hit.any(axis=1)
    if found.any():
        at = row.topk_logprobs[found, hit[found].argmax(axis=1)]
        gap = np.abs(at - lp[found]).max()
        if gap > 1e-3:
            raise ValueError(f"row {row.id}: sampled-token log-prob differs from its top-k entry by {gap:.4f} nats")
    q = np.rint(np.clip(-np.where(np.isfinite(lp), lp, -1e9), 0, 4e6) * scale).astype(np.int64) + 1
    return np.where(found, 0, q).astype(np.uint32)


def decode_token_logprobs(
    codes: np.ndarray, completion_ids: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray, scale: int = LOGPROB_SCALE
) -> np.ndarray:
    """Inverse of `encode_token_logprobs` over a batch: [sum T] codes -> [sum T] float32."""
    sampled = completion_ids.astype(topk_ids.dtype, copy=False)
    # where the sampled token sits in the top-k (its first occurrence; 0 when absent). Mostly it is
    # the top-1 (~75% at T=0.7), so only the other positions are compared against all k entries.
    at = np.zeros(len(codes), np.intp)
    if len(codes):
        other = np.flatnonzero(topk_ids[:, 0] != sampled)
        at[other] = (topk_ids[other] == sampled[other, None]).argmax(axis=1)
    from_topk = topk_logprobs[np.arange(len(codes)), at]
    own = (codes.astype(np.float64) - 1.0) * (-1.0 / scale)
    return np.where(codes == 0, from_topk, own).astype(np.float32)


def frequency_codes(topk_ids: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Replace top-k ids by codes ordered by how often they occur in this shard.

    Top-k candidates are dominated by common tokens; codes put the frequent ones first, so most
    values are small and their byte streams compress far better than raw ids (bench/storage.py).
    Order: by frequency class floor(log2(count)), most frequent class first, ascending id within a
    class — nearly the skew of an exact frequency order, yet the table stays cheap to store (ids
    ascending within a class delta-code to small gaps). Returns the codes (same shapes as the
    inputs) and `order` ([U] ids): id = order[code].
    """
    if not topk_ids:
        return [], np.zeros(0, np.int64)
    flat = np.concatenate([np.asarray(a).reshape(-1) for a in topk_ids]).astype(np.int64)
    uniq, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    klass = np.floor(np.log2(counts)).astype(np.int64)
    by_freq = np.lexsort((uniq, -klass))
    rank = np.empty_like(by_freq)
    rank[by_freq] = np.arange(len(by_freq))
    codes = rank[inverse]
    bounds = np.cumsum([a.size for a in topk_ids])[:-1]
    return [c.reshape(a.shape) for c, a in zip(np.split(codes, bounds), topk_ids)], uniq[by_freq]


def encode_id_order(order: np.ndarray) -> dict[str, str]:
    """Schema metadata holding the order table: per run of ascending ids (one per frequency class)
    its length, then the ids as gaps; uint32, zstd, base64."""
    import base64

    order = np.asarray(order, dtype=np.int64)
    # a run starts at 0 and wherever the id does not increase (a new frequency class)
    starts = np.flatnonzero(np.diff(order, prepend=order[:1] + 1) <= 0) if order.size else np.zeros(0, np.int64)
    runs = np.diff(np.append(starts, order.size))
    gaps = np.diff(order, prepend=0)
    gaps[starts] = order[starts]
    raw = np.concatenate([[len(runs)], runs, gaps]).astype("<u4").tobytes()
    packed = pa.compress(raw, codec="zstd", asbytes=True)
    return {"kd.topk_id_order": base64.b64encode(packed).decode(), "kd.topk_id_order_bytes": str(len(raw))}


def decode_id_order(metadata: dict | None) -> np.ndarray | None:
    """Inverse of `encode_id_order`; None when the shard stores raw ids."""
    import base64

    if not metadata or b"kd.topk_id_order" not in metadata:
        return None
    packed = base64.b64decode(metadata[b"kd.topk_id_order"])
    raw = np.frombuffer(
        pa.decompress(packed, int(metadata[b"kd.topk_id_order_bytes"]), codec="zstd", asbytes=True), dtype="<u4"
    ).astype(np.int64)
    n = int(raw[0])
    runs, gaps = raw[1 : 1 + n], raw[1 + n :]
    run_of = np.repeat(np.arange(n), runs)
    # cumulative sum that restarts at every run (each run's first gap is its absolute id)
    total = np.cumsum(gaps)
    before = np.concatenate([[0], total])[np.concatenate([[0], np.cumsum(runs)[:-1]])]
    return total - before[run_of]


# ----------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    """One prompt x sample, as a backend produces it (before encoding)."""

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


def rows_to_table(rows: list[Row], vocab_rows: int, k: int) -> pa.Table:
    """Encode rows into an Arrow table with the v1 schema (vectorised over the batch)."""
    sch = schema(vocab_rows, k)
    ids_np = np.uint16 if id_type(vocab_rows) == pa.uint16() else np.uint32

    def lists(arrays: list[np.ndarray], dtype, arrow_type) -> pa.ListArray:
        lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = (
            np.concatenate([np.asarray(a).reshape(-1) for a in arrays]).astype(dtype, copy=False)
            if arrays
            else np.zeros(0, dtype)
        )
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=arrow_type))

    for r in rows:
        t = len(r.completion_ids)
        if r.topk_ids.shape != (t, k) or r.topk_logprobs.shape != (t, k) or len(r.token_logprobs) != t:
            raise ValueError(f"row {r.id}: per-token arrays disagree with T={t}, k={k}")
    topk_codes, order = frequency_codes([r.topk_ids for r in rows])
    columns = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "messages": pa.array([r.messages for r in rows], sch.field("messages").type),
        "prompt": pa.array([r.prompt for r in rows], pa.string()),
        "prompt_ids": lists([np.asarray(r.prompt_ids) for r in rows], ids_np, sch.field("prompt_ids").type.value_type),
        "completion": pa.array([r.completion for r in rows], pa.string()),
        "completion_ids": lists(
            [np.asarray(r.completion_ids) for r in rows], ids_np, sch.field("completion_ids").type.value_type
        ),
        "token_logprob_codes": lists(
            [encode_token_logprobs(r) for r in rows], np.uint32, pa.uint32()
        ),
        "topk_ids": lists(topk_codes, ids_np, sch.field("topk_ids").type.value_type),
        "topk_logprob_deltas": lists(
            [encode_topk_logprobs(r.topk_logprobs) for r in rows], np.uint16, pa.uint16()
        ),
        "finish_reason": pa.array([r.finish_reason for r in rows], pa.string()),
    }
    table = pa.Table.from_pydict(columns, schema=sch)
    return table.replace_schema_metadata({**sch.metadata, **encode_id_order(order)})


# ----------------------------------------------------------------------------------------------
# Paths and filesystems


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and path for a local path or URL (s3://, gs://, hf://, memory://).

    Object stores get no listings cache: several processes (and machines) write the same dataset
    directory, and a cached listing would hide their shards, locks and manifest. Credentials and
    endpoints come from the store's usual configuration (for S3: AWS_* variables or
    ~/.aws; another endpoint via FSSPEC_S3_ENDPOINT_URL).
    """
    protocol = fsspec.core.split_protocol(url)[0]
    options = {} if protocol in (None, "file", "local") else {"use_listings_cache": False}
    if protocol == "hf":
        from huggingface_hub.constants import is_offline_mode

        if is_offline_mode():  # HfFileSystem never reads the local cache: offline, every call fails
            raise KdError(
                f"{url}: HF_HUB_OFFLINE is set, and hf:// reads the Hub itself (no offline mode); unset it where the Hub "
                f"is reachable, or use a local copy of the dataset (`kdgen pull` it there)"
            )
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:  # e.g. gs:// without gcsfs: fsspec names the package to install
        raise KdError(f"{url}: {e} (pip install it into this environment)") from None
    except ValueError as e:  # unknown protocol
        raise KdError(f"{url}: {e}; use a local path or an fsspec URL such as s3://, gs://, hf://") from None
    return fs, path.rstrip("/") or "/"


def join(*parts: str) -> str:
    return posixpath.join(*parts)


SHARD_PATH_RE = re.compile(rf"{DATA_DIR}/train-\d{{5}}-of-\d{{5}}\.parquet")


def is_safe_shard_path(rel: object) -> bool:
    """A manifest's shard path must be `data/train-NNNNN-of-NNNNN.parquet`: nothing absolute, no
    `..`, no URL, no other directory — a manifest must never make a reader open files outside
    its dataset directory (issue 7)."""
    return isinstance(rel, str) and SHARD_PATH_RE.fullmatch(rel) is not None


def checked_shard_path(rel: object) -> str:
    if not is_safe_shard_path(rel):
        raise KdError(
            f"manifest.json lists the shard path {rel!r}, which is not data/train-NNNNN-of-NNNNN.parquet inside the "
            f"dataset directory; refusing to read it (the manifest is damaged or was edited) — run `kdgen verify`"
        )
    return rel


def shard_name(index: int, total: int) -> str:
    return f"train-{index:05d}-of-{total:05d}.parquet"


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write to a temp name beside `path`, then rename: readers never see half a file."""
    tmp = join(posixpath.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def parquet_bytes(table: pa.Table, options: dict | None = None) -> bytes:
    """One shard's Parquet file: the v1 options, and the table's `kd.*` schema metadata written once
    as Parquet key-value metadata (see PARQUET_OPTIONS: no embedded Arrow schema)."""
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, **(options or PARQUET_OPTIONS)) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()})
    return sink.getvalue().to_pybytes()


def write_shard(fs: fsspec.AbstractFileSystem, dataset_dir: str, name: str, table: pa.Table, fingerprint: str | None = None) -> dict:
    """Write one shard atomically; returns its manifest entry (path, rows, tokens, bytes, sha256).

    `fingerprint` goes into the shard's key-value metadata (`kd.fingerprint`), so a shard that
    ends up in another dataset is recognised as such even when its manifest entry was edited."""
    if fingerprint is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"kd.fingerprint": fingerprint.encode()})
    data = parquet_bytes(table)
    fs.makedirs(join(dataset_dir, DATA_DIR), exist_ok=True)
    write_bytes_atomic(fs, join(dataset_dir, DATA_DIR, name), data)
    tokens = int(pa.compute.sum(pa.compute.list_value_length(table["completion_ids"])).as_py() or 0)
    return {
        "path": f"{DATA_DIR}/{name}",
        "rows": table.num_rows,
        "tokens": tokens,
        "bytes": len(data),
        "sha256": sha256_hex(data),
    }


def shard_entry_from_file(fs: fsspec.AbstractFileSystem, dataset_dir: str, rel: str) -> dict:
    """Manifest entry of a shard already on disk (used on resume and merge)."""
    with fs.open(join(dataset_dir, rel), "rb") as f:
        data = f.read()
    table = pq.read_table(pa.BufferReader(data), columns=["completion_ids"])
    tokens = int(pa.compute.sum(pa.compute.list_value_length(table["completion_ids"])).as_py() or 0)
    return {"path": rel, "rows": table.num_rows, "tokens": tokens, "bytes": len(data), "sha256": sha256_hex(data)}


def list_shards(fs: fsspec.AbstractFileSystem, dataset_dir: str) -> list[str]:
    """Names of complete shard files (temp files excluded), sorted."""
    d = join(dataset_dir, DATA_DIR)
    if not fs.exists(d):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(d, detail=False)]
    return sorted(n for n in names if SHARD_RE.match(n))


def read_manifest(fs: fsspec.AbstractFileSystem, dataset_dir: str) -> dict | None:
    path = join(dataset_dir, MANIFEST)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdError(f"{path}: manifest is not valid JSON ({e}); the dataset is damaged — regenerate it") from None


def write_manifest(fs: fsspec.AbstractFileSystem, dataset_dir: str, manifest: dict) -> None:
    data = json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False).encode("utf-8")
    write_bytes_atomic(fs, join(dataset_dir, MANIFEST), data)


# ----------------------------------------------------------------------------------------------
# Reader


@dataclass
class Batch:
    """A decoded batch of rows. Per-token arrays are concatenated over rows; `offsets` cuts them.

    offsets:        [rows + 1] int64, row i owns tokens offsets[i]:offsets[i+1]
    completion_ids: [sum T] int64
    token_logprobs: [sum T] float32 (a property: decoded from `token_logprob_codes` on first use)
    topk_ids:       [sum T, k] int64 (int32 where the reader was asked for `id_dtype=np.int32`)
    topk_logprobs:  [sum T, k] float32 (sorted descending, normalised over the full vocabulary)
    prompt_values:  [sum P] int64, row i's prompt ids are prompt_values[prompt_offsets[i]:prompt_offsets[i+1]]
    prompt_offsets: [rows + 1] int64
    prompt_ids:     (property) list of [P_i] int64 arrays, views of prompt_values

    The two properties are built on first use: the vectorised readers (kdtrain's logit examples)
    need neither, so they do not pay for them (bench/train_speed.py times that path).
    """

    ids: list[str]
    offsets: np.ndarray
    completion_ids: np.ndarray
    token_logprob_codes: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    prompt_values: np.ndarray
    prompt_offsets: np.ndarray
    completions: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    scale: int = LOGPROB_SCALE

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def token_logprobs(self) -> np.ndarray:
        return decode_token_logprobs(self.token_logprob_codes, self.completion_ids, self.topk_ids, self.topk_logprobs, self.scale)

    @functools.cached_property
    def prompt_ids(self) -> list[np.ndarray]:
        return np.split(self.prompt_values, self.prompt_offsets[1:-1]) if self.num_rows else []

    def tail_mass(self) -> np.ndarray:
        """[sum T] probability mass outside the top-k: 1 - sum(exp(topk_logprobs))."""
        return np.clip(1.0 - np.exp(self.topk_logprobs.astype(np.float64)).sum(-1), 0.0, 1.0)

    def row(self, i: int) -> dict:
        a, b = self.offsets[i], self.offsets[i + 1]
        return {
            "id": self.ids[i],
            "prompt_ids": self.prompt_ids[i],
            "completion_ids": self.completion_ids[a:b],
            "token_logprobs": self.token_logprobs[a:b],
            "topk_ids": self.topk_ids[a:b],
            "topk_logprobs": self.topk_logprobs[a:b],
            "completion": self.completions[i] if self.completions else None,
            "finish_reason": self.finish_reasons[i] if self.finish_reasons else None,
        }


def flat_list(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Values and offsets of a list column (one chunk), without copying per row."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)
    base = offsets[0]
    return values[base : offsets[-1]], offsets - base


def decode_table(
    table: pa.Table | pa.RecordBatch,
    k: int,
    scale: int = LOGPROB_SCALE,
    text: bool = True,
    id_order: np.ndarray | None = None,
    id_dtype: type = np.int64,
) -> Batch:
    """Arrow table in the v1 schema (one shard's rows) -> `Batch` (vectorised: no loop over tokens).

    `id_order` is the shard's frequency order; by default it is read from the table's metadata.
    `id_dtype` is the dtype of `Batch.topk_ids` (int32 halves the bytes the id lookup writes).
    """
    if id_order is None:
        id_order = decode_id_order(table.schema.metadata)
    cids, offsets = flat_list(table["completion_ids"])
    codes, _ = flat_list(table["token_logprob_codes"])
    tk, _ = flat_list(table["topk_ids"])
    dl, _ = flat_list(table["topk_logprob_deltas"])
    topk_ids = (np.take(id_order.astype(id_dtype, copy=False), tk) if id_order is not None else tk.astype(id_dtype)).reshape(-1, k)
    pids, poff = flat_list(table["prompt_ids"])
    return Batch(
        ids=table["id"].to_pylist(),
        offsets=offsets,
        completion_ids=cids.astype(np.int64),
        token_logprob_codes=codes,
        topk_ids=topk_ids,
        topk_logprobs=decode_topk_logprobs(dl.reshape(-1, k), scale),
        prompt_values=pids.astype(np.int64),
        prompt_offsets=poff,
        completions=table["completion"].to_pylist() if text else [],
        finish_reasons=table["finish_reason"].to_pylist() if text else [],
        scale=scale,
    )


class TeacherDataset:
    """A complete teacher dataset at a local path or fsspec URL.

    `url` may be the dataset directory itself (holding manifest.json) or a root holding exactly
    one dataset. Only complete datasets open: the manifest is the commit.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, path = open_fs(self.url)
        manifest = read_manifest(self.fs, path)
        if manifest is None:
            found = [p for p in dataset_dirs(self.fs, path)]
            if len(found) == 1:
                path = found[0]
                self.url = self.url + "/" + posixpath.basename(path)
                manifest = read_manifest(self.fs, path)
            elif len(found) > 1:
                names = ", ".join(posixpath.basename(p) for p in found[:5])
                raise KdError(f"{url} holds {len(found)} datasets ({names}); pass one of them: {url}/<fingerprint>")
            elif self.fs.exists(join(path, DATA_DIR)):
                raise KdError(
                    f"{url} has shards but no manifest.json: the generation did not finish. "
                    f"Re-run the same `kdgen generate` command to resume it"
                )
            else:
                raise KdError(f"{url}: no teacher dataset here (no manifest.json). List datasets with `kdgen ls ROOT`")
        self.path = path
        self.manifest = manifest
        if manifest.get("format_version") != FORMAT_VERSION:
            raise KdError(
                f"{url}: format version {manifest.get('format_version')!r} is not supported by this kdgen "
                f"(reads v{FORMAT_VERSION}); upgrade kd"
            )
        self.k: int = manifest["generation"]["k"]
        self.scale: int = manifest.get("encoding", {}).get("logprob_scale", LOGPROB_SCALE)
        self.fingerprint: str = manifest["fingerprint"]

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def num_rows(self) -> int:
        return self.manifest["totals"]["rows"]

    @property
    def num_tokens(self) -> int:
        return self.manifest["totals"]["tokens"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    def shard_paths(self) -> list[str]:
        """Full paths of the shards; KdError if the manifest points outside the dataset directory."""
        return [join(self.path, checked_shard_path(s.get("path"))) for s in self.shards]

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """All shards as one Arrow table, encoded as stored: use it for the text columns; the
        top-k columns decode only per shard (`iter_batches`), since each shard has its own id order."""
        tables = [pq.read_table(p, columns=columns, filesystem=self.fs) for p in self.shard_paths()]
        return pa.concat_tables(tables) if tables else schema(self.vocab_size, self.k).empty_table()

    def iter_batches(self, batch_rows: int = 256, text: bool = True, id_dtype: type = np.int64) -> Iterator[Batch]:
        """Decoded batches in shard order (a batch never spans two shards). `id_dtype`: see `decode_table`."""
        cols = None if text else [c for c in schema(2, 1).names if c not in ("messages", "prompt", "completion", "finish_reason")]
        for p in self.shard_paths():
            with self.fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                order = decode_id_order(pf.schema_arrow.metadata)
                for rb in pf.iter_batches(batch_size=batch_rows, columns=cols, use_threads=False):
                    yield decode_table(rb, self.k, self.scale, text=text, id_order=order, id_dtype=id_dtype)

    def to_hf(self):
        """The shards as a `datasets.Dataset` (encoded columns, as `load_dataset('parquet')` gives)."""
        import datasets

        return datasets.Dataset(self.read_table())


def dataset_dirs(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Complete dataset directories directly under `root`."""
    if not fs.exists(root) or not fs.isdir(root):
        return []
    out = []
    for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
        p = entry["name"].rstrip("/")
        if entry["type"] == "directory" and fs.exists(join(p, MANIFEST)):
            out.append(p)
    return out


def list_datasets(url: str) -> list[dict]:
    """Manifests of every complete dataset directly under `url`."""
    fs, root = open_fs(url)
    return [read_manifest(fs, p) for p in dataset_dirs(fs, root)]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
