"""The kdtrain config: every shipped recipe parses and validates; flags, overrides and bad values
give one clear line (exit 2 through the CLI)."""

from __future__ import annotations

import sys

import pytest
import yaml

from kdcore.errors import ConfigError, KdError
from kdtrain.config import RECIPES, TrainConfig, load_config, recipe_path

NEEDED = {"data": ["ds/abc"], "student": "some-model"}
# chain recipes (links of runs, `kdtrain chain`) are checked in tests/test_kdtrain_chain.py
RECIPE_NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml") if "links" not in (yaml.safe_load(p.read_text()) or {}))


def test_the_seed_recipes_are_shipped():
    assert {"kd", "skew_kl", "reverse_kl", "jsd", "tvd", "symmetric_kl", "text_kd"} <= set(RECIPE_NAMES)


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_recipe_parses_and_validates(name):
    cfg = load_config(name, NEEDED)
    assert isinstance(cfg, TrainConfig)
    assert cfg.data == ["ds/abc"]


def test_recipe_by_path_and_by_repo_relative_name():
    assert recipe_path("recipes/skew_kl.yaml") == RECIPES / "skew_kl.yaml"
    assert recipe_path(str(RECIPES / "jsd.yaml")) == RECIPES / "jsd.yaml"
    cfg = load_config("skew_kl", NEEDED)
    assert (cfg.loss, cfg.alpha) == ("skl", 0.1)
    with pytest.raises(KdError, match="no recipe of that name"):
        recipe_path("nope")


def test_precedence_defaults_recipe_flags_overrides():
    cfg = load_config("kd", {**NEEDED, "temperature": 3.0, "lr": 1e-3}, ["lr=1e-4", "lora=true", "max_length=64"])
    assert cfg.kd_temperature == 3.0  # flag (old spelling, a hidden alias) beats recipe (2.0)
    assert cfg.lr == 1e-4  # override beats flag
    assert cfg.lora is True and cfg.max_length == 64
    assert cfg.ce_weight == 0.5  # from the recipe


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["loss=kl2"], "--loss kl2: unknown loss"),
        (["alpha=1.5"], "--alpha 1.5"),
        (["beta=0"], "--beta 0.0"),
        (["temperature=0"], "--kd-temperature 0.0"),
        (["tail=top"], "--tail top"),
        (["mode=dense"], "--mode dense"),
        (["batch_size=0"], "--batch-size 0"),
        (["lr=fast"], "lr: expected a number"),
        (["learning_rate=1"], "unknown option 'learning_rate'"),
        (["lr"], "expected key=value"),
        (["init_from_teacher=a,b", "student="], "--init-from-teacher 'a,b'"),
        (["student_config=x.json"], "exactly one of --student"),
    ],
)
def test_bad_values_name_the_flag(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, NEEDED, overrides)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, {}, ["loss=x", "alpha=-1"])
    assert len(e.value.problems) >= 4  # data, student, loss, alpha


def test_cli_prints_one_line_and_exits_2(monkeypatch, capsys):
    from kdtrain.cli import main

    monkeypatch.setattr(sys, "argv", ["kdtrain", "run", "--data", "x", "--student", "s", "--loss", "nope", "temperature=-1"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--loss nope" in err and "--kd-temperature -1.0" in err


def test_cli_help_comes_from_the_config(monkeypatch, capsys):
    from kdtrain.cli import main

    monkeypatch.setattr(sys, "argv", ["kdtrain", "run", "--help"])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--init-from-teacher" in out and TrainConfig.help("tail")[:40] in out
