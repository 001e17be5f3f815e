"""kdeval end to end on CPU, in a temp dir: tiny teacher -> teacher dataset -> two tiny students ->
`kdeval run` -> `kdeval compare` (console script) -> REPORT.md, PNGs that open, results.json.

The fidelity numbers are checked against a dense recomputation with the full softmax (the students
share the teacher's vocabulary), and the teacher scored against itself must give KL ~ 0, top-1
agreement 1 and ROUGE 1. Run: `pytest tests/test_kdeval_e2e.py` (~1 min).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdeval_helpers import build_peaked_model, kdeval_cli, perturb, write_prompts


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    from kdgen.generate import GenerateConfig, run

    tmp = tmp_path_factory.mktemp("kdeval-world")
    teacher = build_peaked_model(tmp / "teacher", tokenizer, seed=0)
    prompts = write_prompts(tmp / "prompts.jsonl")
    url = run(GenerateConfig(prompts=prompts, out=str(tmp / "ds"), teacher=teacher, backend="hf", max_new_tokens=10, k=8, temperature=0.0), "generate")
    near = perturb(teacher, tmp / "near", noise=0.02)
    far = build_peaked_model(tmp / "far", tokenizer, seed=1)
    # a training log, as kdtrain/TRL leave it, so the loss-curve plot has something to draw
    (Path(near) / "trainer_state.json").write_text(
        json.dumps({"log_history": [{"step": s, "loss": 3.0 / s, "kd": 2.0 / s} for s in range(1, 6)] + [{"step": 5, "train_runtime": 1.0}]})
    )
    return {"tmp": tmp, "teacher": teacher, "data": url, "near": near, "far": far, "prompts": prompts}


@pytest.fixture(scope="module")
def evaluated(world):
    from kdeval.config import EvalConfig
    from kdeval.run import run

    out = world["tmp"] / "eval-a"
    run(EvalConfig(models=[world["near"], f"far={world['far']}"], teacher=world["teacher"], data=world["data"], out=str(out), batch_size=4))
    return out, json.loads((out / "results.json").read_text())


def dense_reference(model_dir: str, url: str) -> dict:
    """KL(t||s) over top-k + tail, top-1 agreement and perplexity, from the student's full softmax."""
    from transformers import AutoModelForCausalLM

    from kdcore.dataset import TeacherDataset

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    kls, agree, nll = [], [], []
    for b in TeacherDataset(url).iter_batches(batch_rows=100):
        for i in range(b.num_rows):
            r = b.row(i)
            ids = torch.tensor(np.concatenate([r["prompt_ids"], r["completion_ids"]]))[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1).numpy()
            p = len(r["prompt_ids"])
            for t, tok in enumerate(r["completion_ids"]):
                s = logp[p - 1 + t]
                top = r["topk_ids"][t]
                pt = np.exp(r["topk_logprobs"][t].astype(np.float64))
                qs = np.exp(s[top])
                p_tail = max(float(np.exp(np.float64(r["tail_logprobs"][t]))), 1e-10)  # the dataset's tail (floored as the loss does)
                pt, p_tail = pt / (pt.sum() + p_tail), p_tail / (pt.sum() + p_tail)  # top-k + tail: one distribution
                q_tail = np.exp(s).sum() - qs.sum()  # the student's mass on every other id, summed densely
                kl = float((pt * (np.log(pt) - np.log(qs))).sum())
                if p_tail > 0:
                    kl += p_tail * (np.log(p_tail) - np.log(q_tail))
                kls.append(kl)
                agree.append(s.argmax() == top[0])
                nll.append(-s[tok])
    return {"kl": float(np.mean(kls)), "top1": float(np.mean(agree)), "ppl": float(np.exp(np.mean(nll))), "tokens": len(kls)}


def test_run_writes_results_with_every_model(evaluated, world):
    out, res = evaluated
    names = [m["name"] for m in res["models"]]
    assert names == ["teacher", "near", "far"]
    assert res["dataset"]["fingerprint"] == Path(world["data"]).name
    assert res["generation"]["greedy"] and res["generation"]["seed"] == 0
    assert res["config"]["models"] == [world["near"], f"far={world['far']}"]
    for m in res["models"]:
        assert m["tokenizer_matches_dataset"] is True
        assert m["weights_hash"] and m["path"]
        c = m["cost"]
        assert c["params"] > 0 and c["bytes_on_disk"] > 0 and c["tokens_per_s"] > 0 and c["peak_memory_bytes"] >= 0
        assert c["memory_kind"] == "cpu_rss_delta"
        for k in ("kl", "top1", "ece", "ppl", "rouge1", "rouge2", "rougeL", "bleu"):
            assert m["metrics"][k] is not None, (m["name"], k)
    assert res["models"][1]["train_log"][0] == {"step": 1, "loss": 3.0, "kd": 2.0}
    assert len(res["samples"]) == 3 and set(res["samples"][0]["outputs"]) == {"teacher", "near", "far"}
    assert (out / "REPORT.md").exists() and (out / "metrics.png").exists()


