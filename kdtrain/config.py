"""The one typed config of `kdtrain run`: every field documented once.

The CLI flags and their help are generated from `TrainConfig` (see `kdtrain.cli`), and YAML recipes
(`kdtrain/recipes/*.yaml`) are plain mappings of these field names. Precedence, lowest first:
defaults < recipe (`--config`) < flags < `key=value` overrides.

    cfg = load_config("skew_kl", flags={"data": ["ds/abc"]}, overrides=["lr=1e-4"])

`validate(cfg)` collects every problem into one `ConfigError`, naming the flag.
Test: `pytest tests/test_kdtrain_config.py` (every recipe parses and validates).
"""

from __future__ import annotations

import re

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from kdcore.cli import load
from kdcore.config import Documented
from kdcore.config import doc_field as _f
from kdcore.errors import KdError, collect
from kdcore.divergences import DIVERGENCES, SAMPLED_RKL, TAILS, SparseKD
from kdcore.vocab_map import VOCAB_MATCH

RECIPES = Path(__file__).resolve().parent / "recipes"
MODES = ("logit", "text")
TARGETS = ("topk", "sampled")
OVERFLOW = ("truncate", "refuse")
LOSSES = DIVERGENCES + (SAMPLED_RKL,)


@dataclass
class TrainConfig(Documented):
    # what to learn from, and who learns
    data: list[str] = _f([], "Teacher dataset directory or URL (ROOT/<fingerprint>); repeat for several datasets of the same teacher and k.")
    student: str = _f("", "Student: built-in name, .gguf file or HF checkpoint directory. Leave empty with --student-config or --init-from-teacher.")
    student_config: str | None = _f(None, "Train a fresh student from this config (config.json or a directory holding one), randomly initialised.")
    init_from_teacher: str | None = _f(None, "Start the student from these teacher layers, e.g. '0,4,8' (embeddings, final norm, head and the chosen blocks).")
    teacher: str | None = _f(None, "Teacher model spec, for --init-from-teacher, as the tokenizer of --student-config, and for its tokenizer in cross-tokenizer KD (only the tokenizer is loaded); with --online, the model run on each batch. Default: the path recorded in the dataset manifest.")
    out: str = _f("runs/student", "Output directory: checkpoints (checkpoint-N/) during training, the final HF checkpoint at the top.")
    # the loss
    mode: str = _f("logit", "logit: sparse top-k KD (+ optional hard loss); text: SFT on the teacher's completions (any tokenizer pair).")
    loss: str = _f(SparseKD.loss, "Divergence: fkl, rkl, skl (skew KL), srkl (skew reverse KL), jsd, tvd, symkl; or sampled_rkl: on rows the student sampled itself (`kdtrain onpolicy`), the per-token estimate log p_student(x) - log p_teacher(x) of the reverse KL on the sampled token x (needs the teacher's tokenizer; ignores --kd-temperature and the top-k).")
    tail: str = _f(SparseKD.tail, "bucket: top-k plus one tail bucket holding the remaining mass on both sides (mass-preserving; DistillKit SYMMETRIC_UNIFORM at T=1); teacher_renorm: teacher renormalised over its top-k, student full-vocabulary log-softmax at the ids (the field's common variant: Axolotl and DistillKit defaults); renorm: both sides renormalised over the top-k (Axolotl kd_normalize_topk; the student's mass outside the top-k gets no gradient).")
    targets: str = _f("topk", "Which teacher targets logit mode learns from: topk (the stored top-k, with --tail) or sampled (the random-sampled targets of a dataset made with `kdgen --sampled-targets N`: forward KL estimated from the draws, counts/N as the teacher's probabilities — unbiased, the full-vocabulary gradient in expectation; RS-KD, Anshumann et al. 2025; needs --loss fkl and --kd-temperature 1).")
    train_top_k: int = _f(0, "Use only the N most likely of the stored top-k ids per position (0 = all k); the rest of their mass joins the tail bucket. Studies smaller k on one dataset.", aliases=("top_k",))
    kd_temperature: float = _f(SparseKD.temperature, "KD softening temperature, applied to both sides' bucket log-probs; the loss is scaled by T^2.", aliases=("temperature",))
    alpha: float = _f(SparseKD.alpha, "Skew weight of skl/srkl, in [0, 1): KL(p || a*p + (1-a)*q) (DistiLLM).")
    beta: float = _f(SparseKD.beta, "JSD interpolation weight, in (0, 1): m = b*teacher + (1-b)*student.")
    kd_weight: float = _f(1.0, "Weight of the soft (KD) loss (logit mode).")
    ce_weight: float = _f(0.0, "Weight of the hard loss: cross-entropy on the teacher's sampled tokens (logit mode; text mode always uses 1). With a different student tokenizer: on the student's re-tokenisation of the teacher's text.")
    # online teacher (kdtrain.online): the teacher runs on each batch
    online: bool = _f(False, "Run the --teacher model on each batch (frozen): dense KD over the full vocabulary with the --loss family, instead of the dataset's top-k. --data: teacher datasets (their prompts and completions) or prompt files (JSONL/Parquet/CSV with a prompt column, a 'completion' column or plain 'text'). Same tokenizer as the student.")
    teacher_dtype: str = _f("auto", "Online only: dtype the teacher runs in: auto (its checkpoint's), float32, bfloat16 or float16.")
    ir_layers: str | None = _f(None, "Online only: hidden-state alignment, student:teacher decoder-block pairs (0-based block outputs), e.g. 1:5,3:15. A learned linear projection maps student to teacher width when they differ (saved beside each checkpoint, not in the model).")
    ir_loss: str = _f("cosine", "Online only: hidden-state loss per position: cosine (1 - cosine similarity) or mse (mean squared error per hidden unit), averaged over the --ir-layers pairs.")
    ir_weight: float = _f(1.0, "Online only: weight of the hidden-state (IR) loss beside --ce-weight and --kd-weight.")
    # cross-tokenizer logit KD (a student whose tokenizer differs from the teacher's)
    span_ll_weight: float = _f(0.5, "Cross-tokenizer only: weight of the span-likelihood term, the divergence between the teacher's and the student's log-prob of each aligned span as {span, rest} (ALM, Minixhofer et al. 2025). --kd-weight weighs the sparse KD at span starts (mapped top-k + residual bucket), --ce-weight the student's cross-entropy.", aliases=("chunk_ll_weight",))
    vocab_match: str = _f("prefix", "Cross-tokenizer only: how teacher ids map to student ids by bytes. exact: identical bytes only; prefix: else the longest student token the teacher token starts with. Unmapped mass joins the residual bucket.")
    tile_size: int = _f(0, "Tokens per LM-head tile in the loss (0 = auto: about 128 MB of float32 logits per tile).", aliases=("chunk_size",))
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

    def sparse_kd(self) -> SparseKD:
        return SparseKD(loss=self.loss, tail=self.tail, temperature=self.kd_temperature, alpha=self.alpha, beta=self.beta)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    if cfg.loss not in LOSSES:
        p.append(f"--loss {cfg.loss}: unknown loss; choose one of {', '.join(LOSSES)}")
    if cfg.loss == SAMPLED_RKL and (cfg.mode != "logit" or cfg.kd_temperature != 1.0):
        p.append(f"--loss {SAMPLED_RKL}: needs --mode logit and --kd-temperature 1 (the estimator is of the temperature-1 reverse KL)")
    if cfg.targets not in TARGETS:
        p.append(f"--targets {cfg.targets}: choose {' or '.join(TARGETS)}")
    if cfg.targets == "sampled":
        # the estimator is of the temperature-1 forward KL (kdcore.divergences.sampled_fkl_per_token)
        if cfg.loss != "fkl" or cfg.kd_temperature != 1.0:
            p.append(f"--targets sampled: needs --loss fkl and --kd-temperature 1 (the draws estimate the temperature-1 forward KL); got --loss {cfg.loss} --kd-temperature {cfg.kd_temperature}")
        if cfg.mode != "logit" or cfg.online:
            p.append("--targets sampled: needs --mode logit without --online (it trains on a dataset's stored draws)")
        if cfg.train_top_k:
            p.append(f"--train-top-k {cfg.train_top_k}: applies to --targets topk; leave it at 0 with --targets sampled")
    if cfg.tail not in TAILS:
        p.append(f"--tail {cfg.tail}: choose one of {', '.join(TAILS)}")
    if not (cfg.kd_temperature > 0 and cfg.kd_temperature <= 100):
        p.append(f"--kd-temperature {cfg.kd_temperature}: must be in (0, 100]")
    if not 0 <= cfg.alpha < 1:
        p.append(f"--alpha {cfg.alpha}: skew weight must be in [0, 1)")
    if not 0 < cfg.beta < 1:
        p.append(f"--beta {cfg.beta}: JSD weight must be in (0, 1)")
    if cfg.kd_weight < 0 or cfg.ce_weight < 0:
        p.append(f"--kd-weight {cfg.kd_weight} / --ce-weight {cfg.ce_weight}: weights must be >= 0")
    if cfg.train_top_k < 0:
        p.append(f"--train-top-k {cfg.train_top_k}: must be >= 0 (0 = all the stored top-k)")
    if cfg.span_ll_weight < 0:
        p.append(f"--span-ll-weight {cfg.span_ll_weight}: must be >= 0")
    if cfg.mode == "logit" and cfg.kd_weight == 0 and cfg.ce_weight == 0 and cfg.span_ll_weight == 0:
        p.append("--kd-weight, --ce-weight and --span-ll-weight are all 0: nothing to train on")
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
    if cfg.tile_size < 0:
        p.append(f"--tile-size {cfg.tile_size}: must be >= 0 (0 = auto)")
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
    p += validate_online(cfg)
    collect(p)


