"""The teacher-dataset format v2 (kdcore.codec, kdcore.dataset): log-prob rounding and tail, rows ->
Parquet -> reader, the fingerprint, and the invariant checker the other tests rely on. No model
needed: runs in seconds. (Independent readers and v1: tests/test_kdgen_format_v2.py.)

    .venv/bin/python -m pytest -q tests/test_kdgen_format.py
"""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdcore import codec
import kdcore.dataset as kds
import kdcore.io as kio
from kdcore.errors import KdError
from kdgen.commit import finalize
from kdcore.prompts import Prompt
from kdcore.verify import check_table, verify

CLIP = 100.0  # the largest gap between neighbours the random rows use (nats)


def assert_within_budget(back: np.ndarray, want: np.ndarray) -> None:
    """The contract's precision: every stored log-prob within max(1e-3, 1e-3*|lp|) of the engine's."""
    want = np.asarray(want, np.float64)
    fin = np.isfinite(want)
    assert (np.isneginf(back) == np.isneginf(want)).all()
    assert (np.abs(back[fin] - want[fin]) <= np.maximum(1e-3, 1e-3 * np.abs(want[fin]))).all()


def random_sorted_logprobs(rng: np.random.Generator, t: int, k: int) -> np.ndarray:
    """[t, k] log-probs sorted descending, from near 0 down to hundreds of nats: gaps mix ties,
    near-ties, ordinary and large steps."""
    top = -rng.exponential(rng.choice([1e-6, 0.01, 1.0, 10.0]), size=(t, 1))
    kind = rng.integers(0, 4, size=(t, k - 1))
    gaps = np.select(
        [kind == 0, kind == 1, kind == 2],
        [np.zeros((t, k - 1)), rng.exponential(0.002, (t, k - 1)), rng.exponential(1.0, (t, k - 1))],
        rng.uniform(0, CLIP - 1, (t, k - 1)),
    )
    return (top - np.concatenate([np.zeros((t, 1)), np.cumsum(gaps, axis=1)], axis=1)).astype(np.float32)


def test_rounding_budget():
    """11 significant bits: relative error <= 2^-11, inside the contract's 1e-3 relative budget."""
    x = -np.exp(np.random.default_rng(0).uniform(-20, 8, 100_000)).astype(np.float32)
    back = codec.round_logprobs(x)
    rel = np.abs(back.astype(np.float64) - x) / np.abs(x.astype(np.float64))
    assert rel.max() <= 2.0 ** -(codec.LOGPROB_MANTISSA_BITS + 1) + 1e-12
    assert_within_budget(back, x)
    # the dropped mantissa bits are zero: what byte-stream-split + zstd compress away
    assert (back.view(np.uint32) & np.uint32((1 << (23 - codec.LOGPROB_MANTISSA_BITS)) - 1) == 0).all()


@pytest.mark.parametrize("seed", range(25))
def test_rounding_round_trip(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.choice([1, 2, 5, 20, 64]))
    lp = random_sorted_logprobs(rng, int(rng.integers(1, 200)), k)
    back = codec.round_logprobs(lp)
    assert back.dtype == np.float32 and back.shape == lp.shape
    assert_within_budget(back, lp)
    assert (back <= 0).all() and (np.diff(back, axis=1) <= 0).all()
    np.testing.assert_array_equal(codec.round_logprobs(back), back)  # idempotent: rewriting changes nothing


