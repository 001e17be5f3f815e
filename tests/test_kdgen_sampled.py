"""Random-sampled teacher targets (RS-KD, Anshumann et al. 2025) end to end: the draws
(kdcore/sampled_targets.py), the columns (kdcore/codec.py), `kdgen generate|score --sampled-targets`,
the estimator's loss and gradient against naive dense references, `kdtrain run --targets sampled`,
readers without kd, and one-line errors. About a minute on 2 CPU cores.

    .venv/bin/python -m pytest -q tests/test_kdgen_sampled.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import kdgen.generate as gen
from kdcore.dataset import TeacherDataset
from kdcore.divergences import SparseKD
from kdcore.sampled_targets import draw
from kdcore.verify import check_table, verify
from kdgen_helpers import CHAT_ROWS, ONE_THREAD_ENV, kdgen_cli, one_torch_thread, tiny_config, write_jsonl  # noqa: F401 (autouse fixture)
from kdtrain.losses import fused_kd_losses

N_DRAWS = 16
V = 40


def _teacher(seed: int = 0, positions: int = 3) -> torch.Tensor:
    """[positions, V] float64 teacher log-probs, peaked, with one impossible token per position."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(positions, V, generator=g, dtype=torch.float64) * 2.0
    logits[:, 7] = float("-inf")
    return logits.log_softmax(-1)


def _dense_weights(s, positions: int, n: int) -> torch.Tensor:
    """[positions, V] t_hat = counts / n, scattered from sampled targets."""
    w = torch.zeros(positions, V, dtype=torch.float64)
    for t in range(positions):
        ids, counts, _ = s.position(t)
        w[t, torch.from_numpy(ids)] = torch.from_numpy(counts).double() / n
    return w


def _padded(s, positions: int, n: int):
    from kdtrain.data import padded_sampled

    ids, lps, w = padded_sampled(s, positions, n)
    return torch.from_numpy(ids).long(), torch.from_numpy(lps), torch.from_numpy(w)


# ----------------------------------------------------------------------------------------------
# The draws


def test_draws_are_valid_counts_sum_to_n_and_logprobs_are_the_teachers():
    logp = _teacher()
    s = draw(logp, N_DRAWS, [11, 11, 12], [0, 1, 0])
    for t in range(3):
        ids, counts, lps = s.position(t)
        assert counts.sum() == N_DRAWS and (counts >= 1).all()
        assert len(np.unique(ids)) == len(ids) and ((ids >= 0) & (ids < V)).all() and 7 not in ids
        np.testing.assert_allclose(lps, logp[t, ids].numpy(), rtol=1e-6)  # float32 of the teacher's value
        assert (np.diff(lps) <= 0).all()  # most likely first


def test_draws_are_seeded_per_row_and_position_whatever_the_batching():
    logp = _teacher(positions=2)
    both = draw(logp, N_DRAWS, [5, 5], [0, 1])
    again = draw(logp, N_DRAWS, [5, 5], [0, 1])
    alone = [draw(logp[t : t + 1], N_DRAWS, [5], [t]) for t in range(2)]
    for t in range(2):
        for a, b, c in zip(both.position(t), again.position(t), alone[t].position(0)):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)
    # another seed or another position: other draws (same distribution)
    other = draw(logp[:1], N_DRAWS, [6], [0])
    assert not np.array_equal(other.position(0)[1], both.position(0)[1]) or not np.array_equal(other.position(0)[0], both.position(0)[0])


def test_mean_of_t_hat_over_many_draws_is_the_teacher_distribution():
    """E[c_i / N] = t_i: over M independent draws (one per seed) the mean is within 5 standard errors
    sqrt(t(1-t)/(N M)) of the dense distribution at every id, and never puts mass on an impossible id."""
    m = 3000
    logp = _teacher(seed=3, positions=1)
    s = draw(logp.expand(m, V), N_DRAWS, list(range(m)), [0] * m)
    mean = _dense_weights(s, m, N_DRAWS).mean(0)
    t = logp[0].exp()
    se = (t * (1 - t) / (N_DRAWS * m)).sqrt()
    assert ((mean - t).abs() <= 5 * se + 1e-12).all(), (mean - t).abs().max()
    assert mean[7] == 0
    assert (mean - t).abs().sum() / 2 < 0.02  # total variation


# ----------------------------------------------------------------------------------------------
# The loss: against a naive dense reference, and its expected gradient


def _fused(hidden, weight, labels, s, positions, ce_weight=0.0, tile=2):
    ids, lps, w = _padded(s, positions, N_DRAWS)
    spec = SparseKD()
    return fused_kd_losses(hidden, weight, labels, ids, lps, spec, ce_weight, 1.0, tile, target_weights=w)


