"""Online teacher mode (`kdtrain run --online`, issue 16): the teacher runs on each batch.

Dense KD and the IR loss against naive float64 references (values and gradients); dense online KD
equals offline sparse KD when k is the whole vocabulary (in memory exactly, and through the trainer
on a k = V teacher dataset written by kdgen's hf backend); the IR projection learns, the teacher's
parameters stay bit-identical, and the projection is restored on resume; gradient accumulation,
LoRA, bf16 and --init-from-teacher; bad layer maps and a different tokenizer -> one-line errors;
the CLI end to end on a prompt file, with resume.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, build_tiny_model
from kdcore.divergences import DIVERGENCES, SparseKD
from kdcore.errors import ConfigError, KdError
from kdtrain.config import load_config, parse_ir_layers
from kdtrain_helpers import generate_dataset, other_tokenizer_model, peaky_model

N_PROMPTS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """Teacher (2 layers, width 64), a narrower 1-layer student (width 32: the IR projection is
    needed), a same-width student, a prompt file and the teacher's dataset with k = the vocabulary."""
    root = tmp_path_factory.mktemp("online")
    rows = [json.loads(line) for line in (REPO / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:N_PROMPTS]]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows), encoding="utf-8")
    teacher = peaky_model(root / "teacher", tokenizer, seed=0)
    narrow = build_tiny_model(root / "narrow", tokenizer, seed=2, layers=1, hidden=32)
    student = peaky_model(root / "student", tokenizer, seed=1, layers=1)
    data = generate_dataset(prompts, root / "datasets", teacher, k=len(tokenizer))
    pc = root / "pc.jsonl"  # a prompt file with completions (what online mode takes besides teacher datasets)
    pc.write_text("".join(json.dumps({"messages": r["messages"][:1], "completion": r["messages"][-1]["content"][:80]}) + "\n" for r in rows), encoding="utf-8")
    return {"root": root, "teacher": teacher, "student": student, "narrow": str(narrow), "data": data, "pc": str(pc)}


def _cfg(world, out: Path, **kw):
    flags = {
        "data": [world["data"]], "student": world["student"], "teacher": world["teacher"], "online": True, "out": str(out), "lr": 3e-3,
        "batch_size": 3, "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 2, "max_steps": 2,
    }
    flags.update(kw)
    return load_config(None, flags)


def _first_batch(trainer) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


# ---------------------------------------------------------------------------------------------- references


def _naive_divergence(t: torch.Tensor, s: torch.Tensor, loss: str, a: float, b: float) -> torch.Tensor:
    """Textbook formulas on probabilities, float64, one row per position."""
    P, Q = t.exp(), s.exp()
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    return {
        "fkl": lambda: kl(P, Q),
        "rkl": lambda: kl(Q, P),
        "skl": lambda: kl(P, a * P + (1 - a) * Q),
        "srkl": lambda: kl(Q, a * Q + (1 - a) * P),
        "jsd": lambda: b * kl(P, b * P + (1 - b) * Q) + (1 - b) * kl(Q, b * P + (1 - b) * Q),
        "tvd": lambda: 0.5 * (P - Q).abs().sum(-1),
        "symkl": lambda: kl(P, Q) + kl(Q, P),
    }[loss]()


