"""A teacher dataset opens unchanged in the usual readers: `datasets.load_dataset` (by data_dir,
and by the dataset card's YAML header), pandas, polars and DuckDB. Each sees every row, and the
card's hand-decoding recipe gives the log-probs `TeacherDataset` gives.

    .venv/bin/python -m pytest -q tests/test_kdgen_readers.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kdgen.generate as gen
from kdcore import format as fmt
from kdgen_helpers import CHAT_ROWS, one_torch_thread, tiny_config, write_jsonl  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("readers")
    prompts = write_jsonl(tmp / "prompts.jsonl", CHAT_ROWS)
    url = gen.run(tiny_config(prompts, str(tmp / "out"), tiny_model_dir, n=1, max_new_tokens=6))
    ds = fmt.TeacherDataset(url)
    first = next(ds.iter_batches()).row(0)
    return Path(url), ds, first


def decode_by_hand(deltas, k: int, scale: int) -> np.ndarray:
    """The recipe printed in the dataset card: logprob = -cumsum(deltas) / scale, per position."""
    return -np.cumsum(np.asarray(deltas, np.int64).reshape(-1, k), axis=1) / scale


def check_first_row(ids, completion_ids, deltas, ds, first) -> None:
    assert ids == first["id"]
    np.testing.assert_array_equal(np.asarray(completion_ids), first["completion_ids"])
    np.testing.assert_allclose(decode_by_hand(deltas, ds.k, ds.scale), first["topk_logprobs"], atol=1e-6)


def test_load_dataset_parquet_data_dir(dataset, tmp_path):
    import datasets

    path, ds, first = dataset
    loaded = datasets.load_dataset("parquet", data_dir=str(path), cache_dir=str(tmp_path))["train"]
    assert loaded.num_rows == ds.num_rows == 6
    row = loaded[0]
    check_first_row(row["id"], row["completion_ids"], row["topk_logprob_deltas"], ds, first)
    assert row["messages"] == CHAT_ROWS[0]["messages"]


def test_load_dataset_from_the_card(dataset, tmp_path):
    """`load_dataset(dir)` finds the shards through the README's `configs` header."""
    import datasets

    path, ds, first = dataset
    loaded = datasets.load_dataset(str(path), cache_dir=str(tmp_path))
    assert list(loaded) == ["train"] and loaded["train"].num_rows == ds.num_rows
    row = loaded["train"][0]
    check_first_row(row["id"], row["completion_ids"], row["topk_logprob_deltas"], ds, first)
    assert ds.to_hf().num_rows == ds.num_rows


def test_pandas(dataset):
    import pandas as pd

    path, ds, first = dataset
    df = pd.read_parquet(path / "data")
    assert len(df) == ds.num_rows
    check_first_row(df["id"][0], df["completion_ids"][0], df["topk_logprob_deltas"][0], ds, first)


def test_polars(dataset):
    import polars as pl

    path, ds, first = dataset
    df = pl.read_parquet(str(path / "data" / "*.parquet"))
    assert df.height == ds.num_rows
    row = df.row(0, named=True)
    check_first_row(row["id"], row["completion_ids"], row["topk_logprob_deltas"], ds, first)


def test_duckdb(dataset):
    import duckdb

    path, ds, first = dataset
    glob = str(path / "data" / "*.parquet")
    [(rows, tokens)] = duckdb.sql(f"select count(*), sum(len(completion_ids)) from read_parquet('{glob}')").fetchall()
    assert (rows, tokens) == (ds.num_rows, ds.num_tokens)
    [row] = duckdb.sql(f"select id, completion_ids, topk_logprob_deltas from read_parquet('{glob}') where id = '{first['id']}'").fetchall()
    check_first_row(*row, ds, first)
