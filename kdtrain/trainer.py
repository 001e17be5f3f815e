"""`KDTrainer`: TRL's `SFTTrainer` with the sparse KD loss in `compute_loss`.

Everything else — accelerate/DeepSpeed/FSDP, PEFT, bf16, gradient accumulation, checkpointing,
resume, `report_to` — is SFTTrainer's (each proven on CPU in tests/test_kdtrain_parallel.py and
tests/test_kdtrain_train.py). What this adds:

* `attach_kd_head(model)`: patches the model's forward so that
  `model(input_ids, attention_mask, kd_targets={...})` runs the backbone and returns the loss sums
  from `kdtrain.losses.fused_sparse_kd` (the loss is computed inside forward, so DDP/FSDP see a
  normal forward). Without `kd_targets` the forward is unchanged (generation, saving).
* `--targets sampled`: the batch's `target_weights` (counts / N of random-sampled teacher targets)
  make the KD term the sampled forward-KL estimate (`kdcore.divergences.sampled_fkl_per_token`).
* `compute_loss`: (ce_weight * ce_sum + kd_weight * kd_sum [+ span_weight * span_sum]) / num_items_in_batch, where
  num_items_in_batch counts the label tokens of the whole optimizer step (every micro-batch and
  every process), so gradient accumulation and data parallelism give the loss of the big batch.
  In text mode the same path runs with kd_weight = 0 and ce_weight = 1. With a cross-tokenizer
  batch (`span_ids` from `kdtrain.crosstok.CrossKDCollator`) the span-likelihood sum joins in.
* `--online` (`kdtrain.online.OnlineTeacher`): `compute_loss` runs the frozen teacher on the batch
  first; the patched forward then computes dense KD (`kdtrain.dense`) plus, with --ir-layers,
  ir_weight * ir_sum; the IR projection gets its own optimizer group and is saved beside every
  checkpoint and restored on resume.
* logs `ce`, `kd`, `span` (cross-tokenizer only), `ir` (online IR only), `total` (per-token means over the logging window) and `tokens_per_s`
  (sequence tokens, prompts included, per wall second, all processes).
* writes `kd_config.json` into every checkpoint.

Test: `pytest tests/test_kdtrain_train.py tests/test_kdtrain_parallel.py tests/test_kdtrain_online.py`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import types
from dataclasses import dataclass

import torch
from trl import SFTTrainer

from kdcore.artifacts import KD_CONFIG
from kdcore.divergences import SparseKD
from kdcore.io import write_bytes_atomic
from kdtrain.losses import fused_kd_losses



@dataclass
class KDLoss:
    """What compute_loss needs (built from the TrainConfig by `kdtrain.train`)."""

    spec: SparseKD
    ce_weight: float
    kd_weight: float
    tile_size: int = 0
    span_weight: float = 0.0  # span-likelihood term (cross-tokenizer batches only)
    top_k: int = 0  # use the first top_k of the stored (descending) top-k; 0 = all
    ir_weight: float = 0.0  # hidden-state alignment (online mode with --ir-layers only)


@dataclass
class KDOutput:
    total: torch.Tensor  # scalar, differentiable: ce_weight * ce_sum + kd_weight * kd_sum
    kd_sum: torch.Tensor  # scalar sums over the scored tokens (no grad)
    ce_sum: torch.Tensor
    n_tokens: torch.Tensor
    span_sum: torch.Tensor | None = None  # span-likelihood sum (cross-tokenizer batches)
    ir_sum: torch.Tensor | None = None  # hidden-state alignment sum (online mode)


def teacher_tails(kd_targets: dict, mask: torch.Tensor, top_k: int) -> torch.Tensor | None:
    """[N] the teacher's stored tail log-prob at the masked positions (None without one: derived in
    the loss). With --train-top-k N the entries after the N-th join the tail, as the loss's bucket would."""
    if "tail_logprobs" not in kd_targets:
        return None
    tails = kd_targets["tail_logprobs"][:, 1:][mask].double()
    if top_k:
        rest = kd_targets["topk_logprobs"][:, 1:, top_k:][mask].double()
        tails = torch.logaddexp(tails, torch.logsumexp(rest, -1)) if rest.shape[-1] else tails
    return tails


