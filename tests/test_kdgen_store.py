"""Remote stores (issue 7, items 1-2): generate, resume, `kdgen ls`, `kdgen verify`, `kdgen push` /
`kdgen pull` and `kdtrain run` against real object-store HTTP servers on loopback, each test once per
store: S3 through s3fs on moto in server mode (tests/kdgen_s3.py), GCS through gcsfs on
gcp-storage-emulator (tests/kdgen_gcs.py). Nothing here is store-specific in kdgen: every path goes
through fsspec. hf:// cannot be reached here (no hub): only its offline error is tested.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import fsspec
import pytest

import kdgen.generate as gen
import kdcore.dataset as kds
import kdcore.io as kio
from kdcore.errors import KdError
from kdgen.store import copy_dataset
from kdgen_helpers import CHAT_ROWS, assert_valid, one_torch_thread, rows_of, write_jsonl  # noqa: F401
from kdgen_gcs import gcs_server  # noqa: F401  (fixture)
from kdgen_s3 import s3_server  # noqa: F401  (fixture)
from kdgen_store_helpers import cli as kdgen_cli
from kdgen_store_helpers import small_config


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tiny_model_dir):
    """The reference: six prompts, six shards, written to a local directory."""
    tmp = tmp_path_factory.mktemp("store")
    prompts = write_jsonl(tmp / "prompts.jsonl", CHAT_ROWS)
    cfg = small_config(prompts, str(tmp / "local"), tiny_model_dir)
    url = gen.run(cfg)
    return {"cfg": cfg, "url": url, "fp": Path(url).name, "rows": rows_of(url), "tmp": tmp}


@pytest.fixture(params=["s3", "gs"])
def bucket(request) -> str:
    """A new empty bucket, as a URL, on the loopback S3 (moto) or GCS (emulator) server."""
    return request.getfixturevalue({"s3": "s3_server", "gs": "gcs_server"}[request.param])()


def _objects(url: str) -> dict[str, bytes]:
    fs, path = kio.open_fs(url)
    return {p[len(path) + 1 :]: fs.cat_file(p) for p in fs.find(path)}


def test_generate_resume_ls_verify(ref, bucket):
    out = bucket + "/team-kd"
    # a first machine writes half of the shards (a slice), as if it had been interrupted
    part = gen.run(replace(ref["cfg"], out=out, shard_index=0, num_shards=2))
    assert part == f"{out}/{ref['fp']}"
    fs, path = kio.open_fs(part)
    assert not fs.exists(kio.join(path, kds.MANIFEST))
    written = {n: fs.cat_file(kio.join(path, kds.DATA_DIR, n)) for n in kds.list_shards(fs, path)}
    assert sorted(written) == [kds.shard_name(i, 6) for i in (0, 2, 4)]
    # resume: the complete shards are kept, the rest generated, the manifest committed last
    assert gen.run(replace(ref["cfg"], out=out)) == part
    for name, data in written.items():
        assert fs.cat_file(kio.join(path, kds.DATA_DIR, name)) == data
    assert assert_valid(part)["fingerprint"] == ref["fp"]
    assert rows_of(part) == ref["rows"]
    assert sorted(_objects(part)) == ["README.md", *(f"data/{kds.shard_name(i, 6)}" for i in range(6)), "manifest.json"]
    # a second request is a cache hit straight from the store
    assert gen.run(replace(ref["cfg"], out=out)) == part

    # the CLI, in child processes that find the endpoint through the environment the fixture set
    ls = kdgen_cli("ls", out, "--json")
    assert ls.returncode == 0, ls.stderr
    (brief,) = json.loads(ls.stdout)
    assert brief["fingerprint"] == ref["fp"] and brief["rows"] == 6 and brief["tokens"] > 0 and brief["bytes"] > 0
    assert brief["prompts"].endswith("prompts.jsonl") and brief["teacher"].startswith("local:") and "@" in brief["created_by"]
    table = kdgen_cli("ls", out)
    assert ref["fp"] in table.stdout and "6" in table.stdout
    ok = kdgen_cli("verify", part)
    assert ok.returncode == 0 and "OK" in ok.stdout + ok.stderr, ok.stderr


def test_push_pull_checksummed_and_resumable(ref, bucket, tmp_path):
    pushed = kdgen_cli("push", ref["url"], bucket + "/shared")
    assert pushed.returncode == 0, pushed.stderr
    url = pushed.stdout.strip().splitlines()[-1]
    assert url == f"{bucket}/shared/{ref['fp']}"
    assert _objects(url) == {k: v for k, v in _objects(ref["url"]).items()}  # byte for byte, nothing else
    assert_valid(url)

    # interrupted copy at the destination: no manifest, one shard missing, one corrupted, one temp file
    fs, path = kio.open_fs(url)
    fs.rm(kio.join(path, kds.MANIFEST))
    fs.rm(kio.join(path, "data", kds.shard_name(1, 6)))
    bad = bytearray(fs.cat_file(kio.join(path, "data", kds.shard_name(3, 6))))
    bad[100] ^= 0xFF
    fs.pipe_file(kio.join(path, "data", kds.shard_name(3, 6)), bytes(bad))
    fs.pipe_file(kio.join(path, "data", kio.TMP_PREFIX + "x-" + kds.shard_name(5, 6)), b"half")
    report = copy_dataset(ref["url"], bucket + "/shared")
    assert (report.copied, report.skipped, report.already_complete) == (2, 4, False)
    assert _objects(url) == _objects(ref["url"])
    assert copy_dataset(ref["url"], bucket + "/shared").already_complete

    # pull it back into a fresh local root: identical files, identical rows
    pulled = kdgen_cli("pull", url, str(tmp_path / "mirror"))
    assert pulled.returncode == 0, pulled.stderr
    local = pulled.stdout.strip().splitlines()[-1]
    assert local == str(tmp_path / "mirror" / ref["fp"])
    assert _objects(local) == _objects(ref["url"])
    assert rows_of(local) == ref["rows"]


def test_copy_refuses_a_damaged_source(ref, tmp_path):
    src = tmp_path / "src" / ref["fp"]
    fs = fsspec.filesystem("file")
    fs.copy(ref["url"], str(src), recursive=True)
    shard = src / "data" / kds.shard_name(2, 6)
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(KdError, match=r"train-00002-of-00006\.parquet fails its checksum"):
        copy_dataset(str(src), str(tmp_path / "dest"))
    assert not (tmp_path / "dest" / ref["fp"] / kds.MANIFEST).exists()  # nothing committed
    r = kdgen_cli("push", str(src), str(tmp_path / "dest"))
    assert r.returncode == 2 and "train-00002-of-00006.parquet" in r.stderr and "Traceback" not in r.stderr


def test_kdtrain_trains_straight_from_the_store(ref, bucket, tmp_path, tiny_model_dir):
    from kdtrain.config import load_config
    from kdtrain.train import run as train

    url = copy_dataset(ref["url"], bucket).url
    out = tmp_path / "student"
    flags = {"data": [url], "student": tiny_model_dir, "out": str(out), "batch_size": 2, "max_steps": 2, "save_steps": 2, "logging_steps": 1, "warmup_ratio": 0.0}
    train(load_config(None, flags))
    record = json.loads((out / "kd_config.json").read_text())
    assert record["datasets"][0]["url"] == url and record["fingerprints"] == [ref["fp"]]
    assert (out / "model.safetensors").exists()


def test_hf_store_offline_is_one_error_line():
    """hf:// (HfFileSystem) reads the Hub itself, never a local cache: offline (HF_HUB_OFFLINE=1, set
    for every test) it can do nothing, and says so instead of listing nothing. Untested against a
    real hub: none is reachable here."""
    res = kdgen_cli("ls", "hf://datasets/x/y")
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdgen: error: hf://datasets/x/y") and "HF_HUB_OFFLINE" in lines[0], res.stderr