def test_rounding_and_tail_edge_values():
    lp = np.array(
        [
            [0.0, 0.0, -1e-9, -1e-4],  # probability 1 and ties at the top
            [-1.5, -1.5, -1.5, -1.5],  # all tied
            [-1e-7, -17.0, -18.0, -19.0],  # a teacher that sure: tail ~1e-7
            [-0.1, -np.inf, -np.inf, -np.inf],  # -inf from a masked vocabulary
        ],
        dtype=np.float32,
    )
    back = codec.round_logprobs(lp)
    assert_within_budget(back, lp)
    assert back[0, 0] == 0.0 and np.isneginf(back[3, 1:]).all()
    tail = codec.tail_logprobs(lp)
    assert np.isneginf(tail[0])  # the top-k holds everything
    np.testing.assert_allclose(np.exp(tail[1]), 1 - 4 * np.exp(-1.5), rtol=1e-6)
    exact = 1 - np.exp(np.float64(lp[2, 0])) - np.exp(lp[2, 1:].astype(np.float64)).sum()
    np.testing.assert_allclose(np.exp(tail[2]), exact, rtol=1e-6)  # 1 - sum(p) in float32 would be 0 or noise
    np.testing.assert_allclose(np.exp(tail[3]), 1 - np.exp(np.float64(lp[3, 0])), rtol=1e-6)


def make_rows(rng: np.random.Generator, vocab: int, k: int, n: int = 7) -> list[codec.Row]:
    """Random but valid rows: normalised-looking top-k; the sampled token is the top-1 at odd
    positions (its log-prob is that entry) and outside the top-k at even ones (below the k-th);
    chat and text rows, one empty completion."""
    rows = []
    for i in range(n):
        t = 0 if i == 2 else int(rng.integers(1, 30))
        lp = random_sorted_logprobs(rng, t, k) - np.log(k + 1, dtype=np.float32) if t else np.zeros((0, k), np.float32)
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(t)]) if t else np.zeros((0, k), np.int64)
        # odd positions sampled the top-1 token; even ones a token outside the top-k
        comp = [int(ids[j, 0]) if j % 2 else int(np.setdiff1d(np.arange(k + 1), ids[j])[0]) for j in range(t)]
        tok_lp = np.array([lp[j, 0] if j % 2 else lp[j, -1] - rng.exponential(2.0) for j in range(t)], np.float32)
        chat = i % 2 == 0
        prompt = Prompt(i, [{"role": "user", "content": f"prompt {i} é"}] if chat else None, None if chat else f"plain prompt {i}")
        rows.append(
            codec.Row(
                id=kds.row_id(prompt.content_hash, 0),  # as kdgen derives it (kdgen verify checks)
                messages=prompt.messages,
                prompt=prompt.text,
                prompt_ids=[int(x) for x in rng.integers(0, vocab, int(rng.integers(1, 20)))],
                completion=f"completion {i}",
                completion_ids=comp,
                token_logprobs=tok_lp,
                topk_ids=ids,
                topk_logprobs=lp,
                finish_reason="stop" if i % 3 else "length",
            )
        )
    return rows


def fake_core(vocab: int, k: int, rows: list[codec.Row]) -> dict:
    """A manifest core as `kdgen.generate.prepare` builds it for these rows (n=1), with made-up
    teacher and tokenizer identities."""
    hashes = [Prompt(0, r.messages, r.prompt).content_hash for r in rows]
    return {
        "format_version": codec.FORMAT_VERSION,
        "teacher": {"source": "local:fake", "path": "/fake", "revision": None, "weights_hash": "ab" * 32, "dtype": "float32"},
        "tokenizer": {"vocab_size": vocab, "embedding_rows": vocab, "tokenizer_hash": "cd" * 32, "chat_template_hash": None},
        "generation": {
            "kind": "generate", "backend": "hf", "engine_version": "transformers 0", "temperature": 0.7, "top_p": 0.95,
            "top_k": 0, "max_new_tokens": 30, "n": 1, "seed": 0, "k": k, "logprob_mode": "raw_logprobs_temperature_1",
            "quantization": None,
        },
        "prompts": {
            "source": "fake.jsonl", "column": "messages", "count": len(rows), "duplicates_dropped": 0,
            "content_hash": kio.sha256_hex("\n".join(hashes)),
        },
    }


