"""The one CLI mechanism (kdcore.cli) in all three commands: flags generated from the config
dataclasses, `--config FILE`, trailing key=value overrides, one-line errors with exit 2 — NaN and
inf refused for every numeric flag — and each flag with one name and one meaning (old spellings are
hidden aliases). Every case runs the real console entry point in this process (no subprocess).

    .venv/bin/python -m pytest -q tests/test_cli.py
"""

from __future__ import annotations

import sys
from dataclasses import fields

import pytest

from kdcore.cli import coerce, flag_of
from kdeval.config import CompareConfig, EvalConfig, LmEvalConfig
from kdgen.config import GenerateConfig
from kdtrain.config import TrainConfig


def cli(monkeypatch, capsys, prog: str, *args: str) -> tuple[int, str, str]:
    """Run `prog` (kdgen, kdtrain or kdeval) with `args` as its console script would; (exit code, stdout, stderr)."""
    import importlib

    main = importlib.import_module(f"{prog}.cli").main
    monkeypatch.setattr(sys, "argv", [prog, *args])
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


def one_line_error(code: int, err: str, prog: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# a command line that is fine except for one number: (prog, arguments, the flag named in the error)
NON_FINITE = [
    ("kdgen", ["generate", "--prompts", "p.jsonl", "--temperature", "{x}"], "--temperature"),
    ("kdgen", ["score", "--prompts", "p.jsonl", "--gpu-memory-utilization", "{x}"], "--gpu-memory-utilization"),
    ("kdtrain", ["run", "--data", "d", "--student", "s", "--lr", "{x}"], "--lr"),
    ("kdtrain", ["run", "--data", "d", "--student", "s", "--kd-temperature", "{x}"], "--kd-temperature"),
    ("kdeval", ["run", "--model", "m", "--prompts", "p.jsonl", "--references", "r.txt", "--temperature", "{x}"], "--temperature"),
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("prog,args,flag", NON_FINITE)
def test_non_finite_numbers_are_one_line_errors(monkeypatch, capsys, prog, args, flag, value):
    code, out, err = cli(monkeypatch, capsys, prog, *[a.format(x=value) for a in args])
    one_line_error(code, err, prog, flag, "finite number", value)
    assert out == ""


@pytest.mark.parametrize("prog,command,item", [("kdgen", "generate", "top_p=nan"), ("kdtrain", "run", "alpha=.inf"), ("kdeval", "run", "top_p=nan")])
def test_non_finite_overrides_are_one_line_errors(monkeypatch, capsys, prog, command, item):
    base = {"generate": ["--prompts", "p.jsonl"], "run": ["--data", "d", "--student", "s"] if prog == "kdtrain" else ["--model", "m", "--prompts", "p"]}
    code, _, err = cli(monkeypatch, capsys, prog, command, *base[command], item)
    one_line_error(code, err, prog, item.split("=")[0], "finite number")


def test_every_numeric_field_refuses_nan():
    for cls in (GenerateConfig, TrainConfig, EvalConfig, CompareConfig, LmEvalConfig):
        for f in fields(cls):
            if "float" in str(f.type) or "int" in str(f.type):
                with pytest.raises(ValueError):
                    coerce(cls, f.name, float("nan"))


def test_a_yaml_config_works_for_every_generated_command(monkeypatch, capsys, tmp_path):
    """`--config FILE` is read by all three CLIs; flags beat it; the problem it holds names the flag."""
    conf = tmp_path / "c.yaml"
    conf.write_text("description: a test config\nk: 0\nn: 0\nsamples: -1\n")
    code, _, err = cli(monkeypatch, capsys, "kdgen", "generate", "--config", str(conf), "--prompts", "p.jsonl", "--n", "2")
    line = one_line_error(code, err, "kdgen", "unknown option 'samples'")
    conf.write_text("k: 0\nn: 0\n")
    code, _, err = cli(monkeypatch, capsys, "kdgen", "generate", "--config", str(conf), "--prompts", "p.jsonl", "--n", "2")
    line = one_line_error(code, err, "kdgen", "--k 0")
    assert "--n" not in line  # the flag beat the file
    conf.write_text("samples: -1\n")
    code, _, err = cli(monkeypatch, capsys, "kdeval", "compare", str(tmp_path), "--config", str(conf))
    one_line_error(code, err, "kdeval", "--samples -1")
    conf.write_text("limit: 0\n")
    code, _, err = cli(monkeypatch, capsys, "kdeval", "lm-eval", "-m", "x", "-c", str(conf))
    one_line_error(code, err, "kdeval", "--limit 0")
    conf.write_text("warn_below: .nan\n")
    code, _, err = cli(monkeypatch, capsys, "kdtrain", "map-report", "--data", "d", "--student", "s", "--config", str(conf))
    one_line_error(code, err, "kdtrain", "warn_below", "finite number")
    code, _, err = cli(monkeypatch, capsys, "kdtrain", "run", "--config", str(tmp_path / "nope.yaml"))
    one_line_error(code, err, "kdtrain", "--config", "no recipe of that name")


def test_trailing_overrides_and_positional_arguments(monkeypatch, capsys, tmp_path):
    code, _, err = cli(monkeypatch, capsys, "kdeval", "compare", str(tmp_path), "samples=-2", "--out", str(tmp_path / "r"))
    one_line_error(code, err, "kdeval", "--samples -2")
    code, _, err = cli(monkeypatch, capsys, "kdgen", "generate", "--prompts", "p.jsonl", "k=0", "n=3")
    one_line_error(code, err, "kdgen", "--k 0")
    code, _, err = cli(monkeypatch, capsys, "kdgen", "score", "--prompts", "p.jsonl", "temperature=1")
    one_line_error(code, err, "kdgen", "unknown option 'temperature'")  # a sampling flag: `generate` only
    code, _, err = cli(monkeypatch, capsys, "kdgen", "generate", "--prompts", "p.jsonl", "stray")
    one_line_error(code, err, "kdgen", "'stray'", "key=value")
    code, _, err = cli(monkeypatch, capsys, "kdeval", "run", "--model", "m", "--prompts", "p", "--metrics", "kl,bogus", "batch_size=0")
    one_line_error(code, err, "kdeval", "--metrics bogus", "--batch-size 0")


def test_a_bad_integer_names_its_flag(monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "kdgen", "generate", "--prompts", "p.jsonl", "--k", "2.5")
    one_line_error(code, err, "kdgen", "--k", "expected an integer")


def test_usage_errors_are_one_line_too(monkeypatch, capsys):
    """An option the command does not have (sampling flags belong to `generate`, not `score`), or a
    flag without its value: one line and exit 2 like every other error, not a framed box."""
    code, _, err = cli(monkeypatch, capsys, "kdgen", "score", "--prompts", "p.jsonl", "--temperature", "1")
    one_line_error(code, err, "kdgen", "No such option: --temperature")
    code, _, err = cli(monkeypatch, capsys, "kdeval", "run", "--model")
    one_line_error(code, err, "kdeval", "--model")
    code, _, err = cli(monkeypatch, capsys, "kdtrain", "map-report", "--data", "d", "--student", "s", "--vocab-match", "x", "limit=0")
    one_line_error(code, err, "kdtrain", "--vocab-match x", "--limit 0")


def test_one_name_one_meaning_with_hidden_old_spellings(monkeypatch, capsys):
    """kdgen and kdeval: --temperature / --top-k sample completions. kdtrain: --kd-temperature and
    --train-top-k; its old --temperature / --top-k / --chunk-size / --chunk-ll-weight still work, unlisted."""
    code, out, _ = cli(monkeypatch, capsys, "kdtrain", "run", "--help")
    assert code == 0 and "--kd-temperature" in out and "--train-top-k" in out and "--tile-size" in out and "--span-ll-weight" in out
    for old in ("--temperature", "--top-k", "--chunk-size", "--chunk-ll-weight"):
        assert f"{old} " not in out.replace("--kd-temperature", "").replace("--train-top-k", ""), old
    code, _, err = cli(monkeypatch, capsys, "kdtrain", "run", "--data", "d", "--student", "s", "--temperature", "0", "--chunk-size", "-1", "--top-k", "-1")
    one_line_error(code, err, "kdtrain", "--kd-temperature 0.0", "--tile-size -1", "--train-top-k -1")
    code, _, err = cli(monkeypatch, capsys, "kdtrain", "run", "--data", "d", "--student", "s", "--temperature", "0", "--kd-temperature", "2", "--lr", "0")
    line = one_line_error(code, err, "kdtrain", "--lr 0.0")
    assert "temperature" not in line  # the new spelling wins over the old one
    # the sampling meaning is the same in kdgen and kdeval
    helps = {flag_of(f): f.metadata["help"] for f in fields(GenerateConfig)}
    assert "Sampling temperature" in helps["--temperature"] and "Sampling temperature" in EvalConfig.help("temperature")
    assert "sampling" in helps["--top-k"].lower()
    flags = {cls: {flag_of(f) for f in fields(cls)} for cls in (TrainConfig, GenerateConfig, EvalConfig)}
    assert not {"--temperature", "--top-k", "--chunk-size"} & flags[TrainConfig]
