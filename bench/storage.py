"""Storage benchmark: bytes per completion token and precision of the teacher-dataset format v2,
beside v1 and a naive layout, on the same real teacher rows; plus the v2 layout choices.

    python bench/storage.py --prompts 96 --max-new-tokens 192 [--rows-cache PATH]

The embedded teacher generates once through vLLM with k=64 (kdgen's settings: T=0.7, top_p=0.95);
the engine's float32 outputs stay in memory (or in --rows-cache) and are written as:
  naive  — nested list<list<int32>> ids + list<list<float32>> log-probs, float32 token log-probs,
           pyarrow defaults (snappy);
  kd-v1  — the v1 codec (frequency-coded ids, quantised delta-coded log-probs; read from this
           repository's git history at V1_COMMIT, since kd no longer writes v1);
  kd-v2  — kdcore.codec as shipped (plain token ids and float32 log-probs, docs/FORMAT.md).
Every layout holds the same other columns (id, messages, prompt ids, text, finish reason).
At k=20 it also measures the v2 layout alternatives (float16 vs float32 and mantissa bits,
nested vs flat top-k, id encodings, zstd levels), each with Parquet's own encodings only, and
checks every layout against the contract's precision (issue 12): each stored log-prob within
max(1e-3, 1e-3*|lp|) of the engine's float32, the tail mass within 1% relative wherever it is
>= 1e-7, and the reproducer (teacher log([0.9997, 0.0002]) stored and read back, rkl bucket loss
at T=2 against itself) < 1e-4. Reading speed: shard bytes -> training arrays, one thread.
Writes bench/results/storage.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("KD_QUIET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import ROOT, machine, results_path, write_result  # noqa: E402
from kdcore import codec  # noqa: E402

V1_COMMIT = "05ba31a"  # the last commit whose kdcore/format.py wrote v1


# ----------------------------------------------------------------------------------------------
# Rows: the engine's values


def cut(rows, k: int) -> list[codec.Row]:
    return [replace(r, topk_ids=r.topk_ids[:, :k], topk_logprobs=r.topk_logprobs[:, :k]) for r in rows]


def engine_values(rows) -> dict:
    """Concatenated engine float32 values and the exact tail mass (float64) per position."""
    topk = np.concatenate([r.topk_logprobs for r in rows])
    return {
        "topk": topk,
        "token": np.concatenate([codec.checked_token_logprobs(r) for r in rows]),
        "tail_mass": np.exp(codec.tail_logprobs(topk)),
    }


def precision(back_topk: np.ndarray, back_token: np.ndarray, back_tail_mass: np.ndarray, ref: dict) -> dict:
    """The contract's precision checks of read-back values against the engine's."""
    def worst(back, want):
        want = want.astype(np.float64)
        both_inf = np.isneginf(back) & np.isneginf(want)
        err = np.where(both_inf, 0.0, np.abs(back.astype(np.float64) - want))
        return float((err / np.maximum(1e-3, 1e-3 * np.abs(want))).max())  # <= 1 meets the contract

    derived = np.clip(1.0 - np.exp(back_topk.astype(np.float64)).sum(1), 0.0, 1.0)  # what 1 - sum(p) gives
    big = ref["tail_mass"] >= 1e-7

    def tail_err(mass):
        return float((np.abs(mass[big] - ref["tail_mass"][big]) / ref["tail_mass"][big]).max()) if big.any() else 0.0

    return {
        "logprob_error_over_budget": round(max(worst(back_topk, ref["topk"]), worst(back_token, ref["token"])), 4),
        "tail_rel_error_max": round(tail_err(back_tail_mass), 6),
        "tail_rel_error_max_from_1_minus_sum": round(tail_err(derived), 6),
        "positions_tail_le_1e-9": round(float((back_tail_mass <= 1e-9).mean()), 4),
        "positions_tail_le_1e-9_from_1_minus_sum": round(float((derived <= 1e-9).mean()), 4),
        "positions_top1_exactly_0": round(float((back_topk[:, 0] == 0).mean()), 4),
    }


def reproducer(write_read) -> float:
    """Issue 12's reproducer: teacher log([[0.9997, 0.0002]]) stored, read back, and compared with
    itself (sparse rkl, tail bucket, T=2): 0 for a lossless format; v1 gave 0.231."""
    import torch

    from kdcore.divergences import SparseKD, sparse_kd_per_token

    teacher = np.log(np.array([[0.9997, 0.0002]], np.float32))
    decoded = write_read(teacher)
    loss = sparse_kd_per_token(torch.tensor(teacher, dtype=torch.float64), torch.tensor(decoded, dtype=torch.float64), SparseKD("rkl", "bucket", 2.0))
    return float(loss.abs().max())


def self_loss(back_topk: np.ndarray, back_tail_mass: np.ndarray, ref: dict) -> dict:
    """The issue's framing on every real position: a student equal to the teacher (the engine's
    values) against the stored teacher, rkl over the top-k + tail bucket at T=2 (0 = lossless):
    with the tail derived from the top-k as kdcore.divergences does today, and with the stored tail."""
    import torch
    import torch.nn.functional as F

    from kdcore.divergences import TAIL_FLOOR, SparseKD, divergence, sparse_kd_per_token

    spec = SparseKD("rkl", "bucket", 2.0)
    derived = sparse_kd_per_token(torch.tensor(ref["topk"], dtype=torch.float64), torch.tensor(back_topk, dtype=torch.float64), spec)

    def buckets(topk, tail_mass):
        x = torch.cat([torch.tensor(topk, dtype=torch.float64), torch.tensor(np.log(np.maximum(tail_mass, TAIL_FLOOR)))[:, None]], 1)
        return F.log_softmax(x / spec.temperature, -1).clamp(min=-1e4)

    stored = divergence(buckets(back_topk, back_tail_mass), buckets(ref["topk"], ref["tail_mass"]), spec.loss) * spec.temperature**2
    return {
        "self_loss_rkl_T2_derived_tail_max": float(f"{derived.max().item():.3g}"),
        "self_loss_rkl_T2_derived_tail_mean": float(f"{derived.mean().item():.3g}"),
        "self_loss_rkl_T2_stored_tail_max": float(f"{stored.max().item():.3g}"),
        "self_loss_rkl_T2_stored_tail_mean": float(f"{stored.mean().item():.3g}"),
    }


def one_row(topk_lp: np.ndarray) -> list[codec.Row]:
    t, k = topk_lp.shape
    ids = np.tile(np.arange(k), (t, 1))
    return [codec.Row("r", None, "p", [1], "c", ids[:, 0].tolist(), topk_lp[:, 0].copy(), ids, topk_lp, "stop")]


# ----------------------------------------------------------------------------------------------
# Layouts


def options(schema: pa.Schema, topk_level: int = 9, bss: tuple[str, ...] = (), dictionary: tuple[str, ...] = ()) -> dict:
    """Parquet options in the shape of `codec.PARQUET_OPTIONS` for a variant schema: BYTE_STREAM_SPLIT
    on the named columns' values, zstd `topk_level` on the top-k columns, 3 elsewhere."""
    leaves = {f.name: codec.leaf_paths(f) for f in schema}
    return dict(
        compression="zstd",
        compression_level={leaf: (topk_level if name.startswith("topk_") else 3) for name, ls in leaves.items() for leaf in ls},
        use_dictionary=["id", "finish_reason", *[leaf for name in dictionary for leaf in leaves[name]]],
        column_encoding={leaf: "BYTE_STREAM_SPLIT" for name in bss for leaf in leaves[name]},
        write_statistics=["id"],
        store_schema=False,
        data_page_size=1 << 20,
    )


