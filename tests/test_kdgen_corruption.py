"""Corruption (issue 7, item 6) and shard-path safety (item 7): every way a dataset can be damaged
is named by `kdgen verify` (shard + problem), and `kdtrain run` refuses to start on it with one
line and exit status 2. Manifests cannot point readers outside the dataset directory.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

import kdgen.generate as gen
import kdcore.dataset as kds
import kdcore.io as kio
from kdcore.errors import KdError
from kdgen.store import RowReuse, copy_dataset
from kdcore.verify import verify
from kdgen_helpers import CHAT_ROWS, one_torch_thread, write_jsonl  # noqa: F401
from kdgen_store_helpers import small_config

SHARD1 = "data/" + kds.shard_name(1, 3)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    """Two complete datasets of three shards each (different prompts)."""
    tmp = tmp_path_factory.mktemp("corrupt")
    a = gen.run(small_config(write_jsonl(tmp / "a.jsonl", CHAT_ROWS[:3]), str(tmp / "root"), tiny_model_dir))
    b = gen.run(small_config(write_jsonl(tmp / "b.jsonl", CHAT_ROWS[3:]), str(tmp / "other"), tiny_model_dir))
    return Path(a), Path(b)


def _truncate(d: Path, other: Path) -> None:
    p = d / SHARD1
    p.write_bytes(p.read_bytes()[:-200])


def _flip(d: Path, other: Path) -> None:
    p = d / SHARD1
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))


def _missing(d: Path, other: Path) -> None:
    (d / SHARD1).unlink()


def _extra(d: Path, other: Path) -> None:
    shutil.copy(d / SHARD1, d / "data" / kds.shard_name(7, 9))


def _edited_manifest(d: Path, other: Path) -> None:
    m = json.loads((d / kds.MANIFEST).read_text())
    m["generation"]["temperature"] = 0.7  # claims other settings than the rows were made with
    (d / kds.MANIFEST).write_text(json.dumps(m))


def _edited_totals(d: Path, other: Path) -> None:
    m = json.loads((d / kds.MANIFEST).read_text())
    m["totals"]["rows"] += 1
    (d / kds.MANIFEST).write_text(json.dumps(m))


def _foreign_shard(d: Path, other: Path) -> None:
    shutil.copy(other / SHARD1, d / SHARD1)  # same name, another dataset's rows


def _foreign_shard_and_entry(d: Path, other: Path) -> None:
    """Someone 'fixes' the manifest to match the foreign shard: the entry, the totals, everything."""
    _foreign_shard(d, other)
    m = json.loads((d / kds.MANIFEST).read_text())
    theirs = json.loads((other / kds.MANIFEST).read_text())
    m["shards"][1] = theirs["shards"][1]
    m["totals"] = {**m["totals"], "rows": sum(s["rows"] for s in m["shards"]), "tokens": sum(s["tokens"] for s in m["shards"])}
    (d / kds.MANIFEST).write_text(json.dumps(m))


CASES = {
    "truncated": (_truncate, rf"{SHARD1}: size \d+ bytes, manifest says \d+ \(truncated or replaced\)"),
    "flipped-bytes": (_flip, rf"{SHARD1}: sha256 mismatch \(corrupted or replaced\)"),
    "missing": (_missing, rf"{SHARD1}: missing"),
    "extra-shard": (_extra, r"data/train-00007-of-00009.parquet: shard file not listed in the manifest"),
    "edited-manifest": (_edited_manifest, r"manifest.json: the fingerprint does not match its recorded settings"),
    "edited-totals": (_edited_totals, r"manifest totals \(4 rows"),
    "foreign-shard": (_foreign_shard, rf"{SHARD1}: (size \d+ bytes, manifest says \d+ \(truncated or replaced\)|sha256 mismatch)"),
    "foreign-shard-and-entry": (_foreign_shard_and_entry, rf"{SHARD1}: rows of another dataset \(its shard metadata says fingerprint"),
}


@pytest.fixture(params=sorted(CASES))
def damaged(request, pair, tmp_path):
    a, b = pair
    d = tmp_path / a.name
    shutil.copytree(a, d)
    damage, expected = CASES[request.param]
    damage(d, b)
    return d, expected


def test_verify_names_the_shard_and_the_problem(damaged):
    d, expected = damaged
    _, problems = verify(str(d))
    assert any(__import__("re").search(expected, p) for p in problems), problems


def test_kdtrain_refuses_to_start(damaged, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from kdtrain.cli import main

    d, expected = damaged
    monkeypatch.setattr(sys, "argv", ["kdtrain", "run", "--data", str(d), "--student", tiny_model_dir, "--out", str(tmp_path / "run"), "--max-steps", "1"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("kdtrain: error:") and "Traceback" not in err
    assert "fails verification" in err and "kdgen verify" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# ----------------------------------------------------------------------------------------------
# Shard paths cannot escape the dataset directory


ESCAPES = ["../outside/train-00000-of-00003.parquet", "/etc/passwd", "data/../../x.parquet", "s3://bucket/x.parquet", "data\\..\\x.parquet", "data/sub/train-00000-of-00003.parquet"]


@pytest.mark.parametrize("bad", ESCAPES)
def test_manifest_paths_cannot_escape(pair, tmp_path, bad):
    a, _ = pair
    d = tmp_path / "root" / a.name
    shutil.copytree(a, d)
    secret = tmp_path / "outside" / kds.shard_name(0, 3)
    secret.parent.mkdir()
    shutil.copy(d / "data" / kds.shard_name(0, 3), secret)
    m = json.loads((d / kds.MANIFEST).read_text())
    m["shards"][0]["path"] = bad
    (d / kds.MANIFEST).write_text(json.dumps(m))

    _, problems = verify(str(d))
    assert any(p.startswith(f"{bad}: shard path is not data/") for p in problems), problems
    ds = kds.TeacherDataset(str(d))  # opening reads only the manifest ...
    with pytest.raises(KdError, match="refusing to read it"):
        ds.shard_paths()  # ... but no reader path leads outside
    with pytest.raises(KdError, match="refusing to read it"):
        next(ds.iter_batches())
    with pytest.raises(KdError, match="refusing to read it"):
        copy_dataset(str(d), str(tmp_path / "copy"))
    assert not (tmp_path / "copy").exists()
    # and such a dataset is never a source of reused rows
    m_core = json.loads((a / kds.MANIFEST).read_text())
    assert len(RowReuse(*kio.open_fs(str(tmp_path / "root")), m_core, exclude="none")) == 0
