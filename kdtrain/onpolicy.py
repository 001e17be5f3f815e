"""`kdtrain onpolicy`: on-policy distillation in offline rounds (issue 15).

    run(cfg): per round r = 0 .. R-1, each stage recorded in <out>/onpolicy_state.json:
      sample   `kdgen generate --teacher <student_r> --prompts P --temperature tau --n N --k 1`
               (the student's own completions; vLLM where installed, else hf)
      score    `kdgen score --prompts <that dataset> --teacher T --k K`: the teacher, teacher-forced
               on exactly the student's tokens (prefill only), top-k plus the log-prob of each
               sampled token even outside the top-k
      offpolicy (only with --offpolicy-mix > 0) `kdtrain run` on this round's share of
               --offpolicy-data with --offpolicy-loss
      train    `kdtrain run` on the scored rows with --loss; its checkpoint is student_{r+1}

Student r+1 samples round r+1: GKD (Agarwal et al. 2024) / MiniLLM (Gu et al. 2024) on-policy
distillation with the teacher's log-probs precomputed per round instead of online (Lightning OPD).
Both datasets of a round are ordinary content-addressed teacher datasets under <out>/datasets, so
the same round can be run by hand on three machines (README, "On-policy distillation").

Off-policy mix (GKD's lambda): with --offpolicy-mix m each round also trains on
round(S * m / (1 - m)) rows of --offpolicy-data (S = the round's student rows), so a fraction m
of the round's rows are the teacher's own text; a different slice each round. They train first,
with their own loss: --offpolicy-loss skl with --loss srkl is DistiLLM-2's recipe (Ko et al. 2025:
skew KL on teacher text, skew reverse KL on student text).

Resume: a rerun skips every recorded stage and redoes only the one a kill cut short (kdgen keeps
its complete shards, kdtrain resumes from its newest checkpoint).

Test: `pytest tests/test_kdtrain_onpolicy.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from kdcore.config import doc_field as _f
from kdcore.config import field_help
from kdcore.errors import KdError, collect
from kdcore.dataset import TeacherDataset
from kdcore.progress import console
from kdcore.divergences import SparseKD
from kdtrain.config import LOSSES, load_config
from kdtrain.stages import ENGINE_KEYS, Stages, kdgen

STATE = "onpolicy"


@dataclass
class OnPolicyConfig:
    teacher: str = _f("smollm2-135m-instruct", "Teacher that scores the student's samples: built-in name, .gguf, HF checkpoint directory or hub id.")
    student: str = _f("", "Student to start from (round 0 samples with it): built-in name, .gguf or HF checkpoint directory sharing the teacher's tokenizer.")
    prompts: str = _f("", "Prompts the student answers every round: a prompt file, or a teacher dataset (its prompts).")
    out: str = _f("runs/onpolicy", "Run directory: datasets/ (every round's teacher datasets), round-N/student (checkpoints), onpolicy_state.json.")
    datasets: str | None = _f(None, "Root (path or URL, e.g. s3://team-kd/) for every round's teacher datasets; default OUT/datasets. Content-addressed: runs sharing it reuse identical rounds.")
    rounds: int = _f(2, "Rounds of sample -> score -> train.")
    n: int = _f(1, "Samples per prompt per round.")
    temperature: float = _f(1.0, "Student sampling temperature (1 = the student's own distribution, what the on-policy losses assume).")
    top_p: float = _f(1.0, "Student nucleus sampling (1 = off).")
    max_new_tokens: int = _f(128, "Longest student sample, in tokens.")
    limit: int | None = _f(None, "Use only the first N prompts.")
    k: int = _f(20, "Top-k log-probs the teacher stores per sampled token.")
    backend: str = _f("auto", "kdgen backend for sampling and scoring: vllm, hf, or auto (vllm where installed).")
    dtype: str = _f("auto", "Model dtype for sampling and scoring (kdgen --dtype).")
    gpu_memory_utilization: float | None = _f(None, "vLLM memory fraction for sampling and scoring (on CPU: of the NUMA node's memory; kdgen's default when unset).")
    engine_arg: list[str] = _f([], "Extra vLLM engine argument KEY=VALUE for sampling and scoring, repeatable (kdgen --engine-arg; e.g. kv_cache_memory_bytes=2147483648).")
    loss: str = _f("rkl", "Loss on the student's rows: rkl, srkl, jsd (top-k + tail bucket), sampled_rkl (log p_student(x) - log p_teacher(x) on the sampled token), or any kdtrain --loss.")
    alpha: float = _f(SparseKD.alpha, "Skew weight of skl / srkl (DistiLLM).")
    beta: float = _f(SparseKD.beta, "JSD interpolation weight (GKD).")
    offpolicy_data: str | None = _f(None, "A teacher dataset (the teacher's own completions) to mix into every round; see --offpolicy-mix.")
    offpolicy_mix: float = _f(0.0, "Fraction of each round's rows drawn from --offpolicy-data (GKD's lambda is 1 minus this), in [0, 1).")
    offpolicy_loss: str = _f("fkl", "Loss on the off-policy rows (skl with --loss srkl: DistiLLM-2).")
    epochs: float = _f(1.0, "Training passes over each round's rows (ignored when --max-steps > 0).")
    max_steps: int = _f(-1, "Optimizer steps per round and stage (-1 = set by --epochs).")
    lr: float = _f(5e-5, "Peak learning rate of every round.")
    batch_size: int = _f(8, "Sequences per micro-batch.")
    seed: int = _f(0, "Seed: round r samples with seed + r and trains with seed + r.")
    train: list[str] = _f([], "More kdtrain options for every training stage, as key=value (e.g. max_length=512 ce_weight=0.1).")
    stop_after: str | None = _f(None, "Stop once this stage is complete, e.g. round-0/score (a later run with the same options continues).")

    @classmethod
    def help(cls, name: str) -> str:
        return field_help(cls, name)

    def options(self) -> dict:
        """What the state file pins: everything but where it goes and when to stop."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "datasets", "stop_after", *ENGINE_KEYS)}


