"""Shared fixtures: the real SmolLM2 tokenizer (from the packaged GGUF, converted once and cached
under $KD_CACHE) and tiny models built from config around it. Nothing is downloaded.

Fast tests use `tiny_model_dir` (2 layers, hidden 64, head_dim 32 — vLLM's CPU attention rejects
head_dim 16). Tests marked `slow` load the real teacher or start the vLLM engine.
"""

from __future__ import annotations

import os

os.environ.setdefault("KD_QUIET", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from kdcore.models import resolve

    return resolve("smollm2-135m-instruct").path


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def build_tiny_model(out: Path, tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A tiny Llama with the real SmolLM2 vocabulary, saved as an HF checkpoint directory."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-teacher"), tokenizer))


@pytest.fixture()
def prompts_file(tmp_path) -> str:
    """Six short chat prompts (one with a system message, one non-ASCII) as JSONL."""
    import json

    rows = [
        {"messages": [{"role": "user", "content": "Name three colours."}]},
        {"messages": [{"role": "user", "content": "What is 7 times 8?"}]},
        {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}]},
        {"messages": [{"role": "user", "content": "Traduis en anglais : « Où est la bibliothèque ? »"}]},
        {"messages": [{"role": "user", "content": "Write a Python function that reverses a string."}]},
        {"messages": [{"role": "user", "content": "Give one tip for sleeping better."}]},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def gemma_tokenizer():
    from transformers import AutoTokenizer

    from kdcore.models import resolve

    return AutoTokenizer.from_pretrained(resolve("gemma3-270m").path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """The kdtrain tests' world: teacher (2 layers), another tiny student, 12 prompts and the
    teacher's dataset (k=8). Module-scoped: one per test module that asks for it."""
    import json

    from kdtrain_helpers import generate_dataset, peaky_model

    root = tmp_path_factory.mktemp("kdtrain")
    rows = [json.loads(line) for line in (REPO / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:12]]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows), encoding="utf-8")
    teacher = peaky_model(root / "teacher", tokenizer, seed=0)
    student = peaky_model(root / "student", tokenizer, seed=1, layers=1)
    data = generate_dataset(prompts, root / "datasets", teacher)
    return {"root": root, "prompts": prompts, "teacher": teacher, "student": student, "data": data}
