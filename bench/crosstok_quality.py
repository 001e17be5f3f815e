"""Cross-tokenizer KD quality check (issue 4): does the cross-tokenizer loss beat text-KD alone?

    python bench/crosstok_quality.py                 # defaults below; a few minutes on 2 CPU cores
    python bench/crosstok_quality.py --steps 80 --train-prompts 128
    python bench/crosstok_quality.py --train-data DS --heldout-data DS   # existing SmolLM2 datasets

1. Teacher datasets from the packaged SmolLM2-135M-Instruct (kdgen, hf backend, sampled at
   temperature 0.7, k=16): --train-prompts prompts of data/train.jsonl, --heldout-prompts of
   data/heldout.jsonl. Content-keyed, cached under $KD_CACHE/bench/crosstok, so reruns skip this.
2. The same tiny cross-family student twice from the same seed: a Llama built from config with the
   **Gemma 3 tokenizer** (262,144 entries; SmolLM2's is byte-level BPE with 49,152), trained by
   `kdtrain run` for the same steps on the same rows and batches (so the same student tokens):
     text   — `--mode text`: cross-entropy on the teacher's re-tokenised text (text-KD alone);
     cross  — `--config cross_family`: CE + sparse KD at aligned chunk starts (mapped top-k +
              residual bucket) + chunk-likelihood term.
3. Held-out, on the teacher's held-out completions aligned exactly as in training: the student's
   **chunk-level NLL** (nats per aligned chunk, -log p_student(chunk) summed over the student's
   tokens of the chunk; lower is better), the teacher's own chunk NLL for reference, the binary
   chunk KL(teacher || student) and the sparse forward KL at chunk starts — computed by
   `kdeval.crosstok`, the cross-tokenizer fidelity `kdeval run` reports for such students.

Writes bench/results/crosstok_quality.json. Both figures are reported whichever way they come out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KD_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine, scratch, write_result  # noqa: E402
from kdcore.io import now_iso  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _prompts(src: Path, n: int, out: Path) -> Path:
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()[:n]]
    out.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows), encoding="utf-8")
    return out


def teacher_datasets(args, work: Path) -> tuple[str, str]:
    from kdgen.generate import GenerateConfig, run
    from kdcore.models import cache_dir

    if args.train_data and args.heldout_data:
        return args.train_data, args.heldout_data

    root = cache_dir() / "bench" / "crosstok"
    out = []
    for name, src, n in (("train", "train.jsonl", args.train_prompts), ("heldout", "heldout.jsonl", args.heldout_prompts)):
        prompts = _prompts(ROOT / "data" / src, n, work / f"{name}.jsonl")
        cfg = GenerateConfig(prompts=str(prompts), out=str(root), teacher="smollm2-135m-instruct", backend="hf", max_new_tokens=args.max_new_tokens, k=args.k, temperature=0.7, seed=0)
        out.append(run(cfg, "generate"))
    return out[0], out[1]


def build_student(args, work: Path) -> str:
    """A tiny Llama with the Gemma 3 tokenizer, saved with it (tied embeddings)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kdcore.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("gemma3-270m").path)
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 32, head_dim=32, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    out = work / "student-init"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def train(arm: str, data: str, student: str, args, work: Path) -> tuple[str, float, dict]:
    from kdtrain.config import load_config
    from kdtrain.train import run

    flags = {
        "data": [data], "student": student, "out": str(work / arm), "lr": args.lr, "batch_size": args.batch,
        "max_steps": args.steps, "warmup_ratio": 0.05, "logging_steps": max(args.steps // 4, 1), "save_steps": 10_000,
        "seed": args.seed, "max_length": 512,
    }
    if arm == "text":
        cfg = load_config(None, {**flags, "mode": "text"})
    else:
        cfg = load_config("cross_family", flags)
    t0 = time.perf_counter()
    out = run(cfg)
    wall = time.perf_counter() - t0
    record = json.loads((Path(out) / "kd_config.json").read_text())
    return out, wall, record


def evaluate(model_dir: str, heldout: str) -> dict:
    """Held-out chunk-level measures of the student on the teacher's completions (module docstring),
    computed by kdeval's cross-tokenizer fidelity (`kdeval.crosstok`, the same as `kdeval run`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdeval.crosstok import crosstok_context, score_crosstok
    from kdcore.crosstok import load_teacher_tokenizer
    from kdcore.teacher_data import open_teacher_data

    data = open_teacher_data([heldout])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    teacher_tok = load_teacher_tokenizer(data.manifest["teacher"]["path"], data.manifest)
    got = score_crosstok(model, data, crosstok_context(teacher_tok, AutoTokenizer.from_pretrained(model_dir), data.manifest))
    return {
        "chunks": got["chunks"],
        "bytes": got["bytes"],
        "student_chunk_nll": got["chunk_nll"],
        "teacher_chunk_nll": got["teacher_chunk_nll"],
        "student_nll_per_byte": got["nll_per_byte"],
        "chunk_kl": got["chunk_kl"],
        "sparse_fkl_at_chunk_starts": got["chunk_start_kl"],
        "top1_at_chunk_starts": got["chunk_top1"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-prompts", type=int, default=96)
    ap.add_argument("--heldout-prompts", type=int, default=24)
    ap.add_argument("--train-data", help="Use this SmolLM2 teacher dataset instead of generating one (with --heldout-data).")
    ap.add_argument("--heldout-data", help="Held-out SmolLM2 teacher dataset (with --train-data).")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    work = scratch("kd-crosstok-")
    t0 = time.perf_counter()
    train_ds, heldout_ds = teacher_datasets(args, work)
    gen_s = time.perf_counter() - t0
    student = build_student(args, work)
    arms = {}
    for arm in ("text", "cross"):
        out, wall, record = train(arm, train_ds, student, args, work)
        ev = evaluate(out, heldout_ds)
        hist = record["log_history"]
        arms[arm] = {
            "train_seconds": round(wall, 1),
            "steps": record["global_step"],
            "train_tokens": record["examples"]["tokens"],
            "final_train_log": hist[-1] if hist else None,
            "heldout": ev,
        }
        if arm == "cross":
            arms[arm]["crosstok"] = record["crosstok"]
        print(f"{arm}: held-out chunk NLL {ev['student_chunk_nll']:.4f} nats/chunk ({wall:.0f} s training)", flush=True)
    init = evaluate(student, heldout_ds)
    text, cross = arms["text"]["heldout"], arms["cross"]["heldout"]
    result = {
        "name": "crosstok_quality",
        "setup": {**vars(args), "teacher": "smollm2-135m-instruct (hf backend, temperature 0.7)", "student": "tiny Llama from config with the Gemma 3 tokenizer (262,144)", "train_dataset": train_ds, "heldout_dataset": heldout_ds},
        "figures": {
            "heldout_chunk_nll": {"text_kd": round(text["student_chunk_nll"], 4), "crosstok_kd": round(cross["student_chunk_nll"], 4), "untrained": round(init["student_chunk_nll"], 4), "teacher": round(text["teacher_chunk_nll"], 4)},
            "crosstok_minus_text": round(cross["student_chunk_nll"] - text["student_chunk_nll"], 4),
            "crosstok_better": cross["student_chunk_nll"] < text["student_chunk_nll"],
            "heldout_chunk_kl": {"text_kd": round(text["chunk_kl"], 4), "crosstok_kd": round(cross["chunk_kl"], 4)},
            "heldout_sparse_fkl_at_chunk_starts": {"text_kd": round(text["sparse_fkl_at_chunk_starts"], 4), "crosstok_kd": round(cross["sparse_fkl_at_chunk_starts"], 4)},
        },
        "arms": arms,
        "untrained": init,
        "generation_seconds": round(gen_s, 1),
        "machine": machine(),
        "created": now_iso(),
    }
    write_result("crosstok_quality", result)
    print(json.dumps(result["figures"], indent=2))
    assert all(math.isfinite(v) for v in (text["student_chunk_nll"], cross["student_chunk_nll"]))


if __name__ == "__main__":
    main()
