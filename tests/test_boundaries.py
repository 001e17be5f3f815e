"""Import boundaries (README "Architecture"): kdcore is the ground floor and imports no stage;
kdgen, kdtrain and kdeval are peers — each imports kdcore and itself, never another stage; nothing
imports vLLM at import time, and kdgen works where vLLM is absent. Each check runs in a fresh
interpreter, over every module of the package.

    .venv/bin/python -m pytest -q tests/test_boundaries.py
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("kdgen", "kdtrain", "kdeval")
OPTIONAL = {"kdcore.backends.vllm_backend"}  # imports vLLM by design; loaded only when --backend vllm is chosen


def modules_of(package: str) -> list[str]:
    names = [package]
    for info in pkgutil.walk_packages([str(REPO / package)], prefix=package + "."):
        if info.name not in OPTIONAL and not info.name.endswith("__main__"):
            names.append(info.name)
    return names


def python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("package", ("kdcore",) + STAGES)
def test_each_package_imports_only_the_core_and_itself(package):
    """kdcore imports no stage; a stage imports kdcore and itself; none imports vLLM at import time."""
    forbidden = ["vllm"] + [s for s in STAGES if s != package]
    code = f"""
import importlib, json, sys
for name in {modules_of(package)!r}:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r})))
"""
    assert json.loads(python(code)) == []


def test_the_boundary_check_sees_a_crossing():
    """The check above can fail: importing a stage from another shows up in sys.modules."""
    code = """
import json, sys
import kdeval.run, kdtrain.train
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"kdeval", "kdtrain"})))
"""
    assert json.loads(python(code)) == ["kdeval", "kdtrain"]


def test_kdgen_works_without_vllm():
    """With vLLM hidden, the default backend is hf and asking for vllm is a one-line user error."""
    code = """
import sys
sys.modules["vllm"] = None  # what an environment without vLLM looks like to import machinery
from kdcore.backends import default_backend, vllm_available
from kdcore.errors import KdError
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


@pytest.mark.parametrize("package", ("kdcore",) + STAGES)
def test_no_source_line_imports_another_stage(package):
    """Also the imports inside functions (run only on some paths), read from the source."""
    import ast

    allowed = {"kdcore", package}
    crossings = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top in STAGES + ("kdcore",) and top not in allowed:
                    crossings.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert crossings == []
