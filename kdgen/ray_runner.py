"""`kdgen generate --ray ADDRESS|auto --replicas N`: the shards of one dataset written by a pool of
engines on a Ray cluster (issue 13).

    driver (this process): plan as always -> N `ShardWriter` actors (one engine each, on
    tensor x pipeline GPUs, or one CPU) -> hand each idle actor the next pending shard ->
    an actor claims the shard, generates its rows and writes it with kd's writer (temp name, then
    rename) straight into the dataset directory -> the driver commits the manifest as in a local run

Ray core actors, not Ray Data: kd's unit of work and of resume is the shard, written by kd's writer
under a claim into a content-addressed directory. Ray Data would write files of its own naming per
block, checkpoint per block, and its pipeline needs CPUs >= actor stages + 2 or it deadlocks
(research notes); an actor pool with a work queue is what is left once those are taken out. The
overhead measured here (bench/scale_out.py): 1 ms per shard on a warm actor pool, against
0.28 s per block for a Ray Data actor stage (its start-up included).

Failure: an actor whose process dies (SIGKILL, OOM, a lost node) mid-shard leaves the shard
unwritten (only a temp file and a claim). The driver breaks that claim, starts a fresh actor in its
place and gives the shard to the next idle one; a shard that kills `MAX_ATTEMPTS` actors stops the
run. A rerun skips committed shards, like any kd run.

Every node needs kd and the teacher checkpoint at the same path, and `--out` must be storage all
nodes reach (a shared file system or a bucket URL).

Test: `pytest -m slow tests/test_kdgen_ray.py` (a two-node Ray cluster on loopback).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import deque

from kdcore import codec
import kdcore.dataset as kds
from kdcore.errors import KdError
from kdcore.progress import RowProgress, console
from kdgen import locks
from kdgen.locks import FileLock, lock_path

MAX_ATTEMPTS = 3  # actors a shard may take down before the run stops


def connect(address: str) -> None:
    """Join the cluster at `address`; `auto` joins a running one or starts a local one."""
    import ray

    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(("KD_", "VLLM_", "HF_", "OMP_")) or k == "PYTHONPATH"}
    runtime_env = {"env_vars": env}
    try:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as e:
        if address != "auto":
            raise KdError(f"--ray {address}: no Ray cluster there ({e}); start one with `ray start --head` or use --ray auto") from None
        ray.init(runtime_env=runtime_env, log_to_driver=False, logging_level="ERROR", include_dashboard=False)


class _Counter:
    """Stands in for the progress bar inside an actor (the driver shows progress per shard)."""

    def __init__(self):
        self.rows = self.tokens = 0

    def advance(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens


class ShardWriter:
    """One engine; writes whole shards. Runs as a Ray actor (`ray.remote(ShardWriter)`)."""

    def __init__(self, job):
        from kdgen.generate import Work

        self.job = job
        self.work = Work(job)

    def pid(self) -> int:
        return os.getpid()

    def write(self, index: int, block: range, num: int) -> dict:
        """Generate and write shard `index` (prompts `block`); {'rows', 'tokens', 'gen_wall', 'busy'}."""
        job = self.job
        name = kds.shard_name(index, num)
        claim = FileLock(job.fs, lock_path(job.dataset_dir, name))
        if not claim.try_acquire():  # another process holds it (a local run on the same request)
            return {"busy": True}
        try:
            counter, wall0 = _Counter(), self.work.gen_wall
            rows = self.work.rows_for(block, counter)
            if claim.lost:
                raise KdError(f"lost the claim on {name} to another process; run the command again")
            table = codec.rows_to_table(rows, job.teacher.embedding_rows, job.cfg.k, job.cfg.sampled_targets)
            kds.write_shard(job.fs, job.dataset_dir, name, table, job.fingerprint)
        finally:
            claim.release()
        return {"busy": False, "rows": len(rows), "tokens": counter.tokens, "gen_wall": self.work.gen_wall - wall0}


def _resources(cfg) -> dict:
    import ray

    gpus = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    if ray.cluster_resources().get("GPU", 0) > 0:
        return {"num_gpus": gpus, "num_cpus": 1}
    return {"num_cpus": 1}


def write_shards(job, shards: list[range], pending: list[int]) -> tuple[float, int]:
    """Write the `pending` shards on the cluster; returns (engine seconds, tokens) summed over actors."""
    # Ray prints worker deaths ("(raylet) A worker died ...") on stdout, which carries only the URL
    with contextlib.redirect_stdout(sys.stderr):
        return _write_shards(job, shards, pending)


def _write_shards(job, shards: list[range], pending: list[int]) -> tuple[float, int]:
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    cfg = job.cfg
    connect(cfg.ray)
    actor_cls = ray.remote(max_restarts=0, max_task_retries=0)(ShardWriter).options(**_resources(cfg))
    job_ref = ray.put(job)
    actors = [actor_cls.remote(job_ref) for _ in range(cfg.replicas)]
    pids = [a.pid.remote() for a in actors]
    queue, running = deque(pending), {}
    attempts = {i: 0 for i in pending}
    gen_wall, gen_tokens = 0.0, 0
    num = len(shards)
    total = sum(len(shards[i]) for i in pending) * job.manifest_core["generation"]["n"]
    console.print(f"ray: {len(pending)} shard(s) on {cfg.replicas} replica(s) at {ray.get_runtime_context().gcs_address}")
    try:
        with RowProgress(total, "generating on ray") as bar:
            while queue or running:
                busy = {a for a, _ in running.values()}
                for a in range(len(actors)):
                    if a not in busy and queue:
                        i = queue.popleft()
                        running[actors[a].write.remote(i, shards[i], num)] = (a, i)
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    a, i = running.pop(ref)
                    try:
                        out = ray.get(ref)
                    except RayTaskError as e:  # the shard's code raised: a user-fixable error passes through
                        if isinstance(e.cause, KdError):
                            raise KdError(str(e.cause)) from None
                        raise
                    except (ActorDiedError, ActorUnavailableError, RayActorError):
                        attempts[i] += 1
                        name = kds.shard_name(i, num)
                        if attempts[i] >= MAX_ATTEMPTS:
                            raise KdError(
                                f"--ray: shard {name} took down {attempts[i]} replicas (out of memory?); complete shards are kept, "
                                f"run the same command again to resume"
                            ) from None
                        _break_claim(job, name, pids[a])
                        console.print(f"ray: replica {a} died writing {name}; a fresh replica takes its place, the shard goes to the next free one")
                        actors[a] = actor_cls.remote(job_ref)
                        pids[a] = actors[a].pid.remote()
                        queue.appendleft(i)
                        continue
                    if out["busy"]:  # held by another process: look again shortly
                        queue.append(i)
                        time.sleep(1.0)
                        continue
                    gen_wall += out["gen_wall"]
                    gen_tokens += out["tokens"]
                    bar.advance(out["rows"], out["tokens"])
    finally:
        for a in actors:
            ray.kill(a)
    return gen_wall, gen_tokens


def _break_claim(job, name: str, pid_ref) -> None:
    """Remove the claim a dead actor left on shard `name` (on another host no local pid check could)."""
    import ray

    lock = FileLock(job.fs, lock_path(job.dataset_dir, name))
    info = lock.holder()
    try:
        dead_pid = ray.get(pid_ref, timeout=1)
    except Exception:
        dead_pid = None
    if info and dead_pid is not None and info.get("pid") == dead_pid:
        lock.fs.rm(lock.path)
        console.print(f"ray: broke the claim on {name} left by {locks.describe(info)}")
