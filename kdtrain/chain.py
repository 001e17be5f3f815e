"""`kdtrain chain`: teacher-assistant chains (TAKD, Mirzadeh et al. 2020), offline (issue 15).

A big capacity gap hurts distillation; an assistant of middle size bridges it. Offline that is a
row of ordinary kd runs, each link's teacher being the previous link's student:

    link 0:  generate  `kdgen generate --teacher T --prompts P`  (or the recipe's existing `data`)
             train     `kdtrain run --data <it> ...link 0's options`         -> assistant
    link 1:  generate  `kdgen generate --teacher <assistant> --prompts P`    (same prompts)
             train     `kdtrain run --data <it> ...link 1's options`         -> student
    ... any number of links.

Each link's dataset is a content-addressed teacher dataset whose manifest names that link's
teacher (the assistant for link 1). Each stage is recorded in <out>/chain_state.json; a rerun skips
recorded stages and resumes the one a kill cut short (see `kdtrain.stages`).

Recipe (YAML; kdtrain/recipes/takd.yaml is the shipped one):

    teacher: smollm2-135m-instruct     # the first link's teacher
    prompts: data/train.jsonl          # prompt file, or a teacher dataset (its prompts)
    data: null                         # optional: link 0's dataset, already generated
    out: runs/takd
    generate: {max_new_tokens: 128, k: 20}   # `kdgen generate` options, every link (engine memory
                                       # settings too: gpu_memory_utilization, engine_arg: [KEY=VALUE])
    links:
      - name: assistant
        train: {init_from_teacher: "0,2,4", loss: fkl}   # `kdtrain run` options (TrainConfig fields)
      - name: student
        train: {init_from_teacher: "0,2", loss: fkl}     # layers of *this* link's teacher

Test: `pytest tests/test_kdtrain_chain.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kdcore.errors import KdError, collect
from kdcore.progress import console
from kdtrain.config import find_recipe, load_config
from kdtrain.stages import ENGINE_KEYS, Stages, kdgen

STATE = "chain"
GENERATE_KEYS = ("backend", "dtype", "temperature", "top_p", "top_k", "max_new_tokens", "n", "seed", "k", "limit", "chat_template", "prompt_column",
                 *ENGINE_KEYS)  # fmt: skip
RECIPE_KEYS = ("description", "teacher", "prompts", "data", "out", "generate", "links")


@dataclass
class Link:
    name: str
    train: dict  # TrainConfig fields; data, out and teacher are filled in per link


@dataclass
class ChainConfig:
    teacher: str
    prompts: str
    out: str
    links: list[Link]
    data: str | None = None
    generate: dict = field(default_factory=dict)
    source: str = ""  # the recipe file

    def options(self) -> dict:
        """What the state file pins (everything but --out and the engine's memory settings)."""
        return {
            "teacher": self.teacher, "prompts": self.prompts, "data": self.data,
            "generate": {k: v for k, v in self.generate.items() if k not in ENGINE_KEYS},
            "links": [{"name": ln.name, "train": ln.train} for ln in self.links],
        }


def load_chain(recipe: str, out: str | None = None) -> ChainConfig:
    """Read and check a chain recipe; every problem at once, each naming its key."""
    path = find_recipe(recipe)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise KdError(f"--recipe {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    where = f"--recipe {path}"
    if not isinstance(doc, dict) or "links" not in doc:
        raise KdError(f"{where}: not a chain recipe (no links); a training recipe runs with `kdtrain run --config {path}`")
    p = [f"{where}: unknown key {k!r} (keys: {', '.join(RECIPE_KEYS)})" for k in doc if k not in RECIPE_KEYS]
    if not doc.get("teacher"):
        p.append(f"{where}: teacher is required (the first link's teacher model)")
    if not doc.get("prompts") and not doc.get("data"):
        p.append(f"{where}: prompts is required (the prompts every link's teacher answers), or data (link 0's dataset)")
    gen = doc.get("generate") or {}
    if not isinstance(gen, dict):
        p.append(f"{where}: generate must be a mapping of kdgen generate options")
        gen = {}
    p += [f"{where}: generate.{k}: not a `kdgen generate` option here (choose from {', '.join(GENERATE_KEYS)})" for k in gen if k not in GENERATE_KEYS]
    links = doc.get("links")
    if not isinstance(links, list) or not links:
        p.append(f"{where}: links must be a non-empty list of {{name, train}}")
        links = []
    parsed: list[Link] = []
    for i, ln in enumerate(links):
        if not isinstance(ln, dict) or not isinstance(ln.get("train", {}), dict):
            p.append(f"{where}: links[{i}] must be a mapping with name and train (kdtrain run options)")
            continue
        name = str(ln.get("name") or f"link{i}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            p.append(f"{where}: links[{i}].name {name!r}: use letters, digits, '-', '_' or '.'")
        train = dict(ln.get("train") or {})
        for key in ("data", "out", "teacher"):
            if key in train:
                p.append(f"{where}: links[{i}].train.{key}: set by the chain (the link's dataset, run directory and teacher); remove it")
        try:  # the link's options, checked now rather than after the links before it have trained
            load_config(None, {"data": ["<link dataset>"], **{k: v for k, v in train.items() if k not in ("data", "out", "teacher")}})
        except KdError as e:
            p.append(f"{where}: links[{i}] ({name}).train: {e}")
        parsed.append(Link(name, train))
    if len({ln.name for ln in parsed}) != len(parsed):
        p.append(f"{where}: link names must differ")
    collect(p)
    return ChainConfig(
        teacher=str(doc["teacher"]), prompts=str(doc.get("prompts") or doc["data"]), out=out or str(doc.get("out") or "runs/chain"),
        links=parsed, data=doc.get("data"), generate=gen, source=str(path),
    )


def run(cfg: ChainConfig, stop_after: str | None = None) -> str:
    """Every link in order; returns the last link's checkpoint directory."""
    from kdtrain.train import run as train

    names = [f"link-{i}/{s}" for i in range(len(cfg.links)) for s in ("generate", "train")]
    if stop_after is not None and stop_after not in names:
        raise KdError(f"--stop-after {stop_after}: not a stage of this chain; stages: {', '.join(names)}")
    stages = Stages(cfg.out, STATE, cfg.options(), stop_after)
    teacher = cfg.teacher
    for i, link in enumerate(cfg.links):
        stage = f"link-{i}"
        rec = stages.done(f"{stage}/generate")
        if rec is None:
            if i == 0 and cfg.data:
                url = cfg.data
            else:
                url = kdgen("generate", f"{stage}/generate", teacher=teacher, prompts=cfg.prompts, out=str(Path(cfg.out) / "datasets"), **cfg.generate)
            rec = stages.record(f"{stage}/generate", dataset=url, teacher=teacher)
        if stages.should_stop(f"{stage}/generate"):
            return rec["dataset"]
        data = rec["dataset"]
        rec = stages.done(f"{stage}/train")
        if rec is None:
            tc = load_config(None, {**link.train, "data": [data], "teacher": teacher, "out": str(Path(cfg.out) / f"{stage}-{link.name}")})
            console.print(f"{stage}/train: kdtrain run --data {data} ({link.name}, teacher {teacher})")
            rec = stages.record(f"{stage}/train", checkpoint=train(tc), link=link.name)
        teacher = rec["checkpoint"]
        if stages.should_stop(f"{stage}/train"):
            return teacher
    console.print(f"[green]chain done:[/] {len(cfg.links)} link(s) -> {teacher}")
    return teacher
