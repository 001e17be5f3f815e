"""`--backend server` against a real vLLM OpenAI-compatible server (issue 13), marked slow.

One `python -m vllm.entrypoints.openai.api_server` per model on 127.0.0.1 (float32, enforce-eager,
CPU), module-scoped: the tiny model, and the embedded teacher (smollm2-135m-instruct). Greedy
generation and teacher-forced scoring through each must equal the in-process vLLM engine's rows
(ids identical, top-k within 1e-4 nats; measured: equal); a server that is not the teacher
(another checkpoint, another tokenizer) is refused before any row; a server killed mid-run stops
the run with one line, and the rerun after a restart resumes and equals the uninterrupted run.

    .venv/bin/python -m pytest -q -m slow tests/test_kdgen_server.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import kdcore.dataset as kds
import kdcore.io as kio
from kdgen.config import GenerateConfig
from kdgen_helpers import CHAT_ROWS, ONE_THREAD_ENV, assert_topk_close, assert_valid, write_jsonl
from kdgen_helpers import TINY_KV_ARG, TINY_KV_BYTES, decoded_rows, run_with_vllm

pytestmark = pytest.mark.slow

ATOL = 1e-4  # nats: the bound between the served and the in-process engine
# Rows are compared as stored: format v2 rounds log-probs to 10 mantissa bits (kdcore/codec.py), so
# two engine values within ATOL can land one rounding step apart, up to 2^-10 * |lp| (each side
# moves by at most half a step). The embedded teacher's checks allow that step: its 30 layers run
# in batches the server composes from request arrival, which may differ from the in-process
# engine's, and a last-bit difference would then fail a check the engines pass. Measured: both
# models' rows bit-equal (the tiny model's checks keep rtol 0).
STORED_RTOL = 2.0**-10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """A real vLLM server on 127.0.0.1 with the flags kd needs (README "Scaling out")."""

    def __init__(self, model: str, log: Path, k: int = 20, kv_bytes: int = TINY_KV_BYTES):
        self.model, self.log, self.k, self.kv_bytes = model, log, k, kv_bytes
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 600) -> "VLLMServer":
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--host", "127.0.0.1",
            "--port", str(self.port), "--dtype", "float32", "--enforce-eager", "--max-logprobs", str(self.k),
            "--logprobs-mode", "raw_logprobs", "--generation-config", "vllm", "--kv-cache-memory-bytes", str(self.kv_bytes),
            "--max-model-len", "1024", "--seed", "0", "--disable-log-stats",
            # as the in-process CPU engine (kdcore/backends/vllm_backend.py): whole-prompt prefill
            "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192",
        ]  # fmt: skip
        env = {**ONE_THREAD_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        # its own process group: the API server spawns an engine-core process that must die with it
        self.proc = subprocess.Popen(args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited: {self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2).read()
                return self
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"vLLM server not up after {timeout} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the API server and its engine core
            except ProcessLookupError:
                pass
            self.proc.wait()


@contextmanager
def serving(model: str, log: Path, kv_bytes: int = TINY_KV_BYTES):
    """A started server, killed on the way out whatever happened (a failed start included)."""
    srv = VLLMServer(model, log, kv_bytes=kv_bytes)
    try:
        yield srv.start()
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with serving(tiny_model_dir, tmp_path_factory.mktemp("server") / "server.log") as srv:
        yield srv


def kdgen(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m kdgen` of this checkout (not the venv's console script)."""
    return subprocess.run([sys.executable, "-m", "kdgen", *args], capture_output=True, text=True, timeout=timeout, env=ONE_THREAD_ENV)


def cli_args(cfg: GenerateConfig) -> list[str]:
    args = ["--prompts", cfg.prompts, "--out", cfg.out, "--teacher", cfg.teacher, "--backend", cfg.backend, "--k", str(cfg.k)]
    args += ["--shard-prompts", str(cfg.shard_prompts), "--server-retries", str(cfg.server_retries)]
    if cfg.server_url:
        args += ["--server-url", cfg.server_url]
    return args


def gen_args(cfg: GenerateConfig) -> list[str]:
    return ["generate", *cli_args(cfg), "--temperature", "0", "--max-new-tokens", str(cfg.max_new_tokens)]


