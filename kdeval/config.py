"""Typed options of the three `kdeval` commands. Each field's docstring (its `help` metadata) is the
CLI help, so this file is the one list of options and defaults.

`validate_*` collect every problem with the given options into one `ConfigError` (one line, exit 2),
naming the flag and the fix. Test: `pytest tests/test_kdeval_cli.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcore.config import doc_field as _f
from kdcore.config import Documented, sampling_problems
from kdcore.errors import collect

# Metric names a user can ask for with --metrics. Fidelity metrics need --data; quality metrics need
# references; `cost` is parameters, bytes, speed and memory.
FIDELITY_METRICS = ("kl", "top1", "ece", "ppl")
# What each fidelity metric reports: token-level for a model with the dataset's tokenizer
# (kdeval.fidelity), chunk-level for one with another tokenizer (kdeval.crosstok; ECE has no
# chunk-level counterpart). NLL per byte comes with ppl on both sides: it compares any tokenizers.
TOKEN_MEASURES = {"kl": ("kl",), "top1": ("top1",), "ece": ("ece",), "ppl": ("ppl", "nll_per_byte")}
CHUNK_MEASURES = {"kl": ("chunk_kl", "chunk_start_kl"), "top1": ("chunk_top1",), "ece": (), "ppl": ("chunk_nll", "nll_per_byte")}
QUALITY_METRICS = ("rouge", "bleu")
METRICS = FIDELITY_METRICS + QUALITY_METRICS + ("cost",)
BACKENDS = ("auto", "hf", "vllm")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EvalConfig(Documented):
    models: list[str] = _f([], "Model to score (repeatable): checkpoint directory, .gguf file or built-in name; NAME=SPEC sets its name in the report.", flag="model", short="-m")
    teacher: str | None = _f(None, "The teacher, scored the same way as the students so the report shows the trade-off (its outputs also serve as references when none are given).")
    baselines: list[str] = _f([], "Baseline model (repeatable), e.g. the student before distillation; shown beside the students.", flag="baseline")
    data: str | None = _f(None, "Held-out teacher dataset (directory or URL of OUT/<fingerprint>): fidelity metrics, prompts, and the teacher's completions as references.")
    prompts: str | None = _f(None, "Prompt file (.jsonl, .parquet, .csv) for generation when no --data is given (or to override its prompts).")
    prompt_column: str | None = _f(None, "Column holding the prompt in --prompts. Default: messages, prompt, text, instruction, question or input.")
    references: str | None = _f(None, "Reference completions, one per prompt (.jsonl/.csv with a reference column, or .txt one per line). Default: the teacher's completions.")
    reference_column: str | None = _f(None, "Column holding the reference in --references. Default: reference, completion, output, answer, target or text.")
    out: str = _f("kdeval-out", "Output directory: results.json, REPORT.md and plots.")
    metrics: list[str] = _f([], f"Metrics to compute (repeatable or comma-separated; default all): {', '.join(METRICS)}.", split_commas=True)
    fidelity: bool = _f(True, "Score fidelity to the teacher on --data: token-level for models with the dataset's tokenizer, chunk-level for models with another (needs the teacher's tokenizer). --no-fidelity uses the dataset only for prompts and references.")
    limit: int | None = _f(None, "Use only the first N dataset rows / prompts.")
    samples: int = _f(3, "Side-by-side samples (prompt, reference, every model's output) kept for the report.")
    backend: str = _f("hf", "Generation backend: hf (transformers), vllm (in a worker process; float32 greedy outputs equal hf's), or auto (vllm where importable).")
    dtype: str = _f("float32", "Dtype for every model: float32, bfloat16 or float16 (float32 on CPU).")
    max_new_tokens: int | None = _f(None, "Maximum generated tokens per prompt. Default: the dataset's max_new_tokens, else 128.")
    temperature: float = _f(0.0, "Sampling temperature for generation (0 = greedy, the default).")
    top_p: float = _f(1.0, "Nucleus sampling for generation when --temperature > 0.")
    seed: int = _f(0, "Base seed; each prompt's seed is derived from it (recorded in results.json).")
    batch_size: int = _f(8, "Rows per forward pass (fidelity) and prompts per generation batch.")
    verify: bool = _f(True, "Check the dataset's checksums before reading it (`kdgen verify --quick`).")


@dataclass
class CompareConfig(Documented):
    runs: list[str] = _f([], "`kdeval run` output directories (or their results.json files) to compare.", positional=True)
    out: str = _f("kdeval-report", "Output directory: REPORT.md, PNG plots and the merged results.json.")
    samples: int = _f(3, "Side-by-side samples to show in REPORT.md.")


@dataclass
class LmEvalConfig(Documented):
    model: str = _f("", "Checkpoint directory, .gguf file or built-in name to hand to lm-evaluation-harness.", short="-m")
    tasks: list[str] = _f([], "Task names (standard lm-eval tasks need their data locally) or local task YAML files (repeatable or comma-separated). Default: data/lm_eval/kd_tiny_task.yaml.", split_commas=True)
    out: str = _f("kdeval-lm-eval", "Output directory for lm_eval_results.json.")
    limit: int | None = _f(None, "Evaluate only the first N documents of each task.")
    num_fewshot: int | None = _f(None, "Few-shot examples per prompt (default: the task's own setting).")
    batch_size: int = _f(8, "Batch size for the harness.")
    dtype: str = _f("float32", "Model dtype: float32, bfloat16 or float16.")
    device: str = _f("cpu", "Device for the harness: cpu or cuda.")
    seed: int = _f(0, "Seed for the harness (python, numpy, torch, few-shot sampling).")


def validate_eval(cfg: EvalConfig) -> None:
    from kdcore.backends import vllm_available  # not at import time: it reads pyarrow, and the CLI starts faster without

    problems = []
    if not cfg.models and not cfg.teacher and not cfg.baselines:
        problems.append("--model is required: a checkpoint directory, .gguf file or built-in name (repeat it to compare several)")
    if not cfg.data and not cfg.prompts:
        problems.append("give --data (a held-out teacher dataset) or --prompts (a prompt file)")
    if cfg.prompts and not cfg.data and not cfg.references and not cfg.teacher:
        problems.append("--prompts without references: give --references FILE, or --teacher to use its outputs as references")
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        problems.append(f"--metrics {', '.join(unknown)}: unknown metric; choose from {', '.join(METRICS)}")
    if cfg.backend not in BACKENDS:
        problems.append(f"--backend {cfg.backend}: choose {', '.join(BACKENDS)}")
    elif cfg.backend == "vllm" and not vllm_available():
        problems.append("--backend vllm: vLLM is not installed here; install '.[cpu]' or '.[gpu]', or use --backend hf")
    if cfg.dtype not in DTYPES:
        problems.append(f"--dtype {cfg.dtype}: choose {', '.join(DTYPES)}")
    if cfg.limit is not None and cfg.limit < 1:
        problems.append(f"--limit {cfg.limit}: must be >= 1")
    if cfg.samples < 0:
        problems.append(f"--samples {cfg.samples}: must be >= 0")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {cfg.max_new_tokens}: must be >= 1")
    problems += sampling_problems(cfg.temperature, cfg.top_p)
    if cfg.batch_size < 1:
        problems.append(f"--batch-size {cfg.batch_size}: must be >= 1")
    collect(problems)


def validate_compare(cfg: CompareConfig) -> None:
    problems = []
    if not cfg.runs:
        problems.append("give at least one `kdeval run` output directory to compare")
    if cfg.samples < 0:
        problems.append(f"--samples {cfg.samples}: must be >= 0")
    collect(problems)


def validate_lm_eval(cfg: LmEvalConfig) -> None:
    problems = []
    if not cfg.model:
        problems.append("--model is required: a checkpoint directory, .gguf file or built-in name")
    if cfg.limit is not None and cfg.limit < 1:
        problems.append(f"--limit {cfg.limit}: must be >= 1")
    if cfg.dtype not in DTYPES:
        problems.append(f"--dtype {cfg.dtype}: choose {', '.join(DTYPES)}")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        problems.append(f"--device {cfg.device}: choose cpu or cuda")
    if cfg.batch_size < 1:
        problems.append(f"--batch-size {cfg.batch_size}: must be >= 1")
    collect(problems)