def common_columns(rows) -> dict:
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return {
        "id": pa.array([r.id for r in rows]),
        "messages": pa.array([r.messages for r in rows], pa.list_(message)),
        "prompt": pa.array([r.prompt for r in rows], pa.string()),
        "prompt_ids": pa.array([list(map(int, r.prompt_ids)) for r in rows], pa.list_(pa.int32())),
        "completion": pa.array([r.completion for r in rows]),
        "completion_ids": pa.array([list(map(int, r.completion_ids)) for r in rows], pa.list_(pa.int32())),
        "finish_reason": pa.array([r.finish_reason for r in rows]),
    }


def naive(rows) -> tuple[bytes, dict]:
    cols = common_columns(rows)
    cols["token_logprobs"] = pa.array([r.token_logprobs.tolist() for r in rows], pa.list_(pa.float32()))
    cols["topk_ids"] = pa.array([r.topk_ids.tolist() for r in rows], pa.list_(pa.list_(pa.int32())))
    cols["topk_logprobs"] = pa.array([r.topk_logprobs.tolist() for r in rows], pa.list_(pa.list_(pa.float32())))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), sink)
    return sink.getvalue().to_pybytes(), {}


def v2_variant(rows, vocab: int, k: int, float_type: str = "float32", bits: int = codec.LOGPROB_MANTISSA_BITS,
               nested: bool = True, ids_encoding: str = "bss", topk_level: int = 9, float_bss: bool = True, tail_bits: int = codec.TAIL_MANTISSA_BITS) -> bytes:
    """The shipped v2 table with its log-prob / top-k columns laid out another way."""
    table = codec.rows_to_table(rows, vocab, k)
    ids_t = codec.id_type(vocab)

    def lp(values: list[np.ndarray]) -> list[np.ndarray]:
        return [v.astype(np.float16) if float_type == "float16" else codec.round_logprobs(v, bits) for v in values]

    ftype = pa.float16() if float_type == "float16" else pa.float32()
    topk_lp = lp([r.topk_logprobs for r in rows])
    topk_ids = [r.topk_ids.astype(np.uint16 if ids_t == pa.uint16() else np.uint32) for r in rows]

    def col(values: list[np.ndarray], t: pa.DataType):
        if nested:
            return pa.array([list(v) for v in values], pa.list_(pa.list_(t)))
        return pa.array([v.reshape(-1) for v in values], pa.list_(t))

    swaps = {
        "topk_ids": col(topk_ids, ids_t),
        "topk_logprobs": col(topk_lp, ftype),
        "token_logprobs": pa.array(lp([codec.checked_token_logprobs(r) for r in rows]), pa.list_(ftype)),
        "tail_logprobs": pa.array([codec.round_logprobs(codec.tail_logprobs(r.topk_logprobs), tail_bits) for r in rows], pa.list_(pa.float32())),
    }
    for name, arr in swaps.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, pa.field(name, arr.type, nullable=False), arr)
    floats = ("topk_logprobs", "token_logprobs") if float_bss else ()
    bss = ("prompt_ids", "completion_ids", "tail_logprobs", *floats, *(("topk_ids",) if ids_encoding == "bss" else ()))
    opts = options(table.schema, topk_level, bss, ("topk_ids",) if ids_encoding == "dictionary" else ())
    return codec.parquet_bytes(table, opts)


