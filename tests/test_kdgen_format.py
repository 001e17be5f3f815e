"""The teacher-dataset format (kdcore.format): log-prob encoding, rows -> Parquet -> reader, the
fingerprint, and the invariant checker the other tests rely on. No model needed: runs in seconds.

    .venv/bin/python -m pytest -q tests/test_kdgen_format.py
"""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdcore import format as fmt
from kdcore.errors import KdError
from kdgen.commit import finalize
from kdcore.prompts import Prompt
from kdcore.verify import check_table, verify

TOL = 0.5 / fmt.LOGPROB_SCALE + 1e-5  # half a quantisation step, plus float32 rounding of the result
CLIP = fmt.MAX_DELTA / fmt.LOGPROB_SCALE  # the largest gap between neighbours the deltas hold (nats)


def test_quantisation_budget():
    """Every stored log-prob is within 1e-3 nats of the engine's value (issue 2, storage target)."""
    assert 0.5 / fmt.LOGPROB_SCALE <= 1e-3 and CLIP >= 64


def random_sorted_logprobs(rng: np.random.Generator, t: int, k: int) -> np.ndarray:
    """[t, k] log-probs sorted descending, from near 0 down to hundreds of nats: gaps mix ties,
    near-ties, ordinary and large steps (up to just below the clip), so the deltas use their range."""
    top = -rng.exponential(rng.choice([0.01, 1.0, 10.0]), size=(t, 1))
    kind = rng.integers(0, 4, size=(t, k - 1))
    gaps = np.select(
        [kind == 0, kind == 1, kind == 2],
        [np.zeros((t, k - 1)), rng.exponential(0.002, (t, k - 1)), rng.exponential(1.0, (t, k - 1))],
        rng.uniform(0, CLIP - 1, (t, k - 1)),
    )
    return (top - np.concatenate([np.zeros((t, 1)), np.cumsum(gaps, axis=1)], axis=1)).astype(np.float32)


@pytest.mark.parametrize("seed", range(25))
def test_encode_decode_round_trip(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.choice([1, 2, 5, 20, 64]))
    lp = random_sorted_logprobs(rng, int(rng.integers(1, 200)), k)
    deltas = fmt.encode_topk_logprobs(lp)
    assert deltas.dtype == np.uint16 and deltas.shape == lp.shape
    back = fmt.decode_topk_logprobs(deltas)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, lp, atol=TOL, rtol=0)
    assert (back <= 0).all() and (np.diff(back, axis=1) <= 0).all()
    # decoding is exact on its own output: a second round trip changes nothing
    np.testing.assert_array_equal(fmt.decode_topk_logprobs(fmt.encode_topk_logprobs(back)), back)


@pytest.mark.parametrize("k, scale", [(1, 512), (20, 512), (256, 512), (257, 512), (20, 500)])
def test_decode_fast_paths_equal_the_plain_formulas(k, scale):
    """The reader's fast paths (int32 cumsum to float32 log-probs, top-1-first search for the sampled
    token, int32 ids) give bit-identical arrays to the plain float64 / full-compare formulas.
    k > 256 or a scale that is not a power of two takes the float64 path."""
    rng = np.random.default_rng(k)
    t = 300
    deltas = rng.integers(0, 3000, (t, k)).astype(np.uint16)
    deltas[::7] = fmt.MAX_DELTA  # clipped gaps: the largest sums the format can hold
    want = (np.cumsum(deltas, axis=-1, dtype=np.int64).astype(np.float64) * (-1.0 / scale)).astype(np.float32)
    np.testing.assert_array_equal(fmt.decode_topk_logprobs(deltas, scale), want)
    # the sampled token is the top-1, another top-k entry, or absent (then its own code holds it)
    ids = np.stack([rng.permutation(1000)[:k] for _ in range(t)])
    case, at = rng.integers(0, 3, t), rng.integers(0, k, t)
    sampled = np.where(case == 0, ids[:, 0], np.where(case == 1, ids[np.arange(t), at], 5000))
    codes = np.where(case == 2, rng.integers(1, 10**6, t), 0).astype(np.uint32)
    first_hit = (ids == sampled[:, None]).argmax(axis=1)
    want_tlp = np.where(codes == 0, want[np.arange(t), first_hit], (codes - 1.0) * (-1.0 / scale)).astype(np.float32)
    for dtype in (np.int64, np.int32):
        np.testing.assert_array_equal(fmt.decode_token_logprobs(codes, sampled, ids.astype(dtype), want, scale), want_tlp)


