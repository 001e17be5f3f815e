"""The one CLI mechanism of kdgen, kdtrain and kdeval: a typed config dataclass *is* the command.

    app = make_app("kdtrain", "Train students ...")
    app.command("run")(config_command(TrainConfig, "kdtrain.train:run", "Train a student ...", resolve_config=recipe_path))

Every field of the dataclass (declared with `kdcore.config.doc_field`) becomes one flag,
`--field-name`, whose help is the field's doc text. Field metadata shapes the flag:
`flag=` (its name when it differs from the field's: `models` -> `--model`), `short=` (`-m`),
`aliases=` (old spellings, hidden from --help, kept for one release), `split_commas=True`
(`--metrics kl,rouge` as well as repeated flags), `positional=True` (the field takes the command's
bare arguments, e.g. the run directories of `kdeval compare`).

Every command also takes `--config FILE` (a YAML mapping of field: value) and trailing `key=value`
overrides (values read as YAML scalars: `lr=1e-4 lora=true`). Precedence, lowest first:
defaults < --config < flags < key=value. Every value is checked against its field's type — integers,
finite numbers (NaN and inf are refused), true/false — and every problem, each naming the flag, is
raised at once as one `ConfigError`, which `run_cli` prints as one line with exit status 2.

Test: `pytest tests/test_cli.py`.
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, Callable, List, Optional

from kdcore.errors import ConfigError, KdError, collect


def flag_of(f: Field) -> str:
    """The one flag of a config field: `--field-name`, or the field's `flag=` metadata."""
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def _spellings(cls) -> dict[str, str]:
    """Every accepted key (field name, flag name, aliases; '-' or '_') -> the field's name."""
    out = {}
    for f in fields(cls):
        for key in (f.name, f.metadata.get("flag", f.name), *f.metadata.get("aliases", ())):
            out[key.replace("-", "_")] = f.name
    return out


def _base_type(cls, name: str) -> tuple[Any, bool]:
    """(the field's type without Optional, whether None is allowed)."""
    t = typing.get_type_hints(cls)[name]
    args = typing.get_args(t)
    if typing.get_origin(t) is list or not args:
        return t, False
    return next(a for a in args if a is not type(None)), type(None) in args


def coerce(cls, name: str, value: Any) -> Any:
    """Check and convert one value for field `name` of `cls`; ValueError with a readable reason."""
    base, optional = _base_type(cls, name)
    is_list = typing.get_origin(base) is list or base is list
    if value is None:
        if optional:
            return None
        if base is str or is_list:
            return "" if base is str else []
        raise ValueError("may not be empty")
    if is_list:
        values = value if isinstance(value, (list, tuple)) else [value]
        f = next(f for f in fields(cls) if f.name == name)
        if f.metadata.get("split_commas"):
            return [x.strip() for v in values for x in str(v).split(",") if x.strip()]
        return [str(v) for v in values]
    if base is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1", "on"):
            return True
        if str(value).lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"expected an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(x):
            raise ValueError(f"expected a finite number, got {value!r}")
        return x
    return str(value)


def apply(cls, values: dict, into: dict, where: str, problems: list[str], allowed: set[str] | None = None) -> None:
    """Coerce `values` (keys: field names, flags or aliases) into `into`; problems name the key.
    `allowed`: the fields this command has (None = all of the class)."""
    known = {k: n for k, n in _spellings(cls).items() if allowed is None or n in allowed}
    flags = {f.name: flag_of(f) for f in fields(cls)}
    for key, value in values.items():
        name = known.get(str(key).replace("-", "_").lstrip("_"))
        if name is None:
            k = str(key).replace("-", "_")
            near = sorted({n for s, n in known.items() if s.startswith(k[:3])})
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            problems.append(f"{where}: unknown option {k!r}{hint}")
            continue
        try:
            into[name] = coerce(cls, name, value)
        except ValueError as e:
            problems.append(f"{flags[name]}: {e}" if where == "flag" else f"{where}: {key}: {e}")