def stage_names(cfg: OnPolicyConfig) -> list[str]:
    per = ["sample", "score"] + (["offpolicy"] if cfg.offpolicy_mix > 0 else []) + ["train"]
    return [f"round-{r}/{s}" for r in range(cfg.rounds) for s in per]


def validate(cfg: OnPolicyConfig) -> None:
    p: list[str] = []
    if not cfg.student:
        p.append("--student is required: the model that samples round 0 (a checkpoint directory or model spec)")
    if not cfg.prompts:
        p.append("--prompts is required: the prompts the student answers each round")
    if cfg.rounds < 1:
        p.append(f"--rounds {cfg.rounds}: must be >= 1")
    if cfg.n < 1:
        p.append(f"--n {cfg.n}: must be >= 1")
    if cfg.temperature <= 0:
        p.append(f"--temperature {cfg.temperature}: must be > 0 (on-policy rows are samples; greedy output is not the student's distribution)")
    for name in ("loss", "offpolicy_loss"):
        if getattr(cfg, name) not in LOSSES:
            p.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}: choose one of {', '.join(LOSSES)}")
    if cfg.offpolicy_loss == "sampled_rkl":
        p.append("--offpolicy-loss sampled_rkl: the estimator needs the student's own samples; use fkl or skl on teacher text")
    if not 0 <= cfg.offpolicy_mix < 1:
        p.append(f"--offpolicy-mix {cfg.offpolicy_mix}: must be in [0, 1)")
    if cfg.offpolicy_mix > 0 and not cfg.offpolicy_data:
        p.append("--offpolicy-mix > 0 needs --offpolicy-data: a teacher dataset of the teacher's own completions")
    if cfg.stop_after is not None and cfg.stop_after not in stage_names(cfg):
        p.append(f"--stop-after {cfg.stop_after}: not a stage of this run; stages: {', '.join(stage_names(cfg)[:4])}, ...")
    collect(p)