def test_teacher_against_itself(evaluated):
    _, res = evaluated
    t = res["models"][0]["metrics"]
    assert t["kl"] < 1e-4  # only the dataset's log-prob rounding (<= 5e-4 x |lp| per entry) remains
    assert t["top1"] == 1.0
    # greedy regeneration of the teacher's own greedy completions: identical text
    assert t["rouge1"] == pytest.approx(1.0) and t["rougeL"] == pytest.approx(1.0)
    assert t["bleu"] == pytest.approx(100.0)
    assert t["ppl"] == pytest.approx(t["teacher_ppl"], rel=1e-2)


def test_fidelity_matches_dense_computation(evaluated, world):
    _, res = evaluated
    for m in res["models"][1:]:
        ref = dense_reference(m["path"], world["data"])
        got = m["metrics"]
        assert got["tokens"] == ref["tokens"]
        assert got["kl"] == pytest.approx(ref["kl"], rel=1e-4, abs=1e-6)
        assert got["top1"] == pytest.approx(ref["top1"])
        assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    near, far = res["models"][1]["metrics"], res["models"][2]["metrics"]
    assert 0 < near["kl"] < far["kl"]
    assert near["top1"] > far["top1"]


def test_compare_writes_report_plots_and_results(evaluated, world, tmp_path):
    from PIL import Image

    out_a, _ = evaluated
    # a second run: prompts + a reference file, one student and a baseline
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"reference": f"answer number {i}"}) + "\n" for i in range(6)))
    out_b = tmp_path / "eval-b"
    from kdeval.config import EvalConfig
    from kdeval.run import run

    cfg = EvalConfig(models=[world["near"]], baselines=[world["far"]], prompts=world["prompts"], references=str(refs), metrics=["rouge", "bleu", "cost"], max_new_tokens=8, out=str(out_b))
    assert run(cfg) == str(out_b)
    b = json.loads((out_b / "results.json").read_text())
    assert b["eval_set"]["references"] == f"file {refs}"
    assert [m["role"] for m in b["models"]] == ["student", "baseline"]
    assert "kl" not in b["models"][0]["metrics"] and "rougeL" in b["models"][0]["metrics"]

    report = tmp_path / "report"
    proc = kdeval_cli("compare", str(out_a), str(out_b), "--out", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (report / "REPORT.md").read_text()
    assert md.count("| teacher | teacher |") == 1
    assert "| near@eval-b | student |" in md and "| far@eval-b | baseline |" in md
    assert "**" in md.split("## Results")[1].split("##")[0]  # best values in bold
    assert "Best value among the students and baselines" in md
    assert "different datasets or prompts" in md
    for png in ("metrics.png", "loss_curves.png", "quality_vs_size.png"):
        with Image.open(report / png) as im:
            im.verify()
        with Image.open(report / png) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
        assert f"]({png})" in md
    merged = json.loads((report / "results.json").read_text())
    assert len(merged["runs"]) == 2 and merged["runs"][0]["dataset"]["fingerprint"] == Path(world["data"]).name
    assert {m["name"] for m in merged["models"]} == {"teacher", "near", "far", "near@eval-b", "far@eval-b"}
    assert all("weights_hash" in m and "kd_config" in m for m in merged["models"])


def test_bold_caption_says_when_there_is_nothing_to_rank():
    from kdeval.report import _bold_caption

    teacher, s1 = {"role": "teacher", "eval_key": "a"}, {"role": "student", "eval_key": "a"}
    assert "nothing is in bold" in _bold_caption([teacher, s1])
    assert "nothing is in bold" in _bold_caption([teacher, s1, {"role": "student", "eval_key": "b"}])  # different prompts: not ranked together
    assert "in **bold**" in _bold_caption([teacher, s1, {"role": "baseline", "eval_key": "a"}])


def test_model_with_another_tokenizer(world, tmp_path):
    """A model whose tokenizer differs from the dataset's (here by one added token) gets chunk-level
    fidelity (tests/test_kdeval_crosstok.py checks the values); --no-fidelity keeps quality only."""
    from transformers import AutoTokenizer

    from kdeval.config import EvalConfig
    from kdeval.run import run

    other = Path(perturb(world["far"], tmp_path / "other-tok", noise=0.0))
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<kdeval-extra-token>"])
    tok.save_pretrained(other)
    run(EvalConfig(models=[str(other)], data=world["data"], max_new_tokens=4, limit=2, out=str(tmp_path / "c"), backend="hf"))
    m = json.loads((tmp_path / "c" / "results.json").read_text())["models"][0]
    assert m["tokenizer_matches_dataset"] is False and m["fidelity"]["kind"] == "chunk" and m["fidelity"]["rows"] == 2
    assert m["metrics"]["chunk_nll"] > 0 and "kl" not in m["metrics"]
    # quality against the dataset's completions only
    run(EvalConfig(models=[str(other)], data=world["data"], fidelity=False, max_new_tokens=4, limit=2, out=str(tmp_path / "o"), backend="hf"))
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["models"][0]["fidelity"] is None and "rougeL" in res["models"][0]["metrics"]
    assert res["eval_set"]["prompts"] == 2