def parse_overrides(items: list[str]) -> dict:
    """['lr=1e-4', 'lora=true'] -> {'lr': 1e-4, 'lora': True} (values read as YAML scalars)."""
    import yaml

    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError([f"override {item!r}: expected key=value, e.g. lr=1e-4"])
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else None
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def read_yaml(path: Path) -> dict:
    """A YAML config file as a mapping (its optional `description` dropped); one-line errors."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise KdError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise KdError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise KdError(f"--config {path}: expected a mapping of option: value")
    doc.pop("description", None)  # a config file may say what it is
    return doc


def _config_file(name: str) -> Path:
    p = Path(name).expanduser()
    if not p.is_file():
        raise KdError(f"--config {name}: no such file; give a YAML file of option: value")
    return p


def load(
    cls,
    config: str | None = None,
    flags: dict | None = None,
    overrides: list[str] | None = None,
    *,
    resolve_config: Callable[[str], Path] = _config_file,
    validate: Callable[[Any], None] | None = None,
    allowed: set[str] | None = None,
):
    """defaults < config file < flags (None = not given) < key=value overrides; raises one
    ConfigError naming every problem, then runs `validate(cfg)` when given. `allowed`: the fields
    the command has; a config file or override naming another is a problem like an unknown key."""
    merged = {f.name: getattr(cls(), f.name) for f in fields(cls)}
    problems: list[str] = []
    if config:
        path = resolve_config(config)
        apply(cls, read_yaml(path), merged, str(path), problems, allowed)
    apply(cls, {k: v for k, v in (flags or {}).items() if v is not None}, merged, "flag", problems, allowed)
    apply(cls, parse_overrides(overrides or []), merged, "override", problems, allowed)
    collect(problems)
    cfg = cls(**merged)
    if validate is not None:
        validate(cfg)
    return cfg


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _option(f: Field, cls, help: str) -> list[inspect.Parameter]:
    """The typer parameter(s) of one field: its flag, plus one hidden parameter per old spelling.
    Default None means 'not given', so the config file and the dataclass default stay visible."""
    import typer

    base, _ = _base_type(cls, f.name)
    flag = flag_of(f)
    short = [f.metadata["short"]] if f.metadata.get("short") else []
    if typing.get_origin(base) is list:
        annotation, metavar = Optional[List[str]], None
    elif base is bool:
        annotation, metavar = Optional[bool], None
    else:  # parsed by `coerce`, so a bad value is one line naming the flag, like every other problem
        annotation, metavar = Optional[str], {int: "INTEGER", float: "NUMBER"}.get(base, "TEXT")

    def decls(name: str) -> list[str]:
        return [f"{name}/--no-{name[2:]}"] if base is bool else [name]

    default = field_default(cls, f.name)
    shown = f" (default: {default})" if default not in (None, "", []) else ""
    kw = {"metavar": metavar} if metavar else {}
    params = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
            default=typer.Option(None, *decls(flag), *short, help=help + shown, show_default=False, **kw),
        )
    ]
    for alias in f.metadata.get("aliases", ()):
        params.append(
            inspect.Parameter(
                "alias__" + alias.replace("-", "_"), inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                default=typer.Option(None, *decls("--" + alias.replace("_", "-")), hidden=True, **kw),
            )
        )
    return params


def config_command(
    cls,
    fn: Callable[[Any], Any] | str,
    doc: str,
    *,
    include: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    helps: dict[str, str] | None = None,
    config_help: str = "YAML file of option: value (any flag of this command, by field name).",
    resolve_config: Callable[[str], Path] = _config_file,
    validate: Callable[[Any], None] | None = None,
) -> Callable:
    """A typer command for config class `cls`: flags from its fields (`include`/`exclude` choose
    them), `--config`, trailing key=value overrides; builds the config with `load` and prints what
    `fn(cfg)` returns (when not None). `fn` may be "module:function", imported when the command
    runs (so `--help` and bad flags never import torch)."""
    import typer

    chosen = [f for f in fields(cls) if (include is None or f.name in include) and f.name not in exclude]
    positional = next((f for f in chosen if f.metadata.get("positional")), None)
    known = _spellings(cls)
    params = [
        inspect.Parameter(
            "args", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[List[str]],
            default=typer.Argument(
                None,
                metavar=(f"{positional.name.upper()}... " if positional else "") + "[KEY=VALUE]...",
                help=(f"{(helps or {}).get(positional.name) or positional.metadata['help']} " if positional else "")
                + "Trailing key=value overrides, applied last (e.g. seed=1).",
                show_default=False,
            ),
        ),
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
            default=typer.Option(None, "--config", "-c", help=config_help, show_default=False),
        ),
    ]
    for f in chosen:
        if f is not positional:
            params += _option(f, cls, (helps or {}).get(f.name) or f.metadata["help"])

    def command(**kw):
        config, args = kw.pop("config"), kw.pop("args") or []
        flags: dict = {}
        for key, value in kw.items():
            name = known[key[len("alias__"):]] if key.startswith("alias__") else key
            if value is not None and flags.get(name) is None:  # the flag's own spelling wins over an alias
                flags[name] = value
        overrides, bare = [], []
        for a in args:
            key = a.split("=", 1)[0]
            (overrides if "=" in a and _KEY.fullmatch(key) else bare).append(a)
        if bare and positional is None:
            raise ConfigError([f"argument {bare[0]!r}: expected key=value, e.g. seed=1"])
        if positional is not None and bare:
            flags[positional.name] = bare
        cfg = load(cls, config, flags, overrides, resolve_config=resolve_config, validate=validate, allowed={f.name for f in chosen})
        if isinstance(fn, str):
            import importlib

            module, _, name = fn.partition(":")
            result = getattr(importlib.import_module(module), name)(cfg)
        else:
            result = fn(cfg)
        if result is not None:
            print(result)

    command.__doc__ = doc
    command.__signature__ = inspect.Signature(params)
    return command


def make_app(name: str, help: str):
    """The typer app of one console script, with the settings all three share (no completion
    install, no pretty tracebacks: errors go through `kdcore.errors.run_cli`)."""
    import typer

    return typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def field_default(cls, name: str) -> Any:
    """The default of field `name` of config class `cls` (its factory called for lists)."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default
