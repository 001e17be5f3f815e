"""Scale-out flags (issue 13): validation in one line per problem naming the flag, `--engine-arg`
parsing, which settings enter the fingerprint (quantization yes, engine layout no), a server that
cannot be reached, and `--data-parallel-size` (engine processes splitting the shards through claims).

    .venv/bin/python -m pytest -q tests/test_kdgen_engine_flags.py
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest

import kdgen.generate as gen
from kdcore.backends import vllm_available
from kdgen.plan import manifest_core
from kdcore import engine_options
import kdcore.dataset as kds
from kdcore.errors import ConfigError, KdError
from kdgen.config import GenerateConfig, validate
from kdgen_helpers import CHAT_ROWS, ONE_THREAD_ENV, TINY_KV_ARG, assert_valid, one_torch_thread, rows_of, tiny_config, write_jsonl  # noqa: F401


def problems_of(**overrides) -> list[str]:
    cfg = replace(GenerateConfig(prompts="p.jsonl"), **overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, "generate")
    return e.value.problems


def test_engine_args_parse_as_json_values_or_strings():
    parsed = engine_options.parse_engine_args(["max_num_seqs=256", "enable-prefix-caching=false", "kv_cache_dtype=fp8", 'hf_overrides={"a": 1}'])
    assert parsed == {"max_num_seqs": 256, "enable_prefix_caching": False, "kv_cache_dtype": "fp8", "hf_overrides": {"a": 1}}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"tensor_parallel_size": 0}, "--tensor-parallel-size 0: must be >= 1"),
        ({"replicas": 0, "ray": "auto"}, "--replicas 0: must be >= 1"),
        ({"engine_arg": ["max_num_seqs"]}, "--engine-arg 'max_num_seqs': expected KEY=VALUE"),
        ({"engine_arg": ["dtype=float16"]}, "--engine-arg dtype: not settable this way (use --dtype)"),
        ({"backend": "hf", "quantization": "fp8"}, "--quantization: a vLLM engine setting, but the backend is hf"),
        ({"backend": "server"}, "--backend server needs --server-url"),
        ({"backend": "server", "server_url": "http://x:8000", "tensor_parallel_size": 2}, "--tensor-parallel-size with --backend server"),
        ({"backend": "hf", "server_url": "http://x:8000"}, "--server-url http://x:8000: only used with --backend server"),
        ({"replicas": 2}, "--replicas 2 needs --ray ADDRESS|auto"),
        ({"ray": "auto", "data_parallel_size": 2}, "--data-parallel-size with --ray: use --replicas N"),
        ({"backend": "vllm", "tensor_parallel_size": 2}, "no GPU here, and vLLM on CPU runs an engine on one device (tensor x pipeline must be 1)"),
        ({"server_timeout": 0.0, "backend": "hf"}, "--server-timeout 0.0: must be > 0 seconds"),
    ],
)
def test_bad_scale_flags_name_the_flag(overrides, expected):
    if overrides.get("backend") == "vllm" and not vllm_available():
        pytest.skip("needs vllm installed")
    found = problems_of(**overrides)
    assert any(p.startswith(expected) or expected in p for p in found), found
    assert all("\n" not in p for p in found)


def fingerprint_of(**overrides) -> str:
    cfg = replace(GenerateConfig(prompts="p.jsonl", backend="vllm"), **overrides)
    teacher = {"weights_hash": "w", "dtype": "float32"}
    tokenizer = {"tokenizer_hash": "t", "chat_template_hash": "c", "embedding_rows": 100}
    return kds.fingerprint(manifest_core(cfg, "generate", teacher, tokenizer, {"content_hash": "p"}))


def test_quantization_is_in_the_fingerprint_engine_layout_is_not():
    base = fingerprint_of()
    # layout, scheduling and transport: same weights, same rows, same key
    for layout in (
        {"tensor_parallel_size": 4},
        {"pipeline_parallel_size": 2},
        {"data_parallel_size": 8},
        {"max_model_len": 8192},
        {"engine_arg": ["max_num_seqs=512", "enable_prefix_caching=false"]},
        {"ray": "auto", "replicas": 4},
        {"backend": "server", "server_url": "http://gpu-box:8000"},
    ):
        assert fingerprint_of(**layout) == base, layout
    # other numerics: other rows, another key
    assert fingerprint_of(quantization="fp8") != base
    assert fingerprint_of(engine_arg=["kv_cache_dtype=fp8"]) != base
    assert fingerprint_of(quantization="fp8") != fingerprint_of(quantization="awq")
    assert "generation.quantization" in kds.FINGERPRINT_FIELDS


def test_unreachable_server_is_one_clear_error(tmp_path, tiny_model_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", CHAT_ROWS)
    cfg = tiny_config(prompts, str(tmp_path / "out"), tiny_model_dir, backend="server", server_url=f"http://127.0.0.1:{port}", server_retries=1)
    t0 = time.perf_counter()
    with pytest.raises(KdError) as e:
        gen.run(cfg)
    msg = str(e.value)
    assert msg.startswith(f"--server-url http://127.0.0.1:{port}: /v1/models failed 2 times") and "resume" in msg and "\n" not in msg
    assert time.perf_counter() - t0 < 60  # backoff 0.5 s, not the 600 s request timeout
    assert not list((tmp_path / "out").glob("*/data/*.parquet"))


@pytest.mark.slow  # two more Python processes with torch: ~40 s idle, minutes on a busy machine
def test_data_parallel_engines_split_the_shards(tmp_path, tiny_model_dir):
    """Two engine processes on one machine write one dataset equal to a single engine's."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", CHAT_ROWS)
    one = tiny_config(prompts, str(tmp_path / "one"), tiny_model_dir, shard_prompts=1)
    expected = rows_of(gen.run(one))
    two = replace(one, out=str(tmp_path / "two"), data_parallel_size=2)
    url = gen.run(two)
    assert rows_of(url) == expected
    m = assert_valid(url)
    assert m["config"]["data_parallel_size"] == 2 and len(m["shards"]) == 6