def test_dense_kd_matches_a_naive_reference():
    """fused_dense_kd (tiled, gradients made in the forward) = full float64 logits + autograd, for
    every divergence, temperature 1 and 2, a soft-capped student, tiles not dividing N."""
    from kdtrain.dense import fused_dense_kd

    torch.manual_seed(0)
    N, H, Ht, V = 13, 8, 12, 37
    for loss in DIVERGENCES:
        for T, cap in ((1.0, None), (2.0, 5.0)):
            h = torch.randn(N, H, requires_grad=True)
            w = torch.randn(V, H, requires_grad=True)
            ht, wt = torch.randn(N, Ht), torch.randn(V, Ht)
            labels = torch.randint(0, V, (N,))
            spec = SparseKD(loss=loss, temperature=T, alpha=0.2, beta=0.3)
            total, kd, ce = fused_dense_kd(h, w, ht, wt, labels, spec, ce_weight=0.3, kd_weight=0.7, tile=5, softcap=cap)
            total.backward()
            h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            z = h64 @ w64.t()
            if cap:
                z = torch.tanh(z / cap) * cap
            zt = ht.double() @ wt.double().t()
            ref_kd = _naive_divergence(torch.log_softmax(zt / T, -1), torch.log_softmax(z / T, -1), loss, 0.2, 0.3).sum() * T * T
            ref_ce = torch.nn.functional.cross_entropy(z, labels, reduction="sum")
            ref = 0.3 * ref_ce + 0.7 * ref_kd
            ref.backward()
            assert kd.item() == pytest.approx(ref_kd.item(), rel=1e-4, abs=1e-5), (loss, T)
            assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-5)
            assert total.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
            torch.testing.assert_close(h.grad, h64.grad.float(), rtol=1e-3, atol=1e-5, msg=f"{loss} T={T}")
            torch.testing.assert_close(w.grad, w64.grad.float(), rtol=1e-3, atol=1e-5, msg=f"{loss} T={T}")


def test_ir_loss_matches_a_naive_reference():
    """IRAlign (projection + cosine / mse, mean over pairs) against a per-position float64 loop:
    values, and gradients of the student states and of the projection."""
    from kdtrain.online import IRAlign

    torch.manual_seed(0)
    N, Hs, Ht = 7, 6, 10
    for kind in ("cosine", "mse"):
        ir = IRAlign([(0, 1), (1, 3)], Hs, Ht, kind)
        s = [torch.randn(N, Hs, requires_grad=True) for _ in range(2)]
        t = [torch.randn(N, Ht) for _ in range(2)]
        got = ir(s, t)
        got.sum().backward()
        Ws = [p.weight.detach().double().requires_grad_() for p in ir.proj]
        s64 = [x.detach().double().requires_grad_() for x in s]
        want = []
        for n in range(N):
            per = []
            for j in range(2):
                a, b = Ws[j] @ s64[j][n], t[j][n].double()
                if kind == "cosine":
                    per.append(1 - (a * b).sum() / (a.dot(a).sqrt() * b.dot(b).sqrt()))
                else:
                    per.append(sum((a[i] - b[i]) ** 2 for i in range(Ht)) / Ht)
            want.append(sum(per) / 2)
        want = torch.stack(want)
        want.sum().backward()
        torch.testing.assert_close(got.detach(), want.float(), rtol=1e-5, atol=1e-6)
        for j in range(2):
            torch.testing.assert_close(s[j].grad, s64[j].grad.float(), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(ir.proj[j].weight.grad, Ws[j].grad.float(), rtol=1e-4, atol=1e-6)
    assert IRAlign([(0, 0)], 8, 8, "cosine").proj is None  # same width: no projection


def test_dense_equals_sparse_when_k_is_the_vocabulary_in_memory():
    """The sparse tail-bucket loss fed the teacher's whole sorted distribution (k = V) is the dense
    loss: same values and same gradients, every divergence (temperature 1: the empty tail bucket)."""
    from kdtrain.dense import fused_dense_kd
    from kdtrain.losses import fused_kd_losses

    torch.manual_seed(1)
    N, H, V = 11, 8, 29
    ht, wt = torch.randn(N, H), torch.randn(V, H)
    lp = torch.log_softmax(ht @ wt.t(), -1)
    ids = lp.argsort(-1, descending=True)
    lps = lp.gather(1, ids)
    labels = torch.randint(0, V, (N,))
    for loss in DIVERGENCES:
        spec = SparseKD(loss=loss, alpha=0.2, beta=0.3)
        grads = []
        sums = []
        for dense in (True, False):
            h = torch.randn(N, H, generator=torch.Generator().manual_seed(2)).requires_grad_()
            w = torch.randn(V, H, generator=torch.Generator().manual_seed(3)).requires_grad_()
            if dense:
                total, kd, _ = fused_dense_kd(h, w, ht, wt, labels, spec, 0.5, 1.0, tile=4)
            else:
                total, kd, _, _ = fused_kd_losses(h, w, labels, ids, lps, spec, 0.5, 1.0, tile=4)
            total.backward()
            sums.append(kd.item())
            grads.append((h.grad, w.grad))
        assert sums[0] == pytest.approx(sums[1], rel=1e-5, abs=1e-6), loss
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=loss)


