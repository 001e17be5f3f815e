"""The TRL features `kdtrain run` claims, proven on CPU (issue 3): bf16 (torch CPU autocast),
gradient checkpointing (the same gradients, reentrant or not, with LoRA), `--report-to tensorboard`,
clear errors for loggers and launches that cannot work, and — marked slow — several processes:
two-process DDP over gloo, FSDP2 and DeepSpeed ZeRO-2, each checkpoint equal to the DDP one.

accelerate (1.15) runs FSDP and DeepSpeed only on GPU-like devices: on CPU it drops the FSDP plugin
(plain DDP) and gives DeepSpeed no process group of its own. kdtrain refuses such launches with one
line (tested). The slow tests launch through `SHIM`, which flips exactly that device check, so the
rest — sharding, gathering the full state dict at save, ZeRO-2's partitioned optimizer — is the real
code path. DeepSpeed is not a dependency: its test runs where `import deepspeed` works.

    pytest tests/test_kdtrain_parallel.py -m "not slow"    # ~1 min here
    pytest tests/test_kdtrain_parallel.py -m slow          # the multi-process launches
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from kdcore.errors import KdError
from kdtrain_helpers import grads_after_one_step, train_cfg

LAUNCH_FLAGS = ["max_steps=3", "batch_size=2", "logging_steps=1", "save_steps=2", "lr=3e-3"]

# accelerate gives the FSDP plugin / the DeepSpeed process group only to GPU-like process groups;
# this launcher hands them to the CPU (gloo) group and runs `kdtrain`.
SHIM = """
import os, sys
from accelerate import state
from accelerate.utils import DistributedType

accelerator_init, prepare_backend = state.AcceleratorState.__init__, state.PartialState._prepare_backend

def init(self, *args, fsdp_plugin=None, **kwargs):
    accelerator_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = plugin

def backend(self, cpu=False, sagemaker_dp=False, backend=None):
    name, kind = prepare_backend(self, cpu, sagemaker_dp, backend)
    if name is None and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        name = "gloo"  # what DeepSpeed's CPU accelerator uses
    return name, kind

state.AcceleratorState.__init__, state.PartialState._prepare_backend = init, backend
sys.argv[0] = "kdtrain"
from kdtrain.cli import main
main()
"""

# FSDP2 with the LM head a shard unit of its own (accelerate groups it with the final norm, so there
# the head's weight is whole again when the loss runs): the patched forward gets a DTensor weight,
# gathers it with full_tensor(), and the sharded gradients equal the unsharded model's.
DTENSOR_CHECK = """
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
import kdtrain.trainer as trainer
from kdcore.divergences import SparseKD

dist.init_process_group("gloo")
used = []
fused = trainer.fused_kd_losses
trainer.fused_kd_losses = lambda h, w, *a: used.append((type(w), tuple(w.shape))) or fused(h, w, *a)
loss = trainer.KDLoss(SparseKD(loss="jsd", tail="bucket", temperature=2.0, alpha=0.1, beta=0.5), ce_weight=0.5, kd_weight=1.0)
torch.manual_seed(0)
ids = torch.randint(0, 4000, (2, 12))
labels = ids.masked_fill(torch.arange(12) < 4, -100)
topk = torch.randint(0, 4000, (2, 12, 4))
lps = torch.log_softmax(torch.randn(2, 12, 5), -1)[..., :4].sort(-1, descending=True).values
targets = {"labels": labels, "topk_ids": topk, "topk_logprobs": lps}
models = [AutoModelForCausalLM.from_pretrained(sys.argv[1]) for _ in range(2)]
for m in models:
    trainer.attach_kd_head(m, loss)
sharded, whole = models
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for unit in [*sharded.model.layers, sharded.lm_head, sharded]:
    fully_shard(unit, mesh=mesh)
assert isinstance(sharded.lm_head.weight, DTensor)
for m in models:
    m(input_ids=ids, attention_mask=torch.ones_like(ids), kd_targets=targets).total.backward()
assert used[0] == (torch.Tensor, tuple(whole.lm_head.weight.shape)), used  # gathered, then whole
for (name, p), q in zip(sharded.named_parameters(), whole.parameters()):
    torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6, msg=name)
