"""Scale (issue 6): does the cost of generating and training grow linearly with the data, and what
do a cache hit, a resume and a verify cost on a dataset of many shards?

    python bench/scale.py --model tiny --prompts 16 --max-new-tokens 64 --shards 64            # small preset
    python bench/scale.py --model teacher --prompts 512 --max-new-tokens 256 --shards 256 \
        --shard-prompts 4 --shard-max-new-tokens 64 --student-hidden 256 --student-layers 4  # gpu preset

Every timing is one fresh CLI process, as a user runs it (interpreter start, imports, engine or
model load included), each writing to its own root so nothing is reused between runs.

1. Linearity. `kdgen generate` (vLLM, the default backend) on the first N, 2N and 4N prompts of
   data/train.jsonl (beyond its 510 prompts: copies with " #j" appended, so every prompt is new),
   fixed --max-new-tokens; then `kdtrain run` (logit KD, one epoch, the same tiny student and
   settings) on each of the three datasets. Reported: wall time, tokens, the in-process loop time
   (the manifest's engine time; the Trainer's train_runtime), the ratios time(2x)/(2 time(1x)) and
   time(4x)/(4 time(1x)) of both (~1.0 means linear), and a least-squares fit
   wall = startup + per_token * tokens over the three points with its residual: the start-up is
   the fixed cost, the slope the cost that scales.
2. Many shards. `kdgen generate --shard-prompts P` on --shards x P prompts (one engine batch per
   shard, so small shards also generate slower), then, each against that full generation:
   (a) the same command again: a cache hit (reads the manifest, must return at once);
   (b) the same command with manifest.json deleted: every shard exists, so it checks each shard's
       footer, hashes it for the manifest and commits (resume with nothing to generate);
   (c) `kdgen verify` (checksums + row invariants) and `kdgen verify --quick` (checksums).
   Per-shard cost of (b): its CPU time minus the cache hit's (the same command's process start,
   imports and tokenizer load), over the shard count; of (c): its whole CPU time over the shards.
3. kdtrain resume: the 1x training command again in the same --out resumes from its final
   checkpoint (no steps left): the cost of loading a checkpoint and the optimizer state.

The machine may be shared: the 1-minute load average is recorded before every process and at the
start and end of the run, and every process's CPU time (user + system) beside its wall time: CPU
time moves less with other jobs' load, so the linearity fit is given on both.
Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("KD_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, cli, machine, results_path, scratch, tiny_model, write_result  # noqa: E402

TEACHER = "smollm2-135m-instruct"
MULTIPLES = (1, 2, 4)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def prompt_args(work: Path, n: int) -> list[str]:
    """The first n prompts of data/train.jsonl; past its end, copies with " #j" appended (new prompts)."""
    source = ROOT / "data" / "train.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    if n <= len(rows):
        return ["--prompts", str(source), "--limit", str(n)]
    path = work / f"prompts-{n}.jsonl"
    with path.open("w") as f:
        for i in range(n):
            messages = [dict(m) for m in rows[i % len(rows)]["messages"]]
            if i >= len(rows):
                messages[-1]["content"] += f" #{i // len(rows)}"
            f.write(json.dumps({"messages": messages}) + "\n")
    return ["--prompts", str(path)]


def generate(args, teacher: str, prompts: list[str], out: Path, max_new: int, *extra: str) -> dict:
    """One `kdgen generate` process; its wall time and what the manifest says it made."""
    load = load1()
    done = cli("kdgen", "generate", "--teacher", teacher, *prompts, "--max-new-tokens", str(max_new),
               "--k", str(args.k), "--out", str(out), *extra)  # fmt: skip
    url = done.stdout.strip().splitlines()[-1]
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    return {
        "url": url,
        "prompts": manifest["prompts"]["count"],
        "shards": len(manifest["shards"]),
        "tokens": manifest["totals"]["tokens"],
        "wall_s": round(done.wall_s, 2),
        "cpu_s": round(done.cpu_s, 2),
        "engine_s": manifest["generation_time_s"],
        "load_1min": load,
    }


def train(args, data: str, student: str, out: Path) -> dict:
    """One `kdtrain run` process (logit KD, one epoch); wall time, the Trainer's own train_runtime."""
    load = load1()
    done = cli("kdtrain", "run", "--data", data, "--student", student, "--out", str(out), "--epochs", "1",
               "--batch-size", str(args.batch), "--seed", "0", "--logging-steps", "1000")  # fmt: skip
    record = json.loads((out / "kd_config.json").read_text())
    runtime = re.findall(r"'train_runtime': '?([0-9.]+)", done.stdout + done.stderr)
    return {
        "rows": record["examples"]["rows"],
        "sequence_tokens": record["examples"]["tokens"],
        "steps": record["global_step"],
        "wall_s": round(done.wall_s, 2),
        "cpu_s": round(done.cpu_s, 2),
        "train_runtime_s": float(runtime[-1]) if runtime else None,
        "load_1min": load,
    }


