"""The commit of a teacher dataset: every planned shard is written, so write the card, then the
manifest (last: the manifest is the commit), under the dataset lock.

    commit(job, num_shards, wall, gen_wall, gen_tokens)   # end of `kdgen generate` / `score`
    tidy(fs, dir)                                         # a committed dataset: drop what killed runs left
    merge(url, sources)                                   # `kdgen merge`: a dataset written in slices
    finalize(fs, dir, core, cfg, ...)                     # the manifest itself (also used by bench)

Test: `pytest tests/test_kdgen_generate.py tests/test_kdgen_format.py`.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict

import kdgen
from kdcore import codec
import kdcore.dataset as kds
import kdcore.io as kio
from kdcore.errors import KdError
from kdcore.progress import console
from kdgen import locks
from kdgen.config import GenerateConfig
from kdgen.plan import PLAN, Job, dataset_lock


def commit(job: Job, num_shards: int, wall: float, gen_wall: float, gen_tokens: int) -> None:
    """Every shard is written: commit the dataset under its lock, unless another process just did."""
    with dataset_lock(job.fs, job.dataset_dir):
        manifest = kds.read_manifest(job.fs, job.dataset_dir)
        committed_here = manifest is None
        if committed_here:
            manifest = finalize(job.fs, job.dataset_dir, job.manifest_core, job.cfg, wall, gen_wall, gen_tokens, num_shards)
    console.print(f"[green]done:[/] {summary(manifest)} -> {job.url}" + ("" if committed_here else " (committed by another process)"))


def tidy(fs, dataset_dir: str) -> None:
    """Best effort, on a committed dataset: remove what a run killed during or right after its commit
    left behind (its plan, its dataset lock, shard claims of dead processes, temp files of writes made
    under the dataset lock, the lock directory), so any later run over the dataset — a cache hit
    too — leaves it clean. Writes nothing when there is nothing to tidy (a cache hit on a read-only
    store stays read-only); never waits for a live process: its own exit tidies up."""
    lock_dir, plan = kio.join(dataset_dir, locks.LOCK_DIR), kio.join(dataset_dir, PLAN)
    try:
        if not (fs.exists(lock_dir) or fs.exists(plan)):
            return
        lock = locks.FileLock(fs, locks.lock_path(dataset_dir, "dataset"))
        if not lock.try_acquire():  # breaks a dataset lock whose holder is dead; a live one is mid-commit
            return
        try:
            for p in fs.ls(lock_dir, detail=False) if fs.exists(lock_dir) else []:
                locks.FileLock(fs, p).break_if_stale()  # claims of dead processes; ours and live ones stay
            if fs.exists(plan):
                fs.rm(plan)
            _remove_temp_files(fs, dataset_dir)  # written under the dataset lock, which is ours: a dead writer's
        finally:
            lock.release()
        locks.remove_lock_dir(fs, dataset_dir)
    except (OSError, NotImplementedError):  # read-only or flaky store: the dataset is complete as it is
        pass


def _remove_temp_files(fs, directory: str) -> None:
    """Remove the temp files (kio.TMP_PREFIX) interrupted atomic writes left in `directory`."""
    for p in fs.ls(directory, detail=False):
        if p.rstrip("/").rsplit("/", 1)[-1].startswith(kio.TMP_PREFIX):
            fs.rm(p)


def finalize(
    fs, dataset_dir: str, core: dict, cfg: GenerateConfig | dict, wall: float, gen_wall: float, gen_tokens: int, num_shards: int | None = None
) -> dict:
    """Collect shard entries, write the dataset card, then the manifest (last: the commit).

    `num_shards`: the plan's; shards of another numbering (an earlier plan of the same dataset, whose
    manifest was deleted and rerun with another --shard-prompts) hold the same rows again, and are removed.
    """
    from kdcore.card import write_card

    names = kds.list_shards(fs, dataset_dir)
    if num_shards is not None:
        planned = {kds.shard_name(i, num_shards) for i in range(num_shards)}
        strays = [n for n in names if n not in planned]
        if strays:
            console.print(f"[yellow]note:[/] removing {len(strays)} shard(s) of an earlier plan of this dataset (their rows are in the new shards)")
            for n in strays:
                fs.rm(kio.join(dataset_dir, kds.DATA_DIR, n))
        names = [n for n in names if n in planned]
    shards = [kds.shard_entry_from_file(fs, dataset_dir, f"{kds.DATA_DIR}/{n}") for n in names]
    rows = sum(s["rows"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)
    nbytes = sum(s["bytes"] for s in shards)
    manifest = {
        "format_version": codec.FORMAT_VERSION,
        "fingerprint": kds.fingerprint(core),
        "kdgen_version": kdgen.__version__,
        "created": kio.now_iso(),
        "created_by": _who(),
        **{key: core[key] for key in ("teacher", "tokenizer", "generation", "prompts")},
        "encoding": codec.encoding_info(core["tokenizer"]["embedding_rows"]),
        "shards": shards,
        "totals": {
            "rows": rows,
            "tokens": tokens,
            "bytes": nbytes,
            "bytes_per_token": round(nbytes / tokens, 2) if tokens else None,
        },
        "wall_time_s": round(wall, 2),
        "generation_time_s": round(gen_wall, 2),
        "tokens_per_s": round(gen_tokens / gen_wall, 1) if gen_wall > 0 else None,
        "fingerprint_fields": list(kds.FINGERPRINT_FIELDS),
        "config": asdict(cfg) if not isinstance(cfg, dict) else cfg,
    }
    write_card(fs, dataset_dir, manifest)
    for p in fs.ls(kio.join(dataset_dir, locks.LOCK_DIR), detail=False) if fs.exists(kio.join(dataset_dir, locks.LOCK_DIR)) else []:
        if not p.rstrip("/").endswith("/dataset.lock"):
            fs.rm(p)  # shard claims left by killed runs: every shard is complete now
    _remove_temp_files(fs, kio.join(dataset_dir, kds.DATA_DIR))  # shards' interrupted writes
    _remove_temp_files(fs, dataset_dir)  # the plan's, card's or manifest's of a run killed while writing them
    kds.write_manifest(fs, dataset_dir, manifest)
    plan = kio.join(dataset_dir, PLAN)
    if fs.exists(plan):
        fs.rm(plan)
    return manifest


def _who() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def summary(m: dict) -> str:
    t = m["totals"]
    tps = m.get("tokens_per_s")
    rate = f", {tps:,.0f} tokens/s" if tps else ""
    return f"{t['rows']:,} rows, {t['tokens']:,} tokens, {t['bytes_per_token']} bytes/token{rate}"


def merge(url: str, sources: list[str] = ()) -> dict:
    """Finish a dataset written in slices: copy in shards from `sources` (other machines' copies of
    the same OUT/<fingerprint>), check every planned shard is there, then commit it."""
    fs, path = kio.open_fs(url)
    if kds.read_manifest(fs, path) is not None:
        raise KdError(f"{url} is already complete (it has a manifest)")
    for src in sources:
        sfs, spath = kio.open_fs(src)
        if not sfs.exists(kio.join(spath, PLAN)):
            raise KdError(f"{src}: not a slice of a sliced `kdgen generate` (no {PLAN})")
        with sfs.open(kio.join(spath, PLAN), "rb") as f:
            if json.loads(f.read())["fingerprint"] != posixpath.basename(path.rstrip("/")):
                raise KdError(f"{src} is a slice of a different dataset than {url}")
        fs.makedirs(kio.join(path, kds.DATA_DIR), exist_ok=True)
        if not fs.exists(kio.join(path, PLAN)):
            with sfs.open(kio.join(spath, PLAN), "rb") as f:
                kio.write_bytes_atomic(fs, kio.join(path, PLAN), f.read())
        for name in kds.list_shards(sfs, spath):
            dest = kio.join(path, kds.DATA_DIR, name)
            if not fs.exists(dest):
                with sfs.open(kio.join(spath, kds.DATA_DIR, name), "rb") as f:
                    kio.write_bytes_atomic(fs, dest, f.read())
    plan_path = kio.join(path, PLAN)
    if not fs.exists(plan_path):
        raise KdError(f"{url}: no generation plan found; point at OUT/<fingerprint> of a sliced `kdgen generate`")
    with fs.open(plan_path, "rb") as f:
        plan = json.loads(f.read())
    present = set(kds.list_shards(fs, path))
    missing = [kds.shard_name(i, plan["num_shards"]) for i in range(plan["num_shards"]) if kds.shard_name(i, plan["num_shards"]) not in present]
    if missing:
        raise KdError(f"{url}: {len(missing)} shard(s) missing ({', '.join(missing[:3])}...); finish the other slices first")
    core, cfg = plan["core"], plan["config"]
    with dataset_lock(fs, path):
        manifest = kds.read_manifest(fs, path) or finalize(fs, path, core, cfg, 0.0, 0.0, 0, plan["num_shards"])
    tidy(fs, path)
    return manifest
