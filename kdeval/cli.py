"""`kdeval` command line: run, compare, lm-eval.

    kdeval run --model runs/s1 --model runs/s2 --data <held-out teacher dataset> --out evals/cmp
    kdeval run --model runs/s1 --prompts data/heldout.jsonl --references refs.jsonl
    kdeval compare evals/a evals/b --out report/
    kdeval lm-eval --model runs/s1 --tasks data/lm_eval/kd_tiny_task.yaml

The typer app is the one registry of commands; each is generated from its config dataclass in
kdeval.config by `kdcore.cli` (one flag per field, whose doc is the help; `--config FILE`; trailing
key=value overrides) and calls a plain function. User errors (`KdError`) print one line and exit
2, with no traceback (tests/test_kdeval_cli.py). Heavy imports (torch, transformers, matplotlib) happen inside the commands.
"""

from __future__ import annotations

from kdcore.cli import config_command, make_app
from kdcore.errors import run_cli
from kdeval.config import CompareConfig, EvalConfig, LmEvalConfig

app = make_app("kdeval", "Score distilled checkpoints against the teacher and references, and compare them.")
app.command("run")(config_command(EvalConfig, "kdeval.run:run", "Score models on a held-out teacher dataset and/or references; writes results.json + REPORT.md."))
app.command("compare")(config_command(CompareConfig, "kdeval.report:compare", "Merge `kdeval run` outputs into one REPORT.md (table, best in bold), PNG plots and results.json."))
app.command("lm-eval")(config_command(LmEvalConfig, "kdeval.harness:run", "Run lm-evaluation-harness tasks (names or local task YAMLs) on a checkpoint."))


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    run_cli(app, "kdeval", "nothing was written for the unfinished models")


if __name__ == "__main__":
    main()
