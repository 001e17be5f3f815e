"""`kdeval` command line: run, compare, lm-eval.

    kdeval run --model runs/s1 --model runs/s2 --data <held-out teacher dataset> --out evals/cmp
    kdeval run --model runs/s1 --prompts data/heldout.jsonl --references refs.jsonl
    kdeval compare evals/a evals/b --out report/
    kdeval lm-eval --model runs/s1 --tasks data/lm_eval/kd_tiny_task.yaml

The typer app is the one registry of commands; each builds a config (kdeval.config, whose field
docs are the help below) and calls a plain function. User errors (`KdError`) print one line and exit
2, with no traceback. Heavy imports (torch, transformers, matplotlib) happen inside the commands.
"""

from __future__ import annotations

import os
from typing import List, Optional

import typer

from kdeval.config import CompareConfig, EvalConfig, LmEvalConfig
from kdcore.errors import run_cli

app = typer.Typer(
    name="kdeval",
    help="Score distilled checkpoints against the teacher and references, and compare them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
E, C, L = EvalConfig.help, CompareConfig.help, LmEvalConfig.help


@app.command("run")
def run_cmd(
    model: Optional[List[str]] = typer.Option(None, "--model", "-m", help=E("models")),
    data: Optional[str] = typer.Option(None, help=E("data")),
    teacher: Optional[str] = typer.Option(None, help=E("teacher")),
    baseline: Optional[List[str]] = typer.Option(None, "--baseline", help=E("baselines")),
    prompts: Optional[str] = typer.Option(None, help=E("prompts")),
    prompt_column: Optional[str] = typer.Option(None, help=E("prompt_column")),
    references: Optional[str] = typer.Option(None, help=E("references")),
    reference_column: Optional[str] = typer.Option(None, help=E("reference_column")),
    out: str = typer.Option(EvalConfig.out, help=E("out")),
    metrics: Optional[List[str]] = typer.Option(None, "--metrics", help=E("metrics")),
    fidelity: bool = typer.Option(EvalConfig.fidelity, "--fidelity/--no-fidelity", help=E("fidelity")),
    limit: Optional[int] = typer.Option(None, help=E("limit")),
    samples: int = typer.Option(EvalConfig.samples, help=E("samples")),
    backend: str = typer.Option(EvalConfig.backend, help=E("backend")),
    dtype: str = typer.Option(EvalConfig.dtype, help=E("dtype")),
    max_new_tokens: Optional[int] = typer.Option(None, help=E("max_new_tokens")),
    temperature: float = typer.Option(EvalConfig.temperature, help=E("temperature")),
    top_p: float = typer.Option(EvalConfig.top_p, help=E("top_p")),
    seed: int = typer.Option(EvalConfig.seed, help=E("seed")),
    batch_size: int = typer.Option(EvalConfig.batch_size, help=E("batch_size")),
    verify: bool = typer.Option(EvalConfig.verify, "--verify/--no-verify", help=E("verify")),
):
    """Score models on a held-out teacher dataset and/or references; writes results.json + REPORT.md."""
    # --metrics accepts "kl,rouge" as well as repeated flags
    names = [x.strip() for m in metrics or [] for x in m.split(",") if x.strip()]
    cfg = EvalConfig(
        models=model or [], teacher=teacher, baselines=baseline or [], data=data, prompts=prompts, prompt_column=prompt_column,
        references=references, reference_column=reference_column, out=out, metrics=names, fidelity=fidelity, limit=limit,
        samples=samples, backend=backend, dtype=dtype, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, batch_size=batch_size, verify=verify,
    )
    from kdeval.run import run

    print(run(cfg))


@app.command()
def compare(
    runs: List[str] = typer.Argument(..., help=C("runs")),
    out: str = typer.Option(CompareConfig.out, help=C("out")),
    samples: int = typer.Option(CompareConfig.samples, help=C("samples")),
):
    """Merge `kdeval run` outputs into one REPORT.md (table, best in bold), PNG plots and results.json."""
    from kdeval.report import compare as run_compare

    print(run_compare(CompareConfig(runs=runs, out=out, samples=samples)))


@app.command("lm-eval")
def lm_eval_cmd(
    model: str = typer.Option(..., "--model", "-m", help=L("model")),
    tasks: Optional[List[str]] = typer.Option(None, "--tasks", help=L("tasks")),
    out: str = typer.Option(LmEvalConfig.out, help=L("out")),
    limit: Optional[int] = typer.Option(None, help=L("limit")),
    num_fewshot: Optional[int] = typer.Option(None, help=L("num_fewshot")),
    batch_size: int = typer.Option(LmEvalConfig.batch_size, help=L("batch_size")),
    dtype: str = typer.Option(LmEvalConfig.dtype, help=L("dtype")),
    device: str = typer.Option(LmEvalConfig.device, help=L("device")),
    seed: int = typer.Option(LmEvalConfig.seed, help=L("seed")),
):
    """Run lm-evaluation-harness tasks (names or local task YAMLs) on a checkpoint."""
    names = [x.strip() for t in tasks or [] for x in t.split(",") if x.strip()]
    cfg = LmEvalConfig(model=model, tasks=names, out=out, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, dtype=dtype, device=device, seed=seed)
    from kdeval.harness import run

    print(run(cfg))


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    # Before torch loads libgomp: OpenMP threads waiting for work sleep instead of spinning. On this
    # 2-core box shared with other jobs the default spin-wait made transformers decoding 2-20x slower
    # (SmolLM2, batch 8, beside one other torch job: 0.34-3.3 s per step, against 0.15 s with PASSIVE)
    # and `kdeval run` on the demo took 440-620 s instead of ~70 s; on an idle box PASSIVE costs ~15%
    # (37 s -> 43 s). GOMP_SPINCOUNT or OMP_WAIT_POLICY set by the user win.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    run_cli(app, "kdeval", "nothing was written for the unfinished models")


if __name__ == "__main__":
    main()
