"""Online teacher mode (`kdtrain run --online --teacher SPEC`): the teacher runs on each batch.

Offline KD trains from a stored top-k; some recipes need more of the teacher: torchtune-style
dense KD over the full vocabulary, and layer-mapped hidden-state ("IR") alignment, whose targets
would cost 8-16 KiB per token per layer to store. Both need the teacher during training.

* `OnlineTeacher.load(cfg, student)`: the teacher, frozen — eval mode, requires_grad False, its own
  dtype (--teacher-dtype) — after checking it shares the student's tokenizer and embedding rows
  (dense logits are compared id by id; another tokenizer is refused, pointing to the offline
  cross-tokenizer path) and that every --ir-layers pair exists in both models.
* `teacher_targets(inputs)`: runs the teacher under no_grad on a batch and returns, at the scored
  positions only, its final hidden states [N, H_t] (the logits are made tile by tile inside the
  loss, `kdtrain.dense.fused_dense_kd`) and its hidden states at the IR layers.
* `losses(...)`: called from the student's patched forward (`kdtrain.trainer.attach_kd_head`):
  dense KD + CE through both LM heads, plus `ir_weight * IR`.
* `IRAlign`: one bias-free linear projection per pair (student width -> teacher width) when the
  widths differ, else none. It belongs to the trainer, not the student: its own optimizer group,
  its gradients averaged over processes under DDP, saved as `ir_projection.safetensors` beside
  each checkpoint's weights and restored on resume. The student checkpoint stays a plain model.

The IR loss per position is the mean over pairs of (1 - cos(P s, t)) or mean((P s - t)^2), where
s and t are the outputs of the paired decoder blocks (0-based; `--ir-layers 1:5` aligns the output
of student block 1 with teacher block 5), taken at the same positions as the KD loss.

`online_examples`: the data. Teacher datasets give their prompts and completions (the teacher's
ids, or re-encoded when the dataset's tokenizer is another one); prompt files (any `kdcore.prompts`
source) give a prompt and a `completion` column (loss on the completion) or a lone text or chat
(loss on all of it).

Test: `pytest tests/test_kdtrain_online.py`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kdcore.artifacts import IR_PROJECTION
from kdcore.errors import KdError
from kdcore.io import write_bytes_atomic
from kdcore.prompts import encode_prompt, load_prompts, read_records
from kdcore.teacher import tokenizer_identity
from kdcore.teacher_data import TeacherData, same_tokenizer
from kdtrain.config import TrainConfig, parse_ir_layers
from kdtrain.data import Prepared, sequence_examples, text_examples
from kdtrain.dense import fused_dense_kd

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def decoder_blocks(model) -> nn.ModuleList:
    """The decoder blocks of a causal LM (`model.base_model.layers`)."""
    blocks = getattr(model.base_model, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise KdError(f"--ir-layers: {type(model).__name__} keeps no decoder blocks at model.layers")
    return blocks


class LayerTap:
    """Forward hooks recording the outputs of chosen decoder blocks while `capture()` is open.

    Only inside `capture()`: a gradient-checkpointing recompute in the backward pass runs the
    blocks again and must not overwrite (or keep alive) what the forward recorded.
    """

    def __init__(self, blocks: nn.ModuleList, layers: list[int]):
        self.outputs: dict[int, Tensor] = {}
        self._on = False
        for i in layers:
            blocks[i].register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, args, output):
            if self._on:
                self.outputs[i] = output[0] if isinstance(output, tuple) else output

        return hook

    @contextlib.contextmanager
    def capture(self):
        self.outputs, self._on = {}, True
        try:
            yield self.outputs
        finally:
            self._on = False


def ir_per_position(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """student, teacher: [N, H] (student already projected) -> [N] loss, computed in float32."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)
    if kind == "mse":
        return (s - t).square().mean(-1)
    raise ValueError(f"unknown IR loss {kind!r}")


class IRAlign(nn.Module):
    """Student -> teacher hidden-state alignment over layer pairs (see the module docstring)."""

    def __init__(self, pairs: list[tuple[int, int]], student_width: int, teacher_width: int, kind: str):
        super().__init__()
        self.pairs, self.kind = pairs, kind
        self.proj = (
            nn.ModuleList([nn.Linear(student_width, teacher_width, bias=False) for _ in pairs])
            if student_width != teacher_width
            else None
        )

    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        """student[j]: [N, H_s], teacher[j]: [N, H_t] for pair j -> [N] mean loss over pairs."""
        per = []
        for j, (s, t) in enumerate(zip(student, teacher)):
            if self.proj is not None:
                p = self.proj[j]
                s = p(s.to(p.weight.dtype))
            per.append(ir_per_position(s, t, self.kind))
        return torch.stack(per).mean(0)


def _text_config(model):
    return model.config.get_text_config()