dist.destroy_process_group()
"""


def _launch(world, out: Path, launcher: list[str], script: list[str], flags: list[str] = ()) -> dict:
    """`accelerate launch <launcher> <script> run ...` on the world's dataset; the final kd_config.json."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "KD_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        *launcher, *script, "run", "--data", world["data"], "--student", world["student"], "--out", str(out), *flags, *LAUNCH_FLAGS,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((out / "kd_config.json").read_text())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def _same_model_as(out: Path, reference: Path) -> None:
    """The checkpoint at `out` loads in transformers and equals `reference`'s (same keys, finite)."""
    from transformers import AutoModelForCausalLM

    got, want = _weights(out), _weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


# ----------------------------------------------------------------------------------------------


def test_bf16_trains_on_cpu_under_autocast(world, tmp_path):
    """--bf16 on CPU: the forward runs in bfloat16 (autocast), the first loss is the fp32 one to 1%,
    weights stay float32, and the checkpoints reload in transformers."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    from kdtrain.train import run

    dtypes: set = set()

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **_):
            model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))

    first = {}
    for bf16 in (False, True):
        out = tmp_path / f"bf16-{bf16}"
        run(train_cfg(world, out, bf16=bf16, max_steps=2, logging_steps=1, save_steps=2), callbacks=[Watch()] if bf16 else None)
        record = json.loads((out / "kd_config.json").read_text())
        first[bf16] = record["log_history"][0]["loss"]
    assert dtypes == {torch.bfloat16}
    assert record["config"]["bf16"] and (out / "checkpoint-2" / "kd_config.json").exists()
    assert math.isfinite(first[True]) and first[True] == pytest.approx(first[False], rel=1e-2)
    assert first[True] != first[False]  # bf16 arithmetic did run
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_gradient_checkpointing_gives_the_same_gradients(world, tmp_path, monkeypatch):
    """--gradient-checkpointing: the KD loss is computed inside the patched forward; recomputing the
    decoder blocks in backward (non-reentrant: the transformers default; reentrant: what TRL forces
    for PEFT + ZeRO-3) leaves one step's gradients unchanged, with and without LoRA."""
    from transformers.models.llama import modeling_llama

    import kdtrain.train as train

    calls = []
    block_forward = modeling_llama.LlamaDecoderLayer.forward
    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", lambda self, *a, **k: calls.append(1) or block_forward(self, *a, **k))
    make_args = train.training_args

    def grads(name: str, checkpointing_kwargs: dict | None = None, **kw) -> dict[str, torch.Tensor]:
        def args(cfg):
            a = make_args(cfg)
            a.gradient_checkpointing_kwargs = checkpointing_kwargs
            return a

        monkeypatch.setattr(train, "training_args", args)
        calls.clear()
        g = grads_after_one_step(world, tmp_path / name, **kw)
        assert len(calls) == (2 if kw.get("gradient_checkpointing") else 1), name  # the 1-block student's forward, + its recompute
        return g

    for lora in ({}, {"lora": True, "lora_r": 4}):
        plain = grads("plain", **lora)
        for kwargs in ([None, {"use_reentrant": True}] if not lora else [{"use_reentrant": True}]):
            checkpointed = grads("gc", kwargs, gradient_checkpointing=True, **lora)
            assert checkpointed.keys() == plain.keys() and plain
            for name in plain:
                torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-9, msg=f"{name} {kwargs} {lora}")


