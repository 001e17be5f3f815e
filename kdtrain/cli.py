"""`kdtrain` command line.

    kdtrain run --data ds/<fp> --student <spec> --mode logit --loss fkl --out runs/s1
    kdtrain run --config skew_kl --data ds/<fp> --init-from-teacher 0,4,8 lr=1e-4
    accelerate launch --num_processes 2 -m kdtrain run ...
    kdtrain map-report --data ds/<fp> --student gemma3-270m   # cross-tokenizer mapping, before training
    kdtrain onpolicy --teacher T --student S --prompts P --rounds 2 --out runs/opd   # on-policy rounds
    kdtrain chain --recipe takd                       # teacher-assistant chain
    kdtrain recipes                                   # list the shipped YAML recipes

The flags of `run` are generated from `kdtrain.config.TrainConfig` by `kdcore.cli` (one flag per
field, its help from the field's docstring), so the config is the one registry of options. Trailing
`key=value` arguments override anything (YAML scalars: `lr=1e-4 lora=true`). User errors print one
line and exit 2. Test: `pytest tests/test_kdtrain_config.py tests/test_cli.py`.
"""

from __future__ import annotations

from typing import Optional

import typer

from kdcore.cli import config_command, make_app
from kdcore.errors import run_cli
from kdtrain.config import RECIPES, MapReportConfig, TrainConfig, recipe_path, validate, validate_map_report
from kdtrain.onpolicy import OnPolicyConfig
from kdtrain.onpolicy import validate as validate_onpolicy

app = make_app("kdtrain", "Train students from teacher datasets: text-KD and sparse top-k logit KD, on TRL.")


app.command("run")(
    config_command(
        TrainConfig, "kdtrain.train:run", "Train a student on teacher dataset(s); writes an HF checkpoint plus kd_config.json to --out.",
        config_help="YAML recipe: a file, or a name from `kdtrain recipes`.", resolve_config=recipe_path, validate=validate,
    )
)


def _map_report(cfg: MapReportConfig) -> None:
    from kdtrain.map_report import run_report

    run_report(cfg.data, cfg.student, cfg.teacher, cfg.out, cfg.limit, cfg.vocab_match, cfg.warn_below)


app.command("map-report")(
    config_command(
        MapReportConfig, _map_report, "How well a teacher dataset maps onto a student's tokenizer (cross-tokenizer KD), before training.",
        validate=validate_map_report,
    )
)


app.command("onpolicy")(
    config_command(
        OnPolicyConfig, "kdtrain.onpolicy:run",
        "On-policy distillation in rounds: the student samples, the teacher scores its samples (kdgen), the student trains; resumable.",
        validate=validate_onpolicy,
    )
)


@app.command()
def chain(
    recipe: str = typer.Option(..., "--recipe", help="Chain recipe (YAML): teacher, prompts, generation options and the links, e.g. kdtrain/recipes/takd.yaml."),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (default: the recipe's out)."),
    stop_after: Optional[str] = typer.Option(None, "--stop-after", help="Stop once this stage is complete, e.g. link-0/train."),
) -> None:
    """Teacher-assistant chain (TAKD): teacher dataset -> train link 0 -> it generates on the same prompts -> train link 1 ...; resumable."""
    from kdtrain.chain import load_chain, run

    print(run(load_chain(recipe, out), stop_after))


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