def load_v1_codec():
    """kdcore/format.py as of V1_COMMIT (the v1 writer), or None without the git history."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{V1_COMMIT}:kdcore/format.py"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("kd_format_v1", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(src, f"{V1_COMMIT}:kdcore/format.py", "exec"), module.__dict__)
    return module


def read_back(data: bytes, k: int) -> codec.Batch:
    """Shard bytes -> training arrays, as kd's reader does (text columns skipped, one thread)."""
    pf = pq.ParquetFile(pa.BufferReader(data))
    version = codec.table_version(pf.schema_arrow.metadata)
    table = pf.read(columns=codec.text_free_columns(version), use_threads=False)
    return codec.decode_any(table, k, text=False, id_dtype=np.int32, metadata=pf.schema_arrow.metadata)


def cpu_seconds(fn, repeats: int = 5) -> float:
    """Best CPU time (this process, one thread) of `fn()`: steadier than wall time on a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def read_speed(data: bytes, k: int, tokens: int) -> int:
    """Tokens per CPU-second, shard bytes -> training arrays."""
    return round(tokens / cpu_seconds(lambda: read_back(data, k)))


def column_bytes(data: bytes, tokens: int) -> dict:
    """Compressed bytes per token of each column (summed over its leaves and row groups)."""
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    out: dict[str, float] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            name = col.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0) + col.total_compressed_size
    return {name: round(n / tokens, 2) for name, n in out.items()}


def measure(rows, vocab: int, k: int, v1) -> dict:
    rows = cut(rows, k)
    tokens = sum(len(r.completion_ids) for r in rows)
    ref = engine_values(rows)
    out = {}
    data, _ = naive(rows)
    t = pq.read_table(pa.BufferReader(data))
    ntopk = t["topk_logprobs"].combine_chunks().flatten().flatten().to_numpy().reshape(-1, k)
    out["naive"] = {"bytes_per_token": round(len(data) / tokens, 2), **precision(ntopk, ref["token"], np.clip(1 - np.exp(ntopk.astype(np.float64)).sum(1), 0, 1), ref)}
    if v1 is not None:
        data = v1.parquet_bytes(v1.rows_to_table(rows, vocab, k))
        b = read_back(data, k)
        out["kd_v1"] = {"bytes_per_token": round(len(data) / tokens, 2), **precision(b.topk_logprobs, b.token_logprobs, b.tail_mass(), ref), **self_loss(b.topk_logprobs, b.tail_mass(), ref),
                        "read_tokens_per_cpu_s_1thread": read_speed(data, k, tokens), "column_bytes_per_token": column_bytes(data, tokens)}
    data = codec.parquet_bytes(codec.rows_to_table(rows, vocab, k))
    b = read_back(data, k)
    out["kd_v2"] = {"bytes_per_token": round(len(data) / tokens, 2), **precision(b.topk_logprobs, b.token_logprobs, b.tail_mass(), ref), **self_loss(b.topk_logprobs, b.tail_mass(), ref),
                    "read_tokens_per_cpu_s_1thread": read_speed(data, k, tokens), "column_bytes_per_token": column_bytes(data, tokens)}
    return out


def layout_variants(rows, vocab: int, k: int = 20) -> dict:
    """Why the shipped v2 layout: each alternative's bytes/token and contract check (k=20)."""
    rows = cut(rows, k)
    tokens = sum(len(r.completion_ids) for r in rows)
    ref = engine_values(rows)
    variants = {
        "shipped: float32 10-bit mantissa (tail 12-bit), nested, BSS, zstd-9": {},
        "float32 full precision": {"bits": 23},
        "float32 12-bit mantissa": {"bits": 12},
        "float32 11-bit mantissa": {"bits": 11},
        "float32 9-bit mantissa": {"bits": 9},
        "float32 10-bit, no BSS on floats": {"float_bss": False},
        "float16 (no BSS: DuckDB refuses BSS on float16)": {"float_type": "float16", "float_bss": False},
        "float16 + BSS (unreadable by DuckDB 1.x-2.0)": {"float_type": "float16"},
        "flat T*k lists instead of nested": {"nested": False},
        "tail_logprobs full float32": {"tail_bits": 23},
        "ids plain (no BSS)": {"ids_encoding": "plain"},
        "ids dictionary": {"ids_encoding": "dictionary"},
        "zstd-3 on top-k": {"topk_level": 3},
        "zstd-15 on top-k": {"topk_level": 15},
        "zstd-19 on top-k": {"topk_level": 19},
    }
    out = {}
    for name, kw in variants.items():
        data = v2_variant(rows, vocab, k, **kw)
        write_s = cpu_seconds(lambda: v2_variant(rows, vocab, k, **kw), repeats=1)
        t = pq.read_table(pa.BufferReader(data))
        topk = t["topk_logprobs"].combine_chunks().flatten()
        topk = (topk.flatten() if pa.types.is_list(topk.type) else topk).to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, k)
        token = t["token_logprobs"].combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        tail = np.exp(t["tail_logprobs"].combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float64))
        out[name] = {"bytes_per_token": round(len(data) / tokens, 2), "write_tokens_per_cpu_s": round(tokens / write_s), **precision(topk, token, tail, ref)}
    return out