def test_sampled_loss_and_gradient_match_a_dense_reference():
    g = torch.Generator().manual_seed(0)
    p, h = 5, 8
    hidden, weight = torch.randn(p, h, generator=g), torch.randn(V, h, generator=g) * 0.5
    labels = torch.randint(0, V, (p,), generator=g)
    logp = _teacher(seed=1, positions=p)
    s = draw(logp, N_DRAWS, [1] * p, list(range(p)))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, kd, ce, _ = _fused(h1, w1, labels, s, p, ce_weight=0.3)
    total.backward()
    # naive: dense t_hat over the vocabulary, sum_i t_hat_i (log t_i - log q_i), in float64
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logq = (h2 @ w2.t()).log_softmax(-1)
    t_hat = _dense_weights(s, p, N_DRAWS)
    teacher = torch.where(t_hat > 0, logp, torch.zeros_like(logp))
    ref_kd = (t_hat * (teacher - logq)).sum()
    ref_ce = -logq.gather(1, labels[:, None]).sum()
    (ref_kd + 0.3 * ref_ce).backward()
    assert kd.item() == pytest.approx(ref_kd.item(), rel=1e-4, abs=1e-5)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad.float(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad.float(), rtol=1e-3, atol=1e-5)


def test_expected_gradient_is_the_full_vocabulary_forward_kl_gradient():
    """With the logits as the hidden states (head = identity), the gradient per position is
    q - t_hat; averaged over M sample sets it approaches the dense forward-KL gradient q - t
    (within 5 standard errors at every id), which top-k targets do not (their tail gets nothing)."""
    m, p = 2000, 2
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(p, V, generator=g)
    logp = _teacher(seed=5, positions=p)
    hidden = logits.repeat(m, 1).requires_grad_()  # [m * p, V]: sample set j holds rows j*p .. j*p+p-1
    s = draw(logp.repeat(m, 1), N_DRAWS, [j for j in range(m) for _ in range(p)], list(range(p)) * m)
    total, *_ = _fused(hidden, torch.eye(V), torch.zeros(m * p, dtype=torch.long), s, m * p, tile=512)
    total.backward()
    mean_grad = hidden.grad.double().reshape(m, p, V).mean(0)
    t = logp.exp()
    dense = logits.double().softmax(-1) - t  # d KL(t || softmax(z)) / dz
    se = (t * (1 - t) / (N_DRAWS * m)).sqrt()
    assert ((mean_grad - dense).abs() <= 5 * se + 1e-6).all(), (mean_grad - dense).abs().max()


# ----------------------------------------------------------------------------------------------
# kdgen generate / score on the tiny model


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("sampled")
    prompts = write_jsonl(tmp / "prompts.jsonl", CHAT_ROWS[:4])
    cfg = tiny_config(prompts, str(tmp / "out"), tiny_model_dir, n=1, max_new_tokens=6, sampled_targets=N_DRAWS, k=4)
    url = gen.run(cfg)
    plain = gen.run(replace(cfg, sampled_targets=0))
    return SimpleNamespace(tmp=tmp, cfg=cfg, url=url, plain=plain, model=tiny_model_dir)


def _sampled_rows(url: str) -> list[tuple]:
    ds = TeacherDataset(url)
    out = []
    for b in ds.iter_batches():
        for i in range(b.num_rows):
            r = b.row(i)
            out.append((r["id"], r["completion_ids"].tolist(), r["sampled"]))
    return out


def test_generate_writes_valid_sampled_targets_from_the_teachers_distribution(made):
    manifest, problems = verify(made.url)
    assert problems == []
    assert manifest["generation"]["sampled_targets"] == N_DRAWS
    ds = TeacherDataset(made.url)
    for path in ds.shard_paths():
        assert check_table(pq.read_table(path), ds.k, ds.vocab_size) == []
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(made.model, dtype=torch.float32).eval()
    prompts = {b.ids[i]: b.prompt_ids[i].tolist() for b in ds.iter_batches() for i in range(b.num_rows)}
    for rid, completion, s in _sampled_rows(made.url):
        assert len(s.lengths) == len(completion)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompts[rid] + completion])).logits[0].float()
        dense = logits[len(prompts[rid]) - 1 : -1].log_softmax(-1)  # [T, V]: position t predicts token t
        for t in range(len(completion)):
            ids, counts, lps = s.position(t)
            assert counts.sum() == N_DRAWS and ids.max() < ds.vocab_size
            np.testing.assert_allclose(lps, dense[t, ids].numpy(), rtol=2e-3, atol=1e-4)  # 11 significant bits