def linearity(points: dict[int, dict], token_key: str, time_keys: tuple[str, ...]) -> dict:
    """Per time measure: time(m x)/(m time(1x)) for m = 2, 4 (1.0 = linear through the origin) and
    the least-squares fit time = startup + per_token * tokens over the three points."""
    out = {}
    x = np.array([points[m][token_key] for m in MULTIPLES], float)
    for key in time_keys:
        if any(points[m][key] is None for m in MULTIPLES):
            continue
        y = np.array([points[m][key] for m in MULTIPLES], float)
        slope, startup = np.polyfit(x, y, 1)
        out[key] = {
            "ratio_2x": round(float(y[1] / (2 * y[0])), 3),
            "ratio_4x": round(float(y[2] / (4 * y[0])), 3),
            "fit_startup_s": round(float(startup), 2),
            f"fit_s_per_1k_{token_key}": round(float(slope) * 1e3, 3),
            "fit_max_abs_residual_s": round(float(np.abs(y - startup - slope * x).max()), 2),
            "fit_startup_share_at_4x": round(float(startup / y[2]), 3),
        }
    return out


def ladder(args, work: Path, teacher: str, student: str) -> tuple[dict, dict, dict]:
    gen, trn = {}, {}
    for m in MULTIPLES:
        n = m * args.prompts
        gen[m] = generate(args, teacher, prompt_args(work, n), work / f"gen-{m}x", args.max_new_tokens)
        print(f"  generate {n} prompts: {gen[m]['wall_s']} s, {gen[m]['tokens']} tokens", file=sys.stderr)
    for m in MULTIPLES:
        trn[m] = train(args, gen[m]["url"], student, work / f"train-{m}x")
        print(f"  train on {m}x: {trn[m]['wall_s']} s, {trn[m]['steps']} steps", file=sys.stderr)
    # the 1x command again: resumes from the final checkpoint-N it left, with no steps to run
    resume = train(args, gen[1]["url"], student, work / "train-1x")
    startup = linearity(trn, "sequence_tokens", ("cpu_s",))["cpu_s"]["fit_startup_s"]
    resume_fig = {
        "wall_s": resume["wall_s"],
        "cpu_s": resume["cpu_s"],
        "cpu_over_fresh_1x_run": round(resume["cpu_s"] / trn[1]["cpu_s"], 3),
        "cpu_over_fitted_startup": round(resume["cpu_s"] / startup, 3) if startup > 0 else None,
        "load_1min": resume["load_1min"],
    }
    return gen, trn, resume_fig


