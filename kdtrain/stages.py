"""Multi-stage runs (`kdtrain onpolicy`, `kdtrain chain`): a state file of completed stages, and
the other stage (`kdgen`) run as a subprocess.

`Stages(out, kind, options)` keeps `<out>/<kind>_state.json`: the run's options and, per completed
stage, what it produced (a dataset URL, a checkpoint directory) and when. A rerun after a kill skips
every stage recorded there whose artifact still exists, and redoes only the one that was cut short
(itself resumable: kdgen keeps complete shards, kdtrain resumes from its newest checkpoint). The
state is written atomically after each stage, so a kill leaves either the old or the new file.

kdtrain never imports kdgen (peer stages, tests/test_boundaries.py): `kdgen(...)` runs
`python -m kdgen generate|score ...` and returns the dataset URL it prints, so each stage's dataset
is an ordinary content-addressed teacher dataset, exactly what the same command typed by hand writes.

Test: `pytest tests/test_kdtrain_onpolicy.py tests/test_kdtrain_chain.py`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from kdcore.artifacts import KD_CONFIG
from kdcore.errors import KdError
from kdcore.dataset import TeacherDataset
from kdcore.progress import console


class Stages:
    """Completed stages of one run directory (see the module docstring)."""

    def __init__(self, out: str, kind: str, options: dict, stop_after: str | None = None):
        self.out = Path(out)
        self.path = self.out / f"{kind}_state.json"
        self.kind = kind
        self.stop_after = stop_after
        self.state = {"kind": kind, "options": options, "stages": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text(encoding="utf-8"))
            if old.get("options") != options:
                changed = sorted(k for k in set(options) | set(old.get("options", {})) if options.get(k) != old.get("options", {}).get(k))
                raise KdError(
                    f"--out {out} holds a {kind} run with other options ({', '.join(changed)} differ); "
                    f"rerun with the same options to resume it, or choose another --out"
                )
            self.state = old
        self.out.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> dict | None:
        """The record of stage `name` if it completed and its artifact is still there."""
        rec = self.state["stages"].get(name)
        if rec is None:
            return None
        where = rec.get("dataset") or rec.get("checkpoint")
        present = (Path(where) / KD_CONFIG).is_file() if "checkpoint" in rec else _dataset_complete(where)
        if not present:
            console.print(f"[yellow]note:[/] stage {name} was recorded complete but {where} is gone; redoing it")
            return None
        console.print(f"{name}: done earlier -> {where}")
        return rec

    def record(self, name: str, **what) -> dict:
        """Mark stage `name` complete (atomic write); stop here when it is --stop-after."""
        rec = {**what, "completed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.state["stages"][name] = rec
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        tmp.write_text(json.dumps(self.state, indent=2), encoding="utf-8")
        os.replace(tmp, self.path)
        return rec

    def should_stop(self, name: str) -> bool:
        return self.stop_after == name


def _dataset_complete(url: str | None) -> bool:
    try:
        TeacherDataset(url)
        return True
    except (KdError, OSError, TypeError):
        return False


# kdgen options that say how the engine runs, not what a stage computes: passed on to every kdgen
# stage, never pinned in the state file (a rerun after a KV-cache error may add them)
ENGINE_KEYS = ("gpu_memory_utilization", "engine_arg")


def flags(options: dict) -> list[str]:
    """{'max_new_tokens': 64, 'limit': None, 'engine_arg': ['a=1', 'b=2']} ->
    ['--max-new-tokens', '64', '--engine-arg', 'a=1', '--engine-arg', 'b=2'] (None dropped; a list
    repeats its flag)."""
    out: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            out += [part for v in value for part in (flag, str(v))]
        else:
            out += [flag, str(value)]
    return out


def kdgen(command: str, stage: str, **options) -> str:
    """Run `python -m kdgen <command> --opt value ...`; returns the dataset URL it prints last.

    kdgen's progress and errors go to this process's stderr as they happen."""
    cmd = [sys.executable, "-m", "kdgen", command, *flags(options)]
    console.print(f"{stage}: {shlex.join(['kdgen', command, *flags(options)])}")
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    if res.returncode != 0 or not lines:
        raise KdError(
            f"stage {stage}: `kdgen {command}` exited with status {res.returncode} (its error is above); "
            f"fix that and run the same command again: completed stages are kept"
        )
    return lines[-1].strip()
