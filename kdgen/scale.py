"""Scaling `kdgen generate` past one engine in one process (issue 13): the checks on the scale-out
flags, the engine settings each backend gets, and `--data-parallel-size N` on one machine.

Data parallel runs N engine processes on this machine, each on its own tensor x pipeline GPUs
(`CUDA_VISIBLE_DEVICES`), each an ordinary `kdgen generate` on the same request and root. They split
the shards through kd's shard claims (kdgen/locks.py) — the same mechanism that lets two machines
share a bucket — and whichever finishes the last shard commits the manifest. vLLM's own
engine refuses `data_parallel_size=N` in a single process, and N independent engines is what vLLM
recommends for a dense teacher anyway. A worker that dies leaves its shard unwritten; the run
fails naming it, and the same command resumes.

Ray (`--ray`) lives in kdgen/ray_runner.py; the served teacher in kdcore/backends/server_backend.py.

Test: `pytest tests/test_kdgen_engine_flags.py`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict

from kdcore import engine_options
import kdcore.dataset as kds
import kdcore.io as kio
from kdcore.backends import default_backend
from kdcore.errors import KdError
from kdcore.progress import console

VLLM_ONLY = ("tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "quantization", "engine_arg")
RANK_ENV = "KD_DATA_PARALLEL_RANK"  # set in each data-parallel worker (which must not fan out again)
SERVER_SIDE = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "max_model_len", "engine_arg")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _set(cfg, name: str) -> bool:
    """Whether a scale-out option differs from 'one engine, as stored'."""
    v = getattr(cfg, name)
    return bool(v) if name in ("engine_arg", "quantization", "max_model_len") else v != 1


def scale_problems(cfg) -> list[str]:
    """Every problem with the scale-out flags of a GenerateConfig, one line each, naming the flag."""
    problems = []
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "replicas", "server_concurrency"):
        if getattr(cfg, name) < 1:
            problems.append(f"{flag(name)} {getattr(cfg, name)}: must be >= 1")
    if cfg.max_model_len is not None and cfg.max_model_len < 1:
        problems.append(f"--max-model-len {cfg.max_model_len}: must be >= 1")
    if cfg.server_retries < 0:
        problems.append(f"--server-retries {cfg.server_retries}: must be >= 0")
    if cfg.server_timeout <= 0:
        problems.append(f"--server-timeout {cfg.server_timeout}: must be > 0 seconds")
    problems += engine_options.engine_arg_problems(cfg.engine_arg)
    backend = default_backend(full_distribution=cfg.sampled_targets > 0) if cfg.backend == "auto" else cfg.backend
    if backend == "hf":
        for name in VLLM_ONLY:
            if _set(cfg, name):
                problems.append(f"{flag(name)}: a vLLM engine setting, but the backend is hf; use --backend vllm (install '.[cpu]' or '.[gpu]')")
    if backend == "server":
        if not cfg.server_url:
            problems.append("--backend server needs --server-url URL of a running `vllm serve` (README: Scaling out)")
        for name in SERVER_SIDE:
            if _set(cfg, name):
                problems.append(f"{flag(name)} with --backend server: the engine is the server's; set it on its `vllm serve` command")
    elif cfg.server_url:
        problems.append(f"--server-url {cfg.server_url}: only used with --backend server")
    if cfg.ray is not None and cfg.data_parallel_size > 1:
        problems.append("--data-parallel-size with --ray: use --replicas N (engines spread over the cluster)")
    if cfg.ray is not None and importlib.util.find_spec("ray") is None:
        problems.append(f"--ray {cfg.ray}: Ray is not installed here; install the ray extra (pip install -e '.[ray]')")
    if cfg.replicas > 1 and cfg.ray is None:
        problems.append(f"--replicas {cfg.replicas} needs --ray ADDRESS|auto; on one machine use --data-parallel-size")
    gpus_per_engine = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    if gpus_per_engine > 1 and backend == "vllm" and cfg.ray is None and not _has_gpu():
        problems.append(
            f"--tensor-parallel-size {cfg.tensor_parallel_size} --pipeline-parallel-size {cfg.pipeline_parallel_size}: "
            f"no GPU here, and vLLM on CPU runs an engine on one device (tensor x pipeline must be 1); "
            f"use --data-parallel-size for more engines"
        )
    return problems


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def engine_settings(job, longest: int) -> tuple[str, dict, int]:
    """(backend name, its options, max_model_len) for a job whose longest request is `longest` tokens."""
    cfg = job.cfg
    if cfg.max_model_len is not None and cfg.max_model_len < longest:
        raise KdError(
            f"--max-model-len {cfg.max_model_len}: the longest request needs {longest} tokens (prompt + completion); "
            f"raise it or lower --max-new-tokens"
        )
    max_len = cfg.max_model_len or min(job.teacher.context, longest + 8)
    if cfg.backend == "server":
        tok, conf = job.teacher.tokenizer, job.teacher.config
        eos = {tok.eos_token_id} | set(_as_list(getattr(conf, "eos_token_id", None)))
        return "server", {
            "url": cfg.server_url,
            "tokenizer": tok,
            "teacher_names": (job.teacher.model.spec, job.teacher.model.path),
            "eos_ids": {int(e) for e in eos if e is not None},
            "concurrency": cfg.server_concurrency,
            "timeout": cfg.server_timeout,
            "retries": cfg.server_retries,
        }, longest
    name = job.manifest_core["generation"]["backend"]
    if name == "hf":
        return name, {"batch_size": min(cfg.batch_size, 16)}, max_len
    return name, {
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "seed": cfg.seed,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "quantization": cfg.quantization,
        "engine_args": engine_options.parse_engine_args(cfg.engine_arg),
    }, max_len


def _as_list(v) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


# One data-parallel worker: an ordinary run on the same request (its claims split the shards).
_WORKER = "import json, sys\nfrom kdgen.config import GenerateConfig\nfrom kdgen.generate import run\na = json.loads(sys.argv[1])\nprint(run(GenerateConfig(**a['cfg']), a['kind']))\n"


def fans_out(cfg) -> bool:
    """Whether this run starts data-parallel workers (it is not one of them)."""
    return cfg.data_parallel_size > 1 and RANK_ENV not in os.environ


def run_data_parallel(cfg, kind: str) -> str:
    """`--data-parallel-size N`: N engine processes on this machine split the shards; returns the URL."""
    per = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    devices = _devices()
    if devices and len(devices) < per * cfg.data_parallel_size:
        raise KdError(
            f"--data-parallel-size {cfg.data_parallel_size} x {per} GPU(s) per engine needs {per * cfg.data_parallel_size} GPUs; "
            f"{len(devices)} visible"
        )
    arg = json.dumps({"cfg": asdict(cfg), "kind": kind})
    procs = []
    for w in range(cfg.data_parallel_size):
        env = {**os.environ, RANK_ENV: str(w)}
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[w * per : (w + 1) * per])
        else:  # CPU engines share the cores
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.data_parallel_size)))
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, arg], env=env, stdout=subprocess.PIPE, text=True))
    urls, failed = [], []
    for w, p in enumerate(procs):
        out, _ = p.communicate()
        if p.returncode == 0:
            urls.append(out.strip().splitlines()[-1])
        else:
            failed.append(f"engine {w} exited with status {p.returncode}")
    if failed and urls and kds.read_manifest(*kio.open_fs(urls[0])) is not None:
        console.print(f"[yellow]note:[/] {'; '.join(failed)}; the other engines finished its shards")
        return urls[0]
    if failed:
        raise KdError(f"--data-parallel-size {cfg.data_parallel_size}: {'; '.join(failed)} (its error is above); run the same command again to resume")
    return urls[0]


def _devices() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries ([] on CPU)."""
    if not _has_gpu():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]
