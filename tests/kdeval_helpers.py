"""Helpers for the kdeval tests: tiny teachers with non-trivial outputs, perturbed students, and the
`kdeval` console script.

A freshly initialised tiny Llama with tied embeddings just repeats its last input token (the
logits are dominated by e_v . e_v), so every model "agrees" and every completion is newlines. The
tiny teacher here unties the LM head and draws it at random with a scale that makes the
next-token distribution peaked, so completions vary with context and students can disagree.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import build_tiny_model

KDEVAL = str(Path(sys.executable).parent / "kdeval")  # the console script of this virtualenv

PROMPTS = [
    "Name three colours.",
    "What is 7 times 8?",
    "Why is the sky blue?",
    "Give one tip for sleeping better.",
    "Write a haiku about rain.",
    "What is the capital of Italy?",
]


def write_prompts(path: Path, texts: list[str] = PROMPTS) -> str:
    rows = [{"messages": [{"role": "user", "content": t}]} for t in texts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def build_peaked_model(out: Path, tokenizer, seed: int, head_scale: float = 0.5) -> str:
    """Tiny Llama (SmolLM2 vocabulary) with an untied random LM head: peaked, context-dependent."""
    import torch
    from transformers import AutoModelForCausalLM

    build_tiny_model(out, tokenizer, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.manual_seed(seed + 1000)
    model.config.tie_word_embeddings = False
    hidden = model.config.hidden_size
    model.lm_head = torch.nn.Linear(hidden, model.config.vocab_size, bias=False)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, head_scale)
    model.save_pretrained(out)
    return str(out)


def perturb(src: str, out: Path, noise: float, seed: int = 7) -> str:
    """A copy of `src` with Gaussian noise of std `noise` added to every weight (a 'near' student)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    model.save_pretrained(out)
    for f in Path(src).glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    for f in ("special_tokens_map.json", "chat_template.jinja"):
        if (Path(src) / f).exists():
            shutil.copy(Path(src) / f, out / f)
    return str(out)


def kdeval_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `kdeval` console script; returns the completed process (text output)."""
    return subprocess.run([KDEVAL, *args], capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one line on stderr starting `kdeval: error:`, no traceback; returns the line."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("kdeval: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
