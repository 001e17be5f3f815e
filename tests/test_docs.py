"""Docs that resolve: every `tests/...py` or `docs/...md` file that a module of kdcore, kdgen,
kdtrain, kdeval or bench names exists, and no module points outside the repository.

    .venv/bin/python -m pytest -q tests/test_docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kdcore", "kdgen", "kdtrain", "kdeval", "bench")
NAMED = re.compile(r"\b((?:tests|docs)/[A-Za-z0-9_./-]*[A-Za-z0-9_]\.(?:py|md))\b")
OUTSIDE = re.compile(r"\.\./shared/|/work/")


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_the_scan_sees_the_modules_and_their_pointers():
    found = {m for p in sources() for m in NAMED.findall(p.read_text(encoding="utf-8"))}
    assert len(sources()) > 40 and "tests/test_kdgen_generate.py" in found


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_named_file_exists_and_nothing_points_outside(path):
    text = path.read_text(encoding="utf-8")
    missing = [m for m in NAMED.findall(text) if not (REPO / m).exists()]
    assert missing == [], f"{path.relative_to(REPO)} names files that do not exist: {missing}"
    assert not OUTSIDE.search(text), f"{path.relative_to(REPO)} points outside the repository"


def test_no_test_module_imports_another():
    """Shared fixtures and helpers live in conftest.py and tests/*_helpers.py, not in test modules."""
    import ast

    crossings = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            crossings += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert crossings == []
