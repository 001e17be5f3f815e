"""`kdgen generate` / `kdgen score`: prompts in, a complete teacher dataset out. The run, top to bottom:

    locate the job (kdgen/plan.py): check options, read prompts, fingerprint the request — from the
        teacher identity an earlier run remembered when there is one (no tokenizer, no transformers)
    committed already? a cache hit: return its URL
    every planned shard already written? then only the commit is left; else load the teacher's
        tokenizer and encode the prompts
    claim the plan (under the dataset lock) -> skip complete shards (resume) -> index reusable rows
        of sibling datasets (kdgen/store.py)
    the loop: per shard, claim it -> reused rows + generated rows (engine started on first need)
        -> atomic write -> release
    commit (kdgen/commit.py): card, then the manifest, last, under the dataset lock

Shards are fixed blocks of prompts, planned once and recorded in `.kdgen-plan.json`, so a resumed
or sliced run writes exactly the shards an uninterrupted one would. `--shard-index i --num-shards m`
makes this process write shards j with j % m == i; whoever completes the last shard commits, or run
`kdgen merge`.

Reliability (issue 7): two processes on the same request split the shards through per-shard
claims (kdgen/locks.py) and never write the same shard at once; a SIGKILL at any moment leaves
only complete shards, temp files and stale locks, all of which a rerun handles.

Scaling out: `--data-parallel-size N` runs N such processes on one machine (kdgen/scale.py);
`--ray` hands the pending shards to engines on a Ray cluster and commits here (kdgen/ray_runner.py);
`--backend server` is one more backend (kdcore/backends/server_backend.py).

Test: `pytest tests/test_kdgen_generate.py` (hf backend, tiny model) and `-m slow` (vLLM, real
teacher); crash, concurrency and resume: tests/test_kdgen_crash.py, tests/test_kdgen_concurrency.py.
"""

from __future__ import annotations

import time
from dataclasses import replace

from kdcore import codec
import kdcore.dataset as kds
from kdcore.backends import Request, SamplingConfig, make_backend, request_seed
from kdcore.errors import KdError
from kdcore.progress import RowProgress, console, status
from kdcore.prompts import Prompt
from kdgen import locks
from kdgen.commit import commit, finalize, merge, summary, tidy
from kdgen.config import GenerateConfig, validate
from kdgen.locks import FileLock, lock_path
from kdgen.plan import PLAN, WAIT_POLL_S, Job, blocks, check_output, claim_plan, every_shard_written, locate, prepare, shard_has_rows
from kdgen.scale import engine_settings, fans_out, run_data_parallel
from kdgen.store import RowReuse


def run(cfg: GenerateConfig, kind: str = "generate") -> str:
    """Generate (or score) the dataset; returns its URL. Idempotent: a complete dataset returns at once.

    Safe to run twice at once on the same request and root (issue 7): shards are claimed before
    they are generated, so two processes split the shards, and each waits for the shards the other
    holds; the plan and the commit happen under the dataset lock (kdgen/locks.py).
    """
    if fans_out(cfg):  # --data-parallel-size N: N engine processes split the shards (kdgen/scale.py)
        validate(cfg, kind)
        return run_data_parallel(cfg, kind)
    url, job = _run(cfg, kind)
    if kds.read_manifest(job.fs, job.dataset_dir) is not None:
        # every process that leaves a committed dataset tidies up once its own locks are gone, so the
        # last one out removes the lock directory whichever path (commit, "another process did", or a
        # cache hit over a dataset whose committing run was killed right after its manifest) it took
        tidy(job.fs, job.dataset_dir)
    return url


