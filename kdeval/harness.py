"""`kdeval lm-eval`: hand a checkpoint to lm-evaluation-harness (`lm_eval`, the `dev` extra).

Tasks are standard harness task names (their data must be reachable: offline, only tasks whose data
is already in the local datasets cache run) or local task YAML files. A YAML's relative
`dataset_kwargs.data_files` are resolved against the YAML's own directory (the harness would resolve
them against the working directory), by writing a resolved copy into a temp include dir.

The project ships `data/lm_eval/kd_tiny_task.yaml` (12 multiple-choice questions, log-likelihood
scored), the default task. Writes `lm_eval_results.json` (the harness's results, versions and
config, plus the model's identity) to --out. Test: `pytest tests/test_kdeval_lm_eval.py`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from kdeval.config import LmEvalConfig, validate_lm_eval
from kdcore.errors import KdError
from kdcore.progress import console

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TASK = REPO / "data" / "lm_eval" / "kd_tiny_task.yaml"


def _yaml_loader():
    """A YAML loader that tolerates the harness's custom tags (`!function ...`)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return Loader


def stage_task_yaml(path: Path, include_dir: Path) -> str:
    """Copy a task YAML into `include_dir` with data_files made absolute; returns its task name."""
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        doc = yaml.load(text, Loader=_yaml_loader()) or {}
    except yaml.YAMLError as e:
        raise KdError(f"--tasks {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("task"), str):
        raise KdError(f"--tasks {path}: not an lm-eval task YAML (no `task:` name)")
    files = (doc.get("dataset_kwargs") or {}).get("data_files")
    if files:
        items = files.items() if isinstance(files, dict) else [(None, files)]
        for _, value in items:
            for f in value if isinstance(value, list) else [value]:
                if isinstance(f, str) and "://" not in f and not os.path.isabs(f):
                    full = (path.parent / f).resolve()
                    if not full.exists():
                        raise KdError(f"--tasks {path}: data file {f} not found beside the YAML ({full})")
                    # rewrite the literal in the text so comments, tags and key order survive
                    text = text.replace(f" {f}", f" {full}")
    (include_dir / path.name).write_text(text, encoding="utf-8")
    return doc["task"]


def run(cfg: LmEvalConfig) -> str:
    """Evaluate; returns the path of lm_eval_results.json."""
    validate_lm_eval(cfg)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise KdError("lm-evaluation-harness is not installed: install the `eval` extra (`pip install -e '.[eval]'`, or `pip install lm-eval==0.4.13`)") from None
    from kdcore.models import resolve

    try:
        model = resolve(cfg.model)
    except KdError as e:
        raise KdError(f"--model {cfg.model}: {e}") from None
    tasks = cfg.tasks or [str(DEFAULT_TASK)]
    with tempfile.TemporaryDirectory(prefix="kdeval-tasks-") as include:
        names = []
        for t in tasks:
            p = Path(t)
            if p.suffix in (".yaml", ".yml"):
                if not p.is_file():
                    raise KdError(f"--tasks {t}: no such task YAML file")
                names.append(stage_task_yaml(p, Path(include)))
            else:
                names.append(t)
        # indexing the harness's thousands of built-in task YAMLs takes seconds: skip it when every task is local
        local_only = all(Path(t).suffix in (".yaml", ".yml") for t in tasks)
        manager = TaskManager(include_path=include, include_defaults=not local_only)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise KdError(
                f"--tasks {', '.join(unknown)}: unknown lm-eval task; give a harness task name (`lm_eval --tasks list`) "
                f"or a local task YAML such as {DEFAULT_TASK.relative_to(REPO)}"
            )
        console.print(f"lm-eval: {model.path} on {', '.join(names)}")
        try:
            res = lm_eval.simple_evaluate(
                model="hf",
                model_args=f"pretrained={model.path},dtype={cfg.dtype}",
                tasks=names,
                task_manager=manager,
                num_fewshot=cfg.num_fewshot,
                batch_size=cfg.batch_size,
                device=cfg.device,
                limit=cfg.limit,
                random_seed=cfg.seed,
                numpy_random_seed=cfg.seed,
                torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed,
                log_samples=False,
            )
        except (ConnectionError, OSError, FileNotFoundError) as e:
            raise KdError(
                f"--tasks {', '.join(names)}: the harness could not load the task data ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); offline, use a local task YAML with local data_files"
            ) from None
    record = {
        "model": model.identity(),
        "tasks": tasks,
        "config": {k: v for k, v in vars(cfg).items()},
        "results": res.get("results"),
        "versions": res.get("versions"),
        "n-shot": res.get("n-shot"),
        "n-samples": res.get("n-samples"),
        "lm_eval_version": res.get("lm_eval_version"),
        "transformers_version": res.get("transformers_version"),
    }
    os.makedirs(cfg.out, exist_ok=True)
    from kdeval.report import write_json

    out = os.path.join(cfg.out, "lm_eval_results.json")
    write_json(out, json.loads(json.dumps(record, default=str)))
    for task, metrics in (res.get("results") or {}).items():
        shown = ", ".join(f"{k.split(',')[0]}={v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        console.print(f"[green]{task}[/]: {shown}")
    return out
