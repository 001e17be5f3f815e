"""Locks on any fsspec store: a small JSON file created exclusively and refreshed while held.

Two `kdgen generate` processes on the same request and root — on one machine or on several
sharing a bucket — must never corrupt each other (issue 7). They split the work instead:

* each shard is **claimed** before it is generated (`<dataset>/.kdgen-locks/<shard>.lock`), so
  concurrent processes take different shards and wait only for shards another process holds;
* the plan (`.kdgen-plan.json`) and the commit (card, then manifest) are written under the
  dataset's own lock (`<dataset>/.kdgen-locks/dataset.lock`), held for moments only.

Exclusive create is `fs.open(path, "xb")`: O_EXCL on local disks, a conditional PUT
(`If-None-Match: *`) on S3 through s3fs (AWS, MinIO and moto honour it), the same on the memory
filesystem. A store that cannot create exclusively falls back to write-then-read-back, which
narrows the race without closing it (noted in the README).

A lock records who holds it (pid, host, token, times). The holder rewrites it every
`HEARTBEAT_S`; a lock not refreshed for `STALE_S`, or held by a process that no longer exists on
this host (a SIGKILLed run), is stale and is broken by the next process that wants it, so a crash
never blocks a resume.

Test: `pytest tests/test_kdgen_concurrency.py`.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid

import fsspec

LOCK_DIR = ".kdgen-locks"
HEARTBEAT_S = 30.0  # how often a holder refreshes its locks
STALE_S = 300.0  # a lock not refreshed for this long is abandoned (10 missed heartbeats)
UNREADABLE_GRACE_S = 10.0  # a lock file that stays empty/unparsable this long was left by a crash mid-create
HOST = socket.gethostname()


def lock_path(dataset_dir: str, name: str) -> str:
    return posixpath.join(dataset_dir, LOCK_DIR, f"{name}.lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FileLock:
    """One lock file. `try_acquire()` never blocks; `release()` removes the file if it is still ours."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        self.fs, self.path = fs, path
        self.token = uuid.uuid4().hex
        self.held = False
        self.lost = False  # set by the heartbeat if someone broke our lock (we were judged stale)
        self._unreadable_since: float | None = None

    # -- reading ----------------------------------------------------------------------------------

    def holder(self) -> dict | None:
        """The lock's record, {} while it is unreadable (being created), None when there is no lock."""
        try:
            with self.fs.open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw)
            return info if isinstance(info, dict) and "token" in info else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def stale_reason(self, info: dict) -> str | None:
        """Why the lock described by `info` may be broken, or None while its holder looks alive."""
        now = time.time()
        if not info:
            self._unreadable_since = self._unreadable_since or now
            if now - self._unreadable_since > UNREADABLE_GRACE_S:
                return f"its file stayed unreadable for {UNREADABLE_GRACE_S:.0f} s (its writer died while creating it)"
            return None
        self._unreadable_since = None
        if info.get("host") == HOST and not _pid_alive(int(info.get("pid", -1))):
            return f"process {info.get('pid')} on this host ({HOST}) no longer exists"
        age = now - float(info.get("refreshed", 0))
        if age > STALE_S:
            return f"not refreshed for {age:.0f} s (holder {info.get('pid')}@{info.get('host')} presumed dead)"
        return None

    # -- taking and giving back -------------------------------------------------------------------

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps(
            {"token": self.token, "pid": os.getpid(), "host": HOST, "created": now, "refreshed": now}
        ).encode()

    def _create(self) -> bool:
        for attempt in range(3):
            self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
            try:
                with self.fs.open(self.path, "xb") as f:
                    f.write(self._record())
                return True
            except FileExistsError:
                return False
            except FileNotFoundError:
                # a finishing process removed the (empty) lock directory between our makedirs and
                # the create: make it again
                if attempt == 2:
                    raise
            except (ValueError, NotImplementedError):  # the store has no exclusive create
                return self._create_unsafe()
        raise AssertionError("unreachable")

    def _create_unsafe(self) -> bool:
        """For stores without an exclusive create: write, wait, and see whose record survived."""
        if self.fs.exists(self.path):
            return False
        with self.fs.open(self.path, "wb") as f:
            f.write(self._record())
        time.sleep(0.2)  # let a racing writer land, then see whose record survived
        return (self.holder() or {}).get("token") == self.token

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale; False while another live process holds it."""
        if self.held:
            return True
        for _ in range(2):
            if self._create():
                self.held, self.lost = True, False
                _heartbeat.add(self)
                return True
            if not self.break_if_stale():
                return False  # a live process holds it
        return False

    def acquire(self, poll_s: float = 1.0, on_wait=None) -> None:
        """Block until the lock is ours; `on_wait(holder)` is called once if we have to wait."""
        waited = False
        while not self.try_acquire():
            if not waited and on_wait is not None:
                on_wait(self.holder() or {})
            waited = True
            time.sleep(poll_s)

    def break_if_stale(self) -> bool:
        """Remove the lock file if its holder is gone (`stale_reason`); False while a live process holds it."""
        info = self.holder()
        if info is None:
            return True  # no lock (released meanwhile)
        if self.stale_reason(info) is None:
            return False
        # only remove the record we judged stale: if it changed meanwhile, its holder is alive
        if (self.holder() or {}).get("token") == info.get("token"):
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass
        return True

    def refresh(self) -> None:
        info = self.holder()
        if not info or info.get("token") != self.token:
            self.lost = True
            return
        info["refreshed"] = time.time()
        with self.fs.open(self.path, "wb") as f:
            f.write(json.dumps(info).encode())

    def release(self) -> None:
        if not self.held:
            return
        _heartbeat.discard(self)
        self.held = False
        if (self.holder() or {}).get("token") == self.token:
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Heartbeat:
    """One daemon thread per process that refreshes every lock the process holds."""

    def __init__(self):
        self._locks: set[FileLock] = set()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, lock: FileLock) -> None:
        with self._guard:
            self._locks.add(lock)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="kdgen-lock-heartbeat", daemon=True)
                self._thread.start()

    def discard(self, lock: FileLock) -> None:
        with self._guard:
            self._locks.discard(lock)

    def _loop(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self._guard:
                locks = list(self._locks)
            for lock in locks:
                try:
                    lock.refresh()
                except Exception:  # a flaky store: the next beat tries again, STALE_S allows many misses
                    pass


_heartbeat = _Heartbeat()


def describe(info: dict) -> str:
    if not info:
        return "a process that is just starting"
    since = time.strftime("%H:%M:%S", time.localtime(float(info.get("created", 0))))
    return f"pid {info.get('pid')} on {info.get('host')} (since {since})"


def remove_lock_dir(fs: fsspec.AbstractFileSystem, dataset_dir: str) -> None:
    """Best effort: drop the (empty) lock directory of a committed dataset."""
    d = posixpath.join(dataset_dir, LOCK_DIR)
    try:
        if fs.exists(d) and not fs.ls(d, detail=False):
            fs.rmdir(d)
    except (OSError, NotImplementedError):
        pass