IR_LOSSES = ("cosine", "mse")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


def validate_online(cfg: TrainConfig) -> list[str]:
    """The problems with the online-teacher options (`kdtrain.online`)."""
    p: list[str] = []
    if not cfg.online:
        p += [f"{_flag(n)} applies only with --online (the teacher must run on each batch)" for n in ("ir_layers",) if getattr(cfg, n)]
        return p
    if not cfg.teacher:
        p.append("--online needs --teacher: the model spec of the teacher to run on each batch")
    if cfg.mode != "logit":
        p.append(f"--mode {cfg.mode}: --online trains on the teacher's logits; use --mode logit")
    if cfg.teacher_dtype not in TEACHER_DTYPES:
        p.append(f"--teacher-dtype {cfg.teacher_dtype}: choose {', '.join(TEACHER_DTYPES)}")
    if cfg.ir_loss not in IR_LOSSES:
        p.append(f"--ir-loss {cfg.ir_loss}: choose {' or '.join(IR_LOSSES)}")
    if cfg.ir_weight < 0:
        p.append(f"--ir-weight {cfg.ir_weight}: must be >= 0")
    if cfg.kd_weight == 0 and cfg.ce_weight == 0 and not (cfg.ir_layers and cfg.ir_weight > 0):
        p.append("--kd-weight and --ce-weight are 0 and there is no --ir-layers alignment: nothing to train on")
    if cfg.ir_layers:
        try:
            parse_ir_layers(cfg.ir_layers)
        except ValueError as e:
            p.append(str(e))
    if cfg.deepspeed and cfg.ir_layers:
        p.append("--ir-layers with --deepspeed: the IR projection is trained beside the model, which DeepSpeed's optimizer does not hold; use DDP")
    return p


