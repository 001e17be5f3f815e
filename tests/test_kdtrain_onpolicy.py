"""`kdtrain onpolicy` end to end on tiny models (hf backend), and the loss on student rows.

* the sampled-token estimator (`--loss sampled_rkl`) against a dense reference, value and
  gradients, and its expectation over the student's distribution against the dense reverse-KL
  gradient (unbiased);
* two rounds through the real CLI: a round's student rows carry the student's tokens (those the
  sampling dataset holds) and the teacher's log-probs for them, checked against running the
  teacher directly; round 1 samples with round 0's checkpoint;
* the loss on those rows is non-zero and moves with the teacher (another teacher scoring the same
  rows gives another gradient), for rkl / srkl / jsd over top-k + tail and sampled_rkl;
* a kill (SIGKILL of the process group) between stages, then a rerun: nothing complete is redone;
* the off-policy mix (DistiLLM-2 style: skl on teacher rows, srkl on student rows) trains its share;
* slow: one round on the embedded teacher with vLLM (`--loss sampled_rkl`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from kdcore.backends import vllm_available
from kdcore.divergences import SAMPLED_RKL, SparseKD
from kdcore.errors import KdError
from kdcore.dataset import TeacherDataset
from kdtrain_helpers import peaky_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "KD_QUIET": "1"}
MAX_NEW = 8


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdtrain", *args]


def _onpolicy_args(w, out: Path, *extra: str) -> list[str]:
    return _cli(
        "onpolicy", "--teacher", w["teacher"], "--student", w["student"], "--prompts", str(w["prompts"]), "--out", str(out),
        "--rounds", "2", "--n", "2", "--max-new-tokens", str(MAX_NEW), "--k", "8", "--backend", "hf", "--batch-size", "4",
        "--lr", "3e-3", "--train", "warmup_ratio=0", *extra,
    )


def _rows(url: str) -> list[dict]:
    ds = TeacherDataset(url)
    return [b.row(i) for b in ds.iter_batches() for i in range(b.num_rows)]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """Teacher (2 layers), a second teacher, a 1-layer student, 6 prompts; and one on-policy run
    of two rounds, killed once right after round 0's score stage was recorded, then rerun."""
    root = tmp_path_factory.mktemp("onpolicy")
    rows = [json.loads(line) for line in (REPO / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:6]]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows), encoding="utf-8")
    w = {
        "root": root,
        "prompts": prompts,
        "teacher": peaky_model(root / "teacher", tokenizer, seed=0),
        "teacher2": peaky_model(root / "teacher2", tokenizer, seed=2),
        "student": peaky_model(root / "student", tokenizer, seed=1, layers=1),
    }
    out = root / "run"
    state = out / "onpolicy_state.json"
    # first run: killed (the whole process group, kdgen children included) once round 0 is scored
    proc = subprocess.Popen(_onpolicy_args(w, out), env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and "round-0/score" in json.loads(state.read_text())["stages"]:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    w["killed_state"] = json.loads(state.read_text())
    # second run: the same command completes the rounds
    res = subprocess.run(_onpolicy_args(w, out), env=ENV, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    w["rerun_log"] = res.stderr
    w["final"] = res.stdout.strip().splitlines()[-1]
    w["state"] = json.loads(state.read_text())
    w["out"] = out
    return w


# ----------------------------------------------------------------------------------------------
# The sampled-token estimator against dense references


def test_sampled_rkl_matches_a_dense_reference():
    from kdtrain.losses import fused_kd_losses

    torch.manual_seed(0)
    n, hdim, vocab = 13, 8, 29
    hidden = torch.randn(n, hdim, dtype=torch.float64)
    weight = torch.randn(vocab, hdim, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,))
    teacher_lp = torch.log_softmax(torch.randn(n, vocab, dtype=torch.float64), -1).gather(1, labels[:, None])[:, 0]
    # dense: full log-softmax, the sampled token's log-prob, stop_grad(d) * log p_s(x)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp = torch.log_softmax(h @ w.t(), -1).gather(1, labels[:, None])[:, 0]
    d = lp - teacher_lp
    (d.detach() * lp).sum().backward()
    # fused, over tiles of 4 positions
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    empty = torch.zeros((n, 0), dtype=torch.long)
    total, kd_sum, _, _ = fused_kd_losses(
        h2, w2, labels, empty, empty.double(), SparseKD(loss=SAMPLED_RKL), 0.0, 1.0, tile=4, label_logprobs=teacher_lp
    )
    total.backward()
    assert kd_sum.item() == pytest.approx(d.sum().item(), abs=1e-4)
    assert kd_sum.item() != 0
    torch.testing.assert_close(h2.grad, h.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w2.grad, w.grad, atol=1e-5, rtol=1e-4)


def test_sampled_rkl_is_unbiased_for_the_reverse_kl_gradient():
    """E_{x ~ p_s}[grad of the surrogate at x] equals the gradient of the dense KL(p_s || p_t)."""
    from kdcore.divergences import sampled_rkl_per_token

    torch.manual_seed(1)
    vocab = 7
    z = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(vocab, dtype=torch.float64), -1)
    s = torch.log_softmax(z, -1)
    (dense,) = torch.autograd.grad((s.exp() * (s - t)).sum(), z)
    expected = torch.zeros(vocab, dtype=torch.float64)
    for x in range(vocab):
        s = torch.log_softmax(z, -1)
        est, surrogate = sampled_rkl_per_token(s[x : x + 1], t[x : x + 1])
        (g,) = torch.autograd.grad(surrogate.sum(), z)
        expected += s[x].exp().detach() * g
    torch.testing.assert_close(expected, dense, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# End to end


def test_student_rows_carry_student_tokens_and_teacher_logprobs(world):
    from transformers import AutoModelForCausalLM

    stages = world["state"]["stages"]
    teacher = AutoModelForCausalLM.from_pretrained(world["teacher"], dtype=torch.float32).eval()
    for r in (0, 1):
        samples, scored = stages[f"round-{r}/sample"]["dataset"], stages[f"round-{r}/score"]["dataset"]
        sm, tm = TeacherDataset(samples).manifest, TeacherDataset(scored).manifest
        # round 0 samples with the given student, round 1 with round 0's checkpoint
        sampler = world["student"] if r == 0 else stages["round-0/train"]["checkpoint"]
        assert Path(sm["teacher"]["path"]) == Path(sampler).resolve()
        assert Path(tm["teacher"]["path"]) == Path(world["teacher"]).resolve()
        assert tm["generation"]["kind"] == "score" and tm["generation"]["k"] == 8
        srows, trows = _rows(samples), _rows(scored)
        assert len(trows) == len(srows) == 12  # 6 prompts x 2 samples, no duplicate samples here
        assert sorted(r["completion_ids"].tolist() for r in trows) == sorted(r["completion_ids"].tolist() for r in srows)
        for row in trows:
            ids = torch.as_tensor(list(row["prompt_ids"]) + list(row["completion_ids"]))[None]
            with torch.no_grad():
                logp = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
            p = len(row["prompt_ids"])
            direct = logp[p - 1 : -1]
            comp = torch.as_tensor(row["completion_ids"])
            # the sampled token's log-prob, stored even where it is outside the teacher's top-k
            torch.testing.assert_close(torch.as_tensor(row["token_logprobs"]), direct.gather(1, comp[:, None])[:, 0], atol=2e-3, rtol=1e-3)  # v2 rounds to 10 mantissa bits (2^-11 relative)
            top = direct.topk(8, -1)
            torch.testing.assert_close(torch.as_tensor(row["topk_logprobs"]), top.values, atol=2e-3, rtol=1e-3)
        outside = sum(int((torch.as_tensor(r["topk_ids"]) != torch.as_tensor(r["completion_ids"])[:, None]).all(1).sum()) for r in trows)
        assert outside > 0  # a random student samples tokens the teacher would not rank in its top 8
    assert Path(world["final"]) == Path(stages["round-1/train"]["checkpoint"])
    kd = json.loads((Path(world["final"]) / "kd_config.json").read_text())
    assert kd["fingerprints"] == [TeacherDataset(stages["round-1/score"]["dataset"]).fingerprint]


def test_a_rerun_after_a_kill_redoes_nothing_complete(world):
    before, after = world["killed_state"]["stages"], world["state"]["stages"]
    assert set(before) >= {"round-0/sample", "round-0/score"}
    for name, rec in before.items():
        assert after[name] == rec, name  # same record: the stage did not run again
        assert f"{name}: done earlier" in world["rerun_log"]
    assert list(after) == [f"round-{r}/{s}" for r in (0, 1) for s in ("sample", "score", "train")]
    assert "kdgen generate" not in world["rerun_log"].split("round-0/train")[0]


@pytest.mark.parametrize("loss", ["rkl", "srkl", "jsd", SAMPLED_RKL])
def test_loss_on_student_rows_is_nonzero_and_moves_with_the_teacher(world, tmp_path, loss):
    """The same student rows scored by two teachers give different gradients."""
    from kdgen.generate import GenerateConfig, run as kdgen_run
    from kdtrain.config import load_config
    from kdtrain.train import build_trainer

    samples = world["state"]["stages"]["round-0/sample"]["dataset"]
    other = kdgen_run(GenerateConfig(prompts=samples, out=str(world["root"] / "other"), teacher=world["teacher2"], backend="hf", k=8), "score")
    grads, values = [], []
    for scored in (world["state"]["stages"]["round-0/score"]["dataset"], other):
        cfg = load_config(None, {"data": [scored], "student": world["student"], "out": str(tmp_path / "t"), "loss": loss})
        trainer = build_trainer(cfg)
        batch = trainer.data_collator([{"row": i} for i in range(len(trainer.train_dataset))])
        targets = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        trainer.model.zero_grad()
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], kd_targets=targets)
        out.total.backward()
        values.append(out.kd_sum.item() / out.n_tokens.item())
        grads.append(trainer.model.get_output_embeddings().weight.grad.clone())
    assert all(abs(v) > 1e-3 for v in values), values
    assert (grads[0] - grads[1]).norm() > 1e-3 * grads[0].norm()