def _grads(trainer, batch) -> tuple[float, float, dict]:
    trainer.model.zero_grad()
    out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], kd_targets={**batch, **trainer.online.teacher_targets(batch)} if trainer.online else batch)
    out.total.backward()
    return out.kd_sum.item(), out.ce_sum.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_online_dense_equals_offline_sparse_on_a_k_equal_vocab_dataset(world, tmp_path):
    """Through both trainers on the same rows: offline sparse KD from the k = V dataset kdgen wrote
    and online dense KD with the teacher that wrote it give the same KD and CE sums and gradients
    (to the dataset's log-prob quantisation, ~1e-3 nats per entry)."""
    from kdtrain.train import build_trainer

    common = {"loss": "fkl", "ce_weight": 0.5, "kd_weight": 1.0}
    offline = build_trainer(_cfg(world, tmp_path / "off", online=False, **common))
    online = build_trainer(_cfg(world, tmp_path / "on", **common))
    assert offline.data_collator.examples.k == offline.model.config.vocab_size
    batch = _first_batch(offline)
    kd_off, ce_off, g_off = _grads(offline, batch)
    kd_on, ce_on, g_on = _grads(online, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    assert ce_on == pytest.approx(ce_off, rel=1e-6)
    assert kd_on == pytest.approx(kd_off, rel=2e-3), (kd_on, kd_off)
    assert g_on.keys() == g_off.keys() and g_on
    for name in g_on:
        cos = torch.nn.functional.cosine_similarity(g_on[name].flatten(), g_off[name].flatten(), dim=0).item()
        assert cos > 0.9999, (name, cos)
        assert g_on[name].norm().item() == pytest.approx(g_off[name].norm().item(), rel=2e-3), name


def test_training_updates_the_projection_not_the_teacher(world, tmp_path):
    """Online KD + IR on a narrower student: the projection receives gradient and moves, the
    teacher's parameters stay bit-identical, ce / kd / ir are logged, the projection is saved beside
    each checkpoint and never in the student's weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, TrainerCallback

    from kdcore.artifacts import IR_PROJECTION
    from kdtrain.train import build_trainer, save_final

    seen = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **_):
            seen.setdefault("grad", [p.grad.norm().item() for p in trainer.online.ir.parameters()])

    out = tmp_path / "ir"
    trainer = build_trainer(_cfg(world, out, student=world["narrow"], ir_layers="0:1", ir_weight=2.0, ce_weight=0.2), callbacks=[Grab()])
    teacher = {n: p.detach().clone() for n, p in trainer.online.model.named_parameters()}
    assert all(not p.requires_grad for p in trainer.online.model.parameters()) and not trainer.online.model.training
    proj0 = trainer.online.ir.proj[0].weight.detach().clone()
    trainer.train()
    save_final(trainer, str(out))
    assert all(g > 0 for g in seen["grad"])
    assert not torch.equal(trainer.online.ir.proj[0].weight.detach(), proj0)
    for n, p in trainer.online.model.named_parameters():
        assert torch.equal(p, teacher[n]), n
    record = json.loads((out / "kd_config.json").read_text())
    assert record["online"]["ir"] == {"pairs": [[0, 1]], "loss": "cosine", "weight": 2.0, "projection": True}
    for h in record["log_history"]:
        assert {"ce", "kd", "ir", "total"} <= h.keys()
        assert h["total"] == pytest.approx(0.2 * h["ce"] + 1.0 * h["kd"] + 2.0 * h["ir"], rel=1e-4)
    saved = load_file(out / "checkpoint-2" / IR_PROJECTION)
    torch.testing.assert_close(saved["proj.0.weight"], trainer.online.ir.proj[0].weight.detach())
    assert (out / IR_PROJECTION).exists()
    assert load_file(out / "model.safetensors").keys() == load_file(Path(world["narrow"]) / "model.safetensors").keys()
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 32


def test_kill_and_resume_restores_the_projection(world, tmp_path):
    """Killed after checkpoint-2; the rerun resumes there, with the projection of checkpoint-2."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from kdcore.artifacts import IR_PROJECTION
    from kdtrain.train import run

    out = tmp_path / "run"
    cfg = _cfg(world, out, student=world["narrow"], ir_layers="0:0", ir_loss="mse", max_steps=4, batch_size=2)

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            if state.global_step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, callbacks=[Kill()])
    saved = load_file(out / "checkpoint-2" / IR_PROJECTION)["proj.0.weight"]
    seen = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **_):
            seen["proj"] = optimizer.param_groups[-1]["params"][0].detach().clone()  # the projection's own group

        def on_step_end(self, args, state, control, **_):
            seen.setdefault("steps", []).append(state.global_step)

    run(cfg, callbacks=[Look()])
    assert seen["steps"] == [3, 4]
    torch.testing.assert_close(seen["proj"], saved, rtol=0, atol=0)
    assert json.loads((out / "kd_config.json").read_text())["global_step"] == 4