def _run(cfg: GenerateConfig, kind: str) -> tuple[str, Job]:
    t0 = time.perf_counter()
    with status(f"resolving teacher {cfg.teacher} and reading prompts"):
        job = locate(cfg, kind)
        existing = kds.read_manifest(job.fs, job.dataset_dir)
        if existing is None and not every_shard_written(job):
            job.load()
    if existing is not None:
        console.print(f"[green]cache hit:[/] {job.url} already holds this dataset ({summary(existing)})")
        return job.url, job
    check_output(job)
    plan = claim_plan(job)
    if plan is None:
        console.print(f"[green]cache hit:[/] {job.url} was completed by another process ({summary(kds.read_manifest(job.fs, job.dataset_dir))})")
        return job.url, job
    shards = blocks(plan, len(job.prompts))
    mine = [i for i in range(len(shards)) if i % cfg.num_shards == cfg.shard_index]
    work = Work(job)
    if not _write_shards(job, work, shards, mine):
        console.print(f"another process committed {job.url} meanwhile; stopping")
        return job.url, job
    if work.reused or (work.reuse is not None):
        console.print(f"rows: {work.reused} reused from existing datasets, {work.generated} generated")
    present = set(kds.list_shards(job.fs, job.dataset_dir))
    missing = [i for i in range(len(shards)) if kds.shard_name(i, len(shards)) not in present]
    if missing:
        console.print(
            f"slice {cfg.shard_index} of {cfg.num_shards} done; {len(missing)} shard(s) still missing (other slices). "
            f"When every slice has finished, run `kdgen merge {job.url}`"
        )
        return job.url, job
    commit(job, len(shards), time.perf_counter() - t0, work.gen_wall, work.gen_tokens)
    return job.url, job


def _write_shards(job: Job, work: "Work", shards: list[range], mine: list[int]) -> bool:
    """The loop: write this process's shards that are not complete yet, each under its claim, waiting
    for shards another process holds. False when another process committed the dataset meanwhile."""
    num, n = len(shards), job.n
    total_rows = sum(len(shards[i]) * n for i in mine)
    pending = [i for i in mine if not _shard_is_complete(job, kds.shard_name(i, num), len(shards[i]) * n)]
    done_rows = total_rows - sum(len(shards[i]) * n for i in pending)
    if done_rows:
        console.print(f"resuming: {done_rows} of {total_rows} rows already in complete shards")
    if pending:
        job.load()
        reuse = RowReuse(job.fs, job.root, job.manifest_core, exclude=job.fingerprint)
        if len(reuse):
            want = [kds.row_id(job.prompts[p].content_hash, s) for i in pending for p in shards[i] for s in range(n)]
            found = reuse.count(want)
            console.print(
                f"row reuse: {found} of {len(want)} rows already exist in {len(reuse.sources)} dataset(s) under "
                f"{job.cfg.out} with the same teacher and generation settings; generating the other {len(want) - found}"
            )
            work.reuse = reuse
    if job.cfg.ray is not None and pending:  # the shards run on a Ray cluster; the commit stays here
        from kdgen.ray_runner import write_shards

        work.gen_wall, work.gen_tokens = write_shards(job, shards, pending)
        pending = []
    try:
        with RowProgress(total_rows, "scoring" if job.kind == "score" else "generating", done_rows) as bar:
            waiting_noted = False
            while pending:
                progressed = False
                for i in list(pending):
                    name, expected = kds.shard_name(i, num), len(shards[i]) * n
                    if _shard_is_complete(job, name, expected):  # written by another process
                        pending.remove(i)
                        bar.advance(expected, 0)
                        continue
                    claim = FileLock(job.fs, lock_path(job.dataset_dir, name))
                    if not claim.try_acquire():
                        continue  # another process is writing it
                    try:
                        if kds.read_manifest(job.fs, job.dataset_dir) is not None:
                            return False
                        if not _shard_is_complete(job, name, expected):
                            rows = work.rows_for(shards[i], bar)
                            if claim.lost:
                                raise KdError(f"lost the claim on {name} to another process (this one stalled for minutes); run the command again")
                            table = codec.rows_to_table(rows, job.teacher.embedding_rows, job.cfg.k, job.cfg.sampled_targets)
                            kds.write_shard(job.fs, job.dataset_dir, name, table, job.fingerprint)
                        else:
                            bar.advance(expected, 0)
                    finally:
                        claim.release()
                    pending.remove(i)
                    progressed = True
                if pending and not progressed:
                    if not waiting_noted:
                        holders = {locks.describe(FileLock(job.fs, lock_path(job.dataset_dir, kds.shard_name(i, num))).holder() or {}) for i in pending}
                        console.print(f"waiting for {len(pending)} shard(s) that another process is writing ({'; '.join(sorted(holders))})")
                        waiting_noted = True
                    _pause()
    finally:
        work.close()
    return True


def _shard_is_complete(job: Job, name: str, expected_rows: int) -> bool:
    return shard_has_rows(job.fs, job.dataset_dir, name, expected_rows)


