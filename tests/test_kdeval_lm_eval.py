"""`kdeval lm-eval`: the shipped local task (data/lm_eval/kd_tiny_task.yaml) runs through
lm-evaluation-harness on a tiny checkpoint, offline, from any working directory.
Run: `pytest tests/test_kdeval_lm_eval.py` (needs the `dev` extra's lm-eval).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")


def test_local_task_yaml_runs(tiny_model_dir, tmp_path, monkeypatch):
    from kdeval.config import LmEvalConfig
    from kdeval.harness import DEFAULT_TASK, run

    monkeypatch.chdir(tmp_path)  # data_files must resolve against the YAML, not the working directory
    out = run(LmEvalConfig(model=tiny_model_dir, tasks=[str(DEFAULT_TASK)], limit=4, out=str(tmp_path / "lm")))
    res = json.loads(open(out).read())
    r = res["results"]["kd_tiny"]
    assert 0.0 <= r["acc,none"] <= 1.0 and 0.0 <= r["acc_norm,none"] <= 1.0
    assert res["n-samples"]["kd_tiny"]["effective"] == 4
    assert res["model"]["path"] == tiny_model_dir and res["lm_eval_version"]