@pytest.mark.slow
def test_unknown_engine_arg_is_refused_before_the_engine_starts():
    code = (
        "from kdcore.backends.vllm_backend import _checked_engine_args\n"
        "from kdcore.errors import KdError\n"
        "assert _checked_engine_args({'max_num_seqs': 4}) == {'max_num_seqs': 4}\n"
        "try:\n    _checked_engine_args({'max_num_seqz': 4})\nexcept KdError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().startswith("--engine-arg max_num_seqz: not an argument of vLLM's engine"), out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="needs vLLM")
def test_a_kv_cache_that_does_not_fit_is_one_line_naming_the_fix(tmp_path, tiny_model_dir):
    """vLLM on CPU takes the model's memory out of `--gpu-memory-utilization` x the node's memory
    before the KV cache: 1% leaves nothing on any machine here. One line naming both fixes, exit 2,
    no dataset."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", CHAT_ROWS)
    args = ["generate", "--prompts", prompts, "--out", str(tmp_path / "out"), "--teacher", tiny_model_dir, "--backend", "vllm"]
    env = {**ONE_THREAD_ENV, "KD_QUIET": "1"}
    out = subprocess.run([sys.executable, "-m", "kdgen", *args, "--gpu-memory-utilization", "0.01"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("kdgen: error: vLLM's KV cache does not fit (Available memory on node"), out.stderr[-3000:]
    assert "raise it" in last and "--engine-arg kv_cache_memory_bytes=" in last
    assert "Traceback" not in out.stderr
    assert not list((tmp_path / "out").glob("*/data/*.parquet"))
    # the fix it names works
    fixed = subprocess.run([sys.executable, "-m", "kdgen", *args, "--engine-arg", TINY_KV_ARG, "--max-new-tokens", "4"], capture_output=True, text=True, env=env, timeout=600)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert_valid(fixed.stdout.strip())