@dataclass
class OnlineTeacher:
    """The frozen teacher, its layer taps, and the IR alignment owned by the trainer."""

    model: nn.Module
    origin: dict
    dtype: torch.dtype
    ir: IRAlign | None = None
    ir_weight: float = 0.0
    teacher_tap: LayerTap | None = None
    student_tap: LayerTap | None = None
    _softcap: float | None = field(default=None, repr=False)

    @classmethod
    def load(cls, cfg: TrainConfig, student) -> "OnlineTeacher":
        from kdtrain.student import load_model

        dtype = "auto" if cfg.teacher_dtype == "auto" else DTYPES[cfg.teacher_dtype]
        model, tok, identity = load_model(cfg.teacher, dtype)
        model.eval()
        model.requires_grad_(False)
        mine = tokenizer_identity(tok, 0)["tokenizer_hash"]
        theirs = tokenizer_identity(student.tokenizer, 0)["tokenizer_hash"]
        if mine != theirs:
            raise KdError(
                f"--online: the student's tokenizer differs from the teacher's ({cfg.teacher}); dense logit KD compares "
                f"the two distributions token id by token id. For a student with another tokenizer, write a teacher dataset "
                f"with `kdgen generate` and train offline without --online (cross-tokenizer KD)"
            )
        rows_t = model.get_output_embeddings().weight.shape[0]
        rows_s = student.model.get_output_embeddings().weight.shape[0]
        if rows_t != rows_s:
            raise KdError(
                f"--online: the teacher's LM head has {rows_t:,} rows and the student's {rows_s:,}; dense KD needs the same "
                f"rows (resize the student's embeddings to {rows_t:,}, or train offline from a teacher dataset)"
            )
        out = cls(model, {**identity, "dtype": str(model.dtype).removeprefix("torch.")}, model.dtype)
        out._softcap = getattr(_text_config(model), "final_logit_softcapping", None)
        if cfg.ir_layers:
            pairs = parse_ir_layers(cfg.ir_layers)
            n_s, n_t = len(decoder_blocks(student.model)), len(decoder_blocks(model))
            bad = [f"student layer {s} (the student has {n_s}: 0..{n_s - 1})" for s, _ in pairs if s >= n_s]
            bad += [f"teacher layer {t} (the teacher has {n_t}: 0..{n_t - 1})" for _, t in pairs if t >= n_t]
            if bad:
                raise KdError(f"--ir-layers {cfg.ir_layers}: out of range: {'; '.join(bad)}")
            torch.manual_seed(cfg.seed)
            width_s, width_t = _text_config(student.model).hidden_size, _text_config(model).hidden_size
            out.ir = IRAlign(pairs, width_s, width_t, cfg.ir_loss)
            out.ir_weight = cfg.ir_weight
            out.teacher_tap = LayerTap(decoder_blocks(model), [t for _, t in pairs])
        return out

    def attach_student(self, model) -> None:
        """Tap the student's IR blocks (called once the trainer holds the student, PEFT or not)."""
        if self.ir is not None:
            self.student_tap = LayerTap(decoder_blocks(model), [s for s, _ in self.ir.pairs])

    def to(self, device) -> "OnlineTeacher":
        self.model.to(device)
        if self.ir is not None:
            self.ir.to(device)
        return self

    def describe(self) -> dict:
        """What kd_config.json records."""
        ir = None
        if self.ir is not None:
            ir = {"pairs": self.ir.pairs, "loss": self.ir.kind, "weight": self.ir_weight, "projection": self.ir.proj is not None}
        return {"teacher": self.origin, "ir": ir}

    # -- per batch ---------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_targets(self, inputs: dict) -> dict[str, Tensor]:
        """Run the teacher on a batch; its hidden states at the scored positions.

        returns: teacher_hidden [N, H_t] (final, normed: the input of its LM head) and, with IR,
        teacher_ir_j [N, H_t] per pair j — N = label tokens of the batch, in the student's order.
        """
        mask = inputs["labels"][:, 1:] != -100
        tap = self.teacher_tap.capture() if self.teacher_tap is not None else contextlib.nullcontext({})
        with tap as taps:
            hidden = self.model.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).last_hidden_state
        out = {"teacher_hidden": hidden[:, :-1][mask]}
        if self.ir is not None:
            for j, (_, t) in enumerate(self.ir.pairs):
                out[f"teacher_ir_{j}"] = taps[t][:, :-1][mask]
        return out

    def losses(self, h: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, taps: dict, targets: dict, loss, softcap) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Inside the student's forward: dense KD + CE (+ IR). h: [N, H] student final hidden
        states at the scored positions; mask: [B, T-1] which positions those are.
        returns: (total, kd_sum, ce_sum, ir_sum); total = ce_w*ce + kd_w*kd + ir_w*ir."""
        t_weight = self.model.get_output_embeddings().weight
        total, kd_sum, ce_sum = fused_dense_kd(
            h, weight, targets["teacher_hidden"].to(h.device), t_weight, labels, loss.spec, loss.ce_weight, loss.kd_weight,
            loss.tile_size, softcap, self._softcap,
        )
        ir_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        if self.ir is not None:
            student = [taps[s][:, :-1][mask] for s, _ in self.ir.pairs]
            if torch.is_grad_enabled() and any(not x.requires_grad for x in student):
                raise KdError(
                    "--ir-layers: the student's block outputs carry no gradient (reentrant gradient checkpointing); "
                    "use non-reentrant checkpointing (the default) or drop --gradient-checkpointing"
                )
            teacher = [targets[f"teacher_ir_{j}"].to(h.device) for j in range(len(self.ir.pairs))]
            per = self.ir(student, teacher)
            ir_sum = per.sum()
            total = total + self.ir_weight * ir_sum
            ir_sum = ir_sum.detach()
        return total, kd_sum, ce_sum, ir_sum

    # -- the projection's training state -----------------------------------------------------

    def sync_ir_grads(self) -> None:
        """Average the projection's gradients over processes (DDP does it for the model only)."""
        if self.ir is None or self.ir.proj is None or not torch.distributed.is_initialized():
            return
        world = torch.distributed.get_world_size()
        for p in self.ir.parameters():
            if p.grad is not None and world > 1:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world

    def callback(self):
        """A TrainerCallback averaging the projection's gradients before each optimizer step."""
        from transformers import TrainerCallback

        online = self

        class SyncIR(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                online.sync_ir_grads()

        return SyncIR()

    def save_ir(self, folder: str) -> None:
        """ir_projection.safetensors in `folder` (atomic), when there is a projection."""
        if self.ir is None or self.ir.proj is None:
            return
        from safetensors.torch import save

        os.makedirs(folder, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.ir.state_dict().items()}
        write_bytes_atomic(None, os.path.join(folder, IR_PROJECTION), save(tensors, metadata={"pairs": str(self.ir.pairs)}))

    def load_ir(self, folder: str) -> None:
        """Restore the projection from a checkpoint (KdError when it is missing or of another shape)."""
        if self.ir is None or self.ir.proj is None:
            return
        from safetensors.torch import load_file

        path = Path(folder) / IR_PROJECTION
        if not path.is_file():
            raise KdError(f"resuming from {folder}: it holds no {IR_PROJECTION} (a run without this --ir-layers map); use a new --out or --no-resume")
        state = load_file(str(path))
        try:
            self.ir.load_state_dict({k: v.to(self.ir.proj[0].weight.device) for k, v in state.items()})
        except RuntimeError as e:
            raise KdError(f"resuming from {folder}: {IR_PROJECTION} does not fit --ir-layers {self.ir.pairs} ({str(e).splitlines()[0]}); use a new --out") from None


# ----------------------------------------------------------------------------------------------
# Data


def prompt_files(paths: list[str]) -> bool:
    """Whether --data names prompt files (online mode's plain data) rather than teacher datasets."""
    files = [Path(p).is_file() for p in paths]
    if any(files) and not all(files):
        raise KdError("--data: give either teacher datasets or prompt files, not both")
    return bool(files) and all(files)


def _prompt_file_sequences(path: str, tokenizer) -> tuple[list[np.ndarray], list[int]]:
    """A prompt file's rows as token sequences and the position where the loss starts."""
    keys = read_records(Path(path), "train")[:1]
    has_completion = bool(keys) and "completion" in keys[0]
    prompts, _ = load_prompts(path, completion_column="completion" if has_completion else None)
    seqs, starts = [], []
    for p in prompts:
        if p.completion is not None:
            head = encode_prompt(p, tokenizer)
            tail = tokenizer(p.completion, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                tail = tail + [tokenizer.eos_token_id]
        elif p.messages is not None:  # a whole conversation: learn all of it
            head, tail = [], tokenizer(tokenizer.apply_chat_template(p.messages, tokenize=False), add_special_tokens=False)["input_ids"]
        else:
            head, tail = [], tokenizer(p.text)["input_ids"]
        seqs.append(np.asarray(head + tail, np.int64))
        starts.append(len(head))
    return seqs, starts


def online_examples(cfg: TrainConfig, data: TeacherData | None, tokenizer, max_length: int) -> Prepared:
    """Training sequences for online mode: from teacher datasets (no top-k) or prompt files."""
    if data is not None:
        same = same_tokenizer(data.manifest, tokenizer, 0)
        return text_examples(data, tokenizer, same, max_length, cfg.overflow, cfg.limit)
    seqs: list[np.ndarray] = []
    starts: list[int] = []
    for path in cfg.data:
        s, st = _prompt_file_sequences(path, tokenizer)
        seqs += s
        starts += st
    if cfg.limit is not None:
        seqs, starts = seqs[: cfg.limit], starts[: cfg.limit]
    return sequence_examples(seqs, starts, max_length, cfg.overflow)
