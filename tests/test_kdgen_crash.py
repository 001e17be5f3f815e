"""Crash tests (issue 7, item 5): SIGKILL `kdgen generate` at 20 random (seeded) moments and
`kdtrain run` a few times; after resuming, the dataset holds exactly the rows of an uninterrupted
run (no duplicate, no missing id, same contents) and verifies; training ends at the right step
with a checkpoint that loads. Marked slow: each kill restarts a Python process (imports + model).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

import kdcore.dataset as kds
import kdcore.io as kio
from kdgen_helpers import CHAT_ROWS, assert_valid, one_torch_thread, rows_of, write_jsonl  # noqa: F401
from kdgen_store_helpers import KDGEN, KDTRAIN, child_env, cli, cli_args, small_config

pytestmark = pytest.mark.slow


def _start(args: list[str], exe: str = KDGEN) -> subprocess.Popen:
    return subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


def _until_ready(proc: subprocess.Popen, root: Path, before: int) -> float:
    """Wait until the run has read its prompts and teacher config and touched the output root (its
    write probe), or has exited; returns the seconds it took. Before that moment a kill only
    interrupts imports; after it come plan, engine start, shards, renames and the commit."""
    t0 = time.perf_counter()
    while proc.poll() is None and _mtime(root) == before:
        time.sleep(0.01)
    return time.perf_counter() - t0


def test_generate_survives_20_sigkills(tmp_path, tiny_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", CHAT_ROWS)
    ref_cfg = small_config(prompts, str(tmp_path / "ref"), tiny_model_dir)  # six shards: six commit points
    proc = _start(cli_args(ref_cfg))
    _until_ready(proc, tmp_path / "ref", 0)
    t0 = time.perf_counter()
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    work = time.perf_counter() - t0  # the part of a run worth killing
    (ref_url,) = [str(p) for p in (tmp_path / "ref").iterdir()]
    expected = rows_of(ref_url)

    cfg = small_config(prompts, str(tmp_path / "crash"), tiny_model_dir)
    root = tmp_path / "crash"
    ds = root / Path(ref_url).name
    rng = random.Random(20)
    kills = finished_early = mid_work = 0
    # 20 random kills, and more (up to 40) if too few of them landed mid-work: on a fast machine a
    # resumed run with one shard left commits within the kill window, and its kill hits a finished run
    while kills < 20 or (mid_work < 5 and kills < 40):
        assert finished_early < 40, "the runs keep finishing before the kill; the test lost its point"
        before, shards_before = _mtime(root), len(kds.list_shards(*kio.open_fs(str(ds))))
        proc = _start(cli_args(cfg))
        _until_ready(proc, root, before)
        if kills % 2:  # every other kill lands after this run wrote a shard: among renames and the commit
            while proc.poll() is None and len(kds.list_shards(*kio.open_fs(str(ds)))) == shards_before:
                time.sleep(0.01)
        try:
            proc.wait(timeout=rng.uniform(0.0, work / 6 if kills % 2 else work))  # a random moment of its work ...
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)  # ... plan, engine start, mid-shard, rename, card, commit
            proc.wait()  # reaped: its pid is gone, so its locks count as stale at once
            kills += 1
            mid_work += bool(kds.list_shards(*kio.open_fs(str(ds)))) and not (ds / kds.MANIFEST).exists()
            continue
        assert proc.returncode == 0, proc.stderr.read()
        # it completed first (resumed runs are short): check it, then start over to keep killing real work
        finished_early += 1
        assert_valid(str(ds))
        assert rows_of(str(ds)) == expected
        fsys, path = kio.open_fs(str(ds))
        fsys.rm(path, recursive=True)
    assert mid_work >= 5, f"only {mid_work} of {kills} kills hit a half-written dataset"
    resumed = cli(*cli_args(cfg))
    assert resumed.returncode == 0, resumed.stderr
    assert_valid(str(ds))
    got = rows_of(str(ds))
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)) == len(expected)  # no duplicate, no missing id
    assert got == expected  # and the very same rows
    assert cli("verify", str(ds)).returncode == 0
    leftovers = sorted(p.name for p in ds.rglob("*") if p.name.startswith((kio.TMP_PREFIX, ".kdgen")))
    assert leftovers == [], leftovers  # a kill right after a commit leaves plan and locks; the resumed run (a cache hit) tidies them


def test_kdtrain_resumes_after_sigkills(tmp_path, tiny_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", CHAT_ROWS)
    made = cli(*cli_args(small_config(prompts, str(tmp_path / "data"), tiny_model_dir)))
    assert made.returncode == 0, made.stderr
    data = made.stdout.strip().splitlines()[-1]
    out = tmp_path / "student"
    max_steps = 30
    args = ["run", "--data", data, "--student", tiny_model_dir, "--out", str(out), "--batch-size", "2",
            "--max-steps", str(max_steps), "--save-steps", "2", "--logging-steps", "1", "--warmup-ratio", "0"]  # fmt: skip

    def complete() -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "kd_config.json").exists())

    rng = random.Random(5)
    kills = 0
    while kills < 3:
        before = complete()
        proc = _start(args, KDTRAIN)
        deadline = time.monotonic() + 300
        while complete() == before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # wait for this run to make progress (a new checkpoint) ...
        time.sleep(rng.uniform(0.0, 0.5))  # ... then kill it at a random moment: mid-step or mid-save
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills == 3
    final = subprocess.run([KDTRAIN, *args], capture_output=True, text=True, env=child_env(), timeout=600)
    assert final.returncode == 0, final.stderr
    assert complete()[-1] == max_steps
    state = json.loads((out / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == max_steps
    assert json.loads((out / f"checkpoint-{max_steps}" / "kd_config.json").read_text())["global_step"] == max_steps
    assert (out / "kd_config.json").exists() and (out / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
