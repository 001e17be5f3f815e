"""Helpers shared by the kdtrain and kdeval tests (plain functions; the fixtures live in conftest.py):
the dense divergence reference, small tokenizers trained here, tiny peaked models, a teacher
dataset written through kdgen, and a kdtrain config for the tiny world.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import REPO, build_tiny_model
from kdtrain.config import load_config

ALPHA, BETA = 0.1, 0.3


def dense_divergence(p: torch.Tensor, q: torch.Tensor, loss: str) -> torch.Tensor:
    """Textbook formulas on probabilities. p = teacher, q = student: [N, K] -> [N]."""
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if loss == "fkl":
        return kl(p, q)
    if loss == "rkl":
        return kl(q, p)
    if loss == "skl":
        return kl(p, ALPHA * p + (1 - ALPHA) * q)
    if loss == "srkl":
        return kl(q, (1 - ALPHA) * p + ALPHA * q)
    if loss == "jsd":
        m = BETA * p + (1 - BETA) * q
        return BETA * kl(p, m) + (1 - BETA) * kl(q, m)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if loss == "symkl":
        return kl(p, q) + kl(q, p)
    raise AssertionError(loss)


def train_text() -> list[str]:
    return [json.loads(line)["messages"][-1]["content"] for line in (REPO / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()]


def tiny_byte_level(vocab: int = 300):
    """A small byte-level BPE (GPT-2 style) trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(train_text(), trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def tiny_sentencepiece(vocab: int = 500):
    """A small SentencePiece-style BPE trained here: `▁` for spaces with a dummy prefix, and
    `<0xNN>` byte-fallback tokens for everything outside its pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.train_from_iterator(train_text(), trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "</s>"]))
    spec = json.loads(tk.to_str())
    vocab_map = dict(spec["model"]["vocab"])
    for b in range(256):
        vocab_map.setdefault(f"<0x{b:02X}>", len(vocab_map))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]
    tk2 = Tokenizer(models.BPE(vocab=vocab_map, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tk2.add_special_tokens(["<unk>", "</s>"])
    tk2.normalizer = normalizers.Sequence([])
    tk2.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk2.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tk2, eos_token="</s>", unk_token="<unk>", pad_token="</s>")


MAX_NEW = 16


def peaky_model(out: Path, tokenizer, seed: int, layers: int = 2, vocab_rows: int | None = None) -> str:
    """A tiny Llama with an untied, large LM head: peaked next-token distributions that depend on
    the context (with tied embeddings a random model just repeats its input token), so KD has signal."""
    from transformers import AutoConfig, AutoModelForCausalLM

    build_tiny_model(out, tokenizer, seed=seed, layers=layers)
    config = AutoConfig.from_pretrained(out)
    config.tie_word_embeddings = False
    if vocab_rows:
        config.vocab_size = vocab_rows
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(out)
    return str(out)


def generate_dataset(prompts: Path, out: Path, teacher: str, k: int = 8) -> str:
    from kdgen.generate import GenerateConfig, run

    cfg = GenerateConfig(prompts=str(prompts), out=str(out), teacher=teacher, backend="hf", max_new_tokens=MAX_NEW, k=k, temperature=0.0)
    return run(cfg, "generate")


def train_cfg(world, out: Path, **kw):
    flags = {"data": [world["data"]], "student": world["student"], "out": str(out), "lr": 3e-3, "batch_size": 4, "warmup_ratio": 0.0, "logging_steps": 2, "save_steps": 4, "max_steps": 4}
    flags.update(kw)
    return load_config(None, flags)


def grads_after_one_step(world, out: Path, **kw) -> dict[str, torch.Tensor]:
    from transformers import TrainerCallback

    from kdtrain.train import build_trainer

    grads: dict[str, torch.Tensor] = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **_):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer = build_trainer(train_cfg(world, out, max_steps=1, max_grad_norm=0.0, ce_weight=0.5, loss="jsd", **kw), callbacks=[Grab()])
    trainer.train()
    return grads


def other_tokenizer_model(out: Path) -> str:
    """A tiny Llama with its own byte-level BPE tokenizer trained here (a different tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = [json.loads(line)["messages"][-1]["content"] for line in (REPO / "data" / "train.jsonl").read_text().splitlines()]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def temper(probs: torch.Tensor, tau: float) -> torch.Tensor:
    x = probs.pow(1.0 / tau)
    return x / x.sum(-1, keepdim=True)


def dense_kd_reference(logits, teacher_logp, ids, labels, loss, tail, tau, ce_weight):
    """The sparse top-k loss computed densely (tests/test_kdtrain_losses.py, test_kdgen_format_v2.py):
    full softmax, then collapse onto the top-k ids (+ tail) and temper, in float64."""
    q_full = logits.double().softmax(-1)
    p_full = teacher_logp.double().exp()
    p_top, q_top = p_full.gather(1, ids), q_full.gather(1, ids)
    if tail == "teacher_renorm":  # Axolotl / DistillKit: student tempered over the full vocabulary, not renormalised
        q_tau = (logits.double() / tau).softmax(-1).gather(1, ids)
        kd = dense_divergence(temper(p_top / p_top.sum(-1, keepdim=True), tau), q_tau, loss) * tau**2
        ce = -q_full.log().gather(1, labels[:, None]).squeeze(1)
        return ce_weight * ce.sum() + kd.sum(), kd.sum()
    if tail == "bucket":
        p = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp(min=1e-10)], -1)
        q = torch.cat([q_top, (1 - q_top.sum(-1, keepdim=True)).clamp(min=1e-10)], -1)
    else:
        p, q = p_top / p_top.sum(-1, keepdim=True), q_top / q_top.sum(-1, keepdim=True)
    kd = dense_divergence(temper(p, tau), temper(q, tau), loss) * tau**2
    ce = -q_full.log().gather(1, labels[:, None]).squeeze(1)
    return ce_weight * ce.sum() + kd.sum(), kd.sum()
