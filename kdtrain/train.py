"""`kdtrain run`: teacher dataset(s) in, a trained student (standard HF checkpoint) out.

    run(cfg): validate -> open + verify datasets -> build student -> tokenizer checks
              (--online: load the frozen teacher, `kdtrain.online`) -> examples (truncate /
              refuse; a different student tokenizer: cross-tokenizer examples, `kdtrain.crosstok`)
              -> KDTrainer -> train (resume from the newest
              checkpoint in --out) -> save the final checkpoint (LoRA merged) + kd_config.json

Every checkpoint (checkpoint-N/ and the final one at --out) carries `kd_config.json`: the resolved
config, the datasets with their fingerprints, how the student was made, the tokenizer relation.

Test: `pytest tests/test_kdtrain_train.py` (end to end on CPU, with resume), `tests/test_kdtrain_parallel.py`
(bf16, gradient checkpointing, report_to, DDP / FSDP / DeepSpeed launches).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

from kdcore.errors import KdError, collect
from kdcore.io import now_iso
from kdcore.progress import console, logged, quiet
from kdtrain import __version__
from kdtrain.config import TrainConfig, validate
from kdcore.crosstok import CrossTok, load_teacher_tokenizer
from kdcore.divergences import SAMPLED_RKL
from kdcore.teacher_data import TeacherData, open_teacher_data, same_tokenizer
from kdtrain.crosstok import CrossKDCollator, crosstok_examples
from kdtrain.data import KDCollator, logit_examples, text_examples, to_hf_dataset
from kdtrain.online import OnlineTeacher, online_examples, prompt_files
from kdtrain.student import Student, build_student, teacher_spec
from kdcore.artifacts import KD_CONFIG
from kdtrain.trainer import KDLoss, KDTrainer, write_kd_config


def check_tokenizers(cfg: TrainConfig, data: TeacherData, student: Student) -> bool:
    """Whether the tokenizers match; KdError where the student cannot embed its own tokens."""
    same = same_tokenizer(data.manifest, student.tokenizer, student.embedding_rows)
    if cfg.mode == "logit" and same and cfg.kd_weight == 0 and cfg.ce_weight == 0:
        raise KdError("--kd-weight and --ce-weight are both 0: nothing to train on (--span-ll-weight applies only to a student with a different tokenizer)")
    if not same and cfg.mode == "logit" and student.embedding_rows < len(student.tokenizer):
        raise KdError(
            f"the student has {student.embedding_rows:,} embedding rows but its tokenizer has {len(student.tokenizer):,} "
            f"tokens; resize the student's embeddings first"
        )
    if cfg.loss == SAMPLED_RKL and not same:
        raise KdError(f"--loss {SAMPLED_RKL} needs the student to share the teacher's tokenizer (it compares both log-probs of the same sampled token)")
    if cfg.targets == "sampled" and cfg.mode == "logit":
        if not same:
            raise KdError("--targets sampled needs a student with the teacher's tokenizer (the draws are teacher ids; cross-tokenizer KD maps only the top-k); use --targets topk")
    if cfg.train_top_k > data.k:
        raise KdError(f"--train-top-k {cfg.train_top_k} exceeds the k={data.k} stored in the dataset; use at most {data.k} (0 = all)")
    if cfg.train_top_k and cfg.mode == "logit" and not same:
        raise KdError("--train-top-k applies to a student with the teacher's tokenizer; leave it at 0 for cross-tokenizer KD")
    if same and student.embedding_rows < len(student.tokenizer):
        raise KdError(
            f"the student has {student.embedding_rows:,} embedding rows but its tokenizer has {len(student.tokenizer):,} "
            f"tokens; resize the student's embeddings first"
        )
    return same


def check_targets(cfg: TrainConfig, data: TeacherData) -> None:
    """--targets sampled needs datasets made with --sampled-targets (checked before the student loads)."""
    without = [d.url for d in data.datasets if not d.sampled_targets]
    if cfg.targets == "sampled" and cfg.mode == "logit" and without:
        raise KdError(
            f"--targets sampled: --data {without[0]} has no sampled targets (made without --sampled-targets); "
            f"add them with `kdgen score --prompts {without[0]} --backend hf --sampled-targets 32`, or use --targets topk"
        )


def build_crosstok(cfg: TrainConfig, data: TeacherData, student: Student) -> CrossTok:
    """The teacher's tokenizer (--teacher, else the manifest's path) and the vocabulary map."""
    teacher_tok = load_teacher_tokenizer(teacher_spec(cfg, data.manifest), data.manifest)
    rows = data.manifest["tokenizer"].get("embedding_rows")
    return CrossTok.build(teacher_tok, student.tokenizer, cfg.vocab_match, rows)


def fit_length(cfg: TrainConfig, student: Student) -> int:
    if cfg.max_length is None:
        return student.context
    if cfg.max_length > student.context:
        raise KdError(f"--max-length {cfg.max_length} exceeds the student's context ({student.context} tokens); lower it")
    return cfg.max_length


def report_targets(cfg: TrainConfig) -> list[str]:
    """--report-to as transformers' list of loggers; KdError for an unknown or uninstalled one
    (transformers would raise only after the data and the student are loaded)."""
    from transformers.integrations import integration_utils as hf

    names = [r.strip() for r in cfg.report_to.split(",") if r.strip() and r.strip() != "none"]
    if names == ["all"]:
        return names
    known, available = hf.INTEGRATION_TO_CALLBACK, hf.get_available_reporting_integrations()
    p = [f"--report-to {r}: unknown logger; choose from none, all, {', '.join(known)}" for r in names if r not in known]
    # flyte is the one logger transformers cannot check for
    p += [f"--report-to {r}: its package is not installed here (pip install {r})" for r in names if r in known and r not in available and r != "flyte"]
    collect(p)
    return names


def check_deepspeed(cfg: TrainConfig) -> None:
    if not cfg.deepspeed:
        return
    if not Path(cfg.deepspeed).is_file():
        raise KdError(f"--deepspeed {cfg.deepspeed}: no such file (expected a DeepSpeed JSON config)")
    if importlib.util.find_spec("deepspeed") is None:
        raise KdError(f"--deepspeed {cfg.deepspeed}: the deepspeed package is not installed here (pip install deepspeed)")


def check_parallel(trainer: KDTrainer, cfg: TrainConfig) -> None:
    """Refuse a launch that accelerate did not set up as asked. Without GPUs accelerate (1.15)
    ignores FSDP (it trains DDP) and gives DeepSpeed no process group of its own (each rank thinks it
    is alone; DeepSpeed then fails on a batch-size assert). README, "Precision, logging, several processes"."""
    state = trainer.accelerator.state
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    deepspeed = bool(cfg.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    wrong = [f"{name} requested" for name, asked, got in (("FSDP", fsdp, trainer.is_fsdp_enabled), ("DeepSpeed", deepspeed, trainer.is_deepspeed_enabled)) if asked and not got]
    if launched != state.num_processes:
        wrong.append(f"{launched} processes launched")
    if wrong:
        raise KdError(
            f"{' and '.join(wrong)}, but accelerate set up {state.distributed_type.value} over {state.num_processes} "
            f"process(es) on {state.device.type}: it runs FSDP and DeepSpeed only on GPUs (or XPU/NPU/HPU). "
            f"On CPU use `accelerate launch --multi_gpu --num_processes N -m kdtrain run ...` (DDP over gloo)"
        )


def training_args(cfg: TrainConfig):
    """TRL's SFTConfig from a kdtrain config."""
    from trl import SFTConfig

    check_deepspeed(cfg)
    return SFTConfig(
        output_dir=cfg.out,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        # no GPU: say so. Else transformers refuses --bf16 ("doesn't support bf16/gpu") and, under
        # torchrun (`accelerate launch --multi_gpu`), every rank trains alone. With it: DDP over gloo,
        # and --bf16 runs the forward under torch's CPU autocast (weights and optimizer stay float32).
        # Not with --deepspeed: transformers would then skip DeepSpeed.
        use_cpu=not torch.accelerator.is_available() and not cfg.deepspeed,
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=report_targets(cfg) or "none",
        deepspeed=cfg.deepspeed,
        dataloader_num_workers=cfg.dataloader_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=quiet() or logged(),  # a log file gets plain lines (LogLines), not tqdm's \r-redrawn bar
        # our collator pads the teacher arrays; SFTTrainer must neither tokenise nor drop columns
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        max_length=None,
        packing=False,
    )