def test_report_to_tensorboard(world, tmp_path):
    """--report-to tensorboard writes an event file with the kd / ce / total / tokens_per_s scalars."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdtrain.train import run

    out = tmp_path / "tb"
    run(train_cfg(world, out, report_to="tensorboard", max_steps=2, logging_steps=1, save_steps=100))
    events = list(out.glob("runs/*/events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    history = json.loads((out / "kd_config.json").read_text())["log_history"]
    for key in ("kd", "ce", "total", "tokens_per_s", "loss"):
        logged = [e.value for e in acc.Scalars(f"train/{key}")]
        assert logged == pytest.approx([h[key] for h in history], rel=1e-5), key


def test_launch_and_logger_errors_are_one_line(world, tmp_path, monkeypatch):
    """What cannot work fails before the data loads, naming the flag — or, for a launch accelerate
    did not set up as asked, before training starts."""
    from transformers.integrations import integration_utils

    from kdtrain.train import build_trainer

    with pytest.raises(KdError, match="--report-to nosuch: unknown logger"):
        build_trainer(train_cfg(world, tmp_path / "o", report_to="nosuch"))
    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: [])
    with pytest.raises(KdError, match=r"--report-to tensorboard: its package is not installed here \(pip install tensorboard\)"):
        build_trainer(train_cfg(world, tmp_path / "o", report_to="tensorboard"))
    with pytest.raises(KdError, match="--deepspeed .*: no such file"):
        build_trainer(train_cfg(world, tmp_path / "o", deepspeed=str(tmp_path / "ds.json")))
    if importlib.util.find_spec("deepspeed") is None:
        (tmp_path / "ds.json").write_text("{}")
        with pytest.raises(KdError, match="the deepspeed package is not installed"):
            build_trainer(train_cfg(world, tmp_path / "o", deepspeed=str(tmp_path / "ds.json")))
    # `accelerate launch --use_fsdp` on CPU: accelerate drops FSDP; kdtrain says so instead of training without it
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(KdError, match=r"FSDP requested, but accelerate set up NO over 1 process\(es\) on cpu: .* --multi_gpu"):
        build_trainer(train_cfg(world, tmp_path / "o"))


# ---------------------------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def ddp_run(world, tmp_path_factory) -> Path:
    """Two-process DDP over gloo: `accelerate launch --multi_gpu` (the only launcher that starts N
    processes on CPU; `--cpu` starts one unless given an MPI hostfile)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    record = _launch(world, out, ["--multi_gpu"], ["-m", "kdtrain"])
    # 12 rows, 2 processes x 2 per step: one epoch in 3 steps (one process would be at 0.5)
    assert [h["epoch"] for h in record["log_history"]] == pytest.approx([1 / 3, 2 / 3, 1.0])
    return out


@pytest.mark.slow
def test_two_process_ddp_cpu(ddp_run):
    record = json.loads((ddp_run / "kd_config.json").read_text())
    assert record["global_step"] == 3 and (ddp_run / "checkpoint-2" / "kd_config.json").exists()
    _same_model_as(ddp_run, ddp_run)


@pytest.mark.slow
def test_fsdp2_two_processes(world, ddp_run, tmp_path):
    """FSDP2 (decoder blocks, embeddings and head sharded) trains to DDP's losses and weights; the full
    state dict gathered at save loads in transformers."""
    (tmp_path / "launch.py").write_text(SHIM)
    fsdp = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_state_dict_type", "FULL_STATE_DICT"]
    record = _launch(world, tmp_path / "fsdp", fsdp, [str(tmp_path / "launch.py")])
    ddp = json.loads((ddp_run / "kd_config.json").read_text())
    assert [h["loss"] for h in record["log_history"]] == pytest.approx([h["loss"] for h in ddp["log_history"]], rel=1e-5)
    assert (tmp_path / "fsdp" / "checkpoint-2" / "model.safetensors").exists()
    _same_model_as(tmp_path / "fsdp", ddp_run)


@pytest.mark.slow
def test_fsdp2_dtensor_head_weight(world, tmp_path):
    (tmp_path / "check.py").write_text(DTENSOR_CHECK)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(tmp_path / "check.py"), world["student"]]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.slow
def test_deepspeed_zero2_two_processes(world, ddp_run, tmp_path):
    """ZeRO-2 on DeepSpeed's CPU accelerator (gloo). deepspeed is not a dependency: skipped without it
    (its first run JIT-compiles a shared-memory op, a few minutes)."""
    pytest.importorskip("deepspeed")
    (tmp_path / "launch.py").write_text(SHIM)
    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    (tmp_path / "zero2.json").write_text(json.dumps(config))
    ddp = json.loads((ddp_run / "kd_config.json").read_text())
    record = _launch(world, tmp_path / "ds", ["--multi_gpu"], [str(tmp_path / "launch.py")], ["--deepspeed", str(tmp_path / "zero2.json")])
    assert [h["loss"] for h in record["log_history"]] == pytest.approx([h["loss"] for h in ddp["log_history"]], rel=1e-5)
    assert (tmp_path / "ds" / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own (partitioned) state
    _same_model_as(tmp_path / "ds", ddp_run)
