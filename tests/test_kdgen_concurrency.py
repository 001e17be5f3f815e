"""Concurrency (issue 7, item 4): two `kdgen generate` processes on the same request and root split
the shards through per-shard claims and never corrupt each other; the lock files behave on local
disks, S3 and GCS (exclusive create, stale locks of dead processes broken at once, live ones
respected). On GCS exclusive create is an upload with `ifGenerationMatch=0`, which GCS refuses with
412 when the object exists and gcsfs raises as FileExistsError; run against the loopback GCS
emulator (tests/kdgen_gcs.py). Generate, resume, cache hit, `kdgen ls`, `kdgen verify`, push/pull
and `kdtrain run` on s3:// and gs:// are the store tests of tests/test_kdgen_store.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import kdgen.generate as gen
import kdcore.dataset as kds
import kdcore.io as kio
from kdgen import locks
from kdgen.locks import FileLock
from kdgen_helpers import CHAT_ROWS, assert_valid, one_torch_thread, rows_of, write_jsonl  # noqa: F401
from kdgen_gcs import gcs_server  # noqa: F401  (fixture)
from kdgen_s3 import s3_server  # noqa: F401  (fixture)
from kdgen_store_helpers import KDGEN, child_env, cli_args, small_config


def test_two_processes_on_one_request_split_the_work(tmp_path, tiny_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", CHAT_ROWS)
    cfg = small_config(prompts, str(tmp_path / "together"), tiny_model_dir)
    procs = [subprocess.Popen([KDGEN, *cli_args(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    urls = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(urls) == 1
    url = urls.pop()
    assert_valid(url)
    assert sorted(p.name for p in Path(url).iterdir()) == ["README.md", "data", "manifest.json"]  # no locks, no plan left
    single = gen.run(small_config(prompts, str(tmp_path / "alone"), tiny_model_dir))
    assert rows_of(url) == rows_of(single)
    for name in kds.list_shards(*kio.open_fs(url)):
        assert (Path(url) / "data" / name).read_bytes() == (Path(single) / "data" / name).read_bytes()


@pytest.fixture(params=["local", "s3", "gcs"])
def store(request, tmp_path):
    """A dataset directory on a local disk, in a new S3 bucket or in a new GCS bucket."""
    if request.param == "local":
        return str(tmp_path / "ds")
    return request.getfixturevalue(f"{request.param}_server")() + "/ds"


def test_lock_is_exclusive_and_released(store):
    fs, path = kio.open_fs(store)
    a, b = FileLock(fs, locks.lock_path(path, "x")), FileLock(fs, locks.lock_path(path, "x"))
    assert a.try_acquire()
    assert not b.try_acquire()  # a live holder (this very process)
    info = b.holder()
    assert info["pid"] == os.getpid() and info["host"] == locks.HOST and info["token"] == a.token
    a.refresh()
    assert not a.lost
    a.release()
    assert b.try_acquire() and b.holder()["token"] == b.token
    a_again = FileLock(fs, locks.lock_path(path, "x"))
    assert not a_again.try_acquire()
    b.release()
    assert not fs.exists(locks.lock_path(path, "x"))


def _plant(fs, path: str, **record) -> None:
    base = {"token": "planted", "pid": os.getpid(), "host": locks.HOST, "created": time.time(), "refreshed": time.time()}
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(json.dumps({**base, **record}).encode())


def test_stale_locks_are_broken_live_ones_kept(store):
    fs, path = kio.open_fs(store)
    lp = locks.lock_path(path, "shard")
    dead = subprocess.Popen(["true"])
    dead.wait()
    _plant(fs, lp, pid=dead.pid)  # SIGKILLed run on this host: broken at once
    lock = FileLock(fs, lp)
    assert lock.try_acquire() and lock.holder()["token"] == lock.token
    lock.release()

    _plant(fs, lp, host="other-machine", pid=1)  # another machine, fresh heartbeat: respected
    assert not FileLock(fs, lp).try_acquire()
    _plant(fs, lp, host="other-machine", pid=1, refreshed=time.time() - locks.STALE_S - 5)  # no heartbeat for too long
    lock = FileLock(fs, lp)
    assert lock.try_acquire()
    lock.release()


def test_lock_lost_to_another_process_is_noticed(tmp_path):
    fs, path = kio.open_fs(str(tmp_path))
    lock = FileLock(fs, locks.lock_path(path, "x"))
    assert lock.try_acquire()
    _plant(fs, lock.path, token="someone-else")  # we were judged stale and someone took over
    lock.refresh()
    assert lock.lost
    lock.release()  # leaves the other holder's lock alone
    assert FileLock(fs, lock.path).holder()["token"] == "someone-else"


def test_a_waiting_run_finishes_after_the_holder(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A shard claimed by a live process is waited for, not generated twice."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", CHAT_ROWS[:2])
    cfg = small_config(prompts, str(tmp_path / "out"), tiny_model_dir)
    ref = gen.run(small_config(prompts, str(tmp_path / "ref"), tiny_model_dir))
    ds = tmp_path / "out" / Path(ref).name
    claim = FileLock(*kio.open_fs(str(ds)))
    claim.path = locks.lock_path(str(ds), kds.shard_name(1, 2))
    assert claim.try_acquire()  # "another process" holds shard 1 ...

    def holder_finishes():  # ... and writes it while we wait
        if claim.held:
            (ds / "data").mkdir(parents=True, exist_ok=True)
            (ds / "data" / kds.shard_name(1, 2)).write_bytes((Path(ref) / "data" / kds.shard_name(1, 2)).read_bytes())
            claim.release()

    monkeypatch.setattr(gen, "_pause", holder_finishes)
    url = gen.run(cfg)
    assert "waiting for 1 shard(s) that another process is writing" in capsys.readouterr().err
    assert_valid(url)
    assert rows_of(url) == rows_of(ref)


def test_a_run_overtaken_by_another_process_leaves_no_locks(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Another process commits the whole dataset between this run's plan and its first claim: this run
    stops, and the lock directory its claim re-created is gone (CI once found `.kdgen-locks` left)."""
    import shutil

    prompts = write_jsonl(tmp_path / "prompts.jsonl", CHAT_ROWS[:2])
    ref = gen.run(small_config(prompts, str(tmp_path / "ref"), tiny_model_dir))
    ds = tmp_path / "out" / Path(ref).name
    real, calls = gen._shard_is_complete, []

    def other_process_commits_first(job, name, expected):
        calls.append(name)
        if len(calls) <= 2:  # the plan's look at both shards: nothing there yet
            return False
        if len(calls) == 3:  # the loop's look at shard 0, just before the other process commits
            shutil.copytree(ref, ds, dirs_exist_ok=True)
            (ds / gen.PLAN).unlink()  # its commit removes the shared plan, as finalize() does
            return False
        return real(job, name, expected)

    monkeypatch.setattr(gen, "_shard_is_complete", other_process_commits_first)
    url = gen.run(small_config(prompts, str(tmp_path / "out"), tiny_model_dir))
    assert "another process committed" in capsys.readouterr().err
    assert sorted(p.name for p in Path(url).iterdir()) == ["README.md", "data", "manifest.json"]
    assert rows_of(url) == rows_of(ref)


