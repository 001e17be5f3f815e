"""Generation for quality metrics and samples, with speed and memory measured the same way for
every model (teacher, students, baselines).

Generation reuses kdgen's backends (`hf`: transformers decode loop; `vllm`), greedy by default,
one seed per prompt derived from the run seed (recorded in results.json).

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
import os
import threading
import time
from dataclasses import dataclass

from kdgen.backends import Request, SamplingConfig, request_seed
from kdgen.format import sha256_hex


@dataclass
class Generated:
    texts: list[str]
    tokens: int
    seconds: float
    peak_memory_bytes: int
    memory_kind: str  # cpu_rss_delta | cuda_max_allocated

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    """Peak RSS of this process in bytes (VmHWM)."""
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
        self._base = _rss()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = None
        if not _reset_hwm():  # fall back to sampling
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            self.peak = int(torch.cuda.max_memory_allocated() - self._base)
            return
        if self._thread is None:
            self._max = _hwm()
        else:
            self._stop.set()
            self._thread.join()
        self._max = max(self._max, _rss())
        self.peak = int(self._max - self._base)


def requests_for(prompt_ids: list[list[int]], keys: list[str], seed: int) -> list[Request]:
    """One request per prompt; its seed comes from the run seed and the prompt's content key."""
    return [Request(sha256_hex(k)[:24], list(map(int, ids)), request_seed(seed, k)) for ids, k in zip(prompt_ids, keys)]


def generate(
    backend: str,
    model_path: str,
    load_model,
    tokenizer,
    requests: list[Request],
    sampling: SamplingConfig,
    dtype: str,
    batch_size: int,
) -> tuple[Generated, object | None]:
    """Load the model (inside the meter), warm up, generate; returns outputs and the loaded HF model
    (hf backend: reused for fidelity scoring; vllm: None, the engine is closed)."""
    with MemoryMeter() as meter:
        if backend == "vllm":
            from kdgen.backends.vllm_backend import VLLMBackend

            longest = max(len(r.prompt_ids) for r in requests) + sampling.max_new_tokens + 8
            engine = VLLMBackend(model_path, dtype=dtype, k=sampling.k, max_model_len=longest)
            hf_model = None
        else:
            from kdgen.backends.hf_backend import HFBackend

            hf_model = load_model()
            engine = HFBackend(model_path, dtype=dtype, batch_size=batch_size, model=hf_model)
        warm = SamplingConfig(sampling.temperature, sampling.top_p, sampling.top_k, 2, sampling.k)
        engine.generate(requests[:1], warm)
        t0 = time.perf_counter()
        outs = engine.generate(requests, sampling)
        seconds = time.perf_counter() - t0
    engine.close()
    texts = [tokenizer.decode(o.completion_ids, skip_special_tokens=True).strip() for o in outs]
    tokens = sum(len(o.completion_ids) for o in outs)
    return Generated(texts, tokens, seconds, meter.peak, meter.kind), hf_model