def test_encode_edge_values():
    lp = np.array(
        [
            [0.0, 0.0, -1e-9, -1e-4],  # probability 1 and ties at the top
            [-0.5, -0.5, -0.5, -0.5],  # all tied
            [-1e-3, -(CLIP + 10), -2 * (CLIP + 10), -3 * (CLIP + 10)],  # gaps beyond the delta range: clipped
            [-0.1, -np.inf, -np.inf, -np.inf],  # -inf from a masked vocabulary
        ],
        dtype=np.float32,
    )
    back = fmt.decode_topk_logprobs(fmt.encode_topk_logprobs(lp))
    np.testing.assert_allclose(back[:2], lp[:2], atol=TOL, rtol=0)
    assert back[0, 0] == 0.0
    assert abs(back[2, 0] - lp[2, 0]) <= TOL and abs(back[3, 0] - lp[3, 0]) <= TOL
    # clipped entries stay finite, sorted, CLIP nats below the one above (probability < 1e-27)
    assert np.isfinite(back).all() and (np.diff(back, axis=1) <= 0).all()
    assert (np.diff(back[2], axis=0) <= -CLIP + TOL).all()
    assert back[3, 1] <= back[3, 0] - CLIP + TOL and back[3, 1] == back[3, 2] == back[3, 3]