@pytest.mark.parametrize("vocab", [49152, 262144])  # uint16 ids (SmolLM2) and uint32 ids (Gemma 3)
def test_rows_parquet_reader_exact(tmp_path, vocab):
    rng = np.random.default_rng(vocab)
    k = 6
    rows = make_rows(rng, vocab, k)
    if vocab > 65536:
        rows[0].topk_ids[0, 0] = vocab - 1  # the largest id must survive the id type
    table = codec.rows_to_table(rows, vocab, k)
    assert table.schema.field("topk_ids").type.value_type.value_type == codec.id_type(vocab)
    assert check_table(table, k, vocab) == []

    core = fake_core(vocab, k, rows)
    fs, ds_dir = kio.open_fs(str(tmp_path / kds.fingerprint(core)))
    kds.write_shard(fs, ds_dir, kds.shard_name(0, 2), table.slice(0, 4))
    kds.write_shard(fs, ds_dir, kds.shard_name(1, 2), table.slice(4))
    finalize(fs, ds_dir, core, {}, 0.0, 0.0, 0)
    assert verify(ds_dir)[1] == []

    ds = kds.TeacherDataset(ds_dir)
    assert ds.num_rows == len(rows) and ds.num_tokens == sum(len(r.completion_ids) for r in rows)
    decoded = [b.row(i) for b in ds.iter_batches(batch_rows=3) for i in range(b.num_rows)]
    assert [d["id"] for d in decoded] == [r.id for r in rows]
    for r, d in zip(rows, decoded):
        np.testing.assert_array_equal(d["prompt_ids"], r.prompt_ids)
        np.testing.assert_array_equal(d["completion_ids"], r.completion_ids)
        np.testing.assert_array_equal(d["topk_ids"], r.topk_ids.reshape(-1, k))
        # exactly the rounded values, within the contract's budget of the originals; the tail exact
        np.testing.assert_array_equal(d["topk_logprobs"], codec.round_logprobs(r.topk_logprobs))
        assert_within_budget(d["topk_logprobs"], r.topk_logprobs)
        assert_within_budget(d["token_logprobs"], r.token_logprobs)
        np.testing.assert_array_equal(d["tail_logprobs"], codec.round_logprobs(codec.tail_logprobs(r.topk_logprobs), codec.TAIL_MANTISSA_BITS))
        in_topk = (r.topk_ids == np.asarray(r.completion_ids)[:, None]).any(axis=1)
        np.testing.assert_array_equal(d["token_logprobs"][in_topk], d["topk_logprobs"][in_topk, 0])
        assert d["completion"] == r.completion and d["finish_reason"] == r.finish_reason
    # the ids-and-log-probs-only path gives the same arrays
    lean = list(ds.iter_batches(batch_rows=100, text=False))
    assert [b.completions for b in lean] == [[], []]  # one batch per shard, no text decoded
    for name in ("completion_ids", "token_logprobs", "topk_ids", "topk_logprobs", "tail_logprobs"):
        np.testing.assert_array_equal(np.concatenate([getattr(b, name) for b in lean]), np.concatenate([d[name] for d in decoded]))
    np.testing.assert_array_equal(np.concatenate([b.prompt_values for b in lean]), np.concatenate([d["prompt_ids"] for d in decoded]))
    # int32 ids (what kdtrain asks for): the same values
    narrow = np.concatenate([b.topk_ids for b in ds.iter_batches(batch_rows=100, text=False, id_dtype=np.int32)])
    assert narrow.dtype == np.int32 and lean[0].topk_ids.dtype == np.int64
    np.testing.assert_array_equal(narrow, np.concatenate([d["topk_ids"] for d in decoded]))
    text = ds.read_table(columns=["messages", "prompt"]).to_pylist()
    assert [t["messages"] for t in text] == [r.messages for r in rows]
    assert [t["prompt"] for t in text] == [r.prompt for r in rows]
    tail = lean[0].tail_mass()
    assert tail.shape == (lean[0].completion_ids.size,) and ((tail >= 0) & (tail <= 1)).all()
    total = tail + np.exp(lean[0].topk_logprobs.astype(np.float64)).sum(1)
    np.testing.assert_allclose(total, 1.0, atol=2e-3)


