"""Distillation quality on the embedded teacher (issue 6): which arm makes the best student?

    python bench/quality.py                                   # the small preset, ~30 min on 2 cores
    python bench/quality.py --train-prompts 510 --max-new-tokens 256 --heldout-prompts 70   # gpu preset

1. `kdgen generate`: SmolLM2-135M-Instruct (vLLM) samples completions for --train-prompts prompts of
   data/train.jsonl at temperature 1 with k=64 log-probs, and greedy completions (k=64) for
   --heldout-prompts prompts of data/heldout.jsonl. Content-keyed under $KD_CACHE/bench/quality, so
   a rerun reuses them. k=5 and k=20 arms read the same k=64 dataset through `kdtrain --top-k`
   (the stored top-k is sorted, so its first N entries are exactly the top-N; tested).
2. One student per arm, each started from the same 6 of the teacher's 30 layers
   (`--init-from-teacher 0,6,12,18,24,29`), trained by `kdtrain run` for one epoch over the same
   rows in the same order with the same seed, batch and learning rate, so every arm sees the same
   tokens (the token budget is the same):
     none        no training (the cut-down teacher as is)
     text        text-KD: cross-entropy on the teacher's sampled completions
     renorm_k20  forward KL on the renormalised top-20 (the naive sparse KD)
     tail_k5 / tail_k20 / tail_k64   forward KL on the top-k plus the tail bucket
     skew_k20    skew KL (DistiLLM, alpha 0.1) on the top-20 plus the tail bucket
3. `kdeval run` on the held-out greedy teacher dataset scores every student the same way: sparse
   KL(teacher || student) over the stored top-64 plus the tail bucket, top-1 agreement, expected
   calibration error (on the teacher's tokens) and ROUGE-L of the student's greedy completion
   against the teacher's.

The expected ordering (tail >= renorm > text > none; larger k helping less and less) is a hypothesis:
the figures are written as they come out. Writes bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cli, machine, scratch, write_result  # noqa: E402

LAYERS = "0,6,12,18,24,29"
ARMS = {
    "text": ["--mode", "text"],
    "renorm_k20": ["--tail", "renorm", "--top-k", "20"],
    "tail_k5": ["--top-k", "5"],
    "tail_k20": ["--top-k", "20"],
    "tail_k64": [],
    "skew_k20": ["--loss", "skl", "--alpha", "0.1", "--top-k", "20"],
}
METRICS = ("kl", "top1", "ece", "ppl", "rougeL")


def _cli(tool: str, *args: str) -> str:
    """Run a kd CLI (stops the bench on failure); its last stdout line: the dataset path for kdgen."""
    print("$", tool, " ".join(args), flush=True)
    out = cli(tool, *args).stdout.strip()
    return out.splitlines()[-1] if out else ""


def teacher_datasets(args) -> tuple[str, str]:
    from kdcore.models import cache_dir

    root = str(cache_dir() / "bench" / "quality")
    common = ["--k", "64", "--backend", args.backend, "--seed", "0", "--out", root]
    train = _cli("kdgen", "generate", "--prompts", "data/train.jsonl", "--limit", str(args.train_prompts), "--temperature", "1",
                 "--max-new-tokens", str(args.max_new_tokens), *common)  # fmt: skip
    heldout = _cli("kdgen", "generate", "--prompts", "data/heldout.jsonl", "--limit", str(args.heldout_prompts), "--temperature", "0",
                   "--max-new-tokens", str(args.eval_new_tokens), *common)  # fmt: skip
    return train, heldout


def untrained_student(train: str, out: Path) -> str:
    """The `none` arm: the same 6-layer cut of the teacher that every trained arm starts from."""
    import kdcore.dataset as kds
    from kdtrain.config import load_config
    from kdtrain.student import build_student

    manifest = kds.TeacherDataset(train).manifest
    student = build_student(load_config(None, {"data": [train], "init_from_teacher": LAYERS}), manifest)
    student.model.save_pretrained(out)
    student.tokenizer.save_pretrained(out)
    return str(out)


def train_arm(args, name: str, train: str, out: Path) -> dict:
    """`kdtrain run` for one arm; a finished run of the same arm and settings in --work is reused."""
    done = out / "kd_config.json"
    if done.exists():
        record = json.loads(done.read_text())
        same = {"data": [train], "lr": args.lr, "batch_size": args.batch} == {k: record["config"][k] for k in ("data", "lr", "batch_size")}
        if same and record.get("arm") == name:
            return {"train_s": record.get("train_s"), "tokens": record["examples"]["tokens"], "reused": True}
    t = time.perf_counter()
    _cli("kdtrain", "run", "--data", train, "--init-from-teacher", LAYERS, "--epochs", "1", "--batch-size", str(args.batch),
         "--lr", str(args.lr), "--warmup-ratio", "0.05", "--seed", "0", "--logging-steps", "8", "--save-steps", "100000",
         "--out", str(out), *ARMS[name])  # fmt: skip
    record = json.loads(done.read_text())
    record.update(arm=name, train_s=round(time.perf_counter() - t, 1))
    done.write_text(json.dumps(record, indent=2))
    return {"train_s": record["train_s"], "tokens": record["examples"]["tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-prompts", type=int, default=256)
    ap.add_argument("--heldout-prompts", type=int, default=70)
    ap.add_argument("--max-new-tokens", type=int, default=96, help="teacher completion length for training")
    ap.add_argument("--eval-new-tokens", type=int, default=64, help="greedy completion length for evaluation")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--backend", default="vllm", help="generation backend: kdgen for the teacher, kdeval for the students")
    ap.add_argument("--arms", default=",".join(["none", *ARMS]), help="comma-separated subset of the arms")
    ap.add_argument("--work", default=None, help="keep the students here (default: a temporary directory)")
    args = ap.parse_args()
    arms = args.arms.split(",")
    unknown = set(arms) - {"none", *ARMS}
    if unknown:
        sys.exit(f"unknown arm(s) {', '.join(sorted(unknown))}; choose from none, {', '.join(ARMS)}")
    work = Path(args.work) if args.work else scratch("kd-quality-")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    train, heldout = teacher_datasets(args)
    runs: dict[str, dict] = {}
    models = []
    for name in arms:
        out = work / name
        if name == "none":
            untrained_student(train, out)
            runs[name] = {"train_s": 0.0, "tokens": 0}
        else:
            runs[name] = train_arm(args, name, train, out)
        models += ["--model", f"{name}={out}"]
    _cli("kdeval", "run", "--data", heldout, *models, "--max-new-tokens", str(args.eval_new_tokens),
         "--backend", args.backend, "--out", str(work / "eval"))  # fmt: skip
    results = json.loads((work / "eval" / "results.json").read_text())
    by_name = {m["name"]: m["metrics"] for m in results["models"]}
    table = {name: {k: round(by_name[name][k], 4) for k in METRICS if by_name[name].get(k) is not None} for name in arms}

    def better(a: str, b: str, key: str, lower: bool) -> bool | None:
        if a not in table or b not in table:
            return None
        return table[a][key] < table[b][key] if lower else table[a][key] > table[b][key]

    write_result(
        "quality",
        {
            "name": "quality",
            "command": "bench/quality.py " + " ".join(sys.argv[1:]),
            "machine": machine(),
            "setup": {
                "teacher": "smollm2-135m-instruct", "student": f"init-from-teacher {LAYERS} (6 of 30 layers)",
                "train_dataset": train, "heldout_dataset": heldout, "train_prompts": args.train_prompts,
                "heldout_prompts": args.heldout_prompts, "max_new_tokens": args.max_new_tokens,
                "eval_new_tokens": args.eval_new_tokens, "batch": args.batch, "lr": args.lr, "epochs": 1, "seed": 0,
                "tokens_per_arm": max(r["tokens"] for r in runs.values()), "arms": {n: ARMS.get(n, "no training") for n in arms},
            },  # fmt: skip
            "figures": {
                "heldout": table,
                "checks": {
                    "tail_k20_kl_below_renorm_k20": better("tail_k20", "renorm_k20", "kl", True),
                    "renorm_k20_kl_below_text": better("renorm_k20", "text", "kl", True),
                    "text_kl_below_none": better("text", "none", "kl", True),
                    "tail_k20_rougeL_above_text": better("tail_k20", "text", "rougeL", False),
                    "tail_k64_kl_below_tail_k20": better("tail_k64", "tail_k20", "kl", True),
                    "tail_k20_kl_below_tail_k5": better("tail_k20", "tail_k5", "kl", True),
                },
                "train_s": {n: r["train_s"] for n, r in runs.items()},
                "wall_s": round(time.perf_counter() - t0, 1),
            },
        },
    )
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
