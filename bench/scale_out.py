"""Scale-out (issue 13): the served teacher against the in-process engine, Ray's overhead per shard,
and one against two Ray replicas.

    python bench/scale_out.py --model tiny --prompts 32 --max-new-tokens 64      # small preset (CPU)
    python bench/scale_out.py --model teacher --prompts 512 --max-new-tokens 256  # gpu preset

1. In-process vs server: the same greedy `kdgen generate` with `--backend vllm` and with
   `--backend server` against a `vllm serve` started here with the flags README "Scaling out" gives.
   Compared: the manifest's engine throughput (tokens over the time spent inside the backend's
   generate calls; engine start excluded) and the whole command's wall time. Ratio server/in-process.
2. Ray overhead per shard, with no model in the way: a no-op task on a pool of Ray core actors fed
   one shard at a time by the same driver loop as kdgen/ray_runner.py, and the same no-op as a Ray
   Data `map_batches` actor stage over one block per shard (the alternative ray_runner.py rejects).
3. One vs two replicas: `kdgen generate --ray ADDRESS --replicas 1|2` on a local Ray cluster started
   here (one node, two CPUs): wall time and engine throughput. On a 2-core machine two engines
   share the cores that one engine already uses, so the ratio is capped near 1; on a GPU box each
   replica brings its own GPU.

Every kdgen run is a fresh `python -m kdgen` process of this checkout. The 1-minute load average is
recorded with each figure: the machine may be shared. Writes bench/results/scale_out.json (`--only
PART` re-runs one part and keeps the others' figures; run `replicas` in a process of its own: a
Ray cluster started after this process's own `ray.init` refused its drivers' auth token).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("KD_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine, results_path, scratch, tiny_model, write_result  # noqa: E402

TEACHER = "smollm2-135m-instruct"
CPU_KV_BYTES = 2**30  # on CPU: a fixed 1 GiB KV cache per engine (~23,000 tokens of the teacher in float32)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def kdgen(*args: str) -> dict:
    """One `python -m kdgen generate` run: wall time, its manifest's engine figures, the load."""
    la, t = load1(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kdgen", "generate", *args], capture_output=True, text=True, cwd=ROOT, env=ENV)
    wall = time.perf_counter() - t
    if done.returncode:
        sys.exit(f"kdgen failed: {' '.join(args)}\n{done.stderr[-3000:]}")
    m = json.loads((Path(done.stdout.strip()) / "manifest.json").read_text())
    return {
        "wall_s": round(wall, 2),
        "generation_time_s": m["generation_time_s"],
        "tokens": m["totals"]["tokens"],
        "tokens_per_s": m["tokens_per_s"],
        "load1_before": la,
    }


def serve(model: str, k: int, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--max-logprobs", str(k), "--logprobs-mode", "raw_logprobs", "--generation-config", "vllm", "--disable-log-stats",
    ]  # fmt: skip
    if not _gpu():
        args += ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(CPU_KV_BYTES), "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192"]
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            sys.exit(f"vllm serve exited:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(1)


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class _Noop:
    def write(self, i):
        return i

    def __call__(self, batch):
        return batch


def ray_overhead(shards: int) -> dict:
    """Seconds per shard of Ray core (actor pool, one shard per call) and of a Ray Data actor stage."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        pool = [ray.remote(num_cpus=1)(_Noop).remote() for _ in range(2)]
        ray.get([a.write.remote(-1) for a in pool])  # actors up
        t = time.perf_counter()
        running, queue = {}, list(range(shards))
        while queue or running:
            busy = set(running.values())
            for a in range(len(pool)):
                if a not in busy and queue:
                    running[pool[a].write.remote(queue.pop())] = a
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                ray.get(ref)
                running.pop(ref)
        core = (time.perf_counter() - t) / shards
        t = time.perf_counter()
        ray.data.range(shards, override_num_blocks=shards).map_batches(_Noop, concurrency=2, batch_size=None).materialize()
        data = (time.perf_counter() - t) / shards
    finally:
        ray.shutdown()
    return {"shards": shards, "ray_core_s_per_shard": round(core, 5), "ray_data_s_per_shard": round(data, 5), "load1": load1()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("tiny", "teacher"), default="tiny")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--shard-prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--only", choices=("server", "overhead", "replicas"), action="append")
    a = ap.parse_args()
    if not a.only:  # each part in a process of its own (see the module docstring)
        for part in ("server", "overhead", "replicas"):
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", part], check=True)
        return
    parts = a.only
    if "replicas" in parts and "overhead" in parts:
        sys.exit("run --only replicas in a process of its own (see the module docstring)")
    work = scratch("kd-scale-out-")
    from transformers import AutoTokenizer

    from kdcore.models import resolve

    teacher = resolve(TEACHER).path
    model = tiny_model(AutoTokenizer.from_pretrained(teacher)) if a.model == "tiny" else teacher
    prompts = [json.loads(line) for line in (ROOT / "data" / "train.jsonl").read_text().splitlines()[: a.prompts]]
    pfile = work / "prompts.jsonl"
    pfile.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    common = ["--prompts", str(pfile), "--teacher", model, "--temperature", "0", "--max-new-tokens", str(a.max_new_tokens),
              "--k", str(a.k), "--shard-prompts", str(a.shard_prompts)]  # fmt: skip
    # on CPU every engine (in-process, served, each Ray replica) gets the same fixed KV cache: vLLM's
    # default sizing is a fraction of the NUMA node's memory minus the process's RSS (docs/VLLM.md)
    cpu_kv = [] if _gpu() else ["--engine-arg", f"kv_cache_memory_bytes={CPU_KV_BYTES}"]
    result = {"machine": machine(), "model": a.model, "prompts": a.prompts, "max_new_tokens": a.max_new_tokens, "k": a.k, "load1_start": load1()}
    if "server" in parts:
        local = kdgen(*common, "--backend", "vllm", *cpu_kv, "--out", str(work / "local"))
        proc, url = serve(model, a.k, work / "server.log")
        try:
            served = kdgen(*common, "--backend", "server", "--server-url", url, "--out", str(work / "served"))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the API server and its engine-core process
            proc.wait(timeout=60)
        result["in_process_vs_server"] = {
            "in_process": local,
            "server": served,
            "throughput_ratio_server_over_in_process": round(served["tokens_per_s"] / local["tokens_per_s"], 3),
        }
    if "overhead" in parts:
        result["ray_overhead"] = ray_overhead(max(32, a.prompts // a.shard_prompts))
    if "replicas" in parts:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        try:
            runs = {}
            for n in (1, 2):
                runs[n] = kdgen(*common, "--backend", "vllm", *cpu_kv, "--ray", cluster.address, "--replicas", str(n), "--out", str(work / f"ray-{n}"))
        finally:
            cluster.shutdown()
        result["ray_replicas"] = {
            "one": runs[1],
            "two": runs[2],
            "wall_ratio_one_over_two": round(runs[1]["wall_s"] / runs[2]["wall_s"], 3),
            "note": "two engines share the cores one engine uses on a CPU-only box: the speed-up is capped near 1 there",
        }
    result["load1_end"] = load1()
    name = "scale_out" + ("" if a.model == "tiny" else "-teacher")
    if a.only and results_path(name).exists():  # one part re-run: keep the others' figures
        result = {**json.loads(results_path(name).read_text()), **result}
    write_result(name, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
