"""Sharing teacher datasets between stores and requests: `kdgen push` / `kdgen pull`, and row reuse.

Copy (`copy_dataset`, behind both `push` and `pull`): shard by shard, each streamed through
sha256 and checked against the source manifest before it is renamed into place at the
destination, then read back and checked again; shards already at the destination with the right
checksum are skipped, so an interrupted copy resumes; the card and then the manifest (byte for
byte the source's) are written last — the manifest is the commit, as for `kdgen generate`.

Row reuse (`RowReuse`): a request whose teacher, tokenizer and generation settings equal those of
complete datasets under the same root (everything in the fingerprint but the prompt set) takes
the rows those datasets already hold, by row id (hash of prompt content and sample index), and
generates only the missing ones. A reused row is taken only if its prompt token ids are exactly
the ones this request computed (and, for `kdgen score`, its completion ids too), and only from
shards whose sha256 matches their manifest.

Test: `pytest tests/test_kdgen_store.py` (moto S3 server on loopback) and `tests/test_kdgen_reuse.py`.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from kdcore import codec
import kdcore.dataset as kds
import kdcore.io as kio
from kdcore.errors import KdError
from kdgen.locks import FileLock, lock_path, remove_lock_dir

CHUNK = 8 << 20  # copy buffer: bounded memory whatever the shard size


# ----------------------------------------------------------------------------------------------
# push / pull


@dataclass
class CopyReport:
    url: str
    copied: int = 0
    skipped: int = 0
    bytes_copied: int = 0
    already_complete: bool = False


def _sha256_of(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stream(sfs, src: str, dfs, dest: str) -> tuple[str, int]:
    """Copy src -> dest in chunks; returns (sha256, bytes) of what was read."""
    h, n = hashlib.sha256(), 0
    with sfs.open(src, "rb") as fi, dfs.open(dest, "wb") as fo:
        while chunk := fi.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
            fo.write(chunk)
    return h.hexdigest(), n


def copy_dataset(src: str, dest: str, on_shard=None) -> CopyReport:
    """Copy the complete dataset at `src` into the root `dest` (or to `dest` itself when it already
    ends with the fingerprint). Verifies every shard's sha256; resumable; manifest last."""
    ds = kds.TeacherDataset(src)
    paths = ds.shard_paths()  # refuses paths that escape the dataset directory
    fp = ds.fingerprint
    dfs, dpath = kio.open_fs(dest)
    if posixpath.basename(dpath) == fp:
        target, url = dpath, dest.rstrip("/")
    else:
        other = kds.read_manifest(dfs, dpath)
        if other is not None:
            raise KdError(f"{dest} is itself a dataset ({other.get('fingerprint')}); give the root that holds datasets")
        target, url = kio.join(dpath, fp), dest.rstrip("/") + "/" + fp
    report = CopyReport(url)
    if kds.read_manifest(dfs, target) is not None:
        report.already_complete = True
        return report
    with FileLock(dfs, lock_path(target, "dataset")) as lock:
        if kds.read_manifest(dfs, target) is not None:  # another copy finished while we waited
            report.already_complete = True
            return report
        dfs.makedirs(kio.join(target, kds.DATA_DIR), exist_ok=True)
        for entry, src_path in zip(ds.shards, paths):
            rel = entry["path"]
            dest_path = kio.join(target, rel)
            if dfs.exists(dest_path) and _sha256_of(dfs, dest_path) == entry["sha256"]:
                report.skipped += 1
                if on_shard:
                    on_shard(rel, "present")
                continue
            tmp = kio.join(posixpath.dirname(dest_path), f"{kio.TMP_PREFIX}copy-{lock.token[:8]}-{posixpath.basename(rel)}")
            digest, n = _stream(ds.fs, src_path, dfs, tmp)
            if digest != entry["sha256"]:
                dfs.rm(tmp)
                raise KdError(f"{src}: {rel} fails its checksum (sha256 differs from the manifest); the source is damaged — run `kdgen verify {src}`")
            dfs.mv(tmp, dest_path)
            if _sha256_of(dfs, dest_path) != entry["sha256"]:
                raise KdError(f"{url}: {rel} reads back with a different sha256 after the copy; the destination store corrupted it — run the command again")
            report.copied += 1
            report.bytes_copied += n
            if on_shard:
                on_shard(rel, "copied")
        # leftovers that would make the copy fail `kdgen verify`: unlisted shards, temp files, a plan
        listed = {posixpath.basename(e["path"]) for e in ds.shards}
        for p in dfs.ls(kio.join(target, kds.DATA_DIR), detail=False):
            name = posixpath.basename(p.rstrip("/"))
            if name not in listed:
                dfs.rm(p)
        for name in (kds.CARD, kds.MANIFEST):  # the card, then the manifest: the commit
            source = kio.join(ds.path, name)
            if name == kds.CARD and not ds.fs.exists(source):
                continue
            with ds.fs.open(source, "rb") as f:
                kio.write_bytes_atomic(dfs, kio.join(target, name), f.read())
        plan = kio.join(target, ".kdgen-plan.json")
        if dfs.exists(plan):
            dfs.rm(plan)
    remove_lock_dir(dfs, target)
    return report