def local_and_served(tmp: Path, server: VLLMServer, prompts: list[dict], n_pairs: int, **overrides) -> dict:
    """The same greedy generation (`prompts`) and scoring (`n_pairs` plain-text pairs) in-process
    (vLLM, one engine) and through `server`; the dataset URLs and the served generate config."""
    gen_cfg = GenerateConfig(
        prompts=write_jsonl(tmp / "prompts.jsonl", prompts), out=str(tmp / "local"), backend="vllm", dtype="float32",
        temperature=0.0, max_new_tokens=24, k=8, shard_prompts=2, server_retries=1, engine_arg=[TINY_KV_ARG],
    )  # fmt: skip
    gen_cfg = replace(gen_cfg, **overrides)
    pairs = [{"prompt": f"Question {i}:", "completion": f" the answer is {i * 7} apples"} for i in range(n_pairs)]
    score_cfg = replace(gen_cfg, prompts=write_jsonl(tmp / "pairs.jsonl", pairs), out=str(tmp / "local-score"))
    local, local_score = run_with_vllm([("generate", gen_cfg), ("score", score_cfg)])
    served_cfg = replace(gen_cfg, backend="server", server_url=server.url, out=str(tmp / "served"))
    proc = kdgen(*gen_args(served_cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc_score = kdgen("score", *cli_args(replace(score_cfg, backend="server", server_url=server.url, out=str(tmp / "served-score"))))
    assert proc_score.returncode == 0, proc_score.stderr[-3000:]
    return dict(tmp=tmp, cfg=served_cfg, local=local, served=proc.stdout.strip(), local_score=local_score, served_score=proc_score.stdout.strip())


@pytest.fixture(scope="module")
def runs(server, tiny_model_dir, tmp_path_factory):
    """The tiny model: 24 prompts (12 shards), 6 scored pairs."""
    prompts = CHAT_ROWS + [{"messages": [{"role": "user", "content": f"Count to {i}."}]} for i in range(18)]
    return local_and_served(tmp_path_factory.mktemp("server-runs"), server, prompts, n_pairs=6, teacher=tiny_model_dir)


def shards(dataset: Path) -> list[str]:
    return kds.list_shards(kio.open_fs(str(dataset))[0], str(dataset))


def assert_same_rows(a_url: str, b_url: str, rtol: float = 0.0) -> None:
    a, b = decoded_rows(a_url), decoded_rows(b_url)
    assert list(a) == list(b)  # same row ids, same order
    for rid, x in a.items():
        y = b[rid]
        np.testing.assert_array_equal(x["prompt_ids"], y["prompt_ids"])
        np.testing.assert_array_equal(x["completion_ids"], y["completion_ids"])
        assert x["finish_reason"] == y["finish_reason"] and x["completion"] == y["completion"]
        assert_topk_close(x["topk_ids"], x["topk_logprobs"], y["topk_ids"], y["topk_logprobs"], atol=ATOL, rtol=rtol)
        np.testing.assert_array_equal(x["topk_ids"], y["topk_ids"])
        np.testing.assert_allclose(x["token_logprobs"], y["token_logprobs"], atol=ATOL, rtol=rtol)


def test_served_greedy_rows_equal_the_in_process_engine(runs):
    assert_same_rows(runs["local"], runs["served"])
    m = assert_valid(runs["served"])
    # the same engine behind HTTP: the same dataset key, and the manifest says where it ran
    assert Path(runs["served"]).name == Path(runs["local"]).name
    assert m["generation"]["server_url"] == runs["cfg"].server_url and m["config"]["backend"] == "server"
    assert m["totals"]["rows"] == 24


def test_served_scoring_equals_the_in_process_engine(runs):
    assert_same_rows(runs["local_score"], runs["served_score"])
    assert_valid(runs["served_score"])


def test_a_server_that_is_not_the_teacher_is_refused(runs, server, tiny_model_dir):
    tmp = runs["tmp"]
    other = tmp / "other-teacher"
    shutil.copytree(tiny_model_dir, other)
    proc = kdgen(*gen_args(replace(runs["cfg"], teacher=str(other), out=str(tmp / "refused"))))
    assert proc.returncode == 2 and "serves" in proc.stderr and "--teacher" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # same name, another tokenizer: two vocabulary entries swapped
    swapped = tmp / "swapped" / Path(tiny_model_dir).name
    shutil.copytree(tiny_model_dir, swapped)
    tj = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["Hello"], vocab["Ġworld"] = vocab["Ġworld"], vocab["Hello"]
    (swapped / "tokenizer.json").write_text(json.dumps(tj))
    proc = kdgen(*gen_args(replace(runs["cfg"], teacher=str(swapped), out=str(tmp / "refused2"))))
    assert proc.returncode == 2 and "tokenizer differs" in proc.stderr, proc.stderr
    assert not any((tmp / "refused2").glob("*/data/*.parquet"))


def test_server_killed_mid_run_then_rerun_resumes(runs, server):
    """SIGKILL the server once the first shard is written: one-line error, complete shards kept;
    restart it and the same command finishes a dataset equal to the uninterrupted one."""
    cfg = replace(runs["cfg"], out=str(runs["tmp"] / "killed"))
    args = [sys.executable, "-m", "kdgen", *gen_args(cfg)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD_ENV)
    dataset = Path(cfg.out) / Path(runs["served"]).name
    t0 = time.time()
    while not shards(dataset):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 300
        time.sleep(0.02)
    server.kill()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("kdgen: error: --server-url") and "resume" in err, err
    assert 1 <= len(shards(dataset)) < 12 and not (dataset / kds.MANIFEST).exists()
    server.start()
    proc = kdgen(*gen_args(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    assert_same_rows(runs["served"], proc.stdout.strip())
    assert_valid(proc.stdout.strip())


@pytest.mark.parametrize("backend", ["server", "vllm"])
def test_kdgen_sigkilled_mid_run_then_rerun_equals(runs, server, backend):
    """The SIGKILL-and-resume check of tests/test_kdgen_crash.py (hf, 20 kills) once for each vLLM
    path: kill `kdgen generate` itself once a shard is written, rerun, same rows as uninterrupted."""
    cfg = replace(runs["cfg"], out=str(runs["tmp"] / f"sigkill-{backend}"), backend=backend, server_url=server.url if backend == "server" else None)
    args = [sys.executable, "-m", "kdgen", *gen_args(cfg)] + (["--engine-arg", TINY_KV_ARG] if backend == "vllm" else [])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ONE_THREAD_ENV)
    dataset = Path(cfg.out) / Path(runs["served"]).name
    t0 = time.time()
    while not shards(dataset) and proc.poll() is None:
        assert time.time() - t0 < 600
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(shards(dataset)) < 12 and not (dataset / kds.MANIFEST).exists()
    done = kdgen(*args[3:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_rows(runs["served"], done.stdout.strip())
    assert_valid(done.stdout.strip())


# -- the embedded teacher: one more server, few prompts, short completions -------------------------


# As for the tiny model (kdgen_helpers.TINY_KV_BYTES), a fixed KV cache, the same on any machine,
# for both engines: vLLM on CPU otherwise sizes it as a fraction of the NUMA node's memory minus the
# process's RSS, which the teacher's float32 weights alone can outgrow. 256 MiB holds ~5,800 tokens of SmolLM2 (30 layers x K,V x 3 heads x 64 x 4 B per token).
TEACHER_KV_BYTES = 256 * 2**20


@pytest.fixture(scope="module")
def teacher_server(smollm2_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("teacher-server") / "server.log"
    with serving(smollm2_dir, log, kv_bytes=TEACHER_KV_BYTES) as srv:
        yield srv


@pytest.fixture(scope="module")
def teacher_runs(teacher_server, tmp_path_factory):
    """smollm2-135m-instruct (the default --teacher): 4 chat prompts (2 shards), 16 tokens, 3 pairs."""
    tmp = tmp_path_factory.mktemp("teacher-runs")
    kv = [f"kv_cache_memory_bytes={TEACHER_KV_BYTES}"]
    return local_and_served(tmp, teacher_server, CHAT_ROWS[:4], n_pairs=3, max_new_tokens=16, engine_arg=kv)


def test_teacher_served_greedy_rows_equal_the_in_process_engine(teacher_runs):
    assert_same_rows(teacher_runs["local"], teacher_runs["served"], rtol=STORED_RTOL)
    m = assert_valid(teacher_runs["served"])
    assert Path(teacher_runs["served"]).name == Path(teacher_runs["local"]).name
    assert m["teacher"]["source"] == "builtin:smollm2-135m-instruct" and m["totals"]["rows"] == 4
    rows = decoded_rows(teacher_runs["served"]).values()
    assert sum(len(r["completion_ids"]) for r in rows) >= 32  # real text, not an immediate EOS


def test_teacher_served_scoring_equals_the_in_process_engine(teacher_runs):
    assert_same_rows(teacher_runs["local_score"], teacher_runs["served_score"], rtol=STORED_RTOL)
    assert_valid(teacher_runs["served_score"])


def test_teacher_server_refuses_another_teacher(teacher_runs, tiny_model_dir):
    """The tiny model (same tokenizer) as --teacher against the served SmolLM2: refused by the
    served checkpoint before any row."""
    out = teacher_runs["tmp"] / "refused"
    proc = kdgen(*gen_args(replace(teacher_runs["cfg"], teacher=tiny_model_dir, out=str(out))))
    assert proc.returncode == 2 and "serves" in proc.stderr and "--teacher" in proc.stderr, proc.stderr
    assert not any(out.glob("*/data/*.parquet"))
