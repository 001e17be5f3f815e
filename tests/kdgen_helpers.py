"""Helpers shared by the kdgen tests (tests/test_kdgen_*.py): prompt files, fast configs for the
tiny model, running the `kdgen` console script, and the checks every writer's output must pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

import kdcore.dataset as kds
from kdgen.config import GenerateConfig
from kdcore.verify import check_table, verify

KDGEN = str(Path(sys.executable).parent / "kdgen")  # the console script of this virtualenv
# Tiny models run on one thread: their ops are too small to share, and on a busy 2-core machine a
# second OpenMP thread spin-waits (measured: 1.6 s vs 7-30 s for one generate run). Subprocesses
# get the same setting, so in-process and CLI runs compute the same numbers.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# A fixed vLLM CPU KV cache for the tiny models (ample: a few KB per token). The default sizing,
# a fraction of the NUMA node's memory minus the process's RSS, depends on the machine: a 0.05
# fraction worked where node 0 held all 24 GiB and failed ("requested memory for kv (-0.37 GiB)")
# on a box of the same size whose node 0 reports 12 GiB.
TINY_KV_BYTES = 64 * 2**20
TINY_KV_ARG = f"kv_cache_memory_bytes={TINY_KV_BYTES}"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Autouse in every module that imports it: torch on one thread, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# Six chat prompts: one with a system message, one multi-turn, one non-ASCII.
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "List two prime numbers."}]},
    {"messages": [{"role": "system", "content": "Reply in one sentence."}, {"role": "user", "content": "What does a compiler do?"}]},
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a fun fact."}]},
    {"messages": [{"role": "user", "content": "Übersetze ins Englische: „Guten Morgen“ ☀"}]},
    {"messages": [{"role": "user", "content": "Sort these words: pear, apple, fig."}]},
    {"messages": [{"role": "user", "content": "How many legs does a spider have?"}]},
]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def tiny_config(prompts: str, out: str, teacher: str, **overrides) -> GenerateConfig:
    """A fast generate config for the tiny model: hf backend, 8 new tokens, k=8, 2 prompts per
    shard (so six prompts make three shards), sampling at the default temperature, n=2."""
    cfg = GenerateConfig(
        prompts=prompts, out=out, teacher=teacher, backend="hf", max_new_tokens=8, k=8, n=2, shard_prompts=2, batch_size=4
    )
    return replace(cfg, **overrides)


def kdgen_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `kdgen` console script (environment inherited: KD_QUIET, offline hub; one thread)."""
    return subprocess.run([KDGEN, *args], capture_output=True, text=True, timeout=timeout, env=ONE_THREAD_ENV)


def assert_valid(url: str) -> dict:
    """The dataset passes `kdgen verify` (checksums + invariants) and every shard keeps the
    contract's invariants under `check_table`. Returns the manifest."""
    manifest, problems = verify(url)
    assert problems == [], problems
    ds = kds.TeacherDataset(url)
    for path in ds.shard_paths():
        import pyarrow.parquet as pq

        table = pq.read_table(path, filesystem=ds.fs)
        assert check_table(table, ds.k, ds.vocab_size) == [], path
    return manifest


def rows_of(url: str) -> list[dict]:
    """All rows of a dataset as plain Python, in shard order: the input as given, and the decoded
    token arrays (top-k ids and log-probs as [T][k] lists) — what two runs must agree on."""
    ds = kds.TeacherDataset(url)
    given = ds.read_table(columns=["id", "messages", "prompt", "completion", "finish_reason"]).to_pylist()
    decoded = [b.row(i) for b in ds.iter_batches() for i in range(b.num_rows)]
    assert [g["id"] for g in given] == [d["id"] for d in decoded]
    arrays = ("prompt_ids", "completion_ids", "token_logprobs", "topk_ids", "topk_logprobs")
    return [{**g, **{name: d[name].tolist() for name in arrays}} for g, d in zip(given, decoded)]


def complete_looking(root: Path) -> list[str]:
    """Files under `root` that would make a dataset look (partly) complete."""
    if not root.exists():
        return []
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name in (kds.MANIFEST, kds.CARD) or kds.SHARD_RE.match(p.name)
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def comparable_positions(gen_ids: list[int], other_ids: list[int]) -> int:
    """How many leading positions of two completions of the same prompt see the same context:
    position t's distribution depends only on the prompt and tokens < t, so all positions up to
    and including the first disagreement are comparable."""
    return min(common_prefix(gen_ids, other_ids) + 1, len(gen_ids), len(other_ids))


def assert_topk_close(ids_a, lp_a, ids_b, lp_b, atol: float, rtol: float = 0.0) -> None:
    """Two engines' top-k [T, k] agree: log-probs rank by rank within `atol + rtol * |lp|`, and
    every token clearly inside one top-k (more than that above its k-th entry) is in the other with
    the same log-prob. Tokens tied within the tolerance may come in either order or drop out at the
    k-th place."""
    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    lp_a, lp_b = np.asarray(lp_a, np.float64), np.asarray(lp_b, np.float64)
    assert lp_a.shape == lp_b.shape == ids_a.shape == ids_b.shape
    np.testing.assert_allclose(lp_a, lp_b, atol=atol, rtol=rtol)
    for t in range(len(lp_a)):
        a, b = dict(zip(ids_a[t].tolist(), lp_a[t])), dict(zip(ids_b[t].tolist(), lp_b[t]))
        kth = min(lp_a[t, -1], lp_b[t, -1])
        floor = max(lp_a[t, -1], lp_b[t, -1]) + atol + rtol * abs(kth)
        for one, other in ((a, b), (b, a)):
            for token, lp in one.items():
                if lp > floor:
                    assert token in other and abs(other[token] - lp) <= atol + rtol * abs(lp), (t, token, lp, other)


# Runs several `kdgen` jobs in one interpreter with one vLLM engine per model; prints their URLs.
SHARED_ENGINE_RUNS = r"""
import json, sys
import kdgen.generate as gen

engines, real = {}, gen.make_backend

def shared(name, path, dtype, k, max_model_len, options, *rest):
    key = (name, path, dtype, k, *rest)
    if key not in engines:
        engines[key] = real(name, path, dtype, k, 1024, options, *rest)
        engines[key].close = lambda: None
    return engines[key]

gen.make_backend = shared
urls = [gen.run(gen.GenerateConfig(**cfg), kind) for kind, cfg in json.loads(sys.argv[1])]
print(json.dumps(urls))
"""


def run_with_vllm(jobs: list[tuple[str, GenerateConfig]]) -> list[str]:
    arg = json.dumps([(kind, asdict(cfg)) for kind, cfg in jobs])
    proc = subprocess.run([sys.executable, "-c", SHARED_ENGINE_RUNS, arg], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decoded_rows(url: str) -> dict[str, dict]:
    return {b.ids[i]: b.row(i) for b in kds.TeacherDataset(url).iter_batches() for i in range(b.num_rows)}
