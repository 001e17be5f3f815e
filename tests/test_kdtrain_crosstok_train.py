"""Cross-tokenizer KD end to end on CPU: a tiny teacher with the SmolLM2 tokenizer writes a dataset
(hf backend); students with other tokenizers (the real Gemma 3 one, a byte-level BPE trained here)
train on it with `kdtrain run --mode logit`, and `kdtrain map-report` measures the pair.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from kdtrain.config import load_config
from kdtrain_helpers import generate_dataset, peaky_model, tiny_byte_level


def _student(out: Path, tok, tie: bool = True) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=32, max_position_embeddings=512, tie_word_embeddings=tie, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def xworld(tmp_path_factory, tokenizer, gemma_tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("crosstok")
    rows = [json.loads(line) for line in (REPO / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:8]]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows), encoding="utf-8")
    teacher = peaky_model(root / "teacher", tokenizer, seed=0)
    data = generate_dataset(prompts, root / "datasets", teacher)
    return {
        "root": root,
        "teacher": teacher,
        "data": data,
        "bpe_student": _student(root / "bpe-student", tiny_byte_level()),
        "gemma_student": _student(root / "gemma-student", gemma_tokenizer),
    }


def xtok_cfg(xworld, out: Path, student: str, **kw):
    flags = {"data": [xworld["data"]], "student": student, "out": str(out), "lr": 3e-3, "batch_size": 4, "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 2, "max_steps": 2}
    flags.update(kw)
    return load_config("cross_family", flags)


def test_gemma_student_batch_targets(xworld, tmp_path):
    """Targets sit at chunk starts only, in student ids; the forward gives finite KD, CE and chunk terms."""
    from kdtrain.train import build_trainer

    trainer = build_trainer(xtok_cfg(xworld, tmp_path / "g", xworld["gemma_student"]))
    ex = trainer.data_collator.examples
    assert ex.stats["kd_positions"] > 0 and ex.stats["unaligned_rows"] == 0
    batch = trainer.data_collator([{"row": i} for i in range(4)])
    scored = batch["labels"] != -100  # the collator leaves zeros (unused) off the completion
    kd_pos = torch.isfinite(batch["topk_logprobs"]).any(-1) & scored
    first = batch["span_ids"] >= 0
    first[:, 1:] &= batch["span_ids"][:, 1:] != batch["span_ids"][:, :-1]
    assert kd_pos.sum() > 0 and (kd_pos == first).all()  # targets exactly at the first token of each chunk
    assert ((batch["span_ids"] >= 0) <= scored).all()
    assert batch["topk_ids"].max() < 262144
    # teacher mass at a KD position never exceeds 1 after summing collisions
    mass = batch["topk_logprobs"].exp().sum(-1)[scored]
    assert (mass <= 1 + 1e-3).all() and mass.max() > 0.1
    out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], kd_targets=batch)
    for v in (out.kd_sum, out.ce_sum, out.span_sum):
        assert math.isfinite(v.item()) and v.item() > 0


def test_cross_family_run_and_resume(xworld, tmp_path):
    from kdtrain.train import run

    out = tmp_path / "bpe"
    run(xtok_cfg(xworld, out, xworld["bpe_student"], max_steps=2))
    record = json.loads((out / "kd_config.json").read_text())
    assert record["tokenizer"] == "different" and record["config"]["span_ll_weight"] == 0.5
    assert record["crosstok"]["kd_positions"] > 0 and record["crosstok"]["vocab_map"]["teacher_vocab"] == 49152
    last = record["log_history"][-1]
    assert all(last[k] > 0 and math.isfinite(last[k]) for k in ("kd", "ce", "span"))
    run(xtok_cfg(xworld, out, xworld["bpe_student"], max_steps=3))  # resumes from checkpoint-2
    assert json.loads((out / "kd_config.json").read_text())["global_step"] == 3


def test_teacher_tokenizer_must_match_dataset(xworld, tmp_path):
    from kdcore.errors import KdError
    from kdtrain.train import build_trainer

    with pytest.raises(KdError, match="not the one the dataset was written with"):
        build_trainer(xtok_cfg(xworld, tmp_path / "x", xworld["bpe_student"], teacher=xworld["gemma_student"]))


def test_map_report_cli(xworld, tmp_path):
    from typer.testing import CliRunner

    from kdtrain.cli import app

    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["map-report", "--data", xworld["data"], "--student", xworld["gemma_student"], "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "shared boundary" in res.output
    r = json.loads(out.read_text())
    assert r["rows"] == 8 and r["round_trip_rate"] == 1.0
    m = r["mass"]
    assert m["exact"] + m["prefix"] + m["unmapped"] + m["tail"] == pytest.approx(1.0, abs=1e-3)
    assert 0 < r["coverage"]["teacher_shared_boundary"] <= 1 and r["vocab"]["teacher_vocab"] == 49152
    assert set(r["by_class"]) >= {"word", "whitespace", "digits", "punctuation", "code", "non_ascii", "special"}
    assert np.isclose(sum(v["share_of_topk_mass"] for v in r["by_class"].values()), 1.0)
