"""The one typed config of `kdtrain run`: every field documented once.

The CLI flags and their help are generated from `TrainConfig` (see `kdtrain.cli`), and YAML recipes
(`kdtrain/recipes/*.yaml`) are plain mappings of these field names. Precedence, lowest first:
defaults < recipe (`--config`) < flags < `key=value` overrides.

    cfg = load_config("skew_kl", flags={"data": ["ds/abc"]}, overrides=["lr=1e-4"])

`validate(cfg)` collects every problem into one `ConfigError`, naming the flag.
Test: `pytest tests/test_kdtrain_config.py` (every recipe parses and validates).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from kdcore.config import doc_field as _f
from kdcore.errors import ConfigError, KdError, collect
from kdcore.divergences import DIVERGENCES, TAILS, SparseKD
from kdcore.vocab_map import VOCAB_MATCH

RECIPES = Path(__file__).resolve().parent / "recipes"
MODES = ("logit", "text")
OVERFLOW = ("truncate", "refuse")


@dataclass
class TrainConfig:
    # what to learn from, and who learns
    data: list[str] = _f([], "Teacher dataset directory or URL (ROOT/<fingerprint>); repeat for several datasets of the same teacher and k.")
    student: str = _f("", "Student: built-in name, .gguf file or HF checkpoint directory. Leave empty with --student-config or --init-from-teacher.")
    student_config: str | None = _f(None, "Train a fresh student from this config (config.json or a directory holding one), randomly initialised.")
    init_from_teacher: str | None = _f(None, "Start the student from these teacher layers, e.g. '0,4,8' (embeddings, final norm, head and the chosen blocks).")
    teacher: str | None = _f(None, "Teacher model spec, for --init-from-teacher, as the tokenizer of --student-config, and for its tokenizer in cross-tokenizer KD (only the tokenizer is loaded). Default: the path recorded in the dataset manifest.")
    out: str = _f("runs/student", "Output directory: checkpoints (checkpoint-N/) during training, the final HF checkpoint at the top.")
    # the loss
    mode: str = _f("logit", "logit: sparse top-k KD (+ optional hard loss); text: SFT on the teacher's completions (any tokenizer pair).")
    loss: str = _f("fkl", "Divergence: fkl, rkl, skl (skew KL), srkl (skew reverse KL), jsd, tvd, symkl.")
    tail: str = _f("bucket", "bucket: top-k plus one tail bucket holding the remaining mass on both sides (mass-preserving; DistillKit SYMMETRIC_UNIFORM at T=1); teacher_renorm: teacher renormalised over its top-k, student full-vocabulary log-softmax at the ids (the field's common variant: Axolotl and DistillKit defaults); renorm: both sides renormalised over the top-k (Axolotl kd_normalize_topk; the student's mass outside the top-k gets no gradient).")
    top_k: int = _f(0, "Use only the N most likely of the stored top-k ids per position (0 = all k); the rest of their mass joins the tail bucket. Studies smaller k on one dataset.")
    temperature: float = _f(1.0, "Softening temperature, applied to both sides' bucket log-probs; the loss is scaled by T^2.")
    alpha: float = _f(0.1, "Skew weight of skl/srkl, in [0, 1): KL(p || a*p + (1-a)*q) (DistiLLM).")
    beta: float = _f(0.5, "JSD interpolation weight, in (0, 1): m = b*teacher + (1-b)*student.")
    kd_weight: float = _f(1.0, "Weight of the soft (KD) loss (logit mode).")
    ce_weight: float = _f(0.0, "Weight of the hard loss: cross-entropy on the teacher's sampled tokens (logit mode; text mode always uses 1). With a different student tokenizer: on the student's re-tokenisation of the teacher's text.")
    # cross-tokenizer logit KD (a student whose tokenizer differs from the teacher's)
    chunk_ll_weight: float = _f(0.5, "Cross-tokenizer only: weight of the chunk-likelihood term, the divergence between the teacher's and the student's log-prob of each aligned chunk as {chunk, rest} (ALM, Minixhofer et al. 2025). --kd-weight weighs the sparse KD at chunk starts (mapped top-k + residual bucket), --ce-weight the student's cross-entropy.")
    vocab_match: str = _f("prefix", "Cross-tokenizer only: how teacher ids map to student ids by bytes. exact: identical bytes only; prefix: else the longest student token the teacher token starts with. Unmapped mass joins the residual bucket.")
    chunk_size: int = _f(0, "Tokens per LM-head chunk in the loss (0 = auto: about 128 MB of float32 logits per chunk).")
    # sequences
    max_length: int | None = _f(None, "Longest prompt+completion in tokens. Default: the student's context length.")
    overflow: str = _f("truncate", "Sequences longer than --max-length: truncate (keep the start, warn) or refuse (error).")
    limit: int | None = _f(None, "Use only the first N rows of the data (smoke tests).")
    # optimisation
    lr: float = _f(5e-5, "Peak learning rate.")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule (transformers names: cosine, linear, constant, constant_with_warmup, ...).")
    warmup_ratio: float = _f(0.03, "Fraction of the steps spent warming up the learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    epochs: float = _f(1.0, "Passes over the data (ignored when --max-steps > 0).")
    max_steps: int = _f(-1, "Optimizer steps to run (-1 = set by --epochs).")
    batch_size: int = _f(8, "Sequences per device per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    seed: int = _f(0, "Seed for initialisation, data order and dropout.")
    bf16: bool = _f(False, "Train in bfloat16 mixed precision.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    # LoRA
    lora: bool = _f(False, "Train LoRA adapters instead of all weights (merged into the final checkpoint).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_targets: str = _f("all-linear", "Modules given adapters: all-linear or a comma-separated list of module names.")
    # bookkeeping
    logging_steps: int = _f(10, "Log ce / kd / total / tokens-per-s every N steps.")
    save_steps: int = _f(500, "Save a checkpoint every N steps.")
    save_total_limit: int | None = _f(2, "Keep at most this many checkpoints (the newest).")
    resume: bool = _f(True, "Resume from the newest checkpoint in --out when there is one.")
    report_to: str = _f("none", "Where to report metrics: none, tensorboard, wandb, ... (transformers names, comma-separated).")
    deepspeed: str | None = _f(None, "DeepSpeed JSON config (for accelerate/DeepSpeed launches).")
    dataloader_workers: int = _f(0, "Data-loader worker processes.")

    @classmethod
    def help(cls, name: str) -> str:
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)

    def sparse_kd(self) -> SparseKD:
        return SparseKD(loss=self.loss, tail=self.tail, temperature=self.temperature, alpha=self.alpha, beta=self.beta)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: TrainConfig) -> None:
    """Every problem with the options, at once, each naming its flag."""
    p: list[str] = []
    if not cfg.data:
        p.append("--data is required: a teacher dataset directory or URL written by `kdgen generate` (list them with `kdgen ls ROOT`)")
    sources = [x for x in (cfg.student, cfg.student_config, cfg.init_from_teacher) if x]
    if len(sources) != 1:
        p.append("give exactly one of --student (a model spec), --student-config (a fresh config) or --init-from-teacher (layer list)")
    if cfg.mode not in MODES:
        p.append(f"--mode {cfg.mode}: choose {' or '.join(MODES)}")
    if cfg.loss not in DIVERGENCES:
        p.append(f"--loss {cfg.loss}: unknown loss; choose one of {', '.join(DIVERGENCES)}")
    if cfg.tail not in TAILS:
        p.append(f"--tail {cfg.tail}: choose one of {', '.join(TAILS)}")
    if not (cfg.temperature > 0 and cfg.temperature <= 100):
        p.append(f"--temperature {cfg.temperature}: must be in (0, 100]")
    if not 0 <= cfg.alpha < 1:
        p.append(f"--alpha {cfg.alpha}: skew weight must be in [0, 1)")
    if not 0 < cfg.beta < 1:
        p.append(f"--beta {cfg.beta}: JSD weight must be in (0, 1)")
    if cfg.kd_weight < 0 or cfg.ce_weight < 0:
        p.append(f"--kd-weight {cfg.kd_weight} / --ce-weight {cfg.ce_weight}: weights must be >= 0")
    if cfg.top_k < 0:
        p.append(f"--top-k {cfg.top_k}: must be >= 0 (0 = all the stored top-k)")
    if cfg.chunk_ll_weight < 0:
        p.append(f"--chunk-ll-weight {cfg.chunk_ll_weight}: must be >= 0")
    if cfg.mode == "logit" and cfg.kd_weight == 0 and cfg.ce_weight == 0 and cfg.chunk_ll_weight == 0:
        p.append("--kd-weight, --ce-weight and --chunk-ll-weight are all 0: nothing to train on")
    if cfg.vocab_match not in VOCAB_MATCH:
        p.append(f"--vocab-match {cfg.vocab_match}: choose {' or '.join(VOCAB_MATCH)}")
    if cfg.overflow not in OVERFLOW:
        p.append(f"--overflow {cfg.overflow}: choose {' or '.join(OVERFLOW)}")
    for name in ("batch_size", "grad_accum", "logging_steps", "save_steps", "lora_r"):
        if getattr(cfg, name) < 1:
            p.append(f"{_flag(name)} {getattr(cfg, name)}: must be >= 1")
    for name in ("max_length", "limit"):
        v = getattr(cfg, name)
        if v is not None and v < 2:
            p.append(f"{_flag(name)} {v}: must be >= 2")
    if cfg.chunk_size < 0:
        p.append(f"--chunk-size {cfg.chunk_size}: must be >= 0 (0 = auto)")
    if cfg.lr <= 0:
        p.append(f"--lr {cfg.lr}: must be > 0")
    if not 0 <= cfg.warmup_ratio < 1:
        p.append(f"--warmup-ratio {cfg.warmup_ratio}: must be in [0, 1)")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        p.append(f"--max-steps {cfg.max_steps}: must be >= 1, or -1 to use --epochs")
    if cfg.max_steps == -1 and cfg.epochs <= 0:
        p.append(f"--epochs {cfg.epochs}: must be > 0")
    if cfg.init_from_teacher:
        try:
            layers = parse_layers(cfg.init_from_teacher)
            if not layers:
                raise ValueError
        except ValueError:
            p.append(f"--init-from-teacher {cfg.init_from_teacher!r}: expected comma-separated layer indices, e.g. 0,4,8")
    collect(p)


def parse_layers(spec: str) -> list[int]:
    """'0,4,8' -> [0, 4, 8] (ValueError on anything else, negatives included)."""
    out = [int(x) for x in str(spec).replace(" ", "").split(",") if x != ""]
    if any(i < 0 for i in out):
        raise ValueError(spec)
    return out


# ----------------------------------------------------------------------------------------------
# Building a config: recipe + flags + key=value overrides


def recipe_path(name: str) -> Path:
    """A recipe by path, or by name in kdtrain/recipes ('skew_kl', 'recipes/skew_kl.yaml')."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    stem = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    q = RECIPES / stem
    if q.is_file():
        return q
    known = ", ".join(sorted(r.stem for r in RECIPES.glob("*.yaml")))
    raise KdError(f"--config {name}: no such file, and no recipe of that name (recipes: {known})")