def train_config(cfg: OnPolicyConfig, data: str, student: str, out: str, loss: str, seed: int):
    """The kdtrain config of one training stage (--train key=value applied last)."""
    flags = {
        "data": [data], "student": student, "teacher": cfg.teacher, "out": out, "mode": "logit", "loss": loss,
        "alpha": cfg.alpha, "beta": cfg.beta, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
        "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": seed,
    }
    return load_config(None, flags, cfg.train)


def check_same_tokenizer(samples: str, scored: str) -> None:
    a, b = TeacherDataset(samples).manifest["tokenizer"], TeacherDataset(scored).manifest["tokenizer"]
    if a["tokenizer_hash"] != b["tokenizer_hash"]:
        raise KdError(
            "on-policy rounds need a student that shares the teacher's tokenizer (the teacher scores the "
            "student's token ids); for a student with another tokenizer distil off-policy (`kdtrain run`)"
        )


def run(cfg: OnPolicyConfig) -> str:
    """All rounds; returns the final student checkpoint directory."""
    validate(cfg)
    from kdtrain.train import run as train

    out = Path(cfg.out)
    stages = Stages(cfg.out, STATE, cfg.options(), cfg.stop_after)
    gen = {"backend": cfg.backend, "dtype": cfg.dtype, "out": cfg.datasets or str(out / "datasets"), "gpu_memory_utilization": cfg.gpu_memory_utilization,
           "engine_arg": cfg.engine_arg or None}  # fmt: skip
    student = cfg.student
    off_start = 0
    for r in range(cfg.rounds):
        name = f"round-{r}"
        rec = stages.done(f"{name}/sample") or stages.record(
            f"{name}/sample",
            dataset=kdgen(
                "generate", f"{name}/sample", teacher=student, prompts=cfg.prompts, limit=cfg.limit, temperature=cfg.temperature,
                top_p=cfg.top_p, n=cfg.n, max_new_tokens=cfg.max_new_tokens, k=1, seed=cfg.seed + r, **gen,
            ),
        )
        samples = rec["dataset"]
        if stages.should_stop(f"{name}/sample"):
            return samples
        rec = stages.done(f"{name}/score")
        if rec is None:
            scored = kdgen("score", f"{name}/score", teacher=cfg.teacher, prompts=samples, k=cfg.k, **gen)
            check_same_tokenizer(samples, scored)
            ds = TeacherDataset(scored)
            rec = stages.record(f"{name}/score", dataset=scored, rows=ds.num_rows, teacher_tokens=ds.num_tokens)
        scored, rows = rec["dataset"], rec["rows"]
        if stages.should_stop(f"{name}/score"):
            return scored
        if cfg.offpolicy_mix > 0:
            m = max(1, round(rows * cfg.offpolicy_mix / (1 - cfg.offpolicy_mix)))
            rec = stages.done(f"{name}/offpolicy")
            if rec is None:
                tc = train_config(cfg, cfg.offpolicy_data, student, str(out / name / "offpolicy"), cfg.offpolicy_loss, cfg.seed + r)
                console.print(f"{name}/offpolicy: kdtrain run on rows {off_start}..{off_start + m - 1} of {cfg.offpolicy_data} (--loss {cfg.offpolicy_loss})")
                rec = stages.record(f"{name}/offpolicy", checkpoint=train(tc, rows=(off_start, m)), rows=m, start=off_start)
            student, off_start = rec["checkpoint"], off_start + m
            if stages.should_stop(f"{name}/offpolicy"):
                return student
        rec = stages.done(f"{name}/train")
        if rec is None:
            tc = train_config(cfg, scored, student, str(out / name / "student"), cfg.loss, cfg.seed + r)
            console.print(f"{name}/train: kdtrain run on {rows} student rows (--loss {cfg.loss})")
            rec = stages.record(f"{name}/train", checkpoint=train(tc))
        student = rec["checkpoint"]
        if stages.should_stop(f"{name}/train"):
            return student
    console.print(f"[green]on-policy rounds done:[/] {cfg.rounds} round(s) -> {student}")
    return student