def test_options_of_a_run_are_pinned(world):
    from kdtrain.onpolicy import OnPolicyConfig, run

    cfg = OnPolicyConfig(teacher=world["teacher"], student=world["student"], prompts=str(world["prompts"]), out=str(world["out"]), rounds=3)
    with pytest.raises(KdError, match="other options"):
        run(cfg)
    with pytest.raises(KdError, match="--offpolicy-mix > 0 needs --offpolicy-data"):
        run(OnPolicyConfig(student="s", prompts="p", offpolicy_mix=0.5))


def test_engine_settings_reach_kdgen_and_are_not_pinned():
    """`--engine-arg` (like --gpu-memory-utilization) is how the engine runs, not what the rounds
    compute: passed to every kdgen stage as repeated flags, left out of the pinned options."""
    from kdtrain.onpolicy import OnPolicyConfig
    from kdtrain.stages import flags

    assert flags({"max_new_tokens": 64, "limit": None, "engine_arg": ["a=1", "b=2"], "eager": False}) == [
        "--max-new-tokens", "64", "--engine-arg", "a=1", "--engine-arg", "b=2", "--no-eager",
    ]  # fmt: skip
    a = OnPolicyConfig(student="s", prompts="p", engine_arg=["kv_cache_memory_bytes=1"], gpu_memory_utilization=0.5)
    assert a.options() == OnPolicyConfig(student="s", prompts="p").options()


