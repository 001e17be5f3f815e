"""Row-level reuse (issue 7, item 3): a request with the same teacher and generation settings as
complete datasets under its root, but another prompt set, takes the rows that exist by row id and
generates only the rest — and its dataset equals a fresh run's, row for row and byte for byte.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import kdgen.generate as gen
import kdcore.dataset as kds
import kdcore.io as kio
from kdgen_helpers import CHAT_ROWS, assert_valid, one_torch_thread, rows_of, write_jsonl  # noqa: F401
from kdgen_store_helpers import small_config


@pytest.fixture()
def asked(monkeypatch):
    """Row ids the engine is asked for, and engine starts, from now on."""
    seen = {"rows": [], "starts": 0}
    real = gen.make_backend

    def make(*a, **kw):
        seen["starts"] += 1
        backend = real(*a, **kw)
        inner = backend.generate

        def generate(reqs, *rest):
            seen["rows"].extend(r.row_id for r in reqs)
            return inner(reqs, *rest)

        backend.generate = generate
        return backend

    monkeypatch.setattr(gen, "make_backend", make)
    return seen


def test_reuse_generates_only_missing_rows_and_equals_a_fresh_run(tmp_path, tiny_model_dir, asked, capsys):
    first = write_jsonl(tmp_path / "first.jsonl", CHAT_ROWS[:4])
    second = write_jsonl(tmp_path / "second.jsonl", CHAT_ROWS[2:])  # 2 prompts shared, 2 new
    root = str(tmp_path / "shared")
    cfg = small_config(first, root, tiny_model_dir, shard_prompts=2, n=2, temperature=0.7, seed=3)  # sampled: per-row seeds
    gen.run(cfg)
    # same settings but another k: never a source (its rows are not this request's rows)
    gen.run(replace(cfg, k=3))
    asked["rows"].clear()
    capsys.readouterr()

    url = gen.run(replace(cfg, prompts=second))
    err = capsys.readouterr().err
    assert "row reuse: 4 of 8 rows already exist in 1 dataset(s)" in err
    assert "rows: 4 reused from existing datasets, 4 generated" in err
    fresh = gen.run(replace(cfg, prompts=second, out=str(tmp_path / "fresh")))
    new_ids = {r["id"] for r in rows_of(fresh)} - {r["id"] for r in rows_of(root + "/" + Path(gen.run(cfg)).name)}
    assert sorted(asked["rows"][: len(new_ids)]) == sorted(new_ids)  # the reusing run asked only for these
    assert Path(url).name == Path(fresh).name
    assert_valid(url)
    assert rows_of(url) == rows_of(fresh)  # same ids, same order, same contents
    for name in kds.list_shards(*kio.open_fs(url)):
        assert (Path(url) / "data" / name).read_bytes() == (Path(fresh) / "data" / name).read_bytes()


def test_all_rows_reused_starts_no_engine(tmp_path, tiny_model_dir, asked, capsys):
    prompts = write_jsonl(tmp_path / "all.jsonl", CHAT_ROWS[:3])
    subset = write_jsonl(tmp_path / "subset.jsonl", [CHAT_ROWS[2], CHAT_ROWS[0]])  # other order, other file
    root = str(tmp_path / "shared")
    cfg = small_config(prompts, root, tiny_model_dir)
    gen.run(cfg)
    starts = asked["starts"]
    capsys.readouterr()
    url = gen.run(replace(cfg, prompts=subset))
    assert asked["starts"] == starts  # the teacher's weights were never loaded
    assert "rows: 2 reused from existing datasets, 0 generated" in capsys.readouterr().err
    assert_valid(url)
    assert rows_of(url) == rows_of(gen.run(replace(cfg, prompts=subset, out=str(tmp_path / "fresh"))))


def test_damaged_source_rows_are_generated_not_copied(tmp_path, tiny_model_dir, asked):
    first = write_jsonl(tmp_path / "first.jsonl", CHAT_ROWS[:2])
    second = write_jsonl(tmp_path / "second.jsonl", CHAT_ROWS[:3])
    root = tmp_path / "shared"
    cfg = small_config(first, str(root), tiny_model_dir)
    src = Path(gen.run(cfg))
    shard = src / "data" / kds.shard_name(0, 2)
    data = bytearray(shard.read_bytes())
    data[-30] ^= 0x01  # the manifest's sha256 no longer matches
    shard.write_bytes(bytes(data))
    asked["rows"].clear()
    url = gen.run(replace(cfg, prompts=second))
    assert len(asked["rows"]) == 2  # prompt 0 (damaged source shard) and prompt 2 (new)
    assert rows_of(url) == rows_of(gen.run(replace(cfg, prompts=second, out=str(tmp_path / "fresh"))))
