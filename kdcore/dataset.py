"""A teacher dataset on a store: paths, shard names, manifest, fingerprint, and the one reader.

Layout at any fsspec URL (the contract: docs/FORMAT.md)::

    <root>/<fingerprint>/
      manifest.json                          # written last: present means complete
      README.md                              # dataset card (HF YAML header: configs, features)
      data/train-00000-of-00012.parquet ...  # each written to a temp name, then renamed

`kdgen` writes shards through `write_shard` and commits with `write_manifest`; `kdtrain` and
`kdeval` read only through `TeacherDataset` (v2 and v1 shards alike, see kdcore/codec.py).

Run `pytest tests/test_kdgen_format.py` to exercise it.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kdcore.artifacts import CARD, MANIFEST  # noqa: F401  (dataset paths are named here)
from kdcore.codec import READABLE_VERSIONS, Batch, decode_any, parquet_bytes, schema, text_free_columns
from kdcore.errors import KdError
from kdcore.io import canonical_json, join, open_fs, sha256_hex, write_bytes_atomic

DATA_DIR = "data"
SHARD_RE = re.compile(r"^train-(\d{5})-of-(\d{5})\.parquet$")
SHARD_PATH_RE = re.compile(rf"{DATA_DIR}/train-\d{{5}}-of-\d{{5}}\.parquet")

# Everything that changes the rows goes into the fingerprint; nothing else does. This is the one
# list (docs/FORMAT.md prints it): anything not named here — batch sizes, engine memory settings,
# shard size, output paths, timestamps, kdgen version — never changes the key. Engine layout
# (tensor/pipeline/data parallel size, replicas, a served or Ray-run engine) is left out too: the
# same weights give the same rows on any layout; weight quantization is in (kdcore/engine_options.py).
FINGERPRINT_FIELDS = (
    "format_version",
    "teacher.weights_hash",
    "teacher.dtype",
    "tokenizer.tokenizer_hash",
    "tokenizer.chat_template_hash",
    "generation.backend",
    "generation.temperature",
    "generation.top_p",
    "generation.top_k",
    "generation.max_new_tokens",
    "generation.n",
    "generation.seed",
    "generation.k",
    "generation.logprob_mode",
    "generation.kind",
    "generation.quantization",
    "generation.sampled_targets",
    "prompts.content_hash",
)


def dig(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


# fields that joined the fingerprint with a later format version: a dataset of an earlier version was
# keyed without them (its manifest does not have them), so they stay out of its key
FINGERPRINT_FIELDS_SINCE = {"generation.quantization": 2}
# fields that joined within a format version: keyed only when they differ from the value every
# dataset made before them had (absent from its manifest = that value), so no existing key changes
# and a dataset made without the option keeps the key it always had
FINGERPRINT_FIELDS_UNLESS = {"generation.sampled_targets": 0}


def keyed_fields(manifest_core: dict) -> dict:
    """The `FINGERPRINT_FIELDS` of a manifest that go into its key (name -> value)."""
    version = manifest_core["format_version"]
    keyed = {}
    for name in FINGERPRINT_FIELDS:
        if version < FINGERPRINT_FIELDS_SINCE.get(name, 0):
            continue
        if name in FINGERPRINT_FIELDS_UNLESS:
            value = manifest_value(manifest_core, name)
            if value != FINGERPRINT_FIELDS_UNLESS[name]:
                keyed[name] = value
            continue
        keyed[name] = dig(manifest_core, name)
    return keyed


def manifest_value(manifest: dict, name: str) -> Any:
    """A field of `FINGERPRINT_FIELDS_UNLESS`: its value, or the one it had before it existed."""
    try:
        return dig(manifest, name)
    except KeyError:
        return FINGERPRINT_FIELDS_UNLESS[name]


def sampled_targets(manifest: dict) -> int:
    """N of a dataset made with `--sampled-targets N` (0: none; also every dataset made before them)."""
    return manifest_value(manifest, "generation.sampled_targets")


def fingerprint(manifest_core: dict) -> str:
    """Content key of a dataset: sha256 over `FINGERPRINT_FIELDS` of the manifest, first 16 hex."""
    return sha256_hex(canonical_json(keyed_fields(manifest_core)))[:16]


def row_id(prompt_hash: str, sample_index: int) -> str:
    """Stable row id: hash of the prompt's content and the sample index."""
    return sha256_hex(f"{prompt_hash}:{sample_index}")[:24]