def test_reader_on_fsspec_memory_url():
    rng = np.random.default_rng(1)
    rows = make_rows(rng, 49152, 4)
    core = fake_core(49152, 4, rows)
    url = f"memory://kd-format-test/{kds.fingerprint(core)}"
    fs, path = kio.open_fs(url)
    kds.write_shard(fs, path, kds.shard_name(0, 1), codec.rows_to_table(rows, 49152, 4))
    finalize(fs, path, core, {}, 0.0, 0.0, 0)
    assert verify(url)[1] == []
    ds = kds.TeacherDataset("memory://kd-format-test")  # a root holding one dataset opens too
    assert ds.fingerprint == kds.fingerprint(core) and ds.num_rows == len(rows)
    assert [b.ids for b in ds.iter_batches()] == [[r.id for r in rows]]


def test_rows_to_table_rejects_bad_shapes():
    rows = make_rows(np.random.default_rng(2), 49152, 4, n=2)
    rows[1].topk_ids = rows[1].topk_ids[:, :3]
    with pytest.raises(ValueError, match="T="):
        codec.rows_to_table(rows, 49152, 4)


def test_incomplete_dataset_does_not_open(tmp_path):
    fs, path = kio.open_fs(str(tmp_path / "abc"))
    rows = make_rows(np.random.default_rng(3), 49152, 4, n=2)
    kds.write_shard(fs, path, kds.shard_name(0, 2), codec.rows_to_table(rows, 49152, 4))
    with pytest.raises(KdError, match="did not finish"):
        kds.TeacherDataset(path)
    assert "did not finish" in verify(path)[1][0]


# ----------------------------------------------------------------------------------------------
# Fingerprint: a function of FINGERPRINT_FIELDS and nothing else


def _set(d: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for part in head:
        d = d[part]
    d[last] = value


def _changed(value):
    if isinstance(value, bool) or value is None:
        return "x"
    if isinstance(value, (int, float)):
        return value + 1
    return value + "-changed"


def test_fingerprint_is_stable_and_keyed_on_its_fields():
    core = fake_core(49152, 20, make_rows(np.random.default_rng(5), 49152, 20, n=2))
    fp = kds.fingerprint(core)
    assert fp == kds.fingerprint(copy.deepcopy(core)) and len(fp) == 16
    # key order does not matter (canonical JSON)
    assert kds.fingerprint({k: core[k] for k in reversed(list(core))}) == fp
    for name in kds.FINGERPRINT_FIELDS:
        other = copy.deepcopy(core)
        value = kds.manifest_value(core, name) if name in kds.FINGERPRINT_FIELDS_UNLESS else kds.dig(core, name)
        _set(other, name, _changed(value))
        assert kds.fingerprint(other) != fp, f"{name} must change the fingerprint"
    # a field that joined later is keyed only when it differs from the value older datasets had:
    # written as that value or absent, the key is the one it always was
    for name, before in kds.FINGERPRINT_FIELDS_UNLESS.items():
        other = copy.deepcopy(core)
        _set(other, name, before)
        assert kds.fingerprint(other) == fp, f"{name} = {before!r} must not change an older dataset's key"
    # provenance that does not change the rows does not change the key
    for name in ("teacher.path", "teacher.source", "generation.engine_version", "prompts.source", "prompts.column"):
        other = copy.deepcopy(core)
        _set(other, name, _changed(kds.dig(core, name)))
        assert kds.fingerprint(other) == fp, f"{name} must not change the fingerprint"
    other = copy.deepcopy(core)
    other["config"] = {"batch_size": 3, "shard_prompts": 1, "out": "/elsewhere"}
    assert kds.fingerprint(other) == fp


# ----------------------------------------------------------------------------------------------
# The invariant checker itself: every violation the contract names is caught


def _one_row(**change) -> codec.Row:
    """One valid row (k=3): token 10 is the top-1 at position 0, token 99 is outside the top-k at 1."""
    row = codec.Row(
        id="r0",
        messages=None,
        prompt="p",
        prompt_ids=[5, 6],
        completion="c",
        completion_ids=[10, 99],
        token_logprobs=np.array([-0.1, -2.5], np.float32),
        topk_ids=np.array([[10, 12, 13], [14, 15, 11]]),
        topk_logprobs=np.array([[-0.1, -3.0, -4.0], [-0.5, -1.5, -2.0]], np.float32),
        finish_reason="length",
    )
    for key, value in change.items():
        setattr(row, key, value)
    return row


def _table(**change) -> pa.Table:
    return codec.rows_to_table([_one_row(**change)], 49152, 3)


def _replace_column(table: pa.Table, name: str, values: list, type_: pa.DataType) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array([values], pa.list_(type_)))