def _coerce(name: str, value: Any) -> Any:
    """Check and convert one value against the field's type; ValueError with a readable reason."""
    t = FIELD_TYPES[name]
    args = typing.get_args(t)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), t) if args and typing.get_origin(t) is not list else t
    if value is None:
        if optional:
            return None
        if base is str or typing.get_origin(base) is list:
            return base() if base is str else []
        raise ValueError("may not be empty")
    if typing.get_origin(base) is list or base is list:
        values = value if isinstance(value, list) else [value]
        return [str(v) for v in values]
    if base is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1", "on"):
            return True
        if str(value).lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    return str(value)


def _apply(values: dict, base: dict, where: str, problems: list[str]) -> None:
    names = {f.name for f in fields(TrainConfig)}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key not in names:
            near = [n for n in names if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(sorted(near))}?)" if near else ""
            problems.append(f"{where}: unknown option {key!r}{hint}")
            continue
        try:
            base[key] = _coerce(key, value)
        except ValueError as e:
            problems.append(f"{where}: {key}: {e}")


def parse_overrides(items: list[str]) -> dict:
    """['lr=1e-4', 'lora=true'] -> {'lr': 1e-4, 'lora': True} (values read as YAML scalars)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError([f"override {item!r}: expected key=value, e.g. lr=1e-4"])
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else None
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def load_config(recipe: str | None = None, flags: dict | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """defaults < recipe < flags < key=value overrides; raises ConfigError naming every problem."""
    merged = TrainConfig().to_dict()
    problems: list[str] = []
    if recipe:
        path = recipe_path(recipe)
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise KdError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(doc, dict):
            raise KdError(f"--config {path}: expected a mapping of option: value")
        doc.pop("description", None)  # recipes may say what they are
        _apply(doc, merged, str(path), problems)
    _apply({k: v for k, v in (flags or {}).items() if v is not None}, merged, "flag", problems)
    _apply(parse_overrides(overrides or []), merged, "override", problems)
    collect(problems)
    cfg = TrainConfig(**merged)
    validate(cfg)
    return cfg
