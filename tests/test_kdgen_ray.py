"""`kdgen generate --ray ADDRESS --replicas N` on a real two-node Ray cluster on loopback (issue 13),
marked slow.

The module starts one cluster (`ray.cluster_utils.Cluster`: a head and a second node, one CPU
each, on this machine). Two vLLM replicas (tiny model, CPU) write the shards; one replica's process is
SIGKILLed while it holds a shard's claim; the shard goes to another replica and the dataset equals
the in-process engine's row for row. A rerun of the same command skips the committed dataset.
The hf backend runs on the same cluster as well (Ray places any backend).

    .venv/bin/python -m pytest -q -m slow tests/test_kdgen_ray.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import kdcore.dataset as kds
import kdcore.io as kio
from kdgen.config import GenerateConfig
from kdgen_helpers import ONE_THREAD_ENV, TINY_KV_ARG, assert_valid, rows_of, write_jsonl
from kdgen_helpers import run_with_vllm

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # both nodes on this machine's own address (pinning 127.0.0.1 left the GCS advertised on the
    # interface address, where a driver in another process could not reach it)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    yield c
    c.shutdown()


def kdgen(*args: str, timeout: float = 900) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kdgen", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD_ENV
    )


def args_of(cfg: GenerateConfig, address: str) -> list[str]:
    return [
        "generate", "--prompts", cfg.prompts, "--out", cfg.out, "--teacher", cfg.teacher, "--backend", cfg.backend,
        "--temperature", "0", "--max-new-tokens", str(cfg.max_new_tokens), "--k", str(cfg.k),
        "--shard-prompts", str(cfg.shard_prompts), "--ray", address, "--replicas", "2",
    ] + (["--engine-arg", TINY_KV_ARG] if cfg.backend == "vllm" else [])  # fmt: skip


def prompts_file(tmp: Path) -> str:
    return write_jsonl(tmp / "prompts.jsonl", [{"prompt": f"Story {i}: once upon a time"} for i in range(12)])


def held_claims(dataset: Path) -> list[int]:
    """pids of the processes holding shard claims now."""
    pids = []
    for lock in (dataset / ".kdgen-locks").glob("train-*.lock"):
        try:
            pid = json.loads(lock.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            continue
        try:
            os.kill(pid, 0)
            pids.append(pid)
        except ProcessLookupError:
            pass
    return pids


def test_ray_replica_killed_mid_shard_dataset_equals_in_process(cluster, tiny_model_dir, tmp_path):
    cfg = GenerateConfig(
        prompts=prompts_file(tmp_path), out=str(tmp_path / "local"), teacher=tiny_model_dir, backend="vllm", dtype="float32",
        temperature=0.0, max_new_tokens=16, k=8, shard_prompts=1, engine_arg=[TINY_KV_ARG],
    )  # fmt: skip
    (local,) = run_with_vllm([("generate", cfg)])
    on_ray = replace(cfg, out=str(tmp_path / "ray"))
    dataset = Path(on_ray.out) / Path(local).name  # the same key: layout is not in the fingerprint
    proc = kdgen(*args_of(on_ray, cluster.address))
    t0, killed = time.time(), None
    while killed is None:  # once a shard is written, SIGKILL a replica that holds another one
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < 600, "no shard written in 10 minutes"
        if kds.list_shards(kio.open_fs(str(dataset))[0], str(dataset)) and (pids := held_claims(dataset)):
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert "died writing" in err, err[-2000:]
    assert out.strip() == str(dataset)
    assert rows_of(str(dataset)) == rows_of(local)  # row for row, in shard order
    m = assert_valid(str(dataset))
    assert m["config"]["ray"] == cluster.address and m["config"]["replicas"] == 2 and len(m["shards"]) == 12
    # a rerun skips the committed dataset without starting any replica
    again = kdgen(*args_of(on_ray, cluster.address))
    out2, err2 = again.communicate(timeout=300)
    assert again.returncode == 0 and out2.strip() == str(dataset) and "cache hit" in err2, err2[-2000:]


def test_ray_with_the_hf_backend_equals_in_process(cluster, tiny_model_dir, tmp_path):
    import kdgen.generate as gen

    cfg = GenerateConfig(
        prompts=prompts_file(tmp_path), out=str(tmp_path / "local"), teacher=tiny_model_dir, backend="hf",
        temperature=0.0, max_new_tokens=8, k=8, shard_prompts=3,
    )  # fmt: skip
    local = gen.run(cfg)
    proc = kdgen(*args_of(replace(cfg, out=str(tmp_path / "ray")), cluster.address))
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert rows_of(out.strip()) == rows_of(local)
    assert Path(out.strip()).name == Path(local).name
