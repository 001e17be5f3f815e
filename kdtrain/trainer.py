"""`KDTrainer`: TRL's `SFTTrainer` with the sparse KD loss in `compute_loss`.

Everything else — accelerate/DeepSpeed/FSDP, PEFT, bf16, gradient accumulation, checkpointing,
resume, `report_to` — is SFTTrainer's (each proven on CPU in tests/test_kdtrain_parallel.py and
tests/test_kdtrain_train.py). What this adds:

* `attach_kd_head(model)`: patches the model's forward so that
  `model(input_ids, attention_mask, kd_targets={...})` runs the backbone and returns the loss sums
  from `kdtrain.losses.fused_sparse_kd` (the loss is computed inside forward, so DDP/FSDP see a
  normal forward). Without `kd_targets` the forward is unchanged (generation, saving).
* `compute_loss`: (ce_weight * ce_sum + kd_weight * kd_sum [+ span_weight * span_sum]) / num_items_in_batch, where
  num_items_in_batch counts the label tokens of the whole optimizer step (every micro-batch and
  every process), so gradient accumulation and data parallelism give the loss of the big batch.
  In text mode the same path runs with kd_weight = 0 and ce_weight = 1. With a cross-tokenizer
  batch (`chunk_ids` from `kdtrain.crosstok.CrossKDCollator`) the chunk-likelihood sum joins in.
* logs `ce`, `kd`, `chunk` (cross-tokenizer only), `total` (per-token means over the logging window) and `tokens_per_s`
  (sequence tokens, prompts included, per wall second, all processes).
* writes `kd_config.json` into every checkpoint.

Test: `pytest tests/test_kdtrain_train.py tests/test_kdtrain_parallel.py`.
"""

from __future__ import annotations

import functools
import json
import os
import time
import types
from dataclasses import dataclass

import torch
from trl import SFTTrainer

from kdcore.divergences import SparseKD
from kdtrain.losses import fused_kd_losses

KD_CONFIG = "kd_config.json"


@dataclass
class KDLoss:
    """What compute_loss needs (built from the TrainConfig by `kdtrain.train`)."""

    spec: SparseKD
    ce_weight: float
    kd_weight: float
    chunk_size: int = 0
    span_weight: float = 0.0  # chunk-likelihood term (cross-tokenizer batches only)
    top_k: int = 0  # use the first top_k of the stored (descending) top-k; 0 = all


@dataclass
class KDOutput:
    total: torch.Tensor  # scalar, differentiable: ce_weight * ce_sum + kd_weight * kd_sum
    kd_sum: torch.Tensor  # scalar sums over the scored tokens (no grad)
    ce_sum: torch.Tensor
    n_tokens: torch.Tensor
    span_sum: torch.Tensor | None = None  # chunk-likelihood sum (cross-tokenizer batches)


def attach_kd_head(model, loss: KDLoss) -> None:
    """Patch `model.forward` (a causal LM, before or under PEFT) to accept `kd_targets`."""
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
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = kd_targets["labels"][:, 1:]
        mask = labels != -100
        weight = self.get_output_embeddings().weight
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: a head sharded in a unit of its own (accelerate's is whole here)
            weight = weight.full_tensor()
        h = hidden[mask].to(weight.device)
        if "topk_ids" in kd_targets and loss.kd_weight:
            keep = slice(None, loss.top_k or None)  # stored best first: the first N are the top-N
            ids = kd_targets["topk_ids"][:, 1:, keep][mask].long()
            lps = kd_targets["topk_logprobs"][:, 1:, keep][mask].float()
        else:
            ids = torch.zeros((h.shape[0], 0), dtype=torch.long, device=h.device)
            lps = torch.zeros((h.shape[0], 0), dtype=torch.float32, device=h.device)
        label_lps = None
        if "token_logprobs" in kd_targets and loss.kd_weight:  # student rows: --loss sampled_rkl
            label_lps = kd_targets["token_logprobs"][:, 1:][mask].float().to(h.device)
        span_ids = span_lps = None
        if "chunk_ids" in kd_targets and loss.span_weight:
            span_ids = kd_targets["chunk_ids"][:, 1:][mask].to(h.device)
            span_lps = kd_targets["chunk_logprobs"].reshape(-1).float().to(h.device)
        total, kd_sum, ce_sum, span_sum = fused_kd_losses(
            h, weight, labels[mask].to(h.device), ids, lps, loss.spec, loss.ce_weight, loss.kd_weight, loss.chunk_size, softcap,
            span_ids, span_lps, loss.span_weight, label_lps,
        )
        return KDOutput(total, kd_sum, ce_sum, mask.sum(), span_sum)

    model.forward = types.MethodType(forward, model)


class KDTrainer(SFTTrainer):
    """SFTTrainer whose loss is `KDLoss` (see the module docstring)."""

    def __init__(self, *args, kd_loss: KDLoss, kd_record: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_loss = kd_loss
        self.kd_record = kd_record or {}
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        attach_kd_head(base, kd_loss)
        self._kd_acc = torch.zeros(5, dtype=torch.float64)  # kd_sum, ce_sum, label tokens, sequence tokens, span_sum
        self._kd_clock: float | None = None  # started by the first training micro-batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = {k: inputs[k] for k in ("labels", "topk_ids", "topk_logprobs", "token_logprobs", "chunk_ids", "chunk_logprobs") if k in inputs}
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
                logs["chunk"] = round(span, 6)
            logs["total"] = round(self.kd_loss.ce_weight * ce + self.kd_loss.kd_weight * kd + self.kd_loss.span_weight * span, 6)
            logs["tokens_per_s"] = round(acc[3].item() / max(now - (self._kd_clock or now), 1e-9), 1)
            self._kd_acc.zero_()
            self._kd_clock = now
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
            write_kd_config(folder, {**self.kd_record, "global_step": self.state.global_step})


def write_kd_config(folder: str, record: dict) -> None:
    """kd_config.json beside a checkpoint: resolved config, datasets and fingerprints (atomic)."""
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{KD_CONFIG}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(tmp, os.path.join(folder, KD_CONFIG))
