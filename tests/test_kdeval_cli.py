"""Bad input to the `kdeval` console script: one clear line on stderr, exit status 2, no traceback.
(A dataset whose teacher tokenizer is neither in the run nor on the machine: test_kdeval_crosstok.py.)
Run: `pytest tests/test_kdeval_cli.py`.
"""

from __future__ import annotations

import json
import shutil

from kdeval_helpers import assert_user_error, kdeval_cli


def test_checkpoint_dir_without_weights(tiny_model_dir, prompts_file, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    refs = tmp_path / "refs.txt"
    refs.write_text("".join(f"r{i}\n" for i in range(6)))
    proc = kdeval_cli("run", "--model", str(broken), "--prompts", prompts_file, "--references", str(refs), "--out", str(tmp_path / "o"))
    assert_user_error(proc, f"--model {broken}", "no weight files")


def test_empty_prompt_file(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    refs = tmp_path / "refs.txt"
    refs.write_text("x\n")
    proc = kdeval_cli("run", "--model", tiny_model_dir, "--prompts", str(empty), "--references", str(refs), "--out", str(tmp_path / "o"))
    assert_user_error(proc, "holds no prompts")


def test_unknown_metric_and_other_flags_all_at_once(tmp_path):
    proc = kdeval_cli("run", "--model", "x", "--prompts", "p.jsonl", "--references", "r.txt", "--metrics", "kl,bertscore", "--backend", "tgi", "--out", str(tmp_path))
    line = assert_user_error(proc, "--metrics bertscore: unknown metric; choose from kl, top1", "--backend tgi")
    assert "rouge" in line


def test_mismatched_prompt_and_reference_counts(tiny_model_dir, prompts_file, tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"reference": f"r{i}"}) + "\n" for i in range(5)))  # 6 prompts
    proc = kdeval_cli("run", "--model", tiny_model_dir, "--prompts", prompts_file, "--references", str(refs), "--out", str(tmp_path / "o"))
    assert_user_error(proc, "holds 5 references but --prompts", "gives 6 prompts")


def test_compare_without_results(tmp_path):
    proc = kdeval_cli("compare", str(tmp_path), "--out", str(tmp_path / "r"))
    assert_user_error(proc, "no results.json", "kdeval run")