@pytest.mark.parametrize(
    "change, problem",
    [
        ({}, None),
        ({"topk_logprobs": np.array([[-0.01, -0.02, -0.03], [-0.5, -1.5, -2.0]], np.float32), "token_logprobs": np.array([-0.01, -2.5], np.float32)}, "mass above 1"),
        ({"token_logprobs": np.array([-0.1, -1.0], np.float32)}, "outside the top-k has a higher log-prob"),
        ({"completion_ids": [10, 60000]}, "ids >= vocab"),
        ({"prompt_ids": [5, 50000]}, "prompt ids >= vocab"),
        ({"finish_reason": "eos"}, "unknown finish_reason"),
        ({"tail_logprobs": np.array([-30.0, -30.0], np.float32)}, "is not 1"),
        ({"topk_logprobs": np.array([[-0.1, -np.nan, -4.0], [-0.5, -1.5, -2.0]], np.float32)}, "NaN"),
    ],
)
def test_check_table_catches_violations(change, problem):
    problems = check_table(_table(**change), 3, 49152)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_writer_rejects_a_sampled_token_that_disagrees_with_its_top_k_entry():
    """Both come from one tensor in every engine: a mismatch means a broken backend."""
    with pytest.raises(ValueError, match="differs from its top-k entry"):
        _table(token_logprobs=np.array([-0.5, -2.5], np.float32))


def test_check_table_catches_bad_layout():
    table = _table()
    assert any("not [T, k=4]" in p for p in check_table(table, 4, 49152))
    assert any("duplicate row ids" in p for p in check_table(pa.concat_tables([table, table]), 3, 49152))
    short = _replace_column(table, "token_logprobs", [-0.1], pa.float32())
    assert any("does not hold T values" in p for p in check_table(short, 3, 49152))
    missing = table.drop_columns(["tail_logprobs"])
    assert any("tail_logprobs is missing" in p for p in check_table(missing, 3, 49152))
    # the sampled token is the top-1 at position 0, but its token_logprobs entry says otherwise
    lying = _replace_column(table, "token_logprobs", [-0.2, -2.5], pa.float32())
    assert any("differ from the sampled token's top-k entry" in p for p in check_table(lying, 3, 49152))


def test_rounding_keeps_top_k_sorted():
    """Rounding is monotonic: sorted rows stay sorted, near-ties may become exact ties."""
    lp = np.array([[-0.9999999, -1.0, -1.0000001, -2.0]], np.float32)
    back = codec.round_logprobs(lp)
    assert (np.diff(back, axis=1) <= 0).all()
    assert_within_budget(back, lp)


def test_parquet_columns_are_plain_for_other_readers(tmp_path):
    """Other readers (pandas, DuckDB, polars) see [T][k] unsigned integer and float lists, not an
    extension type, and no table outside the columns."""
    table = codec.rows_to_table(make_rows(np.random.default_rng(4), 49152, 4, n=3), 49152, 4)
    path = tmp_path / "x.parquet"
    path.write_bytes(codec.parquet_bytes(table))
    back = pq.read_table(path)
    assert back.schema.field("topk_ids").type == pa.list_(pa.list_(pa.uint16()))
    assert back.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float32()))
    assert set(back.schema.metadata) == {b"kd.format_version", b"kd.k"}
    assert back.schema.metadata[b"kd.k"] == b"4"
    assert back.equals(table)