def lora_config(cfg: TrainConfig):
    if not cfg.lora:
        return None
    from peft import LoraConfig

    targets = "all-linear" if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")


def last_checkpoint(out: str) -> str | None:
    """The newest *complete* checkpoint-N in `out`. A kill while saving leaves a checkpoint-N
    without trainer_state.json or kd_config.json (written last); resuming from it fails or silently
    drops optimizer state, so it is skipped (tests/test_kdgen_crash.py kills `kdtrain run`)."""
    if not os.path.isdir(out):
        return None
    steps = [
        int(name.split("-")[1])
        for name in os.listdir(out)
        if re.fullmatch(r"checkpoint-\d+", name)
        and all(os.path.isfile(os.path.join(out, name, f)) for f in ("trainer_state.json", KD_CONFIG))
    ]
    return os.path.join(out, f"checkpoint-{max(steps)}") if steps else None


def log_lines():
    """A callback printing one line per logging step to stderr: `step 20/64 (31%): loss 4.618, ..., 1.9 min`."""
    import time

    from transformers import TrainerCallback

    class LogLines(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items() if k != "total_flos")
            total = max(state.max_steps, 1)
            minutes = (time.perf_counter() - getattr(self, "start", time.perf_counter())) / 60
            console.print(f"step {state.global_step}/{total} ({100 * state.global_step // total}%): {shown}, {minutes:.1f} min")

    return LogLines()


