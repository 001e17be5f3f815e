"""Import boundaries (../shared/DESIGN.md): kdgen never imports kdtrain or kdeval, nothing imports
vLLM at import time, and kdgen works where vLLM is absent. Each check runs in a fresh interpreter.

    .venv/bin/python -m pytest -q tests/test_kdgen_boundaries.py
"""

from __future__ import annotations

import json
import subprocess
import sys

MODULES = [
    "kdgen",
    "kdgen.format",
    "kdgen.generate",
    "kdgen.cli",
    "kdgen.verify",
    "kdgen.models",
    "kdgen.prompts",
    "kdgen.teacher",
    "kdgen.card",
    "kdgen.backends",
    "kdgen.backends.hf_backend",
]


def python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_kdgen_imports_neither_vllm_nor_the_other_packages():
    code = f"""
import importlib, json, sys
for name in {MODULES!r}:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("vllm", "kdtrain", "kdeval"))))
"""
    assert json.loads(python(code)) == []


def test_kdgen_works_without_vllm():
    """With vLLM hidden, the default backend is hf and asking for vllm is a one-line user error."""
    code = """
import sys
sys.modules["vllm"] = None  # what an environment without vLLM looks like to import machinery
from kdgen.backends import default_backend, vllm_available
from kdgen.errors import KdError
from kdgen.generate import GenerateConfig, validate
import kdgen.cli
try:
    validate(GenerateConfig(prompts="p.jsonl", backend="vllm"), "generate")
except KdError as e:
    print(vllm_available(), default_backend(), e)
"""
    available, backend, message = python(code).strip().split(" ", 2)
    assert (available, backend) == ("False", "hf")
    assert message.startswith("--backend vllm: vLLM is not installed") and "--backend hf" in message