def make_rows(rng: np.random.Generator, vocab: int, k: int, n: int = 7) -> list[fmt.Row]:
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
            fmt.Row(
                id=fmt.row_id(prompt.content_hash, 0),  # as kdgen derives it (kdgen verify checks)
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


def fake_core(vocab: int, k: int, rows: list[fmt.Row]) -> dict:
    """A manifest core as `kdgen.generate.prepare` builds it for these rows (n=1), with made-up
    teacher and tokenizer identities."""
    hashes = [Prompt(0, r.messages, r.prompt).content_hash for r in rows]
    return {
        "format_version": fmt.FORMAT_VERSION,
        "teacher": {"source": "local:fake", "path": "/fake", "revision": None, "weights_hash": "ab" * 32, "dtype": "float32"},
        "tokenizer": {"vocab_size": vocab, "embedding_rows": vocab, "tokenizer_hash": "cd" * 32, "chat_template_hash": None},
        "generation": {
            "kind": "generate", "backend": "hf", "engine_version": "transformers 0", "temperature": 0.7, "top_p": 0.95,
            "top_k": 0, "max_new_tokens": 30, "n": 1, "seed": 0, "k": k, "logprob_mode": "raw_logprobs_temperature_1",
        },
        "prompts": {
            "source": "fake.jsonl", "column": "messages", "count": len(rows), "duplicates_dropped": 0,
            "content_hash": fmt.sha256_hex("\n".join(hashes)),
        },
    }


@pytest.mark.parametrize("vocab", [49152, 262144])  # uint16 ids (SmolLM2) and uint32 ids (Gemma 3)
def test_rows_parquet_reader_exact(tmp_path, vocab):
    rng = np.random.default_rng(vocab)
    k = 6
    rows = make_rows(rng, vocab, k)
    if vocab > 65536:
        rows[0].topk_ids[0, 0] = vocab - 1  # the largest id must survive the id type
    table = fmt.rows_to_table(rows, vocab, k)
    assert table.schema.field("topk_ids").type.value_type == fmt.id_type(vocab)
    assert check_table(table, k, vocab) == []

    core = fake_core(vocab, k, rows)
    fs, ds_dir = fmt.open_fs(str(tmp_path / fmt.fingerprint(core)))
    fmt.write_shard(fs, ds_dir, fmt.shard_name(0, 2), table.slice(0, 4))
    fmt.write_shard(fs, ds_dir, fmt.shard_name(1, 2), table.slice(4))
    finalize(fs, ds_dir, core, {}, 0.0, 0.0, 0)
    assert verify(ds_dir)[1] == []

    ds = fmt.TeacherDataset(ds_dir)
    assert ds.num_rows == len(rows) and ds.num_tokens == sum(len(r.completion_ids) for r in rows)
    decoded = [b.row(i) for b in ds.iter_batches(batch_rows=3) for i in range(b.num_rows)]
    assert [d["id"] for d in decoded] == [r.id for r in rows]
    for r, d in zip(rows, decoded):
        np.testing.assert_array_equal(d["prompt_ids"], r.prompt_ids)
        np.testing.assert_array_equal(d["completion_ids"], r.completion_ids)
        np.testing.assert_array_equal(d["topk_ids"], r.topk_ids.reshape(-1, k))
        # exactly the quantised values, and within half a quantisation step of the originals
        np.testing.assert_array_equal(d["topk_logprobs"], fmt.decode_topk_logprobs(fmt.encode_topk_logprobs(r.topk_logprobs)))
        np.testing.assert_allclose(d["topk_logprobs"], r.topk_logprobs.reshape(-1, k), atol=TOL, rtol=0)
        np.testing.assert_allclose(d["token_logprobs"], r.token_logprobs, atol=TOL, rtol=0)
        in_topk = (r.topk_ids == np.asarray(r.completion_ids)[:, None]).any(axis=1)
        np.testing.assert_array_equal(d["token_logprobs"][in_topk], d["topk_logprobs"][in_topk, 0])
        assert d["completion"] == r.completion and d["finish_reason"] == r.finish_reason
    # the ids-and-log-probs-only path gives the same arrays
    lean = list(ds.iter_batches(batch_rows=100, text=False))
    assert [b.completions for b in lean] == [[], []]  # one batch per shard, no text decoded
    for name in ("completion_ids", "token_logprobs", "topk_ids", "topk_logprobs"):
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


def test_reader_on_fsspec_memory_url():
    rng = np.random.default_rng(1)
    rows = make_rows(rng, 49152, 4)
    core = fake_core(49152, 4, rows)
    url = f"memory://kd-format-test/{fmt.fingerprint(core)}"
    fs, path = fmt.open_fs(url)
    fmt.write_shard(fs, path, fmt.shard_name(0, 1), fmt.rows_to_table(rows, 49152, 4))
    finalize(fs, path, core, {}, 0.0, 0.0, 0)
    assert verify(url)[1] == []
    ds = fmt.TeacherDataset("memory://kd-format-test")  # a root holding one dataset opens too
    assert ds.fingerprint == fmt.fingerprint(core) and ds.num_rows == len(rows)
    assert [b.ids for b in ds.iter_batches()] == [[r.id for r in rows]]


def test_rows_to_table_rejects_bad_shapes():
    rows = make_rows(np.random.default_rng(2), 49152, 4, n=2)
    rows[1].topk_ids = rows[1].topk_ids[:, :3]
    with pytest.raises(ValueError, match="T="):
        fmt.rows_to_table(rows, 49152, 4)


def test_incomplete_dataset_does_not_open(tmp_path):
    fs, path = fmt.open_fs(str(tmp_path / "abc"))
    rows = make_rows(np.random.default_rng(3), 49152, 4, n=2)
    fmt.write_shard(fs, path, fmt.shard_name(0, 2), fmt.rows_to_table(rows, 49152, 4))
    with pytest.raises(KdError, match="did not finish"):
        fmt.TeacherDataset(path)
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
    fp = fmt.fingerprint(core)
    assert fp == fmt.fingerprint(copy.deepcopy(core)) and len(fp) == 16
    # key order does not matter (canonical JSON)
    assert fmt.fingerprint({k: core[k] for k in reversed(list(core))}) == fp
    for name in fmt.FINGERPRINT_FIELDS:
        other = copy.deepcopy(core)
        _set(other, name, _changed(fmt.dig(core, name)))
        assert fmt.fingerprint(other) != fp, f"{name} must change the fingerprint"
    # provenance that does not change the rows does not change the key
    for name in ("teacher.path", "teacher.source", "generation.engine_version", "prompts.source", "prompts.column"):
        other = copy.deepcopy(core)
        _set(other, name, _changed(fmt.dig(core, name)))
        assert fmt.fingerprint(other) == fp, f"{name} must not change the fingerprint"
    other = copy.deepcopy(core)
    other["config"] = {"batch_size": 3, "shard_prompts": 1, "out": "/elsewhere"}
    assert fmt.fingerprint(other) == fp


# ----------------------------------------------------------------------------------------------
# The invariant checker itself: every violation the contract names is caught


def _one_row(**change) -> fmt.Row:
    """One valid row (k=3): token 10 is the top-1 at position 0, token 99 is outside the top-k at 1."""
    row = fmt.Row(
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
    return fmt.rows_to_table([_one_row(**change)], 49152, 3)


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
    short = _replace_column(table, "token_logprob_codes", [0], pa.uint32())
    assert any("length differs" in p for p in check_table(short, 3, 49152))
    # code 0 ("same as the top-k entry") for a token that is not in the top-k
    lying = _replace_column(table, "token_logprob_codes", [0, 0], pa.uint32())
    assert any("in the top-k" in p for p in check_table(lying, 3, 49152))


def test_encoding_keeps_top_k_sorted():
    """Deltas are non-negative, so decoded rows are sorted even if an engine's float ties come
    out of order by one ulp."""
    lp = np.array([[-1.0, -0.9999999, -2.0]], np.float32)
    back = fmt.decode_topk_logprobs(fmt.encode_topk_logprobs(lp))
    assert (np.diff(back, axis=1) <= 0).all()
    np.testing.assert_allclose(back, lp, atol=TOL, rtol=0)


def test_parquet_columns_are_plain_for_other_readers(tmp_path):
    """Other readers (pandas, DuckDB, polars) see unsigned integer lists, not an extension type."""
    table = fmt.rows_to_table(make_rows(np.random.default_rng(4), 49152, 4, n=3), 49152, 4)
    path = tmp_path / "x.parquet"
    path.write_bytes(fmt.parquet_bytes(table))
    back = pq.read_table(path)
    assert back.schema.field("topk_ids").type == pa.list_(pa.uint16())
    assert back.schema.metadata[b"kd.k"] == b"4"
    assert back.equals(table)