def test_a_cache_hit_tidies_what_a_run_killed_after_its_commit_left(tmp_path, tiny_model_dir):
    """A run SIGKILLed between writing its manifest and tidying up leaves its plan, its dataset lock and
    the claims of dead processes in a complete dataset: the next run over it (a cache hit) removes
    them, and keeps a live process's lock (CI once found `.kdgen-locks` left after the crash test)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", CHAT_ROWS[:2])
    cfg = small_config(prompts, str(tmp_path / "out"), tiny_model_dir)
    url = gen.run(cfg)
    ds, fs = Path(url), kio.open_fs(url)[0]
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer exists on this host
    (ds / gen.PLAN).write_text("{}")
    (ds / f"{kio.TMP_PREFIX}0123-README.md").write_text("half a card")  # killed while writing under the dataset lock
    _plant(fs, locks.lock_path(url, "dataset"), pid=dead.pid)
    _plant(fs, locks.lock_path(url, "train-00000-of-00002"), pid=dead.pid)
    _plant(fs, locks.lock_path(url, "train-00001-of-00002"))  # this live process: not broken
    assert gen.run(cfg) == url
    assert sorted(p.name for p in (ds / locks.LOCK_DIR).iterdir()) == ["train-00001-of-00002.lock"]
    assert not (ds / gen.PLAN).exists()
    os.remove(locks.lock_path(url, "train-00001-of-00002"))  # its holder finished
    assert gen.run(cfg) == url
    assert sorted(p.name for p in ds.iterdir()) == ["README.md", "data", "manifest.json"]
    assert_valid(url)