# ----------------------------------------------------------------------------------------------
# Paths


def is_safe_shard_path(rel: object) -> bool:
    """A manifest's shard path must be `data/train-NNNNN-of-NNNNN.parquet`: nothing absolute, no
    `..`, no URL, no other directory — a manifest must never make a reader open files outside
    its dataset directory (issue 7)."""
    return isinstance(rel, str) and SHARD_PATH_RE.fullmatch(rel) is not None


def checked_shard_path(rel: object) -> str:
    if not is_safe_shard_path(rel):
        raise KdError(
            f"manifest.json lists the shard path {rel!r}, which is not data/train-NNNNN-of-NNNNN.parquet inside the "
            f"dataset directory; refusing to read it (the manifest is damaged or was edited) — run `kdgen verify`"
        )
    return rel


def shard_name(index: int, total: int) -> str:
    return f"train-{index:05d}-of-{total:05d}.parquet"


def list_shards(fs: fsspec.AbstractFileSystem, dataset_dir: str) -> list[str]:
    """Names of complete shard files (temp files excluded), sorted."""
    d = join(dataset_dir, DATA_DIR)
    if not fs.exists(d):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(d, detail=False)]
    return sorted(n for n in names if SHARD_RE.match(n))


# ----------------------------------------------------------------------------------------------
# Shards and manifest


def _tokens(table: pa.Table) -> int:
    return int(pc.sum(pc.list_value_length(table["completion_ids"])).as_py() or 0)


def write_shard(fs: fsspec.AbstractFileSystem, dataset_dir: str, name: str, table: pa.Table, fingerprint: str | None = None) -> dict:
    """Write one shard atomically; returns its manifest entry (path, rows, tokens, bytes, sha256).

    `fingerprint` goes into the shard's key-value metadata (`kd.fingerprint`), so a shard that
    ends up in another dataset is recognised as such even when its manifest entry was edited."""
    if fingerprint is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"kd.fingerprint": fingerprint.encode()})
    data = parquet_bytes(table)
    fs.makedirs(join(dataset_dir, DATA_DIR), exist_ok=True)
    write_bytes_atomic(fs, join(dataset_dir, DATA_DIR, name), data)
    return {"path": f"{DATA_DIR}/{name}", "rows": table.num_rows, "tokens": _tokens(table), "bytes": len(data), "sha256": sha256_hex(data)}


def shard_entry_from_file(fs: fsspec.AbstractFileSystem, dataset_dir: str, rel: str) -> dict:
    """Manifest entry of a shard already on disk (used on resume and merge)."""
    with fs.open(join(dataset_dir, rel), "rb") as f:
        data = f.read()
    table = pq.read_table(pa.BufferReader(data), columns=["completion_ids"])
    return {"path": rel, "rows": table.num_rows, "tokens": _tokens(table), "bytes": len(data), "sha256": sha256_hex(data)}


def read_manifest(fs: fsspec.AbstractFileSystem, dataset_dir: str) -> dict | None:
    path = join(dataset_dir, MANIFEST)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdError(f"{path}: manifest is not valid JSON ({e}); the dataset is damaged — regenerate it") from None


