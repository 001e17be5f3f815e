"""The models of one `kdeval run`: resolve specs, match tokenizers to the dataset, measure size.

A spec is whatever `kdcore.models.resolve` takes (checkpoint directory, .gguf file, built-in name),
optionally prefixed `NAME=` to name it in the report. Weights are loaded one model at a time
(`load_weights`), so a run holds at most one model in memory.

From a `kdtrain` checkpoint we also read what it was trained on: `kd_config.json` (resolved config,
dataset fingerprints, log history) and TRL's `trainer_state.json` (log history) — whichever exist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kdcore.artifacts import KD_CONFIG
from kdcore.errors import KdError
from kdcore.models import ResolvedModel, resolve

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass
class EvalModel:
    name: str
    role: str  # student | teacher | baseline
    spec: str
    resolved: ResolvedModel
    tokenizer: object
    config: object
    tokenizer_hash: str
    matches_dataset: bool | None = None  # None: no dataset given
    kd_config: dict | None = None
    train_log: list[dict] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.resolved.path

    @property
    def embedding_rows(self) -> int:
        return int(getattr(self.config, "vocab_size", None) or len(self.tokenizer))

    def record(self) -> dict:
        """What results.json says about this model (its config and what it was trained on)."""
        kd = self.kd_config or {}
        return {
            "name": self.name,
            "role": self.role,
            "spec": self.spec,
            **self.resolved.identity(),
            "architecture": (getattr(self.config, "architectures", None) or ["?"])[0],
            "tokenizer_hash": self.tokenizer_hash,
            "tokenizer_matches_dataset": self.matches_dataset,
            "trained_on": kd.get("fingerprints"),
            "kd_config": kd or None,
            "train_log": self.train_log,
        }


def split_name(spec: str) -> tuple[str | None, str]:
    """`NAME=SPEC` -> (NAME, SPEC); a spec that exists as a path is never split."""
    if "=" in spec and not Path(spec).exists():
        name, rest = spec.split("=", 1)
        if name and "/" not in name:
            return name, rest
    return None, spec


def default_name(spec: str) -> str:
    p = Path(spec)
    return p.stem if p.suffix == ".gguf" else (p.name or spec)


def prepare(spec: str, role: str, flag: str) -> EvalModel:
    """Resolve a spec and load its config and tokenizer (not its weights)."""
    name, spec = split_name(spec)
    try:
        resolved = resolve(spec)
    except KdError as e:
        raise KdError(f"{flag} {spec}: {e}") from None
    from transformers import AutoConfig, AutoTokenizer  # after resolve: a bad path fails without the import

    from kdcore.teacher import tokenizer_identity

    try:
        config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for unreadable checkpoints
        raise KdError(f"{flag} {spec}: cannot load its config/tokenizer from {resolved.path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    rows = int(getattr(config, "vocab_size", None) or len(tokenizer))
    model = EvalModel(name or default_name(spec), role, spec, resolved, tokenizer, config, tokenizer_identity(tokenizer, rows)["tokenizer_hash"])
    model.kd_config = read_kd_config(resolved.path)
    model.train_log = read_train_log(resolved.path)
    return model


def unique_names(models: list[EvalModel]) -> None:
    """Make report names unique (`s1`, `s1-2`, ...)."""
    seen: dict[str, int] = {}
    for m in models:
        n = seen.get(m.name, 0)
        seen[m.name] = n + 1
        if n:
            m.name = f"{m.name}-{n + 1}"


def load_weights(model: EvalModel, dtype: str):
    """The model itself, in eval mode (float32 on CPU unless told otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own status line says what is loading
    try:
        m = AutoModelForCausalLM.from_pretrained(model.path, dtype=getattr(torch, dtype), trust_remote_code=False)
    except Exception as e:
        raise KdError(f"model {model.spec}: cannot load weights from {model.path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return m.eval()


def size_on_disk(path: str) -> int:
    """Bytes of the weight files in a checkpoint directory (what a deployment ships)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def read_kd_config(path: str) -> dict | None:
    f = Path(path) / KD_CONFIG
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_train_log(path: str) -> list[dict]:
    """Training loss curve [{step, loss, ...}] from kd_config.json, trainer_state.json, or the latest
    checkpoint-N/trainer_state.json below `path`; [] when there is none (the plot skips the model)."""
    p = Path(path)
    candidates = [p / "trainer_state.json"]
    ckpts = sorted(p.glob("checkpoint-*/trainer_state.json"), key=lambda f: _step_of(f.parent.name))
    candidates += ckpts[::-1]
    history = (read_kd_config(path) or {}).get("log_history")
    for f in candidates:
        if history:
            break
        if f.is_file():
            try:
                history = json.loads(f.read_text(encoding="utf-8")).get("log_history")
            except (json.JSONDecodeError, UnicodeDecodeError):
                history = None
    keep = ("step", "epoch", "loss", "kd", "ce", "total", "eval_loss")
    return [{k: h[k] for k in keep if k in h} for h in history or [] if "loss" in h and "step" in h]


def _step_of(name: str) -> int:
    try:
        return int(name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1
