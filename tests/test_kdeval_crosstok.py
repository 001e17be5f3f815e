"""kdeval for a student whose tokenizer differs from the teacher's: chunk-level fidelity.

A tiny teacher with the SmolLM2 tokenizer scores fixed completions (`kdgen score`, so the text is
known: prose, code, digits, non-ASCII); a tiny student built from config around the real Gemma 3
tokenizer (262,144 entries, SentencePiece-style, from the packaged weights) is scored by
`kdeval run` beside a student with the teacher's tokenizer. Every chunk measure is checked against a
naive recomputation (Python loops over byte offsets, dense distributions over the student
vocabulary), and the report must label the measures. Run: `pytest tests/test_kdeval_crosstok.py`.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import build_tiny_model
from kdeval_helpers import assert_user_error, build_peaked_model, kdeval_cli, perturb

PAIRS = [
    ("Describe a fox.", "The quick brown fox jumps over the lazy dog. It wasn't amused!"),
    ("Reverse a string in Python.", "def reverse(s):\n    return s[::-1]  # slice\n"),
    ("Add two numbers.", "3.14159 + 2,718 = 5.85959; 100000000 - 42%"),
    ("Say hello in three languages.", "Café, naïve — “quotes” 😀 中文字符 Привет мир"),
]


def _write_pairs(path, pairs=PAIRS) -> str:
    rows = [{"messages": [{"role": "user", "content": p}], "completion": c} for p, c in pairs]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _score(pairs: str, out, teacher: str) -> str:
    from kdgen.generate import GenerateConfig, run

    return run(GenerateConfig(prompts=pairs, out=str(out), teacher=teacher, backend="hf", k=8, temperature=0.0), "score")


@pytest.fixture(scope="module")
def xworld(tmp_path_factory, tokenizer, gemma_tokenizer):  # noqa: F811
    tmp = tmp_path_factory.mktemp("kdeval-crosstok")
    teacher = build_peaked_model(tmp / "teacher", tokenizer, seed=0)
    return {
        "tmp": tmp,
        "teacher": teacher,
        "data": _score(_write_pairs(tmp / "pairs.jsonl"), tmp / "ds", teacher),
        "gemma": str(build_tiny_model(tmp / "gemma", gemma_tokenizer, seed=3, layers=1)),
        "near": perturb(teacher, tmp / "near", noise=0.02),
    }


@pytest.fixture(scope="module")
def evaluated(xworld):
    from kdeval.config import EvalConfig
    from kdeval.run import run

    out = xworld["tmp"] / "eval"
    cfg = EvalConfig(models=[f"gemma={xworld['gemma']}", xworld["near"]], teacher=xworld["teacher"], data=xworld["data"], out=str(out), max_new_tokens=6, batch_size=4, backend="hf")
    run(cfg)
    res = json.loads((out / "results.json").read_text())
    return out, {m["name"]: m for m in res["models"]}


# ----------------------------------------------------------------------------------------------
# The naive reference


def naive_chunks(t_pieces: list[bytes], s_pieces: list[bytes]) -> tuple[list[int], list[int], int]:
    """Chunk of every token (-1 = none): text runs both sides cut at the same byte, walked by hand.
    A token belongs to the chunk its first byte is in; an empty token (EOS) to the chunk it starts."""

    def spans(pieces):
        out, pos = [], 0
        for b in pieces:
            out.append((pos, pos + len(b)))
            pos += len(b)
        return out

    ts, ss = spans(t_pieces), spans(s_pieces)
    shared = sorted({0} | ({e for _, e in ts} & {e for _, e in ss}))

    def chunk_of(start):
        return max(i for i, b in enumerate(shared) if b <= start)

    tc, sc = [chunk_of(a) for a, _ in ts], [chunk_of(a) for a, _ in ss]
    both = sorted(set(tc) & set(sc))
    renum = {c: i for i, c in enumerate(both)}
    return [renum.get(c, -1) for c in tc], [renum.get(c, -1) for c in sc], len(both)


@pytest.fixture(scope="module")
def gemma_ctx(xworld, tokenizer):
    """Both tokenizers' bytes and the id map (tested in kdtrain; ~10 s to build for Gemma's vocabulary)."""
    from transformers import AutoTokenizer

    from kdeval.crosstok import crosstok_context
    from kdcore.dataset import TeacherDataset

    return crosstok_context(tokenizer, AutoTokenizer.from_pretrained(xworld["gemma"]), TeacherDataset(xworld["data"]).manifest)


@pytest.fixture(scope="module")
def naive(xworld, gemma_ctx):
    return naive_measures(xworld["gemma"], gemma_ctx, xworld["data"])


@torch.no_grad()
def naive_measures(student_dir: str, ctx, url: str) -> dict:
    """Every chunk measure by the definitions, in float64 over the full student vocabulary."""
    from transformers import AutoModelForCausalLM

    from kdcore.dataset import TeacherDataset

    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    tok = ctx.student_tokenizer
    ds = TeacherDataset(url)
    table = ds.read_table(columns=["messages"]).to_pylist()
    nll = t_nll = ckl = skl = 0.0
    chunks = n_bytes = hits = defined = 0
    rows = [b.row(i) for b in ds.iter_batches() for i in range(b.num_rows)]
    for r, msgs in zip(rows, table):
        t_pieces = [ctx.teacher.token(int(i)) for i in r["completion_ids"]]
        text = b"".join(t_pieces)
        s_ids = tok(text.decode("utf-8"), add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if r["finish_reason"] == "stop" else [])
        s_pieces = [ctx.student.token(j) for j in s_ids]
        assert b"".join(s_pieces) == text
        tc, sc, n = naive_chunks(t_pieces, s_pieces)
        # no chat template: the turns as plain paragraphs, as kdtrain trains such students
        prompt = tok("\n\n".join(m["content"] for m in msgs["messages"]) + "\n\n", add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([prompt + s_ids])).logits[0, len(prompt) - 1 : -1]
        logp = torch.log_softmax(logits.double(), -1).numpy()
        for c in range(n):
            s_pos = [s for s in range(len(s_ids)) if sc[s] == c]
            t_pos = [t for t in range(len(t_pieces)) if tc[t] == c]
            s_lp = sum(logp[s, s_ids[s]] for s in s_pos)
            t_lp = sum(float(r["token_logprobs"][t]) for t in t_pos)
            nll -= s_lp
            t_nll -= t_lp
            p, q = math.exp(t_lp), math.exp(s_lp)
            ckl += p * math.log(p / q) + ((1 - p) * math.log((1 - p) / (1 - q)) if p < 1 else 0.0)
            # next-token distributions at the chunk's first token, on student ids + one residual bucket
            s0, t0 = s_pos[0], t_pos[0]
            P = {}
            for j, lp in zip(r["topk_ids"][t0], r["topk_logprobs"][t0]):
                sid = int(ctx.vmap.student_id[j])
                if sid >= 0:
                    P[sid] = P.get(sid, 0.0) + math.exp(float(lp))
            Q = np.exp(logp[s0])
            kl = sum(pv * math.log(pv / Q[sid]) for sid, pv in P.items())
            p_rest, q_rest = 1.0 - sum(P.values()), 1.0 - sum(Q[sid] for sid in P)
            skl += kl + (p_rest * math.log(p_rest / q_rest) if p_rest > 1e-12 else 0.0)
            top = int(ctx.vmap.student_id[r["topk_ids"][t0][0]])
            if top >= 0:
                defined += 1
                hits += int(Q.argmax() == top)
        chunks += n
        n_bytes += len(text)
    return {
        "chunks": chunks,
        "bytes": n_bytes,
        "chunk_nll": nll / chunks,
        "teacher_chunk_nll": t_nll / chunks,
        "chunk_kl": ckl / chunks,
        "chunk_start_kl": skl / chunks,
        "chunk_top1": hits / defined,
        "chunk_top1_positions": defined,
        "nll_per_byte": nll / n_bytes,
    }


# ----------------------------------------------------------------------------------------------


def test_naive_chunks_by_hand():
    t = [b"Hel", b"lo", b" wor", b"ld", b"!", b""]  # ... + EOS
    s = [b"Hello", b" w", b"orld!", b""]
    assert naive_chunks(t, s) == ([0, 0, 1, 1, 1, 2], [0, 1, 1, 2], 3)
    assert naive_chunks(t, s[:-1]) == ([0, 0, 1, 1, 1, -1], [0, 1, 1], 2)  # the teacher's EOS alone: no chunk


def test_row_measures_match_the_naive_computation(xworld, gemma_ctx, naive):
    """kdeval.crosstok.score_crosstok on the Gemma student against the naive per-chunk loops."""
    from transformers import AutoModelForCausalLM

    from kdeval.crosstok import score_crosstok
    from kdcore.dataset import TeacherDataset
    from kdcore.teacher_data import TeacherData

    ds = TeacherDataset(xworld["data"])
    model = AutoModelForCausalLM.from_pretrained(xworld["gemma"]).eval()
    got = score_crosstok(model, TeacherData([ds]), gemma_ctx)
    want = naive
    assert got["rows"] == len(PAIRS) and got["unaligned_rows"] == 0
    assert got["chunks"] == want["chunks"] and got["bytes"] == want["bytes"] == sum(len(c.encode()) for _, c in PAIRS)
    assert got["chunk_top1_positions"] == want["chunk_top1_positions"] > 0
    for k in ("chunk_nll", "teacher_chunk_nll", "chunk_kl", "chunk_start_kl", "chunk_top1", "nll_per_byte"):
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k
    # the two tokenizers cut this text differently: fewer chunks than teacher tokens
    assert 0 < got["chunks"] < ds.num_tokens
    assert got["chunk_kl"] > 0 and got["chunk_start_kl"] > 0


def test_run_reports_chunk_measures_for_the_other_tokenizer(evaluated, naive):
    out, models = evaluated
    g, near, teacher = models["gemma"], models["near"], models["teacher"]
    assert g["tokenizer_matches_dataset"] is False and near["tokenizer_matches_dataset"] is True
    assert g["fidelity"]["kind"] == "chunk" and near["fidelity"]["kind"] == "token" and teacher["fidelity"]["kind"] == "token"
    assert g["fidelity"]["vocab_map"]["teacher_vocab"] == 49152 and g["fidelity"]["unaligned_rows"] == 0
    # token-level measures are not reported across tokenizers; their chunk-level counterparts are
    assert not {"kl", "top1", "ece", "ppl"} & set(g["metrics"])
    want = naive
    for k in ("chunk_nll", "chunk_kl", "chunk_start_kl", "chunk_top1", "nll_per_byte", "teacher_chunk_nll"):
        assert g["metrics"][k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k
    assert g["metrics"]["chunks"] == want["chunks"]
    assert "rougeL" in g["metrics"] and g["cost"]["params"] > 0 and g["cost"]["generated_tokens"] > 0
    assert "chunk-level fidelity over" in g["fidelity_note"]
    # NLL per byte for the same-tokenizer models: their token NLL over the same bytes
    for m in (near, teacher):
        assert not {"chunk_nll", "chunk_kl"} & set(m["metrics"])
        tokens, nll = m["metrics"]["tokens"], math.log(m["metrics"]["ppl"])
        assert m["metrics"]["nll_per_byte"] == pytest.approx(nll * tokens / want["bytes"], rel=1e-5)
    # the teacher's own NLL per byte is the same whichever way the text is cut
    assert teacher["metrics"]["nll_per_byte"] == pytest.approx(g["metrics"]["teacher_nll_per_byte"], rel=1e-4)
    md = (out / "REPORT.md").read_text()
    for header in ("x-tok chunk NLL ↓", "x-tok chunk KL ↓", "x-tok KL@chunk start ↓", "x-tok top-1@chunk start ↑", "NLL/byte ↓"):
        assert header in md, header
    assert "**x-tok** columns are for models whose tokenizer differs" in md
    assert "- gemma: tokenizer differs from the teacher's: chunk-level fidelity" in md
    row = next(line for line in md.splitlines() if line.startswith("| gemma |"))
    assert row.count("–") >= 4  # KL, top-1, ECE, PPL: not defined for it


def test_without_the_teachers_tokenizer_one_clear_line(xworld, tmp_path):
    """A dataset whose teacher is gone and no model with its tokenizer: name --teacher / --no-fidelity."""
    gone = tmp_path / "gone-teacher"
    shutil.copytree(xworld["teacher"], gone)
    data = _score(_write_pairs(tmp_path / "pairs.jsonl", PAIRS[:1]), tmp_path / "ds", str(gone))
    shutil.rmtree(gone)
    proc = kdeval_cli("run", "--model", xworld["gemma"], "--data", data, "--out", str(tmp_path / "o"))
    assert_user_error(proc, "another tokenizer than the dataset's", "--teacher", "--no-fidelity")
