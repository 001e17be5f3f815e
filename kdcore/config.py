"""Typed config dataclasses, shared by the three CLIs: each field carries its one docstring.

    prompts: str = doc_field("", "Prompt file ...")    # the CLI help is read from here

A list default becomes a default_factory (a fresh list per config).
"""

from __future__ import annotations

from dataclasses import field, fields


def doc_field(default, help: str, **metadata):
    """A dataclass field with its help text in the metadata."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def field_help(cls, name: str) -> str:
    """The help text of field `name` of config class `cls`."""
    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


class Documented:
    """Base of the config dataclasses: `Config.help("field")` is that field's help text."""

    @classmethod
    def help(cls, name: str) -> str:
        return field_help(cls, name)


def sampling_problems(temperature: float, top_p: float) -> list[str]:
    """The checks of the sampling flags --temperature and --top-p, which mean the same in kdgen and kdeval."""
    problems = []
    if temperature < 0:
        problems.append(f"--temperature {temperature}: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p {top_p}: must be in (0, 1]")
    return problems