def many_shards(args, work: Path, teacher: str) -> dict:
    n = args.shards * args.shard_prompts
    prompts = prompt_args(work, n)
    extra = ("--shard-prompts", str(args.shard_prompts))
    out = work / "many-shards"
    full = generate(args, teacher, prompts, out, args.shard_max_new_tokens, *extra)
    print(f"  generate {full['shards']} shards: {full['wall_s']} s", file=sys.stderr)
    hit = generate(args, teacher, prompts, out, args.shard_max_new_tokens, *extra)
    (Path(full["url"]) / "manifest.json").unlink()
    resume = generate(args, teacher, prompts, out, args.shard_max_new_tokens, *extra)
    checks = {}
    for name, flags in (("verify", ()), ("verify_quick", ("--quick",))):
        load = load1()
        done = cli("kdgen", "verify", full["url"], *flags)
        checks[name] = {"wall_s": round(done.wall_s, 2), "cpu_s": round(done.cpu_s, 2), "load_1min": load}

    def against_full(run: dict) -> dict:
        """Wall and CPU time, each over the full generation's, and CPU time per shard."""
        fig = {key: run[key] for key in ("wall_s", "cpu_s", "load_1min")}
        fig |= {f"{key}_over_full_generation": round(run[key] / full[key], 4) for key in ("wall_s", "cpu_s")}
        if run is resume:  # the same command as the cache hit: the difference is the work on the shards
            fig["cpu_ms_per_shard_beyond_cache_hit"] = round(1000 * (run["cpu_s"] - hit["cpu_s"]) / full["shards"], 1)
        elif run is not hit:  # a different command: all of its time, start-up included (an upper bound)
            fig["cpu_ms_per_shard"] = round(1000 * run["cpu_s"] / full["shards"], 1)
        return fig

    return {
        "shards": full["shards"],
        "prompts_per_shard": args.shard_prompts,
        "tokens": full["tokens"],
        "full_generation": {key: full[key] for key in ("wall_s", "cpu_s", "engine_s", "load_1min")},
        "cache_hit": against_full(hit),
        "resume_all_shards_present": against_full(resume),
        "verify": against_full(checks["verify"]),
        "verify_quick": against_full(checks["verify_quick"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "teacher"], default="tiny", help=f"teacher: tiny (random 2-layer Llama, SmolLM2 vocab) or {TEACHER}")
    ap.add_argument("--prompts", type=int, default=16, help="N: the ladder runs N, 2N and 4N prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="kdtrain --batch-size")
    ap.add_argument("--student-hidden", type=int, default=64)
    ap.add_argument("--student-layers", type=int, default=1)
    ap.add_argument("--shards", type=int, default=64, help="shards of the many-shard dataset")
    ap.add_argument("--shard-prompts", type=int, default=1, help="prompts per shard of the many-shard dataset")
    ap.add_argument("--shard-max-new-tokens", type=int, default=4, help="short: one-prompt shards decode one sequence at a time")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from kdcore.models import resolve

    t0, load_start = time.perf_counter(), os.getloadavg()
    work = scratch("kd-scale-")
    tok = AutoTokenizer.from_pretrained(resolve(TEACHER).path)
    teacher = TEACHER if args.model == "teacher" else tiny_model(tok)
    student = tiny_model(tok, layers=args.student_layers, hidden=args.student_hidden)
    gen, trn, train_resume = ladder(args, work, teacher, student)
    shards = many_shards(args, work, teacher)
    load_end, total = os.getloadavg(), time.perf_counter() - t0
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu_total = sum(u.ru_utime + u.ru_stime for u in usage)

    def table(points: dict[int, dict], keys: tuple[str, ...]) -> dict:
        return {f"{m}x": {k: points[m][k] for k in keys} for m in MULTIPLES}

    figures = {
        "generation": table(gen, ("prompts", "tokens", "wall_s", "cpu_s", "engine_s", "load_1min"))
        | {"linearity": linearity(gen, "tokens", ("wall_s", "cpu_s", "engine_s"))},
        "training": table(trn, ("rows", "sequence_tokens", "steps", "wall_s", "cpu_s", "train_runtime_s", "load_1min"))
        | {"linearity": linearity(trn, "sequence_tokens", ("wall_s", "cpu_s", "train_runtime_s")),
           "resume_from_final_checkpoint": train_resume},
        "many_shards": shards,
        "bench_wall_s": round(total, 1),
        "bench_cpu_s": round(cpu_total, 1),
    }
    result = {
        "name": "scale",
        "command": "python bench/scale.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "setup": {
            "teacher": TEACHER if args.model == "teacher" else "tiny random Llama (2 layers, hidden 64, SmolLM2 vocab 49,152)",
            "backend": "vllm (kdgen default), T=0.7 top_p=0.95 (kdgen defaults)",
            "student": f"random Llama, {args.student_layers} layer(s), hidden {args.student_hidden}, SmolLM2 vocab; logit KD (fkl + tail bucket), 1 epoch, batch {args.batch}",
            "prompts_1x": args.prompts, "max_new_tokens": args.max_new_tokens, "k": args.k,
            "many_shards": f"{args.shards} shards x {args.shard_prompts} prompt(s), max_new_tokens {args.shard_max_new_tokens}",
            "each timing": "one fresh CLI process (kdgen / kdtrain): wall clock and CPU time (user + system)",
            "machine load": "shared with other jobs while measured: 1-min load average per process (load_1min) and below",
            "load_avg_start": [round(x, 2) for x in load_start], "load_avg_end": [round(x, 2) for x in load_end],
        },  # fmt: skip
        "figures": figures,
        "targets": {"ratios time(mx)/(m time(1x)) of the loop times": "~1.0 (linear)", "cache hit": "returns at once"},
    }
    write_result("scale", result)
    print(json.dumps(figures, indent=1))
    print(f"-> {results_path('scale')} ({total:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
