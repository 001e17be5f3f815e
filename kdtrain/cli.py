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

from kdcore.cli import config_command, make_app
from kdcore.errors import run_cli
from kdtrain.config import RECIPES, MapReportConfig, TrainConfig, recipe_path, validate, validate_map_report

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