def attach_kd_head(model, loss: KDLoss, online=None) -> None:
    """Patch `model.forward` (a causal LM, before or under PEFT) to accept `kd_targets`.
    With `online` (a `kdtrain.online.OnlineTeacher`), the targets hold the teacher's hidden
    states and the loss is dense KD (+ IR alignment) instead of the sparse one."""
    if online is not None:
        online.attach_student(model)
    inner = model.forward
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)

    @functools.wraps(type(model).forward)  # keeps the signature: Trainer and generate inspect it
    def forward(self, *args, kd_targets: dict | None = None, **kwargs):
        if kd_targets is None:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        kwargs.pop("labels", None)
        kwargs.pop("num_items_in_batch", None)
        # looked up per call: PEFT and FSDP replace the backbone and head after patching
        tap = online.student_tap.capture() if online is not None and online.student_tap is not None else contextlib.nullcontext({})
        with tap as taps:
            hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = kd_targets["labels"][:, 1:]
        mask = labels != -100
        weight = self.get_output_embeddings().weight
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: a head sharded in a unit of its own (accelerate's is whole here)
            weight = weight.full_tensor()
        h = hidden[mask].to(weight.device)
        if online is not None:
            total, kd_sum, ce_sum, ir_sum = online.losses(h, weight, labels[mask].to(h.device), mask, taps, kd_targets, loss, softcap)
            return KDOutput(total, kd_sum, ce_sum, mask.sum(), ir_sum=ir_sum)
        if "topk_ids" in kd_targets and loss.kd_weight:
            keep = slice(None, loss.top_k or None)  # stored best first: the first N are the top-N
            ids = kd_targets["topk_ids"][:, 1:, keep][mask].long()
            lps = kd_targets["topk_logprobs"][:, 1:, keep][mask].float()
            tails = teacher_tails(kd_targets, mask, loss.top_k)
        else:
            ids = torch.zeros((h.shape[0], 0), dtype=torch.long, device=h.device)
            lps = torch.zeros((h.shape[0], 0), dtype=torch.float32, device=h.device)
            tails = None
        weights = None
        if "target_weights" in kd_targets and loss.kd_weight:  # --targets sampled: ids/log-probs are the draws
            weights = kd_targets["target_weights"][:, 1:][mask].float().to(h.device)
        label_lps = None
        if "token_logprobs" in kd_targets and loss.kd_weight:  # student rows: --loss sampled_rkl
            label_lps = kd_targets["token_logprobs"][:, 1:][mask].float().to(h.device)
        span_ids = span_lps = None
        if "span_ids" in kd_targets and loss.span_weight:
            span_ids = kd_targets["span_ids"][:, 1:][mask].to(h.device)
            span_lps = kd_targets["span_logprobs"].reshape(-1).float().to(h.device)
        total, kd_sum, ce_sum, span_sum = fused_kd_losses(
            h, weight, labels[mask].to(h.device), ids, lps, loss.spec, loss.ce_weight, loss.kd_weight, loss.tile_size, softcap,
            span_ids, span_lps, loss.span_weight, tails, label_lps, weights,
        )
        return KDOutput(total, kd_sum, ce_sum, mask.sum(), span_sum)

    model.forward = types.MethodType(forward, model)


class KDTrainer(SFTTrainer):
    """SFTTrainer whose loss is `KDLoss` (see the module docstring)."""

    def __init__(self, *args, kd_loss: KDLoss, kd_record: dict | None = None, online=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_loss = kd_loss
        self.kd_record = kd_record or {}
        self.online = online.to(self.args.device) if online is not None else None  # kdtrain.online.OnlineTeacher
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        attach_kd_head(base, kd_loss, self.online)
        if self.online is not None:
            self.add_callback(self.online.callback())
        self._kd_acc = torch.zeros(6, dtype=torch.float64)  # kd_sum, ce_sum, label tokens, sequence tokens, span_sum, ir_sum
        self._kd_clock: float | None = None  # started by the first training micro-batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = {k: inputs[k] for k in ("labels", "topk_ids", "topk_logprobs", "tail_logprobs", "token_logprobs", "target_weights", "span_ids", "span_logprobs") if k in inputs}
        if self.online is not None:
            targets.update(self.online.teacher_targets(inputs))
        out: KDOutput = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], kd_targets=targets)
        denom = out.n_tokens.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = out.total / denom
        # like SFTTrainer: num_items_in_batch counts every process's tokens and DDP averages gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if self.model.training:
            if self._kd_clock is None:
                self._kd_clock = time.perf_counter()
            self._kd_acc += torch.stack(
                [
                    out.kd_sum.detach().double().cpu(),
                    out.ce_sum.detach().double().cpu(),
                    out.n_tokens.double().cpu(),
                    inputs["attention_mask"].sum().double().cpu(),
                    (out.span_sum if out.span_sum is not None else out.kd_sum.new_zeros(())).detach().double().cpu(),
                    (out.ir_sum if out.ir_sum is not None else out.kd_sum.new_zeros(())).detach().double().cpu(),
                ]
            )
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            acc = self.accelerator.reduce(self._kd_acc.to(self.accelerator.device), reduction="sum").cpu()
            now = time.perf_counter()
            n = max(acc[2].item(), 1.0)
            kd, ce = acc[0].item() / n, acc[1].item() / n
            logs["kd"] = round(kd, 6)
            logs["ce"] = round(ce, 6)
            span = acc[4].item() / n
            if self.kd_loss.span_weight:
                logs["span"] = round(span, 6)
            ir = acc[5].item() / n
            if self.kd_loss.ir_weight:
                logs["ir"] = round(ir, 6)
            logs["total"] = round(self.kd_loss.ce_weight * ce + self.kd_loss.kd_weight * kd + self.kd_loss.span_weight * span + self.kd_loss.ir_weight * ir, 6)
            logs["tokens_per_s"] = round(acc[3].item() / max(now - (self._kd_clock or now), 1e-9), 1)
            self._kd_acc.zero_()
            self._kd_clock = now
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
            write_kd_config(folder, {**self.kd_record, "global_step": self.state.global_step})
            if self.online is not None:
                self.online.save_ir(folder)

    # the online IR projection is trained beside the model (kdtrain.online): its own optimizer
    # group, gradients averaged over processes before each step, state restored on resume

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        ir = self.online.ir if self.online is not None else None
        if ir is not None and ir.proj is not None and not any(p is q for g in optimizer.param_groups for p in g["params"] for q in ir.parameters()):
            optimizer.add_param_group({"params": list(ir.parameters()), "weight_decay": 0.0})
        return optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.online is not None:
            self.online.load_ir(resume_from_checkpoint)


def write_kd_config(folder: str, record: dict) -> None:
    """kd_config.json beside a checkpoint: resolved config, datasets and fingerprints (atomic)."""
    os.makedirs(folder, exist_ok=True)
    write_bytes_atomic(None, os.path.join(folder, KD_CONFIG), json.dumps(record, indent=2, default=str))