def v2_write_read(topk_lp: np.ndarray) -> np.ndarray:
    rows = one_row(topk_lp.astype(np.float32))
    return read_back(codec.parquet_bytes(codec.rows_to_table(rows, 64, topk_lp.shape[1])), topk_lp.shape[1]).topk_logprobs


# ----------------------------------------------------------------------------------------------
# Generating the rows (once)


def generate_rows(n_prompts: int, max_new: int, kmax: int):
    from kdcore import codec
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
        codec.Row(r.row_id, p.messages, p.text, r.prompt_ids, teacher.tokenizer.decode(o.completion_ids, skip_special_tokens=True),
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
    from kdcore import codec

    meta = json.loads(path.with_suffix(".json").read_text())
    arr = np.load(path.with_suffix(".npz"))
    rows, at = [], 0
    for m in meta["rows"]:
        t = m["T"]
        rows.append(codec.Row(m["id"], m["messages"], m["prompt"], m["prompt_ids"], m["completion"],
                            arr["completion_ids"][at:at + t].tolist(), arr["token_logprobs"][at:at + t],
                            arr["topk_ids"][at:at + t], arr["topk_logprobs"][at:at + t], m["finish_reason"]))
        at += t
    return rows, meta["vocab"]


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
    v1 = load_v1_codec()
    figures = {f"k={k}": measure(rows, vocab, k, v1) for k in (5, 20, 64)}
    figures["k=20 v2 layout variants"] = layout_variants(rows, vocab)

    def v1_write_read(topk_lp):
        one = one_row(topk_lp.astype(np.float32))
        return read_back(v1.parquet_bytes(v1.rows_to_table(one, 64, topk_lp.shape[1])), topk_lp.shape[1]).topk_logprobs

    figures["reproducer loss (0 = lossless)"] = {"kd_v2": reproducer(v2_write_read), **({"kd_v1": reproducer(v1_write_read)} if v1 else {})}
    result = {
        "name": "storage",
        "setup": {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "rows": len(rows), "completion_tokens": tokens,
                  "teacher": "smollm2-135m-instruct (float32, vLLM)", "sampling": "T=0.7 top_p=0.95", "v1": f"kdcore/format.py at {V1_COMMIT}" if v1 else "git history absent: not measured"},
        "figures": figures,
        "targets": {"k=20 kd_v2 bytes_per_token": "<= 72 (stretch <= 60)", "logprob_error_over_budget": "<= 1 (max(1e-3, 1e-3*|lp|))",
                    "tail_rel_error_max": "<= 0.01 where tail >= 1e-7", "reproducer": "< 1e-4", "read_tokens_per_cpu_s_1thread": ">= 1e6"},
        "machine": machine(),
        "command": " ".join(sys.argv),
    }
    write_result("storage", result)
    print(json.dumps(figures, indent=2))
    print(f"-> {results_path('storage')}")


if __name__ == "__main__":
    main()
