"""`kdtrain` command line.

    kdtrain run --data ds/<fp> --student <spec> --mode logit --loss fkl --out runs/s1
    kdtrain run --config skew_kl --data ds/<fp> --init-from-teacher 0,4,8 lr=1e-4
    accelerate launch --num_processes 2 -m kdtrain run ...
    kdtrain map-report --data ds/<fp> --student gemma3-270m   # cross-tokenizer mapping, before training
    kdtrain recipes                                   # list the shipped YAML recipes
    kdtrain onpolicy --teacher T --student S --prompts P --rounds 2 --out runs/op   # on-policy rounds
    kdtrain chain --recipe kdtrain/recipes/takd.yaml --out runs/takd           # teacher -> assistant -> student

The flags of `run` are generated from `kdtrain.config.TrainConfig` (one flag per field, its help
from the field's docstring), so the config is the one registry of options. Trailing `key=value`
arguments override anything (YAML scalars: `lr=1e-4 lora=true`). User errors print one line and
exit 2. `onpolicy` gets its flags from `kdtrain.onpolicy.OnPolicyConfig` the same way.
Test: `pytest tests/test_kdtrain_cli.py`, `tests/test_kdtrain_onpolicy.py`, `tests/test_kdtrain_chain.py`.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, fields
from typing import List, Optional

import typer

from kdcore.errors import KdError, run_cli
from kdtrain.config import FIELD_TYPES, RECIPES, TrainConfig, load_config

app = typer.Typer(
    name="kdtrain",
    help="Train students from teacher datasets: text-KD and sparse top-k logit KD, on TRL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _option(name: str, help: str, cls=TrainConfig):
    """The typer parameter for one field of a config dataclass: default None means 'not given'."""
    t = FIELD_TYPES[name] if cls is TrainConfig else typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    flag = "--" + name.replace("_", "-")
    if typing.get_origin(t) is list:
        annotation, decls = Optional[List[str]], [flag]
    else:
        base = args[0] if args else t
        annotation = Optional[base]
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if base is bool else [flag]
    f = next(f for f in fields(cls) if f.name == name)
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    shown = f" [default: {default}]" if default not in (None, "", []) else ""
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(None, *decls, help=help + shown, show_default=False), annotation=annotation
    )


def _run(**kw) -> None:
    recipe = kw.pop("config")
    overrides = kw.pop("overrides") or []
    cfg = load_config(recipe, kw, overrides)
    from kdtrain.train import run

    print(run(cfg))


_run.__doc__ = "Train a student on teacher dataset(s); writes an HF checkpoint plus kd_config.json to --out."
_run.__signature__ = inspect.Signature(
    [
        inspect.Parameter(
            "overrides",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=typer.Argument(None, help="key=value overrides, applied last (e.g. lr=1e-4 loss=jsd)."),
            annotation=Optional[List[str]],
        ),
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", "-c", help="YAML recipe: a file, or a name from `kdtrain recipes`."),
            annotation=Optional[str],
        ),
        *(_option(f.name, f.metadata["help"]) for f in fields(TrainConfig)),
    ]
)
app.command("run")(_run)


def _onpolicy(**kw) -> None:
    from kdtrain.onpolicy import OnPolicyConfig, run

    print(run(OnPolicyConfig(**{k: v for k, v in kw.items() if v is not None})))


def _onpolicy_signature():
    from kdtrain.onpolicy import OnPolicyConfig

    return inspect.Signature([_option(f.name, f.metadata["help"], OnPolicyConfig) for f in fields(OnPolicyConfig)])


_onpolicy.__doc__ = "On-policy distillation in rounds: the student samples, the teacher scores its samples (kdgen), the student trains; resumable."
_onpolicy.__signature__ = _onpolicy_signature()
app.command("onpolicy")(_onpolicy)


@app.command()
def chain(
    recipe: str = typer.Option(..., "--recipe", help="Chain recipe (YAML): teacher, prompts, generation options and the links, e.g. kdtrain/recipes/takd.yaml."),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (default: the recipe's out)."),
    stop_after: Optional[str] = typer.Option(None, "--stop-after", help="Stop once this stage is complete, e.g. link-0/train."),
) -> None:
    """Teacher-assistant chain (TAKD): teacher dataset -> train link 0 -> it generates on the same prompts -> train link 1 ...; resumable."""
    from kdtrain.chain import load_chain, run

    print(run(load_chain(recipe, out), stop_after))


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