def parse_ir_layers(spec: str) -> list[tuple[int, int]]:
    """'1:5,3:15' -> [(1, 5), (3, 15)] (student block, teacher block); ValueError naming the flag."""
    example = "e.g. 1:5,3:15 (student block : teacher block, 0-based)"
    items = [x for x in str(spec).replace(" ", "").split(",") if x != ""]
    if not items:
        raise ValueError(f"--ir-layers {spec!r}: no layer pairs; {example}")
    pairs = []
    for item in items:
        parts = item.split(":")
        if len(parts) != 2 or "" in parts:
            raise ValueError(f"--ir-layers {spec!r}: {item!r} is not a student:teacher pair (uneven map: every student layer needs one teacher layer); {example}")
        try:
            s, t = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"--ir-layers {spec!r}: {item!r} is not two layer numbers; {example}") from None
        if s < 0 or t < 0:
            raise ValueError(f"--ir-layers {spec!r}: layer numbers must be >= 0; {example}")
        pairs.append((s, t))
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise ValueError(f"--ir-layers {spec!r}: a student layer appears twice; map each student layer to one teacher layer")
    return pairs


@dataclass
class MapReportConfig(Documented):
    """`kdtrain map-report`: how well a teacher dataset maps onto a student's tokenizer, before training."""

    data: str = _f("", "Teacher dataset directory or URL (ROOT/<fingerprint>).")
    student: str = _f("", "Student model spec or checkpoint directory (only its tokenizer is loaded).")
    teacher: str | None = _f(None, TrainConfig.help("teacher"))
    out: str = _f("map_report.json", "Where to write the JSON report.")
    limit: int | None = _f(None, "Measure only the first N rows.")
    vocab_match: str = _f("prefix", TrainConfig.help("vocab_match"))
    warn_below: float = _f(0.8, "Warn when less than this share of the teacher's top-k mass maps onto student ids.")


