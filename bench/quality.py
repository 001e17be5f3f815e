"""Distillation quality on the embedded teacher (issues 6, 14, 15, 16): which arm makes the best student?

    python bench/quality.py                                   # every arm, 3 seeds, 64 rows (the README table; ~2.5 h on 2 cores)
    python bench/quality.py --arms none,bucket_k20,renorm_k20 --seeds 0,1     # a subset (arms already in --work are kept)
    python bench/quality.py --render                          # table + plot again from bench/results/quality.json

1. `kdgen generate`: SmolLM2-135M-Instruct (vLLM) samples completions for --train-prompts prompts of
   data/train.jsonl at temperature 1 with k=64 log-probs, and greedy completions (k=64) for
   --heldout-prompts prompts of data/heldout.jsonl. Content-keyed under $KD_CACHE/bench/quality, so
   a rerun reuses them. k=5 and k=20 arms read the same k=64 dataset through `kdtrain --top-k`
   (the stored top-k is sorted, so its first N entries are exactly the top-N; tested).
2. One student per arm and seed, each started from the same cut of the teacher (`--layers`,
   default 6 of its 30 blocks), trained on the same --train-rows teacher rows (teacher tokens are
   the budget every arm shares) with the same batch, learning rate and number of optimizer steps;
   the seed sets the data order (and, for on-policy arms, the student's samples), so the spread
   over seeds is what a reader needs to tell a winner from noise. Arms (`ARMS`):
     none                 no training (the cut as is; deterministic, one "seed")
     text                 text-KD: cross-entropy on the teacher's sampled completions
     bucket_k5/k20/k64    forward KL on the top-k plus one tail bucket (kd's default)
     teacher_renorm_k20   forward KL, teacher renormalised over its top-20, student full-vocabulary
                          log-softmax (Axolotl's / DistillKit's default: the field's common variant)
     renorm_k20           forward KL with both sides renormalised over the top-20 (Axolotl kd_normalize_topk)
     rkl/jsd/skl/srkl_k20 the other divergences on the top-20 plus the tail bucket (skew alpha 0.1,
                          JSD beta 0.5); fkl at k=20 is bucket_k20
     sampled_n100         random-sampled targets (RS-KD): the same rows rescored with 100 draws per
                          position from the teacher's full distribution, forward KL estimated from
                          them; 100 draws store as many bytes per token as the top-20 (68.4 vs 68.3 B, README)
     skl_k20_lr10x        skew KL at 10x the learning rate (why skew KL lags here: its gradient is
                          ~100x smaller than forward KL's far from the teacher, bench/skew_kl.py)
     online_dense         `kdtrain run --online`: the teacher runs on each batch, forward KL over the
                          whole vocabulary (issue 16), same rows
     online_dense_ir      the same plus cosine hidden-state alignment of student blocks 1,3,5 with
                          teacher blocks 6,18,29 (--ir-layers 1:6,3:18,5:29)
     onpolicy_2r          `kdtrain onpolicy`: 2 rounds of student samples on train_rows/2 prompts,
                          scored by the teacher (top-64), reverse KL (issue 15)
     distillm2_2r         2 rounds, each half student samples (skew reverse KL) and half the teacher's
                          own rows (skew KL): DistiLLM-2's mix, same teacher-token budget
     chain_30_15_6        `kdtrain chain`: a 15-block assistant cut from the teacher learns from the
                          teacher's rows, writes its own dataset on the same prompts, and the 6-block
                          student (the same blocks as every other arm) learns from it (TAKD);
                          compare with bucket_k64, the direct route with the same loss
   plus --extra-arms NAME=FLAGS for one-off `kdtrain run` arms (e.g. `skl_lr1e-3="--loss skl --top-k 20 --lr 1e-3"`).
3. `kdeval run` on the held-out greedy teacher dataset scores every student the same way, one
   student at a time as soon as it is trained: sparse KL(teacher || student) over the stored top-64
   plus the tail bucket, top-1 agreement, expected calibration error, perplexity (all on the
   teacher's tokens) and ROUGE-L of the student's greedy completion against the teacher's.

Every student and its evaluation stay in --work; a rerun reuses those made by the same command, so
arms can be added later and the table covers every arm evaluated there. Writes
bench/results/quality.json (per seed, mean and sample standard deviation per arm) and
bench/results/quality.png (one panel per metric, mean ± sd per arm, the seeds as dots); a trial
with other settings should pass `--name trial` (trial.json, trial.png) so the recorded benchmark
stays. The figures are written as they come out; nothing here knows which arm should win.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, cli, machine, results_path, scratch, write_result  # noqa: E402

TEACHER = "smollm2-135m-instruct"
LAYERS = "0,6,12,18,24,29"
ASSISTANT = "0,2,4,6,8,10,12,14,16,18,20,22,24,26,29"  # the chain's 15-block assistant, cut from the teacher
STUDENT_OF_ASSISTANT = "0,3,6,9,12,14"  # its blocks the chain's student keeps: teacher blocks 0,6,12,18,24,29 = LAYERS
IR_LAYERS = "1:6,3:18,5:29"  # student block : teacher block (LAYERS[1], LAYERS[3], LAYERS[5])
# draws per position of the sampled-targets arm: the N whose stored bytes per token match top-20's
# (measured on these rows: `kdgen info` of both datasets)
SAMPLED_DRAWS = 100


@dataclass(frozen=True)
class Arm:
    """How one arm makes its student: `kdtrain run` flags on the teacher dataset (run), the same with
    the teacher online (online), `kdtrain onpolicy` flags (onpolicy) or a `kdtrain chain` (chain)."""

    kind: str
    flags: tuple[str, ...] = ()
    draws: int = 0  # sampled: the --sampled-targets N of the rescored dataset


def run(*flags: str) -> Arm:
    return Arm("run", flags)


ARMS = {
    "none": Arm("none"),
    "text": run("--mode", "text"),
    "bucket_k5": run("--top-k", "5"),
    "bucket_k20": run("--top-k", "20"),
    "bucket_k64": run(),
    "teacher_renorm_k20": run("--tail", "teacher_renorm", "--top-k", "20"),
    "renorm_k20": run("--tail", "renorm", "--top-k", "20"),
    "rkl_k20": run("--loss", "rkl", "--top-k", "20"),
    "jsd_k20": run("--loss", "jsd", "--beta", "0.5", "--top-k", "20"),
    "skl_k20": run("--loss", "skl", "--alpha", "0.1", "--top-k", "20"),
    "srkl_k20": run("--loss", "srkl", "--alpha", "0.1", "--top-k", "20"),
    "skl_k20_lr10x": run("--loss", "skl", "--alpha", "0.1", "--top-k", "20", "--lr", "LR10"),
    f"sampled_n{SAMPLED_DRAWS}": Arm("sampled", ("--targets", "sampled"), draws=SAMPLED_DRAWS),
    "online_dense": Arm("online", ("--online", "--teacher", TEACHER, "--loss", "fkl")),
    "online_dense_ir": Arm("online", ("--online", "--teacher", TEACHER, "--loss", "fkl", "--ir-layers", IR_LAYERS, "--ir-weight", "1")),
    "onpolicy_2r": Arm("onpolicy", ("--rounds", "2", "--loss", "rkl")),
    "distillm2_2r": Arm("onpolicy", ("--rounds", "2", "--loss", "srkl", "--offpolicy-loss", "skl", "--offpolicy-mix", "0.5")),
    "chain_30_15_6": Arm("chain"),
}
# (metric, label, lower is better)
METRICS = (("kl", "sparse KL(t‖s)", True), ("top1", "top-1 agree", False), ("ece", "ECE", True), ("ppl", "PPL", True), ("rougeL", "ROUGE-L vs teacher", False))


def _cli(tool: str, *args: str) -> str:
    """Run a kd CLI (stops the bench on failure); its last stdout line: the dataset or checkpoint path."""
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

    if not (out / "config.json").exists():
        manifest = kds.TeacherDataset(train).manifest
        student = build_student(load_config(None, {"data": [train], "init_from_teacher": layers}), manifest)
        student.model.save_pretrained(out)
        student.tokenizer.save_pretrained(out)
    return str(out)


def _reused(marker: Path, cmd: list[str]) -> dict | None:
    """The record a finished step left in `marker` when it ran exactly `cmd`, else None."""
    if marker.exists():
        record = json.loads(marker.read_text())
        if record.get("bench_command") == cmd:
            return record
    return None


def _rows(args) -> int:
    return args.train_rows or args.train_prompts


def sampled_dataset(args, train: str, draws: int, seed: int) -> str:
    """The same rows rescored with `draws` random draws per position from the teacher's full
    distribution (hf backend: vLLM exposes no per-position draws); the seed sets the draws, so the
    spread over seeds includes the sampling noise. --k 1: the arm reads only the draws."""
    from kdcore.models import cache_dir

    return _cli("kdgen", "score", "--prompts", train, "--limit", str(_rows(args)), "--backend", "hf", "--sampled-targets", str(draws),
                "--k", "1", "--seed", str(seed), "--out", str(cache_dir() / "bench" / "quality"))  # fmt: skip


def chain_recipe(args, train: str, seed: int, out: Path) -> Path:
    """The TAKD recipe for one seed: both links train like every `run` arm (same rows, steps, lr)."""
    import yaml

    common = {"epochs": args.epochs, "batch_size": args.batch, "lr": args.lr, "warmup_ratio": 0.05, "seed": seed,
              "logging_steps": 4, "save_steps": 100000, "limit": _rows(args)}  # fmt: skip
    recipe = {
        "description": f"bench/quality.py chain_30_15_6, seed {seed}",
        "teacher": TEACHER, "prompts": "data/train.jsonl", "data": train, "out": str(out),
        "generate": {"backend": args.backend, "limit": _rows(args), "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "k": 64, "seed": seed},
        "links": [{"name": "assistant", "train": {"init_from_teacher": ASSISTANT, **common}},
                  {"name": "student", "train": {"init_from_teacher": STUDENT_OF_ASSISTANT, **common}}],
    }  # fmt: skip
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train_arm(args, arm: Arm, train: str, seed: int, out: Path, start: str) -> dict:
    """Make one arm's student for one seed; returns {checkpoint, train_s}. A finished run of the same
    command is reused (`kdtrain onpolicy` and `kdtrain chain` also resume by themselves)."""
    marker = out.parent / f"{out.name}.train.json"
    if arm.kind in ("run", "online", "sampled"):
        flags = [str(args.lr * 10) if f == "LR10" else f for f in arm.flags]
        data = sampled_dataset(args, train, arm.draws, seed) if arm.kind == "sampled" else train
        cmd = ["kdtrain", "run", "--data", data, "--init-from-teacher", args.layers, "--epochs", str(args.epochs), "--batch-size",
               str(args.batch), "--lr", str(args.lr), "--warmup-ratio", "0.05", "--seed", str(seed), "--logging-steps", "4",
               "--save-steps", "100000", "--out", str(out), "--limit", str(_rows(args)), *flags]  # fmt: skip  (later flags win)
    elif arm.kind == "onpolicy":
        mix = "--offpolicy-mix" in arm.flags
        rounds = int(arm.flags[arm.flags.index("--rounds") + 1])
        # every arm sees train_rows teacher-scored rows: rounds x prompts (+ as many off-policy rows with the mix)
        prompts = _rows(args) // rounds // (2 if mix else 1)
        cmd = ["kdtrain", "onpolicy", "--teacher", TEACHER, "--student", start, "--prompts", "data/train.jsonl", "--limit", str(prompts),
               "--max-new-tokens", str(args.max_new_tokens), "--k", "64", "--backend", args.onpolicy_backend, "--epochs", str(args.epochs),
               "--batch-size", str(args.batch), "--lr", str(args.lr), "--seed", str(seed), "--out", str(out),
               *(["--offpolicy-data", train] if mix else []), *arm.flags,
               "--train", "warmup_ratio=0.05", "--train", "logging_steps=4", "--train", "save_steps=100000"]  # fmt: skip
    elif arm.kind == "chain":
        cmd = ["kdtrain", "chain", "--recipe", str(chain_recipe(args, train, seed, out))]
    else:
        raise ValueError(arm.kind)
    record = _reused(marker, cmd)
    if record is None or not Path(record["checkpoint"]).exists():  # deleted after its evaluation: train again
        t = time.perf_counter()
        checkpoint = _cli(*cmd)
        record = {"bench_command": cmd, "checkpoint": checkpoint, "train_s": round(time.perf_counter() - t, 1)}
        marker.write_text(json.dumps(record, indent=2))
    return record


def evaluate(args, heldout: str, name: str, checkpoint: str, work: Path) -> dict:
    """kdeval run for one student (reused when the same command already ran): its metrics."""
    out = work / "eval" / name
    cmd = ["kdeval", "run", "--data", heldout, "--model", f"{name}={checkpoint}", "--max-new-tokens", str(args.eval_new_tokens),
           "--backend", args.eval_backend or args.backend, "--out", str(out)]  # fmt: skip
    marker = work / "eval" / f"{name}.json"
    record = _reused(marker, cmd)
    if record is None:
        _cli(*cmd)
        metrics = json.loads((out / "results.json").read_text())["models"][0]["metrics"]
        record = {"bench_command": cmd, "metrics": {k: metrics.get(k) for k, _, _ in METRICS}}
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(record, indent=2))
    return record["metrics"]


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
        if key == "ppl":  # a diverged arm (PPL ~1e11) would squash every other bar: clip, and label it
            ax.set_xscale("log")
            finite = sorted(m for m in means if m == m)
            cap = 20 * finite[len(finite) // 2] if finite else None
            if cap and finite[-1] > cap:
                ax.set_xlim(right=cap)
                for y, m in zip(ys, means):
                    if m > cap:
                        ax.text(cap, y, f"{m:.0e} →", ha="right", va="center", fontsize=8, color="#b22222")
        ax.set_title(f"{label} {'↓' if lower else '↑'}")
        ax.set_yticks(list(ys), arms)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def arms_of(args) -> dict[str, Arm]:
    arms = dict(ARMS)
    for item in args.extra_arms:
        name, _, flags = item.partition("=")
        arms[name] = run(*shlex.split(flags))
    chosen = args.arms.split(",") + [i.partition("=")[0] for i in args.extra_arms]
    unknown = set(chosen) - set(arms)
    if unknown:
        sys.exit(f"unknown arm(s) {', '.join(sorted(unknown))}; choose from {', '.join(arms)} or add --extra-arms NAME=FLAGS")
    return {a: arms[a] for a in dict.fromkeys(chosen)}


def collect(work: Path) -> tuple[dict, dict]:
    """Every evaluated student in --work: (arm -> seed -> metrics, run -> train record)."""
    per_seed: dict[str, dict[int, dict]] = {}
    runs = {}
    for marker in sorted((work / "eval").glob("*.json")):
        run_name = marker.stem
        arm, _, seed = run_name.rpartition("-s")
        per_seed.setdefault(arm, {})[int(seed)] = json.loads(marker.read_text())["metrics"]
        train = work / f"{run_name}.train.json"
        runs[run_name] = json.loads(train.read_text()) if train.exists() else {"train_s": 0.0, "bench_command": None}
    order = list(ARMS)
    return dict(sorted(per_seed.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))), runs


def report(args, work: Path, train: str, heldout: str, seeds: list[int], t0: float) -> dict:
    """<--name>.json + <--name>.png (default quality) from every student evaluated in --work so far."""
    per_seed, runs = collect(work)
    summary = summarise(per_seed)
    log = work / "commands.json"
    commands = json.loads(log.read_text()) if log.exists() else []
    write_result(
        args.name,
        {
            "name": args.name,
            "command": "bench/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "commands": commands,
            "machine": machine(),
            "setup": {
                "teacher": TEACHER, "student": f"init-from-teacher {args.layers}",
                "train_dataset": train, "heldout_dataset": heldout, "train_prompts": args.train_prompts, "train_rows": _rows(args),
                "heldout_prompts": args.heldout_prompts, "max_new_tokens": args.max_new_tokens,
                "eval_new_tokens": args.eval_new_tokens, "batch": args.batch, "lr": args.lr, "epochs": args.epochs, "seeds": seeds,
                "arms": {n: {"kind": ARMS[n].kind, "flags": list(ARMS[n].flags)} if n in ARMS else "extra" for n in per_seed},
            },  # fmt: skip
            "figures": {
                "summary": summary,
                "per_seed": per_seed,
                "train_s": {n: r.get("train_s") for n, r in runs.items()},
                "commands_per_run": {n: r.get("bench_command") for n, r in runs.items()},
                "wall_s": round(time.perf_counter() - t0, 1),
            },
        },
    )
    plot(summary, RESULTS / f"{args.name}.png")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-prompts", type=int, default=256)
    ap.add_argument("--heldout-prompts", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=96, help="teacher completion length for training")
    ap.add_argument("--eval-new-tokens", type=int, default=64, help="greedy completion length for evaluation")
    ap.add_argument("--train-rows", type=int, default=64, help="teacher rows every arm trains on (kdtrain --limit; 0 = all)")
    ap.add_argument("--layers", default=LAYERS, help="teacher layers the student keeps (kdtrain --init-from-teacher)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--jobs", type=int, default=1, help="students trained at once (each its own process)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds per arm (data order)")
    ap.add_argument("--backend", default="vllm", help="kdgen's backend for the teacher datasets")
    ap.add_argument("--onpolicy-backend", default="hf", help="kdgen backend inside `kdtrain onpolicy` (small models: hf skips vLLM's start-up)")
    ap.add_argument("--eval-backend", default="hf", help="kdeval's backend for the students' greedy completions")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of the arms")
    ap.add_argument("--extra-arms", nargs="*", default=[], metavar="NAME=FLAGS", help="one-off arms: kdtrain flags after the common ones")
    ap.add_argument("--work", default=None, help="keep the students here (default: a temporary directory)")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep every student's checkpoint in --work (default: deleted once evaluated; the full v3 run left ~50 GB)")
    ap.add_argument("--name", default="quality",
                    help="results name: bench/results/NAME.json and NAME.png (a trial with other settings: another name, so the "
                    "recorded benchmark stays)")  # fmt: skip
    ap.add_argument("--render", action="store_true", help="only rewrite the plot and print the table from NAME.json")
    args = ap.parse_args()
    if args.render:
        summary = json.loads(results_path(args.name).read_text())["figures"]["summary"]
        plot(summary, RESULTS / f"{args.name}.png")
        print(table_md(summary))
        return
    arms = arms_of(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work) if args.work else scratch("kd-quality-")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.json"
    log.write_text(json.dumps([*(json.loads(log.read_text()) if log.exists() else []), "bench/quality.py " + shlex.join(sys.argv[1:])], indent=1))
    t0 = time.perf_counter()

    train, heldout = teacher_datasets(args)
    start = untrained_student(train, args.layers, work / "none-s0")
    # seed by seed, so that a run cut short still has every arm at the same number of seeds
    todo = [(name, arm, seed) for seed in seeds for name, arm in arms.items() if arm.kind != "none" or seed == seeds[0]]

    def one(item):
        name, arm, seed = item
        run_name = f"{name}-s{seed}"
        checkpoint = start if arm.kind == "none" else train_arm(args, arm, train, seed, work / run_name, start)["checkpoint"]
        metrics = evaluate(args, heldout, run_name, checkpoint, work)
        if arm.kind != "none" and not args.keep_checkpoints:  # the markers keep what the table needs
            shutil.rmtree(work / run_name, ignore_errors=True)
        print(f"{run_name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None), flush=True)
        return run_name

    # --jobs > 1 makes several students at once (wall time only: train_s then includes the sharing)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for _ in pool.map(one, todo):
            report(args, work, train, heldout, seeds, t0)  # the table so far, after every student
    print(table_md(report(args, work, train, heldout, seeds, t0)))


if __name__ == "__main__":
    main()
