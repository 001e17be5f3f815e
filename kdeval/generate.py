"""Generation for quality metrics and samples, with speed and memory measured the same way for
every model (teacher, students, baselines).

Generation reuses kdgen's backends (`hf`: transformers decode loop; `vllm`), greedy by default,
one seed per prompt derived from the run seed (recorded in results.json).

vLLM always runs in a worker process (`python -m kdeval.generate SPEC OUT`, one for all the models
of a run, one engine at a time): its in-process CPU engine changes process-wide settings (OpenMP
thread binding, NUMA policy, its allocator), and transformers work in the same process afterwards —
the fidelity forward passes — was measured 15x slower (tests/test_kdgen_vllm.py).

Cost measurement, identical for every model of a run:
* tokens/s = generated tokens / wall time of the generate calls, after a 2-token warm-up;
* peak memory = on CUDA, `torch.cuda.max_memory_allocated` over load + generation; on CPU, the
  kernel's peak resident set size (VmHWM, reset through /proc/self/clear_refs just before loading)
  minus the RSS at that moment — exact, no sampling; where the reset is not allowed, the RSS is
  sampled every 5 ms instead. Freed memory is first handed back to the OS with `malloc_trim`, so
  earlier models of the run don't hide it.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from kdcore.backends import Request, SamplingConfig, request_seed
from kdcore.errors import KdError
from kdcore.io import sha256_hex, write_bytes_atomic


@dataclass
class Generated:
    completion_ids: list[list[int]]
    seconds: float
    peak_memory_bytes: int
    memory_kind: str  # cpu_rss_delta | cuda_max_allocated

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def texts(self, tokenizer) -> list[str]:
        return [tokenizer.decode(c, skip_special_tokens=True).strip() for c in self.completion_ids]


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak RSS of this process in bytes (VmHWM: unlike ru_maxrss it does not carry the peak of the
    process that forked and exec'd this one)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is a little less tight
        pass


class MemoryMeter:
    """Peak memory over a block: `with MemoryMeter() as m: ...; m.peak` (bytes)."""

    def __init__(self, interval: float = 0.005):
        import torch

        self.cuda = torch.cuda.is_available()
        self.interval = interval
        self.peak = 0
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_rss_delta"

    def __enter__(self) -> "MemoryMeter":
        _trim()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = current_rss()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = None
        if not _reset_hwm():  # fall back to sampling
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, current_rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            self.peak = int(torch.cuda.max_memory_allocated() - self._base)
            return
        if self._thread is None:
            self._max = peak_rss()
        else:
            self._stop.set()
            self._thread.join()
        self._max = max(self._max, current_rss())
        self.peak = int(self._max - self._base)


def requests_for(prompt_ids: list[list[int]], keys: list[str], seed: int) -> list[Request]:
    """One request per prompt; its seed comes from the run seed and the prompt's content key."""
    return [Request(sha256_hex(k)[:24], list(map(int, ids)), request_seed(seed, k)) for ids, k in zip(prompt_ids, keys)]


def generate(
    backend: str,
    model_path: str,
    load_model,
    requests: list[Request],
    sampling: SamplingConfig,
    dtype: str,
    batch_size: int,
) -> tuple[Generated, object | None]:
    """Load the model (inside the meter), warm up, generate, in this process; returns outputs and the
    loaded HF model (hf backend: reused for fidelity scoring; vllm: None, the engine is closed).
    `kdeval run` calls it for vLLM only inside the worker (`generate_in_worker`)."""
    with MemoryMeter() as meter:
        if backend == "vllm":
            from kdcore.backends.vllm_backend import VLLMBackend

            longest = max(len(r.prompt_ids) for r in requests) + sampling.max_new_tokens + 8
            engine = VLLMBackend(model_path, dtype=dtype, k=sampling.k, max_model_len=longest)
            hf_model = None
        else:
            from kdcore.backends.hf_backend import HFBackend

            hf_model = load_model()
            engine = HFBackend(model_path, dtype=dtype, batch_size=batch_size, model=hf_model)
        warm = SamplingConfig(sampling.temperature, sampling.top_p, sampling.top_k, 2, sampling.k)
        engine.generate(requests[:1], warm)
        t0 = time.perf_counter()
        outs = engine.generate(requests, sampling)
        seconds = time.perf_counter() - t0
    engine.close()
    return Generated([list(map(int, o.completion_ids)) for o in outs], seconds, meter.peak, meter.kind), hf_model


def generate_in_worker(jobs: list[tuple[str, list[Request]]], sampling: SamplingConfig, dtype: str) -> list[Generated]:
    """vLLM generation for several models, (model path, requests) each, in one worker process
    (module docstring); the same measurements as `generate`, taken inside the worker."""
    with tempfile.TemporaryDirectory(prefix="kdeval-vllm-") as tmp:
        spec, out, log = (os.path.join(tmp, f) for f in ("spec.json", "out.json", "stderr.txt"))
        with open(spec, "w", encoding="utf-8") as f:
            json.dump({"jobs": [[path, [asdict(r) for r in reqs]] for path, reqs in jobs], "sampling": asdict(sampling), "dtype": dtype}, f)
        with open(log, "w", encoding="utf-8") as err:
            proc = subprocess.run([sys.executable, "-m", "kdeval.generate", spec, out], stdout=err, stderr=err)
        result = {}
        if os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                result = json.load(f)
        if proc.returncode != 0 or "generated" not in result:
            with open(log, encoding="utf-8", errors="replace") as f:
                lines = [line for line in f.read().splitlines() if line.strip()]
            why = result.get("error") or (lines[-1] if lines else f"exit status {proc.returncode}")
            where = f" on {result['model']}" if result.get("model") else ""
            raise KdError(f"--backend vllm: generation failed{where} ({why}); run with --backend hf to use transformers")
    return [Generated(**g) for g in result["generated"]]


def kv_cache_gib(model_path: str, requests: list[Request], sampling: SamplingConfig, dtype: str) -> int | None:
    """KV-cache space (whole GiB, at least 1) holding every request at full length twice over; None
    when the config does not say. Without it vLLM's CPU engine reserves (and touches) 30% of RAM, and
    every model's peak memory read the same ~7 GB here (SmolLM2 and its 6-layer student alike)."""
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
        c = getattr(c, "text_config", None) or c
        heads = int(c.num_attention_heads)
        kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        per_token = 2 * int(c.num_hidden_layers) * kv_heads * head_dim * (4 if dtype == "float32" else 2)
    except (AttributeError, TypeError, ValueError, OSError):
        return None
    tokens = sum(len(r.prompt_ids) + sampling.max_new_tokens for r in requests)
    return max(1, -(-2 * per_token * tokens // 2**30))


def _worker(spec_path: str, out_path: str) -> int:
    """The vLLM worker: generate for every job of the spec, one engine at a time; write the results."""
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    sampling = SamplingConfig(**spec["sampling"])
    done, path = [], None
    size_cache = "VLLM_CPU_KVCACHE_SPACE" not in os.environ  # the user's setting wins
    try:
        for path, reqs in spec["jobs"]:
            requests = [Request(**r) for r in reqs]
            gib = kv_cache_gib(path, requests, sampling, spec["dtype"]) if size_cache else None
            if gib is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)  # read by each engine as it starts (vLLM CPU only)
            gen, _ = generate("vllm", path, None, requests, sampling, spec["dtype"], 0)
            done.append(asdict(gen))
            gc.collect()
        result, status = {"generated": done}, 0
    except Exception as e:  # reported by the parent as one line
        result, status = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}", "model": path}, 1
    write_bytes_atomic(None, out_path, json.dumps(result))
    return status


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:3]))