def validate_map_report(cfg: MapReportConfig) -> None:
    p: list[str] = []
    if not cfg.data:
        p.append("--data is required: a teacher dataset directory or URL written by `kdgen generate`")
    if not cfg.student:
        p.append("--student is required: a model spec or checkpoint directory (only its tokenizer is loaded)")
    if cfg.vocab_match not in VOCAB_MATCH:
        p.append(f"--vocab-match {cfg.vocab_match}: choose {' or '.join(VOCAB_MATCH)}")
    if cfg.limit is not None and cfg.limit < 1:
        p.append(f"--limit {cfg.limit}: must be >= 1")
    collect(p)


def parse_layers(spec: str) -> list[int]:
    """'0,4,8' -> [0, 4, 8] (ValueError on anything else, negatives included)."""
    out = [int(x) for x in str(spec).replace(" ", "").split(",") if x != ""]
    if any(i < 0 for i in out):
        raise ValueError(spec)
    return out


# ----------------------------------------------------------------------------------------------
# Building a config: recipe + flags + key=value overrides


def find_recipe(name: str) -> Path:
    """A recipe file by path, or by name in kdtrain/recipes ('skew_kl', 'recipes/skew_kl.yaml')."""
    p = Path(name).expanduser()
    stem = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    for found in (p, RECIPES / stem):
        if found.is_file():
            return found
    known = ", ".join(sorted(r.stem for r in RECIPES.glob("*.yaml")))
    raise KdError(f"--config {name}: no such file, and no recipe of that name (recipes: {known})")


def recipe_path(name: str) -> Path:
    """A `kdtrain run` recipe (`find_recipe`); a chain recipe (it has links) is refused with the
    command that runs it."""
    found = find_recipe(name)
    if re.search(r"(?m)^links\s*:", found.read_text(encoding="utf-8")):
        raise KdError(f"--config {found}: a chain recipe (it has links); run it with `kdtrain chain --recipe {found}`")
    return found


def load_config(recipe: str | None = None, flags: dict | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """defaults < recipe < flags < key=value overrides; raises ConfigError naming every problem."""
    return load(TrainConfig, recipe, flags, overrides, resolve_config=recipe_path, validate=validate)
