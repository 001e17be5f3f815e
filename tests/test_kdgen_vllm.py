"""The real vLLM CPU engine against the hf backend (marked slow; about two minutes).

On the real teacher (smollm2-135m-instruct, float32, greedy, 24 new tokens, k=5) both backends
must give the same tokens and top-5 log-probs within 0.05 nats, for generation and for
teacher-forced scoring, and every dataset must verify. The tiny model checks the engine path of
the `kdgen` console script itself.

vLLM runs in subprocesses, never in the pytest process: its in-process CPU engine changes
process-wide settings (OpenMP thread binding, NUMA memory policy, LD_PRELOAD of its allocator), and
transformers decoding in the same process afterwards was measured 15x slower (SmolLM2, 2.3 s ->
34 s), which would slow every later test. One subprocess serves both real-teacher runs with one
engine (the start-up costs ~20 s).

    .venv/bin/python -m pytest -q -m slow tests/test_kdgen_vllm.py
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import kdgen.generate as gen
import kdcore.dataset as kds
from kdgen.config import GenerateConfig
from kdgen_helpers import (
    decoded_rows,
    run_with_vllm,
    CHAT_ROWS,
    assert_topk_close,
    assert_valid,
    common_prefix,
    comparable_positions,
    kdgen_cli,
    tiny_config,
    write_jsonl,
)

pytestmark = pytest.mark.slow

ATOL = 0.05  # nats: issue 2's bound between the backends (float32 measured ~1e-4 + quantisation)

@pytest.fixture(scope="module")
def teacher_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-teacher")
    prompts = write_jsonl(tmp / "prompts.jsonl", CHAT_ROWS[:4])
    hf = GenerateConfig(
        prompts=prompts, out=str(tmp / "hf"), backend="hf", dtype="float32", temperature=0.0, max_new_tokens=24, k=5
    )
    hf_url = gen.run(hf)
    # score the teacher's own completions (teacher-forced), with both backends
    pairs = [{"messages": r["messages"], "completion": r["completion"]} for r in kds.TeacherDataset(hf_url).read_table().to_pylist()]
    scoring = replace(hf, prompts=write_jsonl(tmp / "pairs.jsonl", pairs), out=str(tmp / "hf-score"))
    hf_score_url = gen.run(scoring, "score")
    vllm_url, vllm_score_url = run_with_vllm(
        [("generate", replace(hf, backend="vllm", out=str(tmp / "vllm"))), ("score", replace(scoring, backend="vllm", out=str(tmp / "vllm-score")))]
    )
    return SimpleNamespace(hf=hf_url, vllm=vllm_url, hf_score=hf_score_url, vllm_score=vllm_score_url)


def test_every_dataset_verifies(teacher_runs):
    for url, kind, backend in [
        (teacher_runs.hf, "generate", "hf"),
        (teacher_runs.vllm, "generate", "vllm"),
        (teacher_runs.hf_score, "score", "hf"),
        (teacher_runs.vllm_score, "score", "vllm"),
    ]:
        m = assert_valid(url)
        assert (m["generation"]["kind"], m["generation"]["backend"], m["teacher"]["dtype"]) == (kind, backend, "float32")
        assert m["teacher"]["source"] == "builtin:smollm2-135m-instruct" and m["totals"]["rows"] == 4
    assert kds.TeacherDataset(teacher_runs.vllm).manifest["generation"]["engine_version"].startswith("vllm")
    assert Path(teacher_runs.hf).name != Path(teacher_runs.vllm).name  # the backend is part of the key


def test_vllm_and_hf_generate_the_same_tokens_and_topk(teacher_runs):
    hf, vllm = decoded_rows(teacher_runs.hf), decoded_rows(teacher_runs.vllm)
    assert list(hf) == list(vllm)  # same row ids, same order
    for rid, a in hf.items():
        b = vllm[rid]
        np.testing.assert_array_equal(a["prompt_ids"], b["prompt_ids"])
        np.testing.assert_array_equal(a["completion_ids"], b["completion_ids"])
        assert a["completion"] == b["completion"] and a["finish_reason"] == b["finish_reason"]
        assert len(a["completion_ids"]) >= 8
        assert_topk_close(a["topk_ids"], a["topk_logprobs"], b["topk_ids"], b["topk_logprobs"], atol=ATOL)
        np.testing.assert_allclose(a["token_logprobs"], b["token_logprobs"], atol=ATOL, rtol=0)
        # greedy: the generated token is the top-1 of the stored (temperature-1) distribution
        np.testing.assert_array_equal(a["topk_ids"][:, 0], a["completion_ids"])


def test_vllm_and_hf_score_the_same(teacher_runs):
    hf, vllm = decoded_rows(teacher_runs.hf_score), decoded_rows(teacher_runs.vllm_score)
    assert list(hf) == list(vllm)
    for rid, a in hf.items():
        b = vllm[rid]
        np.testing.assert_array_equal(a["completion_ids"], b["completion_ids"])
        assert_topk_close(a["topk_ids"], a["topk_logprobs"], b["topk_ids"], b["topk_logprobs"], atol=ATOL)
        np.testing.assert_allclose(a["token_logprobs"], b["token_logprobs"], atol=ATOL, rtol=0)


def test_vllm_score_matches_vllm_generation(teacher_runs):
    """Teacher forcing (prompt log-probs) and decoding give the same distributions where the
    context is the same."""
    generated, scored = decoded_rows(teacher_runs.vllm), list(decoded_rows(teacher_runs.vllm_score).values())
    whole = 0
    for g, s in zip(generated.values(), scored):
        g_ids, s_ids = g["completion_ids"].tolist(), s["completion_ids"].tolist()
        n = comparable_positions(g_ids, s_ids)
        assert_topk_close(g["topk_ids"][:n], g["topk_logprobs"][:n], s["topk_ids"][:n], s["topk_logprobs"][:n], atol=ATOL)
        whole += common_prefix(g_ids, s_ids) == len(g_ids)
    assert whole >= 3  # real text re-tokenises to the same ids almost always


def test_vllm_cli_on_the_tiny_model(tiny_model_dir, tmp_path):
    """The console script with --backend vllm: exit 0, only the URL on stdout, a valid dataset
    whose first-position top-k (it depends on the prompt alone) matches the hf backend's."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", CHAT_ROWS)
    args = ["--prompts", prompts, "--teacher", tiny_model_dir, "--max-new-tokens", "8", "--k", "4", "--temperature", "0"]
    proc = kdgen_cli("generate", *args, "--backend", "vllm", "--out", str(tmp_path / "vllm"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout  # engine logs stay on stderr
    url = proc.stdout.strip()
    m = assert_valid(url)
    assert m["generation"]["backend"] == "vllm" and m["totals"]["rows"] == 6
    hf_url = gen.run(tiny_config(prompts, str(tmp_path / "hf"), tiny_model_dir, n=1, max_new_tokens=8, k=4, temperature=0.0))
    hf, vllm = decoded_rows(hf_url), decoded_rows(url)
    assert list(hf) == list(vllm)
    for rid, a in hf.items():
        b = vllm[rid]
        n = comparable_positions(a["completion_ids"].tolist(), b["completion_ids"].tolist())
        assert_topk_close(a["topk_ids"][:n], a["topk_logprobs"][:n], b["topk_ids"][:n], b["topk_logprobs"][:n], atol=ATOL)
