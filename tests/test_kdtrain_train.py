"""`kdtrain run` end to end on CPU: a tiny teacher writes a dataset through kdgen (hf backend),
tiny students train on it. Covers alignment (student = teacher -> KD ~ 0), gradient accumulation,
resume after a kill, reload in transformers, init from teacher layers, tokenizer checks, bad
inputs. Precision, logging and several processes: tests/test_kdtrain_parallel.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from kdcore.errors import KdError
from kdtrain_helpers import generate_dataset, grads_after_one_step, other_tokenizer_model, peaky_model, train_cfg

def _first_batch(trainer) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


# ----------------------------------------------------------------------------------------------


def test_student_equal_to_teacher_has_zero_kd(world, tmp_path):
    """Checks the alignment of teacher arrays with labels: the teacher distils into itself at ~0."""
    from kdtrain.train import build_trainer

    for loss in ("fkl", "rkl", "jsd"):
        trainer = build_trainer(train_cfg(world, tmp_path / "self", student=world["teacher"], loss=loss))
        batch = _first_batch(trainer)
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], kd_targets=batch)
        n = out.n_tokens.item()
        assert n == (batch["labels"][:, 1:] != -100).sum().item() > 0
        assert out.kd_sum.item() / n < 2e-3, loss  # only the dataset's log-prob rounding (11 significant bits) remains
    other = build_trainer(train_cfg(world, tmp_path / "other"))
    out = other.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], kd_targets=batch)
    assert out.kd_sum.item() / out.n_tokens.item() > 0.5


def test_prompt_tokens_are_masked(world, tmp_path):
    from kdtrain.train import build_trainer

    trainer = build_trainer(train_cfg(world, tmp_path / "mask"))
    ex = trainer.data_collator.examples.row(0)
    batch = trainer.data_collator([{"row": 0}])
    start = int(ex["completion_start"])
    assert (batch["labels"][0, :start] == -100).all()
    assert (batch["labels"][0, start:] == torch.as_tensor(ex["input_ids"][start:])).all()
    # the teacher's top-1 for a greedy completion is the token itself
    assert (batch["topk_ids"][0, start:, 0] == batch["labels"][0, start:]).all()


def test_a_logged_run_prints_one_plain_line_per_logging_step(world, tmp_path, monkeypatch, capsys):
    """stderr to a file: no tqdm bar (its \\r redraws make one endless line there), one line per
    logging step with the step count and the logged values, and nothing on stdout but our own."""
    from kdtrain.train import run

    monkeypatch.setenv("KD_QUIET", "0")
    run(train_cfg(world, tmp_path / "logged", max_steps=4, logging_steps=2, save_steps=100))
    out, err = capsys.readouterr()
    steps = [ln for ln in err.splitlines() if ln.startswith("step ")]
    assert [ln.split(" (")[0] for ln in steps[:2]] == ["step 2/4", "step 4/4"], err
    assert all("loss " in ln and "kd " in ln and "tokens_per_s " in ln for ln in steps[:2]), steps
    assert "\r" not in err and "it/s" not in err and "{'loss'" not in out + err


def test_grad_accumulation_4x1_equals_batch_4(world, tmp_path):
    big = grads_after_one_step(world, tmp_path / "b4", batch_size=4, grad_accum=1)
    small = grads_after_one_step(world, tmp_path / "b1", batch_size=1, grad_accum=4)
    assert big.keys() == small.keys() and big
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=2e-4, atol=1e-6, msg=name)


def test_end_to_end_kill_resume_reload(world, tmp_path):
    """Train, get killed after checkpoint-4, resume to step 12; the loss falls; the checkpoint reloads."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    from kdtrain.train import run

    out = tmp_path / "run"

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            if state.global_step == 6:
                raise KeyboardInterrupt  # as a killed process: checkpoint-4 is the newest on disk

    cfg = train_cfg(world, out, max_steps=12, loss="skl", ce_weight=0.2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, callbacks=[Kill()])
    assert (out / "checkpoint-4" / "kd_config.json").exists() and not (out / "config.json").exists()

    steps = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            steps.append(state.global_step)

    run(cfg, callbacks=[Count()])
    assert steps == list(range(5, 13))  # resumed from checkpoint-4, not from scratch
    record = json.loads((out / "kd_config.json").read_text())
    fp = Path(world["data"]).name
    assert record["fingerprints"] == [fp] and record["config"]["loss"] == "skl" and record["global_step"] == 12
    assert json.loads((out / "checkpoint-8" / "kd_config.json").read_text())["fingerprints"] == [fp]
    kd = [h["kd"] for h in record["log_history"]]
    total = [h["total"] for h in record["log_history"]]
    assert len(kd) == 6 and kd[-1] < 0.8 * kd[0] and total[-1] < 0.5 * total[0], (kd, total)
    assert all(h["tokens_per_s"] > 0 and "ce" in h and "total" in h for h in record["log_history"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape == (1, 3, model.config.vocab_size)


def test_init_from_teacher_layers(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from kdtrain.student import from_teacher_layers

    s = from_teacher_layers(world["teacher"], [1])
    t = AutoModelForCausalLM.from_pretrained(world["teacher"])
    assert s.model.config.num_hidden_layers == 1
    torch.testing.assert_close(s.model.model.layers[0].mlp.up_proj.weight, t.model.layers[1].mlp.up_proj.weight)
    torch.testing.assert_close(s.model.model.norm.weight, t.model.norm.weight)
    torch.testing.assert_close(s.model.get_input_embeddings().weight, t.get_input_embeddings().weight)
    with pytest.raises(KdError, match="the teacher has 2 layers"):
        from_teacher_layers(world["teacher"], [0, 5])


def test_fresh_student_from_config_and_lora(world, tmp_path):
    """--student-config with the teacher's tokenizer (from the manifest), and LoRA merged at the end."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdtrain.train import run

    conf = AutoConfig.from_pretrained(world["student"]).to_dict()
    conf["num_hidden_layers"] = 1
    path = tmp_path / "student.json"
    path.write_text(json.dumps(conf))
    out = tmp_path / "fresh"
    run(train_cfg(world, out, student="", student_config=str(path), max_steps=2, save_steps=100))
    assert json.loads((out / "kd_config.json").read_text())["student"]["kind"] == "config"
    out = tmp_path / "lora"
    run(train_cfg(world, out, lora=True, lora_r=4, max_steps=2, save_steps=100))
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_other_tokenizer_logit_and_text_work(world, tmp_path):
    from kdtrain.train import run

    other = other_tokenizer_model(tmp_path / "other")
    run(train_cfg(world, tmp_path / "x", student=other, max_steps=1, save_steps=100))  # cross-tokenizer logit KD (issue 4)
    assert json.loads((tmp_path / "x" / "kd_config.json").read_text())["crosstok"]["kd_positions"] > 0
    out = tmp_path / "text"
    run(train_cfg(world, out, student=other, mode="text", max_steps=2, save_steps=100))
    record = json.loads((out / "kd_config.json").read_text())
    assert record["tokenizer"] == "different" and record["examples"]["rows"] == 12
    assert record["log_history"][-1]["ce"] > 0


def test_other_tokenizer_text_examples_are_the_students_own_encoding(world, tmp_path):
    """Text mode across tokenizers: each example is the student's chat-template prompt, then the
    completion text re-tokenised (one batched call per dataset), then EOS where the teacher stopped."""
    from transformers import AutoTokenizer

    from kdcore.dataset import TeacherDataset
    from kdcore.teacher_data import TeacherData
    from kdtrain.data import text_examples

    other = AutoTokenizer.from_pretrained(other_tokenizer_model(tmp_path / "other"))
    ds = TeacherDataset(world["data"])
    rows = ds.read_table(columns=["messages", "completion", "finish_reason"]).to_pylist()
    prep = text_examples(TeacherData([ds]), other, same=False, max_length=4096, overflow="truncate", limit=5)
    assert prep.num_rows == 5 and prep.rows_in == 5
    for i, row in enumerate(rows[:5]):
        seq = prep.seq_ids[prep.seq_offsets[i] : prep.seq_offsets[i + 1]].tolist()
        text = "\n\n".join(m["content"] for m in row["messages"]) + "\n\n"  # no chat template: plain paragraphs
        prompt = other.encode(text, add_special_tokens=False)
        completion = other.encode(row["completion"], add_special_tokens=False)
        eos = [other.eos_token_id] if row["finish_reason"] == "stop" else []
        assert seq == prompt + completion + eos
        assert prep.completion_start[i] == len(prompt)


def test_padded_embedding_rows(world, tokenizer, tmp_path):
    """Same tokenizer, different embedding rows: student padded above the teacher, and teacher padded
    above the student (teacher ids beyond the student's rows go to the tail bucket)."""
    from kdtrain.train import build_trainer, run

    padded_student = peaky_model(tmp_path / "ps", tokenizer, seed=3, layers=1, vocab_rows=len(tokenizer) + 64)
    run(train_cfg(world, tmp_path / "a", student=padded_student, max_steps=1, save_steps=100))
    # the teacher plus 64 padding rows, each a slightly shrunk copy of a frequent token's row: they
    # rank right behind their twin (in the top-k) but never win the argmax (same completions)
    from kdcore.dataset import TeacherDataset
    from transformers import AutoModelForCausalLM

    ids = next(TeacherDataset(world["data"]).iter_batches(1000, text=False)).completion_ids
    frequent = torch.as_tensor(ids).bincount().argsort(descending=True)[:64]
    m = AutoModelForCausalLM.from_pretrained(world["teacher"])
    m.resize_token_embeddings(len(tokenizer) + 64, mean_resizing=False)
    with torch.no_grad():
        m.lm_head.weight[len(tokenizer) :] = 0.999 * m.lm_head.weight[frequent]
    padded_teacher = str(tmp_path / "pt")
    m.save_pretrained(padded_teacher)
    tokenizer.save_pretrained(padded_teacher)
    data = generate_dataset(world["prompts"], tmp_path / "ds", padded_teacher)
    trainer = build_trainer(train_cfg(world, tmp_path / "b", data=[data], max_steps=1))
    assert trainer.kd_record["examples"]["rows"] == 12
    assert torch.isinf(torch.as_tensor(trainer.data_collator.examples.topk_logprobs)).any()
    trainer.train()


def test_top_k_uses_the_best_n_of_the_stored_k(world, tmp_path):
    """--top-k 4 on a k=8 dataset is the k=4 dataset of the same (greedy) teacher run: same loss."""
    from kdtrain.train import build_trainer

    k4 = generate_dataset(world["prompts"], tmp_path / "k4", world["teacher"], k=4)
    sums = {}
    for name, data, top_k in (("k8", world["data"], 0), ("k8-top4", world["data"], 4), ("k4", k4, 0)):
        trainer = build_trainer(train_cfg(world, tmp_path / name, data=[data], top_k=top_k, loss="jsd"))
        batch = _first_batch(trainer)
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], kd_targets=batch)
        sums[name] = out.kd_sum.item()
    assert sums["k8-top4"] == pytest.approx(sums["k4"], rel=1e-5)
    assert sums["k8-top4"] != pytest.approx(sums["k8"], rel=1e-3)
    with pytest.raises(KdError, match="exceeds the k=8 stored"):
        build_trainer(train_cfg(world, tmp_path / "o", top_k=9))


def _reference_logit_examples(urls: list[str], max_length: int, student_rows: int, limit: int | None) -> dict:
    """`kdtrain.data.logit_examples` written row by row (slow, obvious): what the vectorised one must give."""
    import numpy as np

    from kdcore.dataset import TeacherDataset

    rows = [b.row(i) for url in urls for b in TeacherDataset(url).iter_batches(batch_rows=5) for i in range(b.num_rows)][:limit]
    out = {"seqs": [], "starts": [], "ids": [], "lps": [], "tails": [], "rows_in": len(rows), "truncated": 0, "dropped": 0, "beyond_vocab": 0, "dropped_topk_entries": 0}
    for r in rows:
        p, c = r["prompt_ids"], r["completion_ids"]
        if (p >= student_rows).any() or (c >= student_rows).any():
            out["beyond_vocab"] += 1
            continue
        keep = min(len(c), max(max_length - len(p), 0))
        if keep == 0:
            out["dropped"] += 1
            continue
        out["truncated"] += len(p) + len(c) > max_length
        bad = r["topk_ids"][:keep] >= student_rows
        out["dropped_topk_entries"] += int(bad.sum())
        out["seqs"].append(np.concatenate([p, c[:keep]]))
        out["starts"].append(len(p))
        out["ids"].append(np.where(bad, 0, r["topk_ids"][:keep]))
        out["lps"].append(np.where(bad, -np.inf, r["topk_logprobs"][:keep]))
        # the dropped entries' mass joins the stored tail
        with np.errstate(divide="ignore"):
            dropped = np.log(np.where(bad, np.exp(r["topk_logprobs"][:keep].astype(np.float64)), 0.0).sum(1))
        out["tails"].append(np.logaddexp(r["tail_logprobs"][:keep].astype(np.float64), dropped).astype(np.float32))
    return out


@pytest.mark.parametrize("max_length, student_rows, limit", [(4096, None, None), (40, None, None), (60, "median", 20), (4096, "median", 7)])
def test_logit_examples_equal_a_row_by_row_reference(world, max_length, student_rows, limit):
    """The vectorised example builder (whole-batch views, masks, gathers) gives exactly the examples
    of a row-by-row reference on the teacher's real rows: read twice (two datasets, so batches and
    --limit cross dataset boundaries), with truncation, dropped rows and ids beyond the student's rows."""
    import numpy as np

    from kdcore.teacher_data import open_teacher_data
    from kdtrain.data import logit_examples

    data = open_teacher_data([world["data"], world["data"]])
    if student_rows == "median":  # about half the rows hold an id the student lacks
        maxima = [max(r["prompt_ids"].max(), r["completion_ids"].max()) for b in data.datasets[0].iter_batches() for r in map(b.row, range(b.num_rows))]
        student_rows = int(np.median(maxima))
    else:
        student_rows = data.manifest["tokenizer"]["embedding_rows"]
    got = logit_examples(data, max_length, "truncate", student_rows, limit=limit)
    want = _reference_logit_examples([world["data"], world["data"]], max_length, student_rows, limit)
    for name in ("rows_in", "truncated", "dropped", "beyond_vocab", "dropped_topk_entries"):
        assert getattr(got, name) == want[name], name
    assert got.num_rows == len(want["seqs"]) > 0
    assert (got.seq_ids.dtype, got.topk_ids.dtype, got.topk_logprobs.dtype) == (np.int32, np.int32, np.float32)
    np.testing.assert_array_equal(got.completion_start, want["starts"])
    for i in range(got.num_rows):
        row = got.row(i)
        np.testing.assert_array_equal(row["input_ids"], want["seqs"][i])
        np.testing.assert_array_equal(row["topk_ids"], want["ids"][i])
        np.testing.assert_array_equal(row["topk_logprobs"], want["lps"][i])
        np.testing.assert_allclose(row["tail_logprobs"], want["tails"][i], rtol=1e-6)
    # each case exercises what it is there for
    assert (want["truncated"] > 0) == (max_length < 100)
    assert (want["beyond_vocab"] > 0 and want["dropped_topk_entries"] > 0) == (student_rows < data.manifest["tokenizer"]["embedding_rows"])


def test_bad_inputs(world, tmp_path):
    from kdtrain.train import run

    base = Path(world["data"])
    # a dataset failing verification
    broken = tmp_path / "broken" / base.name
    shutil.copytree(base, broken)
    shard = next((broken / "data").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(KdError, match="fails verification"):
        run(train_cfg(world, tmp_path / "o", data=[str(broken)]))
    # an empty dataset (valid, zero rows)
    empty = tmp_path / "empty" / base.name
    shutil.copytree(base, empty)
    shutil.rmtree(empty / "data")
    m = json.loads((empty / "manifest.json").read_text())
    m["shards"], m["totals"]["rows"], m["totals"]["tokens"] = [], 0, 0
    (empty / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(KdError, match="empty"):
        run(train_cfg(world, tmp_path / "o", data=[str(empty)]))
    # mixed datasets with different k
    other_k = generate_dataset(world["prompts"], tmp_path / "k4", world["teacher"], k=4)
    with pytest.raises(KdError, match="mixed datasets must share k"):
        run(train_cfg(world, tmp_path / "o", data=[world["data"], other_k]))
    # not a dataset
    with pytest.raises(KdError, match="no teacher dataset"):
        run(train_cfg(world, tmp_path / "o", data=[str(tmp_path)]))
    # sequences longer than --max-length: refuse, or truncate with a warning
    with pytest.raises(KdError, match="longer than --max-length 40"):
        run(train_cfg(world, tmp_path / "o", max_length=40, overflow="refuse"))
    from kdtrain.train import build_trainer

    t = build_trainer(train_cfg(world, tmp_path / "o", max_length=40))
    assert t.kd_record["examples"]["truncated"] + t.kd_record["examples"]["dropped"] > 0
    assert max(len(t.data_collator.examples.row(i)["input_ids"]) for i in range(t.data_collator.examples.num_rows)) <= 40
    with pytest.raises(KdError, match="exceeds the student's context"):
        run(train_cfg(world, tmp_path / "o", max_length=100_000))


def test_cli_end_to_end_one_line_errors(world, tmp_path):
    """The console entry point: a run through `python -m kdtrain`, and a user error -> one line, exit 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "KD_QUIET": "1"}
    bad = subprocess.run(
        [sys.executable, "-m", "kdtrain", "run", "--data", world["data"], "--student", world["student"], "--mode", "logit", "--loss", "fkl", "--out", str(tmp_path / "o"), "max_length=100000"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("kdtrain: error: --max-length 100000 exceeds the student's context")
