"""Bad input to the `kdgen` console script: one line on stderr naming the problem, exit status 2,
no traceback, and nothing left behind that looks like a (partly) complete dataset.

Each case runs the real console script in a subprocess; they run a few at a time (each pays the
interpreter start-up), so the module takes about half a minute.

    .venv/bin/python -m pytest -q tests/test_kdgen_errors.py
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import kdgen.generate as gen
from kdgen_helpers import CHAT_ROWS, complete_looking, kdgen_cli, one_torch_thread, tiny_config, write_jsonl  # noqa: F401

# name: (arguments beyond the defaults below, words the error line must contain); `generate` unless
# the arguments start with another command
CASES = {
    "missing prompt file": (["--prompts", "{tmp}/nope.jsonl"], ["nope.jsonl", "no such file"]),
    "no prompt column": (["--prompts", "{tmp}/no-column.jsonl"], ["no prompt column", "--prompt-column", "foo"]),
    "unknown --prompt-column": (["--prompts", "{tmp}/good.jsonl", "--prompt-column", "nope"], ["--prompt-column 'nope'", "messages"]),
    "empty chat message": (["--prompts", "{tmp}/empty-message.jsonl"], ["row 2", "empty"]),
    "empty text prompt": (["--prompts", "{tmp}/empty-text.jsonl"], ["row 1", "empty"]),
    "non-UTF-8 file": (["--prompts", "{tmp}/latin1.jsonl"], ["not valid UTF-8", "line 2", "iconv"]),
    "prompt longer than the context": (["--prompts", "{tmp}/long.jsonl"], ["prompt 1", "context of 1024"]),
    "unknown model spec": (["--teacher", "no-such-model"], ["unknown model 'no-such-model'", "smollm2-135m-instruct"]),
    "unknown hub id offline": (["--teacher", "nobody/no-such-model"], ["nobody/no-such-model", "not found locally"]),
    "--k 0": (["--k", "0"], ["--k 0", "between 1 and"]),
    "--k above the vocab": (["--k", "49153"], ["--k 49153", "(49152)"]),
    "several bad flags at once": (["--k", "0", "--n", "0", "--temperature", "-1"], ["--k 0", "--n 0", "--temperature -1"]),
    "out is a dataset": (["--out", "{existing}"], ["is itself a dataset", "parent directory"]),
    "out is not writable": (["--out", "{tmp}/a-file/sub"], ["cannot write", "a-file"]),
    "no chat template for chat input": (["--teacher", "{no_template}"], ["no chat template", "--prompt-column"]),
    "score without completions": (["score"], ["--completion-column 'completion'", "messages"]),
}


def _prepare_inputs(tmp: Path, tiny_model_dir: str, tokenizer) -> dict:
    write_jsonl(tmp / "good.jsonl", CHAT_ROWS)
    write_jsonl(tmp / "no-column.jsonl", [{"foo": "What is 2 + 2?"}])
    write_jsonl(tmp / "empty-message.jsonl", [CHAT_ROWS[0], {"messages": [{"role": "user", "content": "  "}]}])
    write_jsonl(tmp / "empty-text.jsonl", [{"prompt": ""}, {"prompt": "fine"}])
    (tmp / "latin1.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9 au lait"}\n')
    write_jsonl(tmp / "long.jsonl", [{"prompt": "word " * 1100}])  # 1100 tokens; the tiny model has 1024
    (tmp / "a-file").write_text("a regular file, not a directory\n")
    # a dataset with other settings (k=3), whose directory is then given as --out
    existing = gen.run(tiny_config(str(tmp / "good.jsonl"), str(tmp / "existing"), tiny_model_dir, k=3, n=1, max_new_tokens=2))
    # the tiny model with a tokenizer that has no chat template
    no_template = tmp / "no-template"
    shutil.copytree(tiny_model_dir, no_template, ignore=shutil.ignore_patterns("*token*", "*chat_template*"))
    tok = type(tokenizer).from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.save_pretrained(no_template)
    return {"tmp": str(tmp), "existing": existing, "no_template": str(no_template)}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory, tiny_model_dir, tokenizer):
    tmp = tmp_path_factory.mktemp("errors")
    where = _prepare_inputs(tmp, tiny_model_dir, tokenizer)
    existing_files = sorted(p for p in Path(where["existing"]).rglob("*"))

    def run(name):
        extra, _ = CASES[name]
        command, extra = (extra[0], extra[1:]) if extra[:1] == ["score"] else ("generate", extra)
        out = tmp / ("out-" + name.replace(" ", "-"))
        args = [command, "--prompts", f"{tmp}/good.jsonl", "--teacher", tiny_model_dir, "--backend", "hf", "--out", str(out)]
        args += ["--max-new-tokens", "4"] if command == "generate" else []
        args += [a.format(**where) for a in extra]  # later flags win
        return name, out, kdgen_cli(*args)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = {name: (out, proc) for name, out, proc in pool.map(run, CASES)}
    assert sorted(p for p in Path(where["existing"]).rglob("*")) == existing_files  # nothing written into it
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_user_error(error_runs, name):
    out, proc = error_runs[name]
    _, words = CASES[name]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdgen: error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert proc.stdout == ""  # stdout carries the dataset URL only on success
    assert complete_looking(out) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_output_directory(tmp_path, tiny_model_dir):
    prompts = write_jsonl(tmp_path / "p.jsonl", CHAT_ROWS[:1])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        proc = kdgen_cli("generate", "--prompts", prompts, "--teacher", tiny_model_dir, "--backend", "hf", "--out", str(locked / "out"))
    finally:
        locked.chmod(0o700)
    assert proc.returncode == 2 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr
    assert complete_looking(locked) == []
