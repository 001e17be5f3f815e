"""`kdtrain` command line.

    kdtrain run --data ds/<fp> --student <spec> --mode logit --loss fkl --out runs/s1
    kdtrain run --config skew_kl --data ds/<fp> --init-from-teacher 0,4,8 lr=1e-4
    accelerate launch --num_processes 2 -m kdtrain run ...
    kdtrain map-report --data ds/<fp> --student gemma3-270m   # cross-tokenizer mapping, before training
    kdtrain recipes                                   # list the shipped YAML recipes

The flags of `run` are generated from `kdtrain.config.TrainConfig` by `kdcore.cli` (one flag per
field, its help from the field's docstring), so the config is the one registry of options. Trailing
`key=value` arguments override anything (YAML scalars: `lr=1e-4 lora=true`). User errors print one
line and exit 2. Test: `pytest tests/test_kdtrain_config.py tests/test_cli.py`.
"""

from __future__ import annotations

from typing import Optional

import typer

from kdcore.cli import config_command
from kdcore.errors import KdError, run_cli
from kdtrain.config import RECIPES, TrainConfig, recipe_path, validate

app = typer.Typer(
    name="kdtrain",
    help="Train students from teacher datasets: text-KD and sparse top-k logit KD, on TRL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _train(cfg: TrainConfig) -> str:
    from kdtrain.train import run

    return run(cfg)


app.command("run")(
    config_command(
        TrainConfig, _train, "Train a student on teacher dataset(s); writes an HF checkpoint plus kd_config.json to --out.",
        config_help="YAML recipe: a file, or a name from `kdtrain recipes`.", resolve_config=recipe_path, validate=validate,
    )
)


@app.command("map-report")
def map_report(
    data: str = typer.Option(..., "--data", help="Teacher dataset directory or URL (ROOT/<fingerprint>)."),
    student: str = typer.Option(..., "--student", help="Student model spec or checkpoint directory (only its tokenizer is loaded)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help=TrainConfig.help("teacher")),
    out: str = typer.Option("map_report.json", "--out", help="Where to write the JSON report."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Measure only the first N rows."),
    vocab_match: str = typer.Option("prefix", "--vocab-match", help=TrainConfig.help("vocab_match")),
    warn_below: float = typer.Option(0.8, "--warn-below", help="Warn when less than this share of the teacher's top-k mass maps onto student ids."),
) -> None:
    """How well a teacher dataset maps onto a student's tokenizer (cross-tokenizer KD), before training."""
    from kdtrain.map_report import run_report
    from kdcore.vocab_map import VOCAB_MATCH

    if vocab_match not in VOCAB_MATCH:
        raise KdError(f"--vocab-match {vocab_match}: choose {' or '.join(VOCAB_MATCH)}")
    if limit is not None and limit < 1:
        raise KdError(f"--limit {limit}: must be >= 1")
    run_report(data, student, teacher, out, limit, vocab_match, warn_below)


@app.command()
def recipes() -> None:
    """List the YAML recipes shipped in kdtrain/recipes (use with --config NAME)."""
    import yaml

    for path in sorted(RECIPES.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        print(f"{path.stem:<14} {doc.get('description', '')}")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    run_cli(app, "kdtrain", "run the same command again to resume from the last checkpoint")


if __name__ == "__main__":
    main()