def write_manifest(fs: fsspec.AbstractFileSystem, dataset_dir: str, manifest: dict) -> None:
    write_bytes_atomic(fs, join(dataset_dir, MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------
# Reader


class TeacherDataset:
    """A complete teacher dataset (format v2, or v1 read through kdcore/codec_v1.py) at a local path
    or fsspec URL.

    `url` may be the dataset directory itself (holding manifest.json) or a root holding exactly
    one dataset. Only complete datasets open: the manifest is the commit.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, path = open_fs(self.url)
        manifest = read_manifest(self.fs, path)
        if manifest is None:
            found = dataset_dirs(self.fs, path)
            if len(found) == 1:
                path = found[0]
                self.url = self.url + "/" + posixpath.basename(path)
                manifest = read_manifest(self.fs, path)
            elif len(found) > 1:
                names = ", ".join(posixpath.basename(p) for p in found[:5])
                raise KdError(f"{url} holds {len(found)} datasets ({names}); pass one of them: {url}/<fingerprint>")
            elif self.fs.exists(join(path, DATA_DIR)):
                raise KdError(
                    f"{url} has shards but no manifest.json: the generation did not finish. "
                    f"Re-run the same `kdgen generate` command to resume it"
                )
            else:
                raise KdError(f"{url}: no teacher dataset here (no manifest.json). List datasets with `kdgen ls ROOT`")
        self.path = path
        self.manifest = manifest
        self.version = manifest.get("format_version")
        if self.version not in READABLE_VERSIONS:
            raise KdError(
                f"{url}: format version {self.version!r} is not supported by this kd "
                f"(reads v{', v'.join(map(str, READABLE_VERSIONS))}); upgrade kd"
            )
        self.k: int = manifest["generation"]["k"]
        self.sampled_targets: int = sampled_targets(manifest)  # N of --sampled-targets, 0 = none
        self.fingerprint: str = manifest["fingerprint"]

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def num_rows(self) -> int:
        return self.manifest["totals"]["rows"]

    @property
    def num_tokens(self) -> int:
        return self.manifest["totals"]["tokens"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    def shard_paths(self) -> list[str]:
        """Full paths of the shards; KdError if the manifest points outside the dataset directory."""
        return [join(self.path, checked_shard_path(s.get("path"))) for s in self.shards]

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """All shards as one Arrow table, as stored (v1 top-k columns are codes: use `iter_batches`)."""
        tables = [pq.read_table(p, columns=columns, filesystem=self.fs) for p in self.shard_paths()]
        return pa.concat_tables(tables) if tables else schema(self.vocab_size, self.k, self.sampled_targets).empty_table()

    def iter_batches(self, batch_rows: int = 256, text: bool = True, id_dtype: type = np.int64) -> Iterator[Batch]:
        """Batches of arrays in shard order (a batch never spans two shards). `id_dtype`: the dtype
        of `Batch.topk_ids`; `Batch.sampled` holds the sampled targets when the dataset has them."""
        cols = None if text else text_free_columns(self.version, self.sampled_targets)
        for p in self.shard_paths():
            with self.fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                meta = pf.schema_arrow.metadata
                for rb in pf.iter_batches(batch_size=batch_rows, columns=cols, use_threads=False):
                    yield decode_any(rb, self.k, text=text, id_dtype=id_dtype, metadata=meta)

    def to_hf(self):
        """The shards as a `datasets.Dataset` (the columns as stored, as `load_dataset` gives them)."""
        import datasets

        return datasets.Dataset(self.read_table())


def dataset_dirs(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Complete dataset directories directly under `root`."""
    if not fs.exists(root) or not fs.isdir(root):
        return []
    out = []
    for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
        p = entry["name"].rstrip("/")
        if entry["type"] == "directory" and fs.exists(join(p, MANIFEST)):
            out.append(p)
    return out


def list_datasets(url: str) -> list[dict]:
    """Manifests of every complete dataset directly under `url`."""
    fs, root = open_fs(url)
    return [read_manifest(fs, p) for p in dataset_dirs(fs, root)]


__all__ = ["TeacherDataset", "list_datasets", "write_shard", "write_manifest", "read_manifest", "fingerprint"]