def build_trainer(cfg: TrainConfig, callbacks: list | None = None) -> KDTrainer:
    """Everything up to the training loop (also used by the benchmark)."""
    from accelerate import PartialState

    validate(cfg)
    args = training_args(cfg)  # its problems (--report-to, --deepspeed) before the data loads
    if quiet() or logged():  # transformers' own bars (loading, saving) too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    main = PartialState().is_main_process
    say = console.print if main and not quiet() else (lambda *a, **k: None)
    data = None if cfg.online and prompt_files(cfg.data) else open_teacher_data(cfg.data)
    if data is not None:
        drawn = sorted({d.sampled_targets for d in data.datasets} - {0})
        say(
            f"data: {len(data.datasets)} dataset(s), {data.num_rows:,} rows, {data.num_tokens:,} tokens, k={data.k}"
            + (f", sampled targets N={'/'.join(map(str, drawn))}" if drawn else "")
            + f" ({', '.join(d.fingerprint for d in data.datasets)})"
        )
        check_targets(cfg, data)
    student = build_student(cfg, data.manifest if data is not None else {})
    online = OnlineTeacher.load(cfg, student) if cfg.online else None
    same = True if online is not None else check_tokenizers(cfg, data, student)
    max_length = fit_length(cfg, student)
    cross = None
    if online is not None:
        prepared = online_examples(cfg, data, student.tokenizer, max_length)
        say(f"online teacher: {cfg.teacher} ({online.dtype}), dense KD over {student.embedding_rows:,} ids" + (f", IR {cfg.ir_layers} ({cfg.ir_loss})" if online.ir else ""))
    elif cfg.mode == "logit" and same:
        prepared = logit_examples(data, max_length, cfg.overflow, student.embedding_rows, cfg.limit, cfg.loss == SAMPLED_RKL, cfg.targets == "sampled")
    elif cfg.mode == "logit":
        cross = build_crosstok(cfg, data, student)
        summary = cross.vmap.summary(cross.teacher)
        say(
            f"cross-tokenizer KD: teacher vocab {summary['teacher_vocab']:,} -> student {cross.student.size:,}: "
            f"{summary['exact']:,} ids exact, {summary['prefix']:,} via prefix, {summary['none']:,} unmapped "
            f"(`kdtrain map-report` measures the mapped mass on the data)"
        )
        prepared = crosstok_examples(data, cross, max_length, cfg.overflow, cfg.limit)
    else:
        prepared = text_examples(data, student.tokenizer, same, max_length, cfg.overflow, cfg.limit)
    for note in prepared.notes:
        if main:
            console.print(f"[yellow]warning:[/] {note}")
    tok = student.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    record = {
        "kdtrain_version": __version__,
        "created": now_iso(),
        "config": cfg.to_dict(),
        "fingerprints": [d.fingerprint for d in data.datasets] if data is not None else [],
        "datasets": data.describe() if data is not None else [{"prompts": p} for p in cfg.data],
        "student": student.origin,
        "tokenizer": "same" if same else "different",
        "max_length": max_length,
        "examples": {"rows": prepared.num_rows, "tokens": prepared.num_tokens, "truncated": prepared.truncated, "dropped": prepared.dropped},
    }
    if online is not None:
        record["online"] = online.describe()
    if cross is not None:
        record["crosstok"] = {"vocab_map": cross.vmap.summary(cross.teacher), "vocab_match": cfg.vocab_match, **prepared.stats}
    if cfg.mode == "logit":
        ir_weight = cfg.ir_weight if online is not None and online.ir is not None else 0.0
        kd_loss = KDLoss(cfg.sparse_kd(), cfg.ce_weight, cfg.kd_weight, cfg.tile_size, cfg.span_ll_weight if cross else 0.0, cfg.train_top_k, ir_weight)
    else:
        kd_loss = KDLoss(cfg.sparse_kd(), 1.0, 0.0, cfg.tile_size)
    collator_cls = CrossKDCollator if cross is not None else KDCollator
    trainer = KDTrainer(
        model=student.model,
        args=args,
        train_dataset=to_hf_dataset(prepared),
        data_collator=collator_cls(prepared, tok.pad_token_id, with_topk=cfg.mode == "logit" and online is None),
        processing_class=tok,
        peft_config=lora_config(cfg),
        callbacks=callbacks,
        kd_loss=kd_loss,
        kd_record=record,
        online=online,
    )
    if logged():  # instead of PrinterCallback's dicts on stdout, which carries the checkpoint path
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(log_lines())
    check_parallel(trainer, cfg)
    return trainer


