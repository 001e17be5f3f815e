"""`kdgen generate` / `score` / `merge` end to end on the tiny model with the hf backend: dataset
layout, invariants on every writer, cache hit, resume after a killed run, sliced runs plus merge,
teacher-forced scoring, prompt sources and the fingerprint. About a minute on 2 CPU cores.

    .venv/bin/python -m pytest -q tests/test_kdgen_generate.py
"""

from __future__ import annotations

import csv
import functools
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import kdgen.generate as gen
from conftest import build_tiny_model
from kdcore import codec
import kdcore.dataset as kds
import kdcore.io as kio
from kdcore.errors import KdError
from kdcore.prompts import load_prompts
from kdcore.models import resolve
from kdcore.teacher import load_teacher, remembered_identity
from kdgen_helpers import (  # noqa: F401  (one_torch_thread: autouse fixture)
    CHAT_ROWS,
    ONE_THREAD_ENV,
    assert_topk_close,
    assert_valid,
    common_prefix,
    comparable_positions,
    kdgen_cli,
    one_torch_thread,
    rows_of,
    tiny_config,
    write_jsonl,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    """The reference run: six chat prompts, n=2 samples each, three shards, uninterrupted."""
    tmp = tmp_path_factory.mktemp("generate")
    prompts = write_jsonl(tmp / "prompts.jsonl", CHAT_ROWS)
    cfg = tiny_config(prompts, str(tmp / "out"), tiny_model_dir)
    url = gen.run(cfg)
    return SimpleNamespace(cfg=cfg, url=url, root=tmp / "out", dir=Path(url), fingerprint=Path(url).name, rows=rows_of(url))


def counting_backends(monkeypatch) -> SimpleNamespace:
    """Count engine starts from now on, and record the row ids each engine is asked for."""
    seen = SimpleNamespace(starts=0, rows=[])
    real = gen.make_backend

    def make(*args, **kwargs):
        seen.starts += 1
        backend = real(*args, **kwargs)
        for method in ("generate", "score"):
            inner = getattr(backend, method)

            def wrapped(reqs, *rest, _inner=inner):
                seen.rows.extend(r.row_id for r in reqs)
                return _inner(reqs, *rest)

            setattr(backend, method, wrapped)
        return backend

    monkeypatch.setattr(gen, "make_backend", make)
    return seen


def test_dataset_layout(base):
    assert [p.name for p in base.root.iterdir()] == [base.fingerprint]
    names = sorted(p.name for p in base.dir.iterdir())
    assert names == ["README.md", "data", "manifest.json"]  # no plan, no temp files left
    shards = sorted(p.name for p in (base.dir / "data").iterdir())
    assert shards == [kds.shard_name(i, 3) for i in range(3)]

    m = json.loads((base.dir / "manifest.json").read_text())
    assert m["format_version"] == codec.FORMAT_VERSION and m["fingerprint"] == base.fingerprint
    assert m["fingerprint_fields"] == list(kds.FINGERPRINT_FIELDS)
    assert m["teacher"]["dtype"] == "float32" and m["teacher"]["source"].startswith("local:")
    assert m["tokenizer"]["vocab_size"] == 49152 and m["tokenizer"]["chat_template_hash"]
    g = m["generation"]
    assert (g["kind"], g["backend"], g["k"], g["n"], g["max_new_tokens"], g["temperature"]) == ("generate", "hf", 8, 2, 8, 0.7)
    assert g["engine_version"].startswith("transformers")
    assert m["prompts"]["count"] == 6 and m["totals"]["rows"] == 12 == len(base.rows)
    assert m["totals"]["tokens"] == sum(len(r["completion_ids"]) for r in base.rows)
    for s in m["shards"]:
        data = (base.dir / s["path"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == kio.sha256_hex(data) and s["rows"] == 4
    # the manifest is the commit: written after everything else
    newest = max(p.stat().st_mtime_ns for p in base.dir.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert (base.dir / "manifest.json").stat().st_mtime_ns >= newest

    card = (base.dir / "README.md").read_text()
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}]
    assert base.fingerprint in card and "top-8" in card
    assert "Completions of **" in card and "| `completion` | `string` | the teacher's text |" in card
    assert "hash of the prompt content and the sample index" in card


def test_rows_and_invariants(base, tokenizer):
    assert_valid(base.url)
    prompts, _ = load_prompts(base.cfg.prompts)
    expected_ids = [kds.row_id(p.content_hash, s) for p in prompts for s in range(2)]
    assert [r["id"] for r in base.rows] == expected_ids
    eos = tokenizer.eos_token_id
    for i, r in enumerate(base.rows):
        src = CHAT_ROWS[i // 2]["messages"]
        assert r["messages"] == src and r["prompt"] is None
        text = tokenizer.apply_chat_template(src, add_generation_prompt=True, tokenize=False)
        assert r["prompt_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert r["prompt_ids"][:2] != [tokenizer.bos_token_id] * 2  # the template holds the BOS: no second one
        ids = r["completion_ids"]
        assert 1 <= len(ids) <= 8 and r["completion"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert r["finish_reason"] == ("stop" if ids[-1] == eos else "length")
        assert eos not in ids[:-1]
    # the two samples of a prompt use different seeds
    assert any(base.rows[i]["completion_ids"] != base.rows[i + 1]["completion_ids"] for i in range(0, len(base.rows), 2))


def test_cli_verify_info_ls(base):
    r = kdgen_cli("verify", base.url)
    assert r.returncode == 0 and "OK" in r.stderr, r.stderr
    r = kdgen_cli("info", base.url, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["fingerprint"] == base.fingerprint
    r = kdgen_cli("info", base.url)
    assert r.returncode == 0 and base.fingerprint in r.stdout and "bytes/token" in r.stdout
    r = kdgen_cli("ls", str(base.root), "--json")
    assert r.returncode == 0 and [d["fingerprint"] for d in json.loads(r.stdout)] == [base.fingerprint]


def test_verify_names_damaged_and_foreign_shards(base, tmp_path):
    copy = tmp_path / base.fingerprint
    shutil.copytree(base.dir, copy)
    shard = copy / "data" / kds.shard_name(1, 3)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    shutil.copy(copy / "data" / kds.shard_name(0, 3), copy / "data" / kds.shard_name(3, 4))
    r = kdgen_cli("verify", str(copy))
    assert r.returncode == 1
    assert "train-00001-of-00003.parquet: sha256 mismatch" in r.stderr
    assert "train-00003-of-00004.parquet: shard file not listed" in r.stderr.replace("\n", "")


def test_cache_hit_returns_at_once(base, tmp_path, monkeypatch):
    seen = counting_backends(monkeypatch)
    before = {p: p.stat().st_mtime_ns for p in base.root.rglob("*")}
    # the same prompts under another file name are the same request (keyed by content)
    moved = shutil.copy(base.cfg.prompts, tmp_path / "renamed.jsonl")
    for cfg in (base.cfg, replace(base.cfg, prompts=str(moved), batch_size=1, shard_prompts=5)):
        t0 = time.perf_counter()
        assert gen.run(cfg) == base.url
        assert time.perf_counter() - t0 < 5
    assert (seen.starts, seen.rows) == (0, [])  # no engine started
    assert {p: p.stat().st_mtime_ns for p in base.root.rglob("*")} == before


def test_a_logged_run_prints_plain_progress_lines(base, tmp_path, monkeypatch, capsys):
    """stderr to a file (nohup, a job log): no live bar is drawn there, so progress comes as plain
    lines (every LOG_EVERY_S seconds; 0 here, so one per batch) ending at the full row count."""
    import kdcore.progress as progress

    monkeypatch.setenv("KD_QUIET", "0")
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    gen.run(replace(base.cfg, out=str(tmp_path / "out")))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("generating: ")]
    assert lines, err
    total = len(CHAT_ROWS) * base.cfg.n
    done = [int(ln.split(": ")[1].split("/")[0].replace(",", "")) for ln in lines]
    assert done == sorted(done) and done[-1] == total, lines
    assert all(f"/{total} rows, " in ln and "tok/s" in ln for ln in lines), lines
    assert not any("\x1b[" in ln or "\r" in ln for ln in err.splitlines()), "terminal control codes in a log"


CACHE_HIT = r"""
import json, sys
from kdgen.generate import GenerateConfig, run

print(run(GenerateConfig(**json.loads(sys.argv[1]))))
print("transformers-imported" if "transformers" in sys.modules else "transformers-not-imported")
"""


def test_cache_hit_in_a_new_process_needs_no_tokenizer(base):
    """The teacher's identity is remembered by the first run, so a cache hit answers without importing
    transformers (seconds of the few a cache hit costs)."""
    r = subprocess.run([sys.executable, "-c", CACHE_HIT, json.dumps(asdict(base.cfg))], capture_output=True, text=True, timeout=120, env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [base.url, "transformers-not-imported"]
    assert "cache hit" in r.stderr


@pytest.mark.parametrize("plan", ["sliced run's plan", "no plan"])
def test_every_shard_written_commits_in_a_new_process_without_the_tokenizer(base, tmp_path, plan):
    """Every planned shard is there but nothing committed them (slices that finished on one root, a
    run killed just before its commit, a deleted manifest): a rerun commits them, with the teacher's
    remembered identity and without importing transformers, into the uninterrupted run's dataset."""
    out, other = tmp_path / "out", tmp_path / "other"
    ds = out / base.fingerprint
    if plan == "no plan":
        shutil.copytree(base.dir, ds)
        (ds / "manifest.json").unlink()
        (ds / "README.md").unlink()
    else:
        gen.run(replace(base.cfg, out=str(out), shard_index=0, num_shards=2))
        gen.run(replace(base.cfg, out=str(other), shard_index=1, num_shards=2))
        shutil.copy(other / base.fingerprint / "data" / kds.shard_name(1, 3), ds / "data")
        assert (ds / gen.PLAN).exists() and not (ds / "manifest.json").exists()
    cfg = replace(base.cfg, out=str(out))
    r = subprocess.run([sys.executable, "-c", CACHE_HIT, json.dumps(asdict(cfg))], capture_output=True, text=True, timeout=120, env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(ds), "transformers-not-imported"]
    assert "12 of 12 rows already in complete shards" in r.stderr and "done:" in r.stderr
    manifest = assert_valid(str(ds))
    assert manifest["fingerprint"] == base.fingerprint and manifest["config"]["out"] == str(out)
    assert sorted(p.name for p in ds.iterdir()) == ["README.md", "data", "manifest.json"]  # no plan, no locks left
    assert rows_of(str(ds)) == base.rows


def test_remembered_identity_is_the_live_one_until_a_file_changes(tmp_path, tiny_model_dir):
    model = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, model)
    assert remembered_identity(resolve(str(model)), "float32") is None
    teacher = load_teacher(str(model), "float32")
    teacher.remember()
    assert remembered_identity(resolve(str(model)), "float32") == (teacher.teacher_info(), teacher.tokenizer_info())
    assert remembered_identity(resolve(str(model)), "bfloat16") is None
    config = model / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")  # any change to a tokenizer file forgets the identity
    assert remembered_identity(resolve(str(model)), "float32") is None


# A run that dies by SIGKILL while its second shard is half written: the temp file exists, the
# rename never happens (the worst moment for an atomic writer).
KILLED_RUN = r"""
import json, os, signal, sys
from kdcore import codec
import kdcore.dataset as kds
import kdcore.io as kio
from kdgen.generate import GenerateConfig, run

real, shards = kds.write_bytes_atomic, []  # the name write_shard calls (kdcore.dataset imports it from kdcore.io)

def dying(fs, path, data):
    if kds.SHARD_RE.match(os.path.basename(path)):
        shards.append(path)
        if len(shards) == 2:
            with fs.open(kio.join(os.path.dirname(path), kio.TMP_PREFIX + "x-" + os.path.basename(path)), "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    real(fs, path, data)

kds.write_bytes_atomic = dying
run(GenerateConfig(**json.loads(sys.argv[1])))
"""


def test_resume_after_kill_gives_the_uninterrupted_rows(base, tmp_path, monkeypatch):
    cfg = replace(base.cfg, out=str(tmp_path / "out"))
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(asdict(cfg))], capture_output=True, text=True, timeout=300, env=ONE_THREAD_ENV
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ds_dir = tmp_path / "out" / base.fingerprint
    assert not (ds_dir / "manifest.json").exists() and not (ds_dir / "README.md").exists()
    data = sorted(p.name for p in (ds_dir / "data").iterdir())
    assert data[0].startswith(kio.TMP_PREFIX) and data[1:] == [kds.shard_name(0, 3)]
    with pytest.raises(KdError, match="did not finish"):
        kds.TeacherDataset(str(ds_dir))
    assert kdgen_cli("verify", str(ds_dir)).returncode == 1
    first = (ds_dir / "data" / kds.shard_name(0, 3)).read_bytes()

    seen = counting_backends(monkeypatch)
    # resumed with other logistics: the recorded plan (2 prompts per shard) is kept
    assert gen.run(replace(cfg, shard_prompts=3, batch_size=3)) == cfg.out + "/" + base.fingerprint
    assert seen.rows == [r["id"] for r in base.rows[4:]]  # only the rows not in a complete shard
    assert (ds_dir / "data" / kds.shard_name(0, 3)).read_bytes() == first  # kept, not rewritten
    assert sorted(p.name for p in (ds_dir / "data").iterdir()) == [kds.shard_name(i, 3) for i in range(3)]
    assert_valid(str(ds_dir))
    assert rows_of(str(ds_dir)) == base.rows


def test_resume_regenerates_a_damaged_shard(base, tmp_path):
    """A shard whose footer is unreadable (e.g. copied half-way by hand) is not trusted."""
    ds_dir = tmp_path / base.fingerprint
    shutil.copytree(base.dir, ds_dir)
    (ds_dir / "manifest.json").unlink()
    shard = ds_dir / "data" / kds.shard_name(2, 3)
    shard.write_bytes(shard.read_bytes()[:100])
    gen.run(replace(base.cfg, out=str(tmp_path)))
    assert_valid(str(ds_dir))
    assert rows_of(str(ds_dir)) == base.rows


def test_rerun_with_other_shard_prompts_after_a_deleted_manifest_keeps_one_numbering(base, tmp_path):
    """The manifest of a finished dataset is deleted (its plan went with the commit) and the command is
    rerun with another --shard-prompts: the new plan's shards are written and the old numbering's
    shards are dropped, not committed beside them (the rows would be there twice)."""
    ds = tmp_path / base.fingerprint
    shutil.copytree(base.dir, ds)
    (ds / "manifest.json").unlink()
    gen.run(replace(base.cfg, out=str(tmp_path), shard_prompts=6))
    assert sorted(p.name for p in (ds / "data").iterdir()) == [kds.shard_name(0, 1)]
    manifest = assert_valid(str(ds))
    assert manifest["totals"]["rows"] == 12 and len(manifest["shards"]) == 1
    assert sorted(r["id"] for r in rows_of(str(ds))) == sorted(r["id"] for r in base.rows)


def test_slices_and_merge_equal_the_single_machine_run(base, tmp_path):
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    url_a = gen.run(replace(base.cfg, out=str(a), shard_index=0, num_shards=2))
    url_b = gen.run(replace(base.cfg, out=str(b), shard_index=1, num_shards=2))
    assert Path(url_a).name == Path(url_b).name == base.fingerprint
    assert sorted(p.name for p in (Path(url_a) / "data").iterdir()) == [kds.shard_name(0, 3), kds.shard_name(2, 3)]
    assert sorted(p.name for p in (Path(url_b) / "data").iterdir()) == [kds.shard_name(1, 3)]
    for url in (url_a, url_b):
        assert not (Path(url) / "manifest.json").exists()
    r = kdgen_cli("merge", url_a)  # machine b's shard is not there yet
    assert r.returncode == 2 and "train-00001-of-00003.parquet" in r.stderr and "Traceback" not in r.stderr
    assert not (Path(url_a) / "manifest.json").exists()
    r = kdgen_cli("merge", url_a, url_b)
    assert r.returncode == 0, r.stderr
    assert_valid(url_a)
    assert rows_of(url_a) == base.rows
    m = json.loads((Path(url_a) / "manifest.json").read_text())
    assert m["fingerprint"] == base.fingerprint and m["totals"]["rows"] == 12
    assert kdgen_cli("merge", url_a).returncode == 2  # already complete: a one-line error

    # slices sharing one output root: whoever finishes the last shard commits the dataset
    shared = tmp_path / "shared"
    gen.run(replace(base.cfg, out=str(shared), shard_index=1, num_shards=2))
    assert not (shared / base.fingerprint / "manifest.json").exists()
    url = gen.run(replace(base.cfg, out=str(shared), shard_index=0, num_shards=2))
    assert_valid(url)
    assert rows_of(url) == base.rows


def test_score_gives_the_top_k_generation_produced(base, tmp_path, tokenizer):
    """Teacher-forced scoring of the generated completions reproduces generation's top-k: at each
    position whose context (prompt + earlier completion tokens) is the same in both."""
    pairs = [{"messages": r["messages"], "completion": r["completion"]} for r in base.rows]
    prompts = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "scored"
    r = kdgen_cli(
        "score", "--prompts", prompts, "--teacher", base.cfg.teacher, "--out", str(out), "--backend", "hf", "--k", "8", "--shard-prompts", "5"
    )
    assert r.returncode == 0, r.stderr
    url = r.stdout.strip().splitlines()[-1]
    m = assert_valid(url)
    assert m["generation"]["kind"] == "score" and m["totals"]["rows"] == len(pairs) and len(m["shards"]) == 3
    # the card says what a scored dataset's columns hold: given text, ids keyed by it too
    card = (Path(url) / "README.md").read_text()
    assert "Given completions scored by" in card and "Completions of" not in card
    assert "| `completion` | `string` | the scored text, as given to `kdgen score`" in card and "the teacher's text" not in card
    assert "together with the scored completion" in card

    gen_rows = [b.row(i) for b in kds.TeacherDataset(base.url).iter_batches() for i in range(b.num_rows)]
    score_rows = [b.row(i) for b in kds.TeacherDataset(url).iter_batches() for i in range(b.num_rows)]
    eos = tokenizer.eos_token_id
    whole = 0
    for g, s, pair in zip(gen_rows, score_rows, pairs):
        np.testing.assert_array_equal(s["prompt_ids"], g["prompt_ids"])
        expected = tokenizer(pair["completion"], add_special_tokens=False)["input_ids"] + [eos]
        assert s["completion_ids"].tolist() == expected and s["finish_reason"] == "stop"
        n = comparable_positions(g["completion_ids"].tolist(), expected)
        assert n >= 1
        # one rounding step (11 significant bits) at these magnitudes: the two paths differ by ~1e-6
        step = 2.0**-codec.LOGPROB_MANTISSA_BITS * max(1.0, float(np.abs(g["topk_logprobs"][:n]).max())) + 1e-4
        assert_topk_close(g["topk_ids"][:n], g["topk_logprobs"][:n], s["topk_ids"][:n], s["topk_logprobs"][:n], atol=step)
        same = common_prefix(g["completion_ids"].tolist(), expected)  # same context and same token
        np.testing.assert_allclose(s["token_logprobs"][:same], g["token_logprobs"][:same], atol=step, rtol=0)
        whole += same == len(g["completion_ids"])
    assert whole >= 3  # several completions re-tokenise exactly: compared over their whole length


@pytest.fixture(scope="module")
def source_files(tmp_path_factory):
    """The base prompts as Parquet, CSV (messages as JSON text) and an HF dataset directory."""
    import datasets

    tmp = tmp_path_factory.mktemp("sources")
    pq.write_table(pa.Table.from_pylist(CHAT_ROWS), tmp / "prompts.parquet")
    with open(tmp / "prompts.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["messages"])
        w.writeheader()
        w.writerows({"messages": json.dumps(r["messages"], ensure_ascii=False)} for r in CHAT_ROWS)
    datasets.Dataset.from_list(CHAT_ROWS).save_to_disk(str(tmp / "hf-dataset"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CHAT_ROWS)}).save_to_disk(str(tmp / "hf-dataset-dict"))
    return tmp


def test_prompt_sources_read_the_same(base, source_files):
    """JSONL, Parquet, CSV and HF dataset directories give the same prompts, token ids and
    fingerprint (keyed by content, not by file format or path): the same dataset."""
    ref = gen.prepare(base.cfg)
    for name in ("prompts.parquet", "prompts.csv", "hf-dataset", "hf-dataset-dict"):
        job = gen.prepare(replace(base.cfg, prompts=str(source_files / name)))
        assert [(p.messages, p.text) for p in job.prompts] == [(p.messages, p.text) for p in ref.prompts], name
        assert job.prompt_ids == ref.prompt_ids and job.fingerprint == base.fingerprint, name


def test_cli_generate_from_an_hf_dataset_directory(base, source_files, tmp_path):
    """The console script with the same settings as flags writes the same dataset, and prints
    only its URL on stdout."""
    c = base.cfg
    flags = {"teacher": c.teacher, "backend": c.backend, "max-new-tokens": c.max_new_tokens, "k": c.k, "n": c.n}
    flags |= {"shard-prompts": c.shard_prompts, "batch-size": c.batch_size, "out": tmp_path}
    args = [str(a) for name, value in flags.items() for a in (f"--{name}", value)]
    r = kdgen_cli("generate", "--prompts", str(source_files / "hf-dataset"), *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{tmp_path}/{base.fingerprint}"]
    assert_valid(r.stdout.strip())
    assert rows_of(r.stdout.strip()) == base.rows


def test_plain_text_prompts(base, tmp_path, tokenizer):
    rows = [{"id": i, "question": q} for i, q in enumerate(["The capital of France is", "Once upon a time"])]
    prompts = write_jsonl(tmp_path / "text.jsonl", rows + [{"id": 2, "question": rows[0]["question"]}])
    url = gen.run(replace(base.cfg, prompts=prompts, prompt_column="question", out=str(tmp_path / "raw"), n=1))
    m = assert_valid(url)
    assert (m["prompts"]["count"], m["prompts"]["duplicates_dropped"], m["prompts"]["column"]) == (2, 1, "question")
    got = rows_of(url)
    assert [r["prompt"] for r in got] == [r["question"] for r in rows] and all(r["messages"] is None for r in got)
    assert [r["prompt_ids"] for r in got] == [tokenizer(r["question"])["input_ids"] for r in rows]
    # --chat-template always wraps text as a user message and applies the template
    url = gen.run(replace(base.cfg, prompts=prompts, prompt_column="question", out=str(tmp_path / "chat"), n=1, chat_template="always"))
    got = rows_of(url)
    assert [r["messages"] for r in got] == [[{"role": "user", "content": r["question"]}] for r in rows]
    text = tokenizer.apply_chat_template(got[0]["messages"], add_generation_prompt=True, tokenize=False)
    assert got[0]["prompt_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_writes_to_an_fsspec_url(base):
    url = gen.run(replace(base.cfg, out="memory://kdgen-test-out"))
    assert url == f"memory://kdgen-test-out/{base.fingerprint}"
    assert_valid(url)
    assert rows_of(url) == base.rows


def test_fingerprint_depends_on_rows_not_on_logistics(base, tmp_path, tokenizer, monkeypatch):
    import kdgen.plan

    monkeypatch.setattr(kdgen.plan, "load_teacher", functools.cache(kdgen.plan.load_teacher))  # tokenizer loads once
    fp = lambda cfg: gen.prepare(cfg).fingerprint  # noqa: E731
    assert fp(base.cfg) == base.fingerprint
    same = [
        replace(base.cfg, shard_prompts=1),
        replace(base.cfg, batch_size=1),
        replace(base.cfg, out=str(tmp_path / "elsewhere")),
        replace(base.cfg, shard_index=1, num_shards=3),
        replace(base.cfg, gpu_memory_utilization=0.5),
    ]
    assert [fp(c) for c in same] == [base.fingerprint] * len(same)
    other_teacher = build_tiny_model(tmp_path / "other-teacher", tokenizer, seed=1)
    fewer = write_jsonl(tmp_path / "fewer.jsonl", CHAT_ROWS[:5])
    different = {
        "k": replace(base.cfg, k=7),
        "temperature": replace(base.cfg, temperature=1.0),
        "top_p": replace(base.cfg, top_p=0.9),
        "max_new_tokens": replace(base.cfg, max_new_tokens=base.cfg.max_new_tokens + 1),
        "n": replace(base.cfg, n=1),
        "seed": replace(base.cfg, seed=1),
        "prompts": replace(base.cfg, prompts=fewer),
        "limit": replace(base.cfg, limit=5),
        "teacher": replace(base.cfg, teacher=str(other_teacher)),
        "dtype": replace(base.cfg, dtype="bfloat16"),
    }
    fps = {name: fp(cfg) for name, cfg in different.items()}
    assert base.fingerprint not in fps.values(), fps
    assert fps["prompts"] == fps["limit"]  # the same five prompts, however they were chosen
    assert len(set(fps.values())) == len(fps) - 1
    # greedy decoding ignores the sampling filters and the seed: they do not split the cache
    greedy = replace(base.cfg, temperature=0)
    assert fp(greedy) == fp(replace(greedy, top_p=0.5, top_k=3, seed=9))
