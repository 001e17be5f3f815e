"""Distillation quality on the embedded teacher (issues 6, 14): which arm makes the best student?

    python bench/quality.py                                   # every arm, 3 seeds (hours on 2 busy cores; a GPU box: minutes)
    python bench/quality.py --arms none,text,bucket_k20,teacher_renorm_k20,renorm_k20 --seeds 0,1 --epochs 1   # reduced
    python bench/quality.py --render                          # table + plot again from bench/results/quality.json

1. `kdgen generate`: SmolLM2-135M-Instruct (vLLM) samples completions for --train-prompts prompts of
   data/train.jsonl at temperature 1 with k=64 log-probs, and greedy completions (k=64) for
   --heldout-prompts prompts of data/heldout.jsonl. Content-keyed under $KD_CACHE/bench/quality, so
   a rerun reuses them. k=5 and k=20 arms read the same k=64 dataset through `kdtrain --top-k`
   (the stored top-k is sorted, so its first N entries are exactly the top-N; tested).
2. One student per arm and seed, each started from the same cut of the teacher (`--layers`,
   default 6 of its 30 layers), trained by `kdtrain run` for --epochs over the same rows with the
   same batch and learning rate; the seed sets the data order (and dropout), so the spread over
   seeds is what a reader needs to tell a winner from noise. Arms (`ARMS`):
     none                 no training (the cut as is; deterministic, one "seed")
     text                 text-KD: cross-entropy on the teacher's sampled completions
     bucket_k5/k20/k64    forward KL on the top-k plus one tail bucket (kd's default)
     teacher_renorm_k20   forward KL, teacher renormalised over its top-20, student full-vocabulary
                          log-softmax (Axolotl's / DistillKit's default: the field's common variant)
     renorm_k20           forward KL with both sides renormalised over the top-20 (Axolotl kd_normalize_topk)
     rkl/jsd/skl/srkl_k20 the other divergences on the top-20 plus the tail bucket (skew alpha 0.1, JSD beta 0.5);
                          fkl at k=20 is bucket_k20
   plus --extra-arms NAME=FLAGS for one-off experiments (e.g. `skl_lr1e-3="--loss skl --top-k 20 --lr 1e-3"`).
3. `kdeval run` on the held-out greedy teacher dataset scores every student the same way: sparse
   KL(teacher || student) over the stored top-64 plus the tail bucket, top-1 agreement, expected
   calibration error, perplexity (all on the teacher's tokens) and ROUGE-L of the student's greedy
   completion against the teacher's.

Writes bench/results/quality.json (per seed, mean and sample standard deviation per arm) and
bench/results/quality.png (one panel per metric, mean ± sd per arm, the seeds as dots). The
figures are written as they come out; nothing here knows which arm should win.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, cli, machine, results_path, scratch, write_result  # noqa: E402

LAYERS = "0,6,12,18,24,29"
ARMS = {
    "text": ["--mode", "text"],
    "bucket_k5": ["--top-k", "5"],
    "bucket_k20": ["--top-k", "20"],
    "bucket_k64": [],
    "teacher_renorm_k20": ["--tail", "teacher_renorm", "--top-k", "20"],
    "renorm_k20": ["--tail", "renorm", "--top-k", "20"],
    "rkl_k20": ["--loss", "rkl", "--top-k", "20"],
    "jsd_k20": ["--loss", "jsd", "--beta", "0.5", "--top-k", "20"],
    "skl_k20": ["--loss", "skl", "--alpha", "0.1", "--top-k", "20"],
    "srkl_k20": ["--loss", "srkl", "--alpha", "0.1", "--top-k", "20"],
}
# (metric, label, lower is better)
METRICS = (("kl", "sparse KL(t‖s)", True), ("top1", "top-1 agree", False), ("ece", "ECE", True), ("ppl", "PPL", True), ("rougeL", "ROUGE-L vs teacher", False))


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


def untrained_student(train: str, layers: str, out: Path) -> str:
    """The `none` arm: the same cut of the teacher that every trained arm starts from."""
    import kdcore.dataset as kds
    from kdtrain.config import load_config
    from kdtrain.student import build_student

    manifest = kds.TeacherDataset(train).manifest
    student = build_student(load_config(None, {"data": [train], "init_from_teacher": layers}), manifest)
    student.model.save_pretrained(out)
    student.tokenizer.save_pretrained(out)
    return str(out)


def train_arm(args, flags: list[str], train: str, seed: int, out: Path) -> dict:
    """`kdtrain run` for one arm and seed; a finished run with the same command in --work is reused."""
    done = out / "kd_config.json"
    cmd = ["run", "--data", train, "--init-from-teacher", args.layers, "--epochs", str(args.epochs), "--batch-size", str(args.batch),
           "--lr", str(args.lr), "--warmup-ratio", "0.05", "--seed", str(seed), "--logging-steps", "4", "--save-steps", "100000",
           "--out", str(out), *(["--limit", str(args.train_rows)] if args.train_rows else []), *flags]  # fmt: skip  (later flags win)
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("bench_command") == cmd:
            return {"train_s": record.get("train_s"), "tokens": record["examples"]["tokens"], "reused": True}
    t = time.perf_counter()
    _cli("kdtrain", *cmd)
    record = json.loads(done.read_text())
    record.update(bench_command=cmd, train_s=round(time.perf_counter() - t, 1))
    done.write_text(json.dumps(record, indent=2))
    return {"train_s": record["train_s"], "tokens": record["examples"]["tokens"]}


def summarise(per_seed: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """arm -> metric -> {mean, sd, n, values}; sd is the sample standard deviation (0 with one seed)."""
    out = {}
    for arm, seeds in per_seed.items():
        out[arm] = {}
        for key, _, _ in METRICS:
            vals = [m[key] for m in seeds.values() if m.get(key) is not None]
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                out[arm][key] = {"mean": statistics.fmean(vals), "sd": sd, "n": len(vals), "values": vals}
    return out


def table_md(summary: dict[str, dict]) -> str:
    """Markdown: arm x metric, mean ± sd (n seeds); the best mean of each column in bold."""
    best = {}
    for key, _, lower in METRICS:
        means = [s[key]["mean"] for s in summary.values() if key in s]
        if means:
            best[key] = min(means) if lower else max(means)
    lines = ["| arm | seeds | " + " | ".join(f"{lab} {'↓' if lower else '↑'}" for _, lab, lower in METRICS) + " |",
             "|---|---:|" + "---:|" * len(METRICS)]  # fmt: skip
    for arm, s in summary.items():
        cells = []
        for key, _, _ in METRICS:
            if key not in s:
                cells.append("–")
                continue
            m, sd = s[key]["mean"], s[key]["sd"]
            f = "{:,.0f}" if key == "ppl" and m >= 100 else "{:.3f}"
            text = f"{f.format(m)} ± {f.format(sd)}"
            cells.append(f"**{text}**" if m == best[key] else text)
        n = max(v["n"] for v in s.values())
        lines.append(f"| {arm} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, dict], path: Path) -> None:
    """One panel per metric: mean ± sd per arm (bars), each seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 0.45 * len(arms) + 1.5), sharey=True)
    for ax, (key, label, lower) in zip(axes, METRICS):
        ys = range(len(arms))
        means = [summary[a].get(key, {}).get("mean", float("nan")) for a in arms]
        sds = [summary[a].get(key, {}).get("sd", 0.0) for a in arms]
        ax.barh(ys, means, xerr=sds, color="#1f77b4", alpha=0.6, capsize=3)
        for y, a in zip(ys, arms):
            vals = summary[a].get(key, {}).get("values", [])
            ax.plot(vals, [y] * len(vals), "k.", ms=4)
        if key == "ppl":
            ax.set_xscale("log")
        ax.set_title(f"{label} {'↓' if lower else '↑'}")
        ax.set_yticks(list(ys), arms)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def arms_of(args) -> dict[str, list[str]]:
    arms = {"none": None, **ARMS}
    for item in args.extra_arms:
        name, _, flags = item.partition("=")
        arms[name] = shlex.split(flags)
    chosen = args.arms.split(",") + [i.partition("=")[0] for i in args.extra_arms]
    unknown = set(chosen) - set(arms)
    if unknown:
        sys.exit(f"unknown arm(s) {', '.join(sorted(unknown))}; choose from {', '.join(arms)} or add --extra-arms NAME=FLAGS")
    return {a: arms[a] for a in dict.fromkeys(chosen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-prompts", type=int, default=256)
    ap.add_argument("--heldout-prompts", type=int, default=70)
    ap.add_argument("--max-new-tokens", type=int, default=96, help="teacher completion length for training")
    ap.add_argument("--eval-new-tokens", type=int, default=64, help="greedy completion length for evaluation")
    ap.add_argument("--train-rows", type=int, default=0, help="train on the first N rows only (kdtrain --limit; 0 = all)")
    ap.add_argument("--layers", default=LAYERS, help="teacher layers the student keeps (kdtrain --init-from-teacher)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--jobs", type=int, default=1, help="training runs at once (each its own process)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds per arm (data order)")
    ap.add_argument("--backend", default="vllm", help="kdgen's backend for the teacher datasets")
    ap.add_argument("--eval-backend", default=None, help="kdeval's backend for the students' greedy completions (default: --backend)")
    ap.add_argument("--arms", default=",".join(["none", *ARMS]), help="comma-separated subset of the arms")
    ap.add_argument("--extra-arms", nargs="*", default=[], metavar="NAME=FLAGS", help="one-off arms: kdtrain flags after the common ones")
    ap.add_argument("--work", default=None, help="keep the students here (default: a temporary directory)")
    ap.add_argument("--render", action="store_true", help="only rewrite the plot and print the table from quality.json")
    args = ap.parse_args()
    if args.render:
        summary = json.loads(results_path("quality").read_text())["figures"]["summary"]
        plot(summary, RESULTS / "quality.png")
        print(table_md(summary))
        return
    arms = arms_of(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work) if args.work else scratch("kd-quality-")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    train, heldout = teacher_datasets(args)
    runs: dict[str, dict] = {}
    models, todo = [], []
    for name, flags in arms.items():
        for seed in [0] if flags is None else seeds:
            out = work / f"{name}-s{seed}"
            if flags is None:
                untrained_student(train, args.layers, out)
                runs[out.name] = {"train_s": 0.0, "tokens": 0}
            else:
                todo.append((out.name, flags, seed, out))
            models += ["--model", f"{out.name}={out}"]
    # --jobs > 1 trains several arms at once (wall time only: train_s then includes the sharing)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for run_name, result in zip([t[0] for t in todo], pool.map(lambda t: train_arm(args, t[1], train, t[2], t[3]), todo)):
            runs[run_name] = result
    _cli("kdeval", "run", "--data", heldout, *models, "--max-new-tokens", str(args.eval_new_tokens),
         "--backend", args.eval_backend or args.backend, "--out", str(work / "eval"))  # fmt: skip
    results = json.loads((work / "eval" / "results.json").read_text())
    by_name = {m["name"]: m["metrics"] for m in results["models"]}
    per_seed = {
        name: {int(run.rsplit("-s", 1)[1]): {k: by_name[run].get(k) for k, _, _ in METRICS} for run in runs if run.rsplit("-s", 1)[0] == name}
        for name in arms
    }  # fmt: skip
    summary = summarise(per_seed)
    write_result(
        "quality",
        {
            "name": "quality",
            "command": "bench/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "machine": machine(),
            "setup": {
                "teacher": "smollm2-135m-instruct", "student": f"init-from-teacher {args.layers}",
                "train_dataset": train, "heldout_dataset": heldout, "train_prompts": args.train_prompts, "train_rows": args.train_rows or "all",
                "heldout_prompts": args.heldout_prompts, "max_new_tokens": args.max_new_tokens,
                "eval_new_tokens": args.eval_new_tokens, "batch": args.batch, "lr": args.lr, "epochs": args.epochs, "seeds": seeds,
                "tokens_per_run": max(r["tokens"] for r in runs.values()), "arms": {n: f if f is not None else "no training" for n, f in arms.items()},
            },  # fmt: skip
            "figures": {
                "summary": summary,
                "train_s": {n: r["train_s"] for n, r in runs.items()},
                "wall_s": round(time.perf_counter() - t0, 1),
            },
        },
    )
    plot(summary, RESULTS / "quality.png")
    print(table_md(summary))


if __name__ == "__main__":
    main()
