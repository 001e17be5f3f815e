"""A teacher dataset reads correctly in the usual readers, with no kd code on the reading side:
DuckDB SQL, pandas, polars and `datasets` each recompute every position's top-1 id,
`token_logprobs` and tail mass following docs/FORMAT.md alone, and match kd's reader exactly. The
dataset is greedy, so the issue-12 symptom is checked too: the sampled token is the top-1 at every
position (v1's frequency codes matched at 0 of 791 positions in DuckDB).

    .venv/bin/python -m pytest -q tests/test_kdgen_readers.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kdgen.generate as gen
from kdcore.dataset import TeacherDataset
from kdgen_helpers import CHAT_ROWS, one_torch_thread, tiny_config, write_jsonl  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("readers")
    prompts = write_jsonl(tmp / "prompts.jsonl", CHAT_ROWS)
    url = gen.run(tiny_config(prompts, str(tmp / "out"), tiny_model_dir, n=1, max_new_tokens=6, temperature=0.0))
    return Path(url)


@pytest.fixture(scope="module")
def kd_view(dataset) -> dict:
    """What kd's reader says, per (row id, position 1..T): top-1 id, token log-prob, tail log-prob."""
    out = {}
    for b in TeacherDataset(str(dataset)).iter_batches():
        for i, rid in enumerate(b.ids):
            a, e = b.offsets[i], b.offsets[i + 1]
            for t in range(a, e):
                out[(rid, int(t - a + 1))] = (int(b.topk_ids[t, 0]), float(b.token_logprobs[t]), float(b.tail_logprobs[t]), int(b.completion_ids[t]))
    assert len(out) == TeacherDataset(str(dataset)).num_tokens > 0
    return out


def assert_matches(found: dict, kd_view: dict) -> None:
    """found: (id, t) -> (top1 id, token log-prob, tail mass, sampled id), from an independent reader."""
    assert found.keys() == kd_view.keys()
    for key, (top1, token_lp, tail_mass, sampled) in found.items():
        kd_top1, kd_token_lp, kd_tail_lp, kd_sampled = kd_view[key]
        assert (top1, token_lp, sampled) == (kd_top1, kd_token_lp, kd_sampled), key
        assert tail_mass == pytest.approx(np.exp(np.float64(kd_tail_lp)), rel=1e-12, abs=0), key  # exp of the same float32
        assert sampled == top1  # greedy: the sampled token is the teacher's top-1 everywhere


def test_duckdb_sql(dataset, kd_view):
    import duckdb

    glob = str(dataset / "data" / "*.parquet")
    rows = duckdb.sql(
        f"""
        SELECT id, t, topk_ids[t][1], token_logprobs[t], exp(tail_logprobs[t]), completion_ids[t]
        FROM (SELECT *, unnest(range(1, len(completion_ids) + 1)) AS t FROM read_parquet('{glob}'))
        """
    ).fetchall()
    assert_matches({(r[0], r[1]): r[2:] for r in rows}, kd_view)
    # every position's log-probs sum to 1 with the tail (the contract's invariant, in SQL)
    [(worst,)] = duckdb.sql(
        f"""
        SELECT max(abs(list_sum(list_transform(topk_logprobs[t], lambda x: exp(x))) + exp(tail_logprobs[t]) - 1))
        FROM (SELECT *, unnest(range(1, len(completion_ids) + 1)) AS t FROM read_parquet('{glob}'))
        """
    ).fetchall()
    assert worst < 2e-3


def test_pandas(dataset, kd_view):
    import pandas as pd

    df = pd.read_parquet(dataset / "data")
    found = {}
    for row in df.itertuples():
        tail_mass = np.exp(row.tail_logprobs.astype(np.float64))
        for t, ids in enumerate(row.topk_ids):
            found[(row.id, t + 1)] = (int(ids[0]), float(row.token_logprobs[t]), float(tail_mass[t]), int(row.completion_ids[t]))
    assert_matches(found, kd_view)


def test_polars(dataset, kd_view):
    import polars as pl

    df = (
        pl.read_parquet(str(dataset / "data" / "*.parquet"))
        .select(
            "id",
            pl.col("topk_ids").list.eval(pl.element().list.first()).alias("top1"),
            "token_logprobs",
            pl.col("tail_logprobs").list.eval(pl.element().cast(pl.Float64).exp()).alias("tail_mass"),
            "completion_ids",
        )
        .with_columns(pl.int_ranges(1, pl.col("completion_ids").list.len() + 1).alias("t"))
        .explode("top1", "token_logprobs", "tail_mass", "completion_ids", "t")
    )
    found = {(r["id"], r["t"]): (r["top1"], r["token_logprobs"], r["tail_mass"], r["completion_ids"]) for r in df.iter_rows(named=True)}
    assert_matches(found, kd_view)


def test_datasets_load_dataset_from_the_card(dataset, kd_view, tmp_path):
    """`load_dataset(<dataset dir>)` finds the shards and the typed features through the card."""
    import datasets

    loaded = datasets.load_dataset(str(dataset), cache_dir=str(tmp_path))
    assert list(loaded) == ["train"]
    train = loaded["train"]
    assert train.features["topk_ids"] == datasets.List(datasets.List(datasets.Value("uint16")))
    assert train.features["topk_logprobs"] == datasets.List(datasets.List(datasets.Value("float32")))
    found = {}
    for row in train.with_format("numpy"):
        tail_mass = np.exp(np.asarray(row["tail_logprobs"], np.float64))
        for t in range(len(row["completion_ids"])):
            found[(str(row["id"]), t + 1)] = (int(row["topk_ids"][t][0]), float(row["token_logprobs"][t]), float(tail_mass[t]), int(row["completion_ids"][t]))
    assert_matches(found, kd_view)
    assert datasets.load_dataset("parquet", data_dir=str(dataset), cache_dir=str(tmp_path))["train"].num_rows == train.num_rows