def test_offpolicy_mix_trains_its_share_first(world, tmp_path):
    """DistiLLM-2 style: a third of the round's rows from the teacher's own dataset (skl), the rest
    the student's (srkl); stopped after the off-policy stage, the state names its rows."""
    from kdgen.generate import GenerateConfig, run as kdgen_run
    from kdtrain.onpolicy import OnPolicyConfig, run

    teacher_data = kdgen_run(GenerateConfig(prompts=str(world["prompts"]), out=str(tmp_path / "ds"), teacher=world["teacher"], backend="hf", k=8, max_new_tokens=MAX_NEW), "generate")
    cfg = OnPolicyConfig(
        teacher=world["teacher"], student=world["student"], prompts=str(world["prompts"]), out=str(tmp_path / "mix"), rounds=1, n=2,
        datasets=str(world["out"] / "datasets"),  # round 0's sample and score are cache hits there
        max_new_tokens=MAX_NEW, k=8, backend="hf", batch_size=4, lr=3e-3, loss="srkl", offpolicy_data=teacher_data, offpolicy_mix=1 / 3,
        offpolicy_loss="skl", stop_after="round-0/offpolicy",
    )
    ckpt = run(cfg)
    stages = json.loads((tmp_path / "mix" / "onpolicy_state.json").read_text())["stages"]
    assert stages["round-0/score"]["dataset"] == world["state"]["stages"]["round-0/score"]["dataset"]
    rec = stages["round-0/offpolicy"]
    assert rec["rows"] == 6 and rec["start"] == 0  # 12 student rows * (1/3) / (2/3)
    kd = json.loads((Path(ckpt) / "kd_config.json").read_text())
    assert kd["config"]["loss"] == "skl" and kd["rows"] == {"start": 0, "count": 6, "of": 6}