def test_grad_accumulation_lora_bf16_init_from_teacher(world, tmp_path):
    """Batch 4 = 4 micro-batches of 1 (student and projection gradients); LoRA, bf16 and a student cut
    from the teacher's layers train online with IR."""
    from transformers import TrainerCallback

    from kdtrain.train import build_trainer, run

    def one_step(name, **kw):
        grads = {}

        class Grab(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **_):
                grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
                grads.update({f"ir.{n}": p.grad.detach().clone() for n, p in trainer.online.ir.named_parameters()})

        trainer = build_trainer(_cfg(world, tmp_path / name, student=world["narrow"], ir_layers="0:1", max_steps=1, max_grad_norm=0.0, ce_weight=0.5, loss="jsd", limit=4, **kw), callbacks=[Grab()])
        trainer.train()
        return grads

    big, small = one_step("b4", batch_size=4, grad_accum=1), one_step("b1", batch_size=1, grad_accum=4)
    assert big.keys() == small.keys() and "ir.proj.0.weight" in big
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=2e-4, atol=1e-6, msg=name)
    run(_cfg(world, tmp_path / "lora", student=world["narrow"], ir_layers="0:1", lora=True, lora_r=4, bf16=True, save_steps=100))
    record = json.loads((tmp_path / "lora" / "kd_config.json").read_text())
    assert all(math.isfinite(h["loss"]) and h["ir"] > 0 for h in record["log_history"])
    run(_cfg(world, tmp_path / "cut", student="", init_from_teacher="0,1", ir_layers="0:0,1:1", save_steps=100))
    record = json.loads((tmp_path / "cut" / "kd_config.json").read_text())
    assert record["student"]["kind"] == "teacher_layers" and record["online"]["ir"]["projection"] is False
    # all the teacher's blocks: the first step's KD and IR (before any update) are ~0
    assert record["log_history"][0]["ir"] < 1e-5 and record["log_history"][0]["kd"] < 1e-5


