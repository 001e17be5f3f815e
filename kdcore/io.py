"""Storage primitives every stage shares: filesystems by URL, the one atomic write, the one
timestamp, canonical JSON and sha256.

`write_bytes_atomic` is the only way kd writes a file that a reader may open at any moment (dataset
shards, manifests, cards, checkpoint configs, eval results, reports): a temp name beside the target,
then a rename, so a reader sees the old file or the new one, never half of one.

Test: `pytest tests/test_kdgen_format.py` (writes through it) and `tests/test_kdgen_urls.py` (URLs).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
import uuid
from typing import Any

import fsspec

from kdcore.errors import KdError

TMP_PREFIX = ".tmp-"  # temp files start with this: listings skip them, finalize and readers ignore them


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def now_iso() -> str:
    """UTC timestamp for `created` fields: 2026-01-31T12:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and path for a local path or URL (s3://, gs://, hf://, memory://).

    Object stores get no listings cache: several processes (and machines) write the same dataset
    directory, and a cached listing would hide their shards, locks and manifest. Credentials and
    endpoints come from the store's usual configuration (for S3: AWS_* variables or
    ~/.aws; another endpoint via FSSPEC_S3_ENDPOINT_URL).
    """
    protocol = fsspec.core.split_protocol(url)[0]
    options = {} if protocol in (None, "file", "local") else {"use_listings_cache": False}
    if protocol == "hf":
        from huggingface_hub.constants import is_offline_mode

        if is_offline_mode():  # HfFileSystem never reads the local cache: offline, every call fails
            raise KdError(
                f"{url}: HF_HUB_OFFLINE is set, and hf:// reads the Hub itself (no offline mode); unset it where the Hub "
                f"is reachable, or use a local copy of the dataset (`kdgen pull` it there)"
            )
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:  # e.g. gs:// without gcsfs: fsspec names the package to install
        raise KdError(f"{url}: {e} (pip install it into this environment)") from None
    except ValueError as e:  # unknown protocol
        raise KdError(f"{url}: {e}; use a local path or an fsspec URL such as s3://, gs://, hf://") from None
    return fs, path.rstrip("/") or "/"


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem | None, path: str | os.PathLike, data: bytes | str) -> None:
    """Write to a temp name beside `path`, then rename: readers never see half a file.

    `fs` None means the local filesystem (`path` may then be a `Path`); `str` data is written as UTF-8.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    fs = fs if fs is not None else fsspec.filesystem("file")
    path = os.fspath(path)
    tmp = join(posixpath.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):  # the write failed half way: leave no temp file behind
            fs.rm(tmp)
        raise