def test_sampled_targets_are_reproducible_keyed_and_leave_the_completions_alone(made):
    again = gen.run(replace(made.cfg, out=str(made.tmp / "again")))
    assert Path(again).name == Path(made.url).name
    cols = ["id", "sampled_ids", "sampled_counts", "sampled_logprobs"]
    assert pq.read_table(Path(again) / "data").select(cols).equals(pq.read_table(Path(made.url) / "data").select(cols))
    other_seed = gen.run(replace(made.cfg, out=str(made.tmp / "seed1"), seed=1, temperature=0.0))
    greedy = gen.run(replace(made.cfg, out=str(made.tmp / "seed0"), temperature=0.0))
    assert Path(other_seed).name != Path(greedy).name  # the seed keys the draws even under greedy decoding
    assert [r[1] for r in _sampled_rows(other_seed)] == [r[1] for r in _sampled_rows(greedy)]
    assert [r[2].ids.tolist() for r in _sampled_rows(other_seed)] != [r[2].ids.tolist() for r in _sampled_rows(greedy)]
    # the dataset without them: another key, the same completions (the draws use their own generators)
    assert Path(made.plain).name != Path(made.url).name
    assert [r[1] for r in _sampled_rows(made.plain)] == [r[1] for r in _sampled_rows(made.url)]
    assert all(r[2] is None for r in _sampled_rows(made.plain))
    assert "sampled_ids" not in pq.read_schema(next((Path(made.plain) / "data").glob("*.parquet"))).names


def test_score_a_dataset_with_sampled_targets_via_the_cli(made):
    r = kdgen_cli("score", "--prompts", made.plain, "--teacher", made.model, "--out", str(made.tmp / "scored"),
                  "--backend", "hf", "--k", "4", "--sampled-targets", str(N_DRAWS))
    assert r.returncode == 0, r.stderr
    url = r.stdout.strip().splitlines()[-1]
    assert verify(url)[1] == []
    scored, source = _sampled_rows(url), _sampled_rows(made.plain)
    assert [x[1] for x in scored] == [x[1] for x in source]  # the same completions, now with draws
    assert all(x[2] is not None and len(x[2].lengths) == len(x[1]) for x in scored)


def test_readers_without_kd_see_the_new_columns(made):
    import duckdb
    import polars as pl

    glob = str(Path(made.url) / "data" / "*.parquet")
    [(bad, positions)] = duckdb.sql(
        f"""SELECT count(*) FILTER (WHERE list_sum(sampled_counts[t]) != {N_DRAWS} OR len(sampled_ids[t]) != len(sampled_logprobs[t])),
                   count(*)
            FROM (SELECT *, unnest(range(1, len(completion_ids) + 1)) AS t FROM read_parquet('{glob}'))"""
    ).fetchall()
    assert bad == 0 and positions == TeacherDataset(made.url).num_tokens
    kd = {(rid, t): (s.position(t)[0].tolist(), s.position(t)[1].tolist()) for rid, c, s in _sampled_rows(made.url) for t in range(len(c))}
    df = pl.read_parquet(glob).select("id", "sampled_ids", "sampled_counts")
    found = {(row["id"], t): (ids, counts) for row in df.iter_rows(named=True) for t, (ids, counts) in enumerate(zip(row["sampled_ids"], row["sampled_counts"]))}
    assert found == kd


# ----------------------------------------------------------------------------------------------
# kdtrain on sampled targets, and one-line errors


def _kdtrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdtrain", *args], capture_output=True, text=True, timeout=600, env=ONE_THREAD_ENV)


def test_kdtrain_trains_on_sampled_targets(made):
    out = made.tmp / "student"
    r = _kdtrain("run", "--data", made.url, "--student", made.model, "--out", str(out), "--targets", "sampled",
                 "--ce-weight", "0.5", "--max-steps", "2", "--batch-size", "2", "--logging-steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((out / "kd_config.json").read_text())
    assert record["config"]["targets"] == "sampled" and record["datasets"][0]["sampled_targets"] == N_DRAWS
    kd = [h["kd"] for h in record["log_history"]]
    assert len(kd) == 2 and all(np.isfinite(kd))


def _one_line_error(r: subprocess.CompletedProcess, prog: str, *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_input_is_one_line(made):
    _one_line_error(kdgen_cli("generate", "--prompts", "p.jsonl", "--sampled-targets", "-1"), "kdgen", "--sampled-targets -1")
    _one_line_error(kdgen_cli("generate", "--prompts", "p.jsonl", "--backend", "server", "--server-url", "http://x", "--sampled-targets", "8"), "kdgen", "--backend hf")
    _one_line_error(_kdtrain("run", "--data", made.url, "--student", "s", "--targets", "sampled", "--loss", "rkl"), "kdtrain", "--targets sampled", "--loss fkl")
    _one_line_error(_kdtrain("run", "--data", made.url, "--student", "s", "--targets", "sampled", "--kd-temperature", "2"), "kdtrain", "--kd-temperature 1")
    _one_line_error(_kdtrain("run", "--data", made.url, "--student", "s", "--targets", "all"), "kdtrain", "--targets all")
    r = _kdtrain("run", "--data", made.plain, "--student", made.model, "--out", str(made.tmp / "x"), "--targets", "sampled")
    _one_line_error(r, "kdtrain", "no sampled targets", "--sampled-targets")
