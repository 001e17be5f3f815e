"""Engine settings for scaling out (issue 13): vLLM parallelism, quantization, `--engine-arg KEY=VALUE`.

Which of them change the rows, and so belong in the dataset fingerprint:

* tensor / pipeline / data parallel size, `max_model_len` and scheduling knobs (`max_num_seqs`,
  `enable_prefix_caching`, ...) do not: the same weights in the same dtype give the same
  distribution however they are laid out over devices (up to float reduction order, which the
  fingerprint never covered — batch sizes are not in it either);
* `--quantization` does: it replaces the weights the rows are computed from. So do the few engine
  arguments listed in `ROW_CHANGING_ENGINE_ARGS` (a quantised KV cache, config overrides, another
  revision). Both go into the manifest's `generation.quantization`, which is a fingerprint field.

Every other `--engine-arg` is assumed not to change rows; it is recorded in the manifest's config.

Test: `pytest tests/test_kdgen_engine_flags.py`.
"""

from __future__ import annotations

import json
import re

from kdcore.errors import KdError

# Engine arguments that change the numbers the teacher computes (see the module docstring).
ROW_CHANGING_ENGINE_ARGS = ("kv_cache_dtype", "calculate_kv_scales", "hf_overrides", "revision", "model_impl")

# Set by kd itself or by a dedicated flag: an --engine-arg may not override them.
RESERVED_ENGINE_ARGS = {
    "model": None,
    "tokenizer": None,
    "dtype": "--dtype",
    "max_logprobs": "--k",
    "logprobs_mode": None,
    "seed": "--seed",
    "tensor_parallel_size": "--tensor-parallel-size",
    "pipeline_parallel_size": "--pipeline-parallel-size",
    "data_parallel_size": "--data-parallel-size",
    "max_model_len": "--max-model-len",
    "quantization": "--quantization",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "trust_remote_code": None,
    "skip_tokenizer_init": None,
}

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def parse_engine_args(items: list[str]) -> dict:
    """`["max_num_seqs=256", "enable_prefix_caching=false"]` -> `{"max_num_seqs": 256, ...}`.

    A VALUE is read as JSON when it parses (numbers, true/false, null, lists, objects), else kept as
    a string; KEY may use dashes like the `vllm serve` flag (`max-num-seqs`)."""
    return dict(_parse_one(item) for item in items)


def _parse_one(item: str) -> tuple[str, object]:
    key, sep, raw = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not _KEY.match(key):
        raise KdError(f"--engine-arg {item!r}: expected KEY=VALUE, e.g. --engine-arg max_num_seqs=256")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    if key in RESERVED_ENGINE_ARGS:
        flag = RESERVED_ENGINE_ARGS[key]
        fix = f"use {flag}" if flag else "kd sets it itself"
        raise KdError(f"--engine-arg {key}: not settable this way ({fix})")
    return key, value


def engine_arg_problems(items: list[str]) -> list[str]:
    """Every malformed --engine-arg, as one-line problems (for config validation)."""
    problems = []
    for item in items:
        try:
            _parse_one(item)
        except KdError as e:
            problems.append(str(e))
    return problems


def numerics(quantization: str | None, engine_args: list[str]) -> dict | None:
    """The fingerprinted part of the engine settings: None when the teacher runs as stored."""
    parsed = parse_engine_args(engine_args)
    changing = {k: parsed[k] for k in ROW_CHANGING_ENGINE_ARGS if k in parsed}
    if quantization is None and not changing:
        return None
    return {"method": quantization, **changing}