# ----------------------------------------------------------------------------------------------
# Row reuse


def _settings(manifest: dict) -> dict:
    """Everything in the fingerprint except the prompt set."""
    return {name: v for name, v in kds.keyed_fields(manifest).items() if not name.startswith("prompts.")}


class RowReuse:
    """Rows already generated under the same settings, in complete datasets under one root.

    Builds an index row id -> (dataset, shard) from the `id` column of every matching dataset
    (cheap: one column), then serves decoded rows shard by shard.
    """

    def __init__(self, fs, root: str, core: dict, exclude: str):
        self.fs = fs
        self.index: dict[str, tuple[str, dict, dict]] = {}  # id -> (dataset dir, manifest, shard entry)
        self.sources: list[str] = []
        want = _settings(core)
        for d in kds.dataset_dirs(fs, root):
            if posixpath.basename(d) == exclude:
                continue
            try:
                m = kds.read_manifest(fs, d)
                if m is None or _settings(m) != want:
                    continue
                entries = [(e, kio.join(d, kds.checked_shard_path(e["path"]))) for e in m["shards"]]
            except (KdError, KeyError, TypeError):
                continue  # a damaged dataset is never a source
            self.sources.append(m["fingerprint"])
            for entry, path in entries:
                try:
                    ids = pq.read_table(path, columns=["id"], filesystem=fs)["id"].to_pylist()
                except Exception:
                    continue
                for rid in ids:
                    self.index.setdefault(rid, (d, m, entry))
        self._cache: dict[str, dict[str, codec.Row]] = {}  # the last few shards read (sources are read in order)

    def __len__(self) -> int:
        return len(self.index)

    def count(self, ids) -> int:
        return sum(1 for i in ids if i in self.index)

    def _shard_rows(self, d: str, m: dict, entry: dict) -> dict[str, codec.Row]:
        key = kio.join(d, entry["path"])
        if key in self._cache:
            return self._cache[key]
        with self.fs.open(key, "rb") as f:
            data = f.read()
        rows: dict[str, codec.Row] = {}
        if kio.sha256_hex(data) == entry["sha256"]:  # a damaged shard gives nothing: its rows are generated
            table = pq.read_table(pa.BufferReader(data))
            b = codec.decode_any(table, m["generation"]["k"])  # sampled targets too, when the dataset has them
            rows = {r.id: r for r in b.to_rows()}  # tail_logprobs kept as stored: exact, not re-derived
        if len(self._cache) >= 4:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = rows
        return rows

    def get(self, rid: str, prompt_ids: list[int], completion_ids: list[int] | None) -> codec.Row | None:
        """The stored row for `rid` if it was made from exactly these token ids, else None."""
        if rid not in self.index:
            return None
        row = self._shard_rows(*self.index[rid]).get(rid)
        if row is None or row.prompt_ids != list(prompt_ids):
            return None
        if completion_ids is not None and row.completion_ids != list(completion_ids):
            return None
        return row


__all__ = ["copy_dataset", "CopyReport", "RowReuse"]