def test_bad_layer_maps_and_tokenizers_are_one_line_errors(world, tmp_path):
    from kdtrain.train import build_trainer

    for spec, why in (("1-5", "not a student:teacher pair"), ("1:5,3", "uneven map"), ("1:5:2", "not a student:teacher pair"), ("a:b", "not two layer numbers"), ("0:1,0:0", "appears twice"), ("-1:2", "not two layer numbers|>= 0")):
        with pytest.raises(ValueError, match=why):
            parse_ir_layers(spec)
        with pytest.raises(ConfigError, match="--ir-layers"):
            _cfg(world, tmp_path / "o", ir_layers=spec)
    assert parse_ir_layers("1:5, 3:15") == [(1, 5), (3, 15)]
    with pytest.raises(ConfigError, match="--ir-layers applies only with --online"):
        _cfg(world, tmp_path / "o", online=False, ir_layers="0:1")
    with pytest.raises(ConfigError, match="--online needs --teacher"):
        _cfg(world, tmp_path / "o", teacher=None)
    with pytest.raises(ConfigError, match="--ir-loss huber: choose cosine or mse"):
        _cfg(world, tmp_path / "o", ir_layers="0:0", ir_loss="huber")
    with pytest.raises(KdError, match=r"out of range: student layer 1 \(the student has 1: 0..0\); teacher layer 7 \(the teacher has 2: 0..1\)"):
        build_trainer(_cfg(world, tmp_path / "o", ir_layers="0:1,1:7"))
    other = other_tokenizer_model(tmp_path / "other")
    with pytest.raises(KdError, match="differs from the teacher's .*without --online \\(cross-tokenizer KD\\)"):
        build_trainer(_cfg(world, tmp_path / "o", student=other))


def test_cli_prompt_file_end_to_end_with_resume(world, tmp_path):
    """`python -m kdtrain run --online` on a JSONL of prompts + completions, IR with projection; a
    second run with more steps resumes from the checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "KD_QUIET": "1"}
    out = tmp_path / "cli"
    base = [sys.executable, "-m", "kdtrain", "run", "--online", "--teacher", world["teacher"], "--data", world["pc"], "--student", world["narrow"],
            "--ir-layers", "0:1", "--ir-weight", "0.5", "--ce-weight", "0.5", "--out", str(out), "--batch-size", "3", "--save-steps", "2", "--logging-steps", "1", "lr=3e-3"]
    for steps in (2, 3):
        res = subprocess.run([*base, "--max-steps", str(steps)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((out / "kd_config.json").read_text())
    assert record["global_step"] == 3 and record["datasets"] == [{"prompts": world["pc"]}] and record["examples"]["rows"] == N_PROMPTS
    assert [h["step"] for h in record["log_history"]] == [1, 2, 3] and all(h["ir"] > 0 and h["kd"] > 0 for h in record["log_history"])
    assert (out / "checkpoint-2" / "ir_projection.safetensors").exists()


@pytest.mark.slow
def test_two_process_ddp_online_with_ir(world, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (DDP over gloo) online with IR: two processes
    x batch 2 take the step one process takes with batch 4 — same first loss and components, same IR
    projection after the step (its gradients are averaged over processes)."""
    from safetensors.torch import load_file

    from kdtrain.train import run

    flags = ["--online", "--teacher", world["teacher"], "--data", world["data"], "--student", world["narrow"], "--ir-layers", "0:1", "--ce-weight", "0.5", "--limit", "4",
             "max_steps=1", "logging_steps=1", "save_steps=1", "lr=3e-3", "warmup_ratio=0", "max_grad_norm=0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "KD_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
           "-m", "kdtrain", "run", "--out", str(tmp_path / "ddp"), "--batch-size", "2", *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    run(_cfg(world, tmp_path / "one", student=world["narrow"], ir_layers="0:1", ce_weight=0.5, limit=4, batch_size=4, max_steps=1, save_steps=1, max_grad_norm=0.0))
    ddp, one = (json.loads((tmp_path / n / "kd_config.json").read_text()) for n in ("ddp", "one"))
    for key in ("loss", "kd", "ce", "ir"):
        assert ddp["log_history"][0][key] == pytest.approx(one["log_history"][0][key], rel=1e-4), key
    # the projection's step (its gradients all-reduced by kdtrain, not DDP). The student's weights are
    # not compared: Adam's first step is ~lr * sign(grad), so embedding rows whose gradients are
    # rounding noise move by +-lr depending on the reduction order (DDP itself: test_kdtrain_parallel.py)
    a, b = load_file(tmp_path / "ddp" / "ir_projection.safetensors"), load_file(tmp_path / "one" / "ir_projection.safetensors")
    assert a.keys() == b.keys() == {"proj.0.weight"}
    torch.testing.assert_close(a["proj.0.weight"], b["proj.0.weight"], rtol=1e-4, atol=1e-6)