def run(cfg: TrainConfig, callbacks: list | None = None, rows: tuple[int, int] | None = None) -> str:
    """Train; returns the output directory holding the final checkpoint.

    `rows=(start, count)`: train on `count` examples from `start` on, wrapping around the end
    (`kdtrain onpolicy` draws each round's off-policy share this way); recorded in kd_config.json."""
    trainer = build_trainer(cfg, callbacks)
    if rows is not None:
        n = len(trainer.train_dataset)
        trainer.train_dataset = trainer.train_dataset.select([(rows[0] + i) % n for i in range(rows[1])])
        trainer.kd_record["rows"] = {"start": rows[0] % n, "count": rows[1], "of": n}
    resume = last_checkpoint(cfg.out) if cfg.resume else None
    if resume and trainer.args.should_save:
        console.print(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, cfg.out)
    return cfg.out


def save_final(trainer: KDTrainer, out: str) -> None:
    """The final standard HF checkpoint at `out` (LoRA adapters merged in) and its kd_config.json."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        if trainer.args.should_save:
            model.save_pretrained(out)
    else:
        trainer.save_model(out)
    if trainer.args.should_save:
        trainer.processing_class.save_pretrained(out)
        history = [h for h in trainer.state.log_history if "loss" in h]
        write_kd_config(out, {**trainer.kd_record, "global_step": trainer.state.global_step, "log_history": history})
        if trainer.online is not None:
            trainer.online.save_ir(out)  # beside the model, not in it
        console.print(f"[green]saved[/] {Path(out)} (step {trainer.state.global_step})")
