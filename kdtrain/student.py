"""Build the student: from a model spec, from a fresh config, or from layers of the teacher.

* `--student SPEC`: any model spec `kdcore.models.resolve` takes (built-in name, .gguf, HF dir).
* `--student-config PATH`: a config.json (or a directory holding one), randomly initialised
  (seed --seed); the tokenizer comes from that directory if it has one, else from the teacher.
* `--init-from-teacher 0,4,8`: the teacher's embeddings, final norm, LM head and the chosen
  decoder blocks, in that order — the DistilBERT (Sanh et al. 2019) / Minitron (Muralidharan et
  al. 2024) way to start a student. The result is a plain model of the same architecture with
  fewer layers, so it saves and loads like any checkpoint.

The teacher, when needed, is `--teacher`, else the path the dataset manifest recorded.
Test: `pytest tests/test_kdtrain_train.py` (students from a spec, a config, teacher layers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcore.errors import KdError
from kdcore.models import load_tokenizer, resolve
from kdtrain.config import TrainConfig, parse_layers


@dataclass
class Student:
    model: object  # transformers PreTrainedModel
    tokenizer: object
    origin: dict  # how it was made; recorded in kd_config.json

    @property
    def embedding_rows(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def context(self) -> int:
        c = self.model.config.get_text_config()
        for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            v = getattr(c, name, None)
            if isinstance(v, int) and v > 0:
                return v
        return 2048


def teacher_spec(cfg: TrainConfig, manifest: dict) -> str:
    """--teacher, else the teacher path recorded in the manifest (must exist here)."""
    if cfg.teacher:
        return cfg.teacher
    path = manifest["teacher"].get("path")
    if path and Path(path).is_dir():
        return path
    source = manifest["teacher"]["source"]
    raise KdError(
        f"the teacher recorded in the dataset ({source}, at {path}) is not on this machine; "
        f"pass --teacher with its model spec or checkpoint directory"
    )


def load_model(spec: str, dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer, identity) of a model spec; `dtype="auto"` keeps the checkpoint's dtype."""
    from transformers import AutoModelForCausalLM

    resolved = resolve(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, trust_remote_code=False)
    except Exception as e:
        raise KdError(f"model {spec!r}: cannot load it from {resolved.path} ({type(e).__name__}: {e})") from None
    return model, load_tokenizer(resolved.path), resolved.identity()


def from_spec(spec: str) -> Student:
    model, tok, identity = load_model(spec)
    return Student(model, tok, {"kind": "spec", **identity})


def from_config(path: str, tokenizer_source: str, seed: int) -> Student:
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path).expanduser()
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise KdError(f"--student-config {path}: no such file (expected a config.json or a directory holding one)")
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
        model_type = d.pop("model_type")
        config = AutoConfig.for_model(model_type, **d)
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise KdError(f"--student-config {path}: not a transformers config with a model_type ({type(e).__name__}: {e})") from None
    tok_dir = p if p.is_dir() and any(p.glob("tokenizer*")) else Path(resolve(tokenizer_source).path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return Student(model, load_tokenizer(str(tok_dir)), {"kind": "config", "config": str(file), "tokenizer": str(tok_dir), "seed": seed})


def from_teacher_layers(teacher: str, layers: list[int]) -> Student:
    """The teacher with only `layers` kept (in the given order), rebuilt as a clean model."""
    from transformers import AutoModelForCausalLM

    model, tok, identity = load_model(teacher)
    backbone = model.base_model
    blocks = getattr(backbone, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise KdError(f"--init-from-teacher: {type(model).__name__} keeps no decoder blocks at model.layers; use --student or --student-config")
    bad = [i for i in layers if i >= len(blocks)]
    if bad:
        raise KdError(f"--init-from-teacher {','.join(map(str, layers))}: the teacher has {len(blocks)} layers (0..{len(blocks) - 1}); {bad} out of range")
    config = model.config.get_text_config()
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    backbone.layers = torch.nn.ModuleList([blocks[i] for i in layers])
    state = model.state_dict()
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    fresh.load_state_dict(state)
    fresh.generation_config = model.generation_config
    return Student(fresh, tok, {"kind": "teacher_layers", "teacher": identity, "layers": layers})


def build_student(cfg: TrainConfig, manifest: dict) -> Student:
    if cfg.student:
        return from_spec(cfg.student)
    if cfg.student_config:
        return from_config(cfg.student_config, teacher_spec(cfg, manifest), cfg.seed)
    return from_teacher_layers(teacher_spec(cfg, manifest), parse_layers(cfg.init_from_teacher or ""))