@pytest.mark.slow
def test_one_round_on_the_embedded_teacher(tmp_path):
    """The README's command on the real teacher (vLLM where installed): a student cut to 2 of
    SmolLM2's 30 layers samples, SmolLM2 scores its tokens, the student trains one step."""
    from transformers import AutoModelForCausalLM

    from kdcore.models import resolve
    from kdtrain.student import from_teacher_layers

    student = from_teacher_layers("smollm2-135m-instruct", [0, 29])
    student.model.save_pretrained(tmp_path / "student")
    student.tokenizer.save_pretrained(tmp_path / "student")
    rows = [json.loads(line) for line in (REPO / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:2]]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows), encoding="utf-8")
    args = _cli(
        "onpolicy", "--teacher", "smollm2-135m-instruct", "--student", str(tmp_path / "student"), "--prompts", str(prompts),
        "--out", str(tmp_path / "run"), "--rounds", "1", "--max-new-tokens", "12", "--k", "8", "--dtype", "float32",
        "--max-steps", "1", "--batch-size", "2", "--loss", "sampled_rkl",
        # vLLM: a fixed KV cache (256 MiB: ~5,800 teacher tokens), not a fraction of this machine's memory
        *(["--engine-arg", f"kv_cache_memory_bytes={256 * 2**20}"] if vllm_available() else []),
    )
    res = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    stages = json.loads((tmp_path / "run" / "onpolicy_state.json").read_text())["stages"]
    scored = stages["round-0/score"]["dataset"]
    assert Path(TeacherDataset(scored).manifest["teacher"]["path"]) == Path(resolve("smollm2-135m-instruct").path)
    teacher = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m-instruct").path, dtype=torch.float32).eval()
    srows = {tuple(r["completion_ids"].tolist()) for r in _rows(stages["round-0/sample"]["dataset"])}
    for row in _rows(scored):
        assert tuple(row["completion_ids"].tolist()) in srows
        ids = torch.as_tensor(list(row["prompt_ids"]) + list(row["completion_ids"]))[None]
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
        p = len(row["prompt_ids"])
        direct = logp[p - 1 : -1].gather(1, torch.as_tensor(row["completion_ids"])[:, None])[:, 0]
        torch.testing.assert_close(torch.as_tensor(row["token_logprobs"]), direct, atol=5e-3, rtol=1e-3)  # vLLM vs hf, plus v2 rounding
    kd = json.loads((Path(stages["round-0/train"]["checkpoint"]) / "kd_config.json").read_text())
    assert kd["config"]["loss"] == SAMPLED_RKL and kd["global_step"] == 1
