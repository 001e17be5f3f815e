"""Reading format v1 shards (written by kd before issue 12); kd never writes v1 again.

v1 stored private encodings inside Parquet columns: `topk_ids` as per-shard frequency codes,
decoded through an order table in the shard's key-value metadata (`kd.topk_id_order`, zstd +
base64); `topk_logprob_deltas` as quantised (1/`kd.logprob_scale` nats) delta-coded log-probs, flat
T*k per row; `token_logprob_codes` as 0 (= the sampled token's top-k entry) or
round(-logprob*scale)+1. This module turns such a shard into the same `kdcore.codec.Batch` a v2
shard gives; `kdgen upgrade` (kdgen/upgrade.py) rewrites a v1 dataset as v2.

Test: `pytest tests/test_kdgen_format_v2.py -k v1` (a checked-in v1 dataset, tests/fixtures/v1).
"""

from __future__ import annotations

import base64

import numpy as np
import pyarrow as pa

from kdcore.codec import Batch, flat_list

ARRAY_COLUMNS = ["id", "prompt_ids", "completion_ids", "token_logprob_codes", "topk_ids", "topk_logprob_deltas"]
COLUMN_LENGTHS = {"token_logprob_codes": 1, "topk_ids": "k", "topk_logprob_deltas": "k"}  # values per completion token (kdgen verify)


def decode_topk_logprobs(deltas: np.ndarray, scale: int) -> np.ndarray:
    """deltas: [T, k] uint16 -> [T, k] float32 log-probs: -cumsum(deltas)/scale."""
    q = np.cumsum(deltas, axis=-1, dtype=np.int64)
    return (q.astype(np.float64) * (-1.0 / scale)).astype(np.float32)


def decode_token_logprobs(codes: np.ndarray, completion_ids: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray, scale: int) -> np.ndarray:
    """[sum T] codes -> [sum T] float32: the sampled token's top-k entry where the code is 0."""
    hit = topk_ids == completion_ids.astype(topk_ids.dtype)[:, None]
    from_topk = topk_logprobs[np.arange(len(codes)), hit.argmax(axis=1)]
    own = (codes.astype(np.float64) - 1.0) * (-1.0 / scale)
    return np.where(codes == 0, from_topk, own).astype(np.float32)


def decode_id_order(metadata: dict | None) -> np.ndarray | None:
    """The shard's frequency order (id = order[code]); None when the shard stores raw ids."""
    if not metadata or b"kd.topk_id_order" not in metadata:
        return None
    packed = base64.b64decode(metadata[b"kd.topk_id_order"])
    raw = np.frombuffer(
        pa.decompress(packed, int(metadata[b"kd.topk_id_order_bytes"]), codec="zstd", asbytes=True), dtype="<u4"
    ).astype(np.int64)
    n = int(raw[0])
    runs, gaps = raw[1 : 1 + n], raw[1 + n :]
    run_of = np.repeat(np.arange(n), runs)
    total = np.cumsum(gaps)  # a cumulative sum that restarts at every run (its first gap is an absolute id)
    before = np.concatenate([[0], total])[np.concatenate([[0], np.cumsum(runs)[:-1]])]
    return total - before[run_of]


def decode_table(table: pa.Table | pa.RecordBatch, k: int, text: bool = True, metadata: dict | None = None, id_dtype: type = np.int64) -> Batch:
    """A v1 shard's rows -> `Batch`; `metadata` is the shard's key-value metadata (order table, scale)."""
    meta = metadata if metadata is not None else (table.schema.metadata or {})
    scale = int(meta.get(b"kd.logprob_scale", b"512"))
    order = decode_id_order(meta)
    cids, offsets = flat_list(table["completion_ids"])
    codes, _ = flat_list(table["token_logprob_codes"])
    tk, _ = flat_list(table["topk_ids"])
    dl, _ = flat_list(table["topk_logprob_deltas"])
    topk_ids = (order[tk] if order is not None else tk.astype(np.int64)).reshape(-1, k)
    topk_lp = decode_topk_logprobs(dl.reshape(-1, k), scale)
    cids = cids.astype(np.int64)
    mass = np.exp(topk_lp.astype(np.float64)).sum(-1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.clip(1.0 - mass, 0.0, 1.0)).astype(np.float32)  # all v1 can say about the tail
    pids, poff = flat_list(table["prompt_ids"])
    return Batch(
        ids=table["id"].to_pylist(),
        offsets=offsets,
        completion_ids=cids,
        token_logprobs=decode_token_logprobs(codes, cids, topk_ids, topk_lp, scale),
        topk_ids=topk_ids.astype(id_dtype),
        topk_logprobs=topk_lp,
        tail_logprobs=tail,
        prompt_values=pids.astype(np.int64),
        prompt_offsets=poff,
        completions=table["completion"].to_pylist() if text else [],
        finish_reasons=table["finish_reason"].to_pylist() if text else [],
    )