def _requests_for(job: Job, prompt_indices: range) -> tuple[list[Request], list[tuple[Prompt, list[int]]]]:
    reqs, meta = [], []
    n = job.manifest_core["generation"]["n"]
    for i in prompt_indices:
        p = job.prompts[i]
        for s in range(n):
            rid = kds.row_id(p.content_hash, s)
            comp = job.completion_ids[i] if job.completion_ids is not None else None
            reqs.append(Request(rid, job.prompt_ids[i], request_seed(job.cfg.seed, rid), comp))
            meta.append((p, job.prompt_ids[i]))
    return reqs, meta


class Work:
    """Produces a shard's rows: reused ones from `RowReuse`, the rest from the engine (started on
    first need, so a run whose rows all exist never loads the teacher's weights)."""

    def __init__(self, job: Job):
        self.job = job
        self.reuse: RowReuse | None = None
        self.backend = None
        self.reused = self.generated = 0
        self.gen_wall, self.gen_tokens = 0.0, 0

    def _engine(self):
        if self.backend is None:
            job, cfg = self.job, self.job.cfg
            longest = max(len(p) for p in job.prompt_ids) + (
                cfg.max_new_tokens if job.kind == "generate" else max(len(c) for c in job.completion_ids)
            )
            backend_name, options, max_len = engine_settings(job, longest)
            with status(f"starting the {backend_name} engine on {job.teacher.model.path}"):
                self.backend = make_backend(backend_name, job.teacher.model.path, job.teacher.dtype, cfg.k, max_len, options, cfg.sampled_targets)
        return self.backend

    def rows_for(self, prompt_indices: range, bar: RowProgress) -> list[codec.Row]:
        """The rows of these prompts, in the order an uninterrupted run writes them."""
        job, cfg = self.job, self.job.cfg
        reqs, meta = _requests_for(job, prompt_indices)
        rows: list[codec.Row | None] = [None] * len(reqs)
        todo = []
        for j, (r, (p, pids)) in enumerate(zip(reqs, meta)):
            old = self.reuse.get(r.row_id, pids, r.completion_ids) if self.reuse is not None else None
            if old is None:
                todo.append(j)
            else:  # the request's own prompt fields; the stored arrays
                rows[j] = replace(old, messages=p.messages, prompt=p.text, prompt_ids=pids)
                self.reused += 1
        if len(todo) < len(reqs):
            bar.advance(len(reqs) - len(todo), 0)
        sampling = SamplingConfig(
            temperature=job.manifest_core["generation"]["temperature"],
            top_p=job.manifest_core["generation"]["top_p"],
            top_k=job.manifest_core["generation"]["top_k"],
            max_new_tokens=max(cfg.max_new_tokens, 1),
            k=cfg.k,
        )
        tok = job.teacher.tokenizer
        for b in range(0, len(todo), cfg.batch_size):
            idx = todo[b : b + cfg.batch_size]
            chunk = [reqs[j] for j in idx]
            backend = self._engine()
            tb = time.perf_counter()
            outs = backend.score(chunk, cfg.k) if job.kind == "score" else backend.generate(chunk, sampling)
            self.gen_wall += time.perf_counter() - tb
            for j, r, o in zip(idx, chunk, outs):
                p, pids = meta[j]
                rows[j] = codec.Row(
                    id=r.row_id,
                    messages=p.messages,
                    prompt=p.text,
                    prompt_ids=pids,
                    completion=tok.decode(o.completion_ids, skip_special_tokens=True),
                    completion_ids=o.completion_ids,
                    token_logprobs=o.token_logprobs,
                    topk_ids=o.topk_ids,
                    topk_logprobs=o.topk_logprobs,
                    finish_reason=o.finish_reason,
                    sampled=o.sampled,
                )
            toks = sum(len(o.completion_ids) for o in outs)
            self.gen_tokens += toks
            self.generated += len(chunk)
            bar.advance(len(chunk), toks)
        return rows

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


def _pause() -> None:
    """Wait a moment for other processes (a function, so tests can stand in for the other process)."""
    time.sleep(WAIT_POLL_S)


__all__ = ["GenerateConfig", "PLAN", "run", "merge", "prepare", "finalize", "validate", "summary"]
