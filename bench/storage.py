"""Storage benchmark: bytes per completion token of the teacher-dataset format vs simpler layouts,
on the same real rows, and the log-prob error of each against the engine's own values.

    python bench/storage.py --prompts 64 --max-new-tokens 128

The embedded teacher generates once through vLLM with k=64 (kdgen's settings: T=0.7, top_p=0.95);
the raw engine outputs stay in memory and are written in three layouts at k in {5, 20, 64}:
  naive  — nested list<list<int32>> ids + list<list<float32>> log-probs, float32 token log-probs,
           pyarrow defaults (snappy);
  typed  — flat uint16 ids + float16 log-probs, float32 token log-probs, zstd;
  kd-v1  — kdcore.format (uint16 ids; quantised delta-coded log-probs; token log-prob codes;
           BYTE_STREAM_SPLIT + zstd).
Every layout holds the same other columns (id, messages, prompt ids, text, finish reason).
Target at k=20: kd-v1 <= 60 B/token with every stored log-prob within 1e-3 nats.
Writes bench/results/storage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("KD_QUIET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import machine, results_path, write_result  # noqa: E402


def parquet_bytes(table: pa.Table, **options) -> int:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return sink.getvalue().size


def common_columns(rows) -> dict:
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return {
        "id": pa.array([r.id for r in rows]),
        "messages": pa.array([r.messages for r in rows], pa.list_(message)),
        "prompt_ids": pa.array([list(map(int, r.prompt_ids)) for r in rows], pa.list_(pa.int32())),
        "completion": pa.array([r.completion for r in rows]),
        "completion_ids": pa.array([list(map(int, r.completion_ids)) for r in rows], pa.list_(pa.int32())),
        "finish_reason": pa.array([r.finish_reason for r in rows]),
    }


def naive_bytes(rows, k: int) -> int:
    cols = common_columns(rows)
    cols["token_logprobs"] = pa.array([r.token_logprobs.tolist() for r in rows], pa.list_(pa.float32()))
    cols["topk_ids"] = pa.array([r.topk_ids[:, :k].tolist() for r in rows], pa.list_(pa.list_(pa.int32())))
    cols["topk_logprobs"] = pa.array([r.topk_logprobs[:, :k].tolist() for r in rows], pa.list_(pa.list_(pa.float32())))
    return parquet_bytes(pa.table(cols))


def typed(rows, k: int) -> tuple[int, float]:
    cols = common_columns(rows)
    cols["prompt_ids"] = cols["prompt_ids"].cast(pa.list_(pa.uint16()))
    cols["completion_ids"] = cols["completion_ids"].cast(pa.list_(pa.uint16()))
    cols["token_logprobs"] = pa.array([r.token_logprobs.tolist() for r in rows], pa.list_(pa.float32()))
    cols["topk_ids"] = pa.array([r.topk_ids[:, :k].reshape(-1).astype(np.uint16) for r in rows], pa.list_(pa.uint16()))
    f16 = [r.topk_logprobs[:, :k].reshape(-1).astype(np.float16) for r in rows]
    cols["topk_logprobs"] = pa.array(f16, pa.list_(pa.float16()))
    err = max(float(np.abs(a.astype(np.float64) - r.topk_logprobs[:, :k].reshape(-1)).max()) for a, r in zip(f16, rows) if a.size)
    return parquet_bytes(pa.table(cols), compression="zstd", use_dictionary=False), err


def kd_v1(rows, k: int, vocab: int) -> tuple[int, float, float]:
    from kdcore import format as fmt

    cut = [
        fmt.Row(r.id, r.messages, r.prompt, r.prompt_ids, r.completion, r.completion_ids, r.token_logprobs,
                r.topk_ids[:, :k], r.topk_logprobs[:, :k], r.finish_reason)
        for r in rows
    ]
    data = fmt.parquet_bytes(fmt.rows_to_table(cut, vocab, k))
    size = len(data)
    back = fmt.decode_table(pq.read_table(pa.BufferReader(data)), k)
    raw_topk = np.concatenate([r.topk_logprobs for r in cut])
    raw_tok = np.concatenate([r.token_logprobs for r in cut])
    return size, float(np.abs(back.topk_logprobs - raw_topk).max()), float(np.abs(back.token_logprobs - raw_tok).max())


def generate_rows(n_prompts: int, max_new: int, kmax: int):
    from kdcore import format as fmt
    from kdcore.backends import Request, SamplingConfig, request_seed
    from kdcore.backends.vllm_backend import VLLMBackend
    from kdcore.prompts import encode_prompt, load_prompts
    from kdcore.teacher import load_teacher

    teacher = load_teacher("smollm2-135m-instruct", "float32")
    prompts, _ = load_prompts(Path(__file__).resolve().parents[1] / "data" / "train.jsonl", limit=n_prompts)
    ids = [encode_prompt(p, teacher.tokenizer) for p in prompts]
    reqs = [Request(p.content_hash[:24], i, request_seed(0, p.content_hash[:24])) for p, i in zip(prompts, ids)]
    backend = VLLMBackend(teacher.model.path, dtype="float32", k=kmax, max_model_len=max(map(len, ids)) + max_new + 8)
    outs = backend.generate(reqs, SamplingConfig(temperature=0.7, top_p=0.95, top_k=0, max_new_tokens=max_new, k=kmax))
    backend.close()
    rows = [
        fmt.Row(r.row_id, p.messages, p.text, r.prompt_ids, teacher.tokenizer.decode(o.completion_ids, skip_special_tokens=True),
                o.completion_ids, o.token_logprobs, o.topk_ids, o.topk_logprobs, o.finish_reason)
        for r, p, o in zip(reqs, prompts, outs)
    ]
    return rows, teacher.embedding_rows


def save_rows(path: Path, rows, vocab: int) -> None:
    """Cache the generated rows (npz + json; no pickle) so layouts can be compared again cheaply."""
    meta = [{"id": r.id, "messages": r.messages, "prompt": r.prompt, "prompt_ids": list(map(int, r.prompt_ids)),
             "completion": r.completion, "finish_reason": r.finish_reason, "T": len(r.completion_ids)} for r in rows]
    np.savez_compressed(
        path.with_suffix(".npz"),
        completion_ids=np.concatenate([np.asarray(r.completion_ids) for r in rows]),
        token_logprobs=np.concatenate([r.token_logprobs for r in rows]),
        topk_ids=np.concatenate([r.topk_ids for r in rows]),
        topk_logprobs=np.concatenate([r.topk_logprobs for r in rows]),
    )
    path.with_suffix(".json").write_text(json.dumps({"vocab": vocab, "rows": meta}))


def load_rows(path: Path):
    from kdcore import format as fmt

    meta = json.loads(path.with_suffix(".json").read_text())
    arr = np.load(path.with_suffix(".npz"))
    rows, at = [], 0
    for m in meta["rows"]:
        t = m["T"]
        rows.append(fmt.Row(m["id"], m["messages"], m["prompt"], m["prompt_ids"], m["completion"],
                            arr["completion_ids"][at:at + t].tolist(), arr["token_logprobs"][at:at + t],
                            arr["topk_ids"][at:at + t], arr["topk_logprobs"][at:at + t], m["finish_reason"]))
        at += t
    return rows, meta["vocab"]


def codec_variants(rows, vocab: int, k: int = 20) -> dict:
    """Why the shipped settings: top-k columns under each codec, with raw ids vs frequency codes;
    bytes/token of the whole shard and single-thread read+decode speed."""
    import time

    from kdcore import format as fmt

    tokens = sum(len(r.completion_ids) for r in rows)
    cut = [fmt.Row(r.id, r.messages, r.prompt, r.prompt_ids, r.completion, r.completion_ids, r.token_logprobs,
                   r.topk_ids[:, :k], r.topk_logprobs[:, :k], r.finish_reason) for r in rows]
    shipped = fmt.rows_to_table(cut, vocab, k)
    raw_ids = shipped.set_column(
        shipped.schema.get_field_index("topk_ids"), shipped.schema.field("topk_ids"),
        pa.array([r.topk_ids.reshape(-1) for r in cut], shipped.schema.field("topk_ids").type),
    ).replace_schema_metadata({key: v for key, v in shipped.schema.metadata.items() if not key.startswith(b"kd.topk_id_order")})
    # written without the order table, raw ids decode as themselves
    out = {}
    for ids_name, table in (("frequency_codes", shipped), ("raw_ids", raw_ids)):
        for codec, level in (("zstd", 3), ("zstd", 9), ("brotli", 5)):
            opts = dict(fmt.PARQUET_OPTIONS)
            opts["compression"] = {c: (codec if c.startswith(("topk_ids", "topk_logprob_deltas")) else "zstd") for c in opts["compression_level"]}
            opts["compression_level"] = {c: (level if c.startswith(("topk_ids", "topk_logprob_deltas")) else v) for c, v in opts["compression_level"].items()}
            buf = fmt.parquet_bytes(table, opts)
            t0 = time.perf_counter()
            for _ in range(3):
                fmt.decode_table(pq.read_table(pa.BufferReader(buf), use_threads=False), k, text=False)
            rate = 3 * tokens / (time.perf_counter() - t0)
            out[f"{ids_name}+{codec}-{level}"] = {"bytes_per_token": round(len(buf) / tokens, 2), "read_decode_tokens_per_s_1thread": round(rate)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rows-cache", type=Path, default=None, help="save generated rows here, or reuse them if present")
    args = ap.parse_args()
    if args.rows_cache and args.rows_cache.with_suffix(".json").exists():
        rows, vocab = load_rows(args.rows_cache)
    else:
        rows, vocab = generate_rows(args.prompts, args.max_new_tokens, 64)
        if args.rows_cache:
            save_rows(args.rows_cache, rows, vocab)
    tokens = sum(len(r.completion_ids) for r in rows)
    figures = {}
    for k in (5, 20, 64):
        naive = naive_bytes(rows, k)
        typed_size, f16_err = typed(rows, k)
        kd_size, kd_err, kd_tok_err = kd_v1(rows, k, vocab)
        figures[f"k={k}"] = {
            "naive_bytes_per_token": round(naive / tokens, 2),
            "typed_uint16_float16_zstd_bytes_per_token": round(typed_size / tokens, 2),
            "typed_float16_max_logprob_error": round(f16_err, 5),
            "kd_v1_bytes_per_token": round(kd_size / tokens, 2),
            "kd_v1_max_topk_logprob_error": round(kd_err, 6),
            "kd_v1_max_token_logprob_error": round(kd_tok_err, 6),
            "kd_v1_over_naive": round(kd_size / naive, 3),
        }
    figures["k=20 codec variants"] = codec_variants(rows, vocab)
    result = {
        "name": "storage",
        "setup": {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "rows": len(rows), "completion_tokens": tokens,
                  "teacher": "smollm2-135m-instruct (float32, vLLM)", "sampling": "T=0.7 top_p=0.95"},
        "figures": figures,
        "targets": {"k=20 kd_v1_bytes_per_token": "<= 60", "max log-prob error": "<= 1e-3 nats"},
        "machine": machine(),
        "command": " ".join(sys.argv),
    }
    write_result("storage", result)
    print(json.dumps(figures, indent=2))
    print(f"-> {results_path('storage')}")


if __name__ == "__main__":
    main()
