"""Online teacher cost: offline sparse KD vs online dense KD vs online dense KD + IR alignment.

    python bench/online.py                         # defaults below; a few minutes on 2 CPU cores
    python bench/online.py --teacher tiny --reps 2 # a tiny teacher instead of the embedded one

Three `kdtrain` arms on the same student (a Llama with the SmolLM2 vocabulary, --hidden/--layers),
the same batches and TrainingArguments:

    sparse    offline: forward KL over the dataset's top-k + tail bucket (no teacher loaded);
    dense     --online: the teacher (default: the embedded SmolLM2-135M-Instruct, float32) runs on
              every batch, forward KL over the full vocabulary (`kdtrain.dense.fused_dense_kd`);
    dense_ir  the same plus --ir-layers (student blocks -> teacher blocks, cosine) through a
              learned projection (student width -> teacher width).

The data is `bench.train_speed.make_dataset`'s synthetic teacher dataset in the real format (random
ids; step time depends on shapes only); the online arms train on its prompts and completions.
Each arm runs in a fresh subprocess (peak memory is per process), arms interleaved over --reps,
median step time over the steps after --warmup. Memory: peak RSS of the process (the teacher's
weights included) and the working set above the RSS just before training.

Writes bench/results/online.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("KD_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, scratch, timed_train, tiny_model, write_result  # noqa: E402
from kdcore.io import now_iso  # noqa: E402
from bench.train_speed import make_dataset, make_student  # noqa: E402

ARMS = ("sparse", "dense", "dense_ir")


def arm(kind: str, url: str, student: str, teacher: str, ir_layers: str, out: str, batch: int, steps: int, warmup: int) -> dict:

    from kdtrain.config import load_config
    from kdtrain.train import build_trainer

    flags = {"data": [url], "student": student, "out": out, "batch_size": batch, "max_steps": steps, "save_steps": 10**6, "logging_steps": 10**6, "lr": 1e-4, "warmup_ratio": 0.0, "loss": "fkl"}
    if kind != "sparse":
        flags |= {"online": True, "teacher": teacher}
    if kind == "dense_ir":
        flags |= {"ir_layers": ir_layers}
    trainer = build_trainer(load_config(None, flags))
    return {"arm": kind, **timed_train(trainer, warmup)}


def summarise(runs: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Medians per arm and the ratios against sparse (and IR against dense). `train_cpu_s` (this
    process's CPU time over the whole of train()) moves less than wall time on a shared machine."""
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("step_s", "train_cpu_s", "peak_mb", "working_mb")} for k, v in runs.items()}
    ratio = lambda a, b, m: round(med[a][m] / med[b][m], 3)  # noqa: E731
    names = {"step_time": "step_s", "train_cpu_time": "train_cpu_s", "peak_memory": "peak_mb", "working_memory": "working_mb"}
    ratios = {f"{a}_vs_{b}": {n: ratio(a, b, m) for n, m in names.items()} for a, b in (("dense", "sparse"), ("dense_ir", "sparse"), ("dense_ir", "dense"))}
    return med, ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct", help="teacher spec, or 'tiny' (4 layers, width 128)")
    ap.add_argument("--ir-layers", default=None, help="default: 1:10,3:29 for the embedded teacher, 1:1,3:3 for tiny")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--arm", choices=ARMS)  # internal: one arm in this process
    ap.add_argument("--data")
    ap.add_argument("--student")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args.data, args.student, args.teacher, args.ir_layers, args.out, args.batch, args.steps, args.warmup)))
        return
    work = scratch("kd-online-")
    teacher = args.teacher
    if teacher == "tiny":
        from transformers import AutoTokenizer

        from kdcore.models import resolve

        teacher = tiny_model(AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct").path), layers=4, hidden=128)
    ir_layers = args.ir_layers or ("1:1,3:3" if args.teacher == "tiny" else "1:10,3:29")
    url = make_dataset(work, args.rows, args.new_tokens, args.k)
    student = make_student(work, args.hidden, args.layers)
    runs: dict[str, list[dict]] = {a: [] for a in ARMS}
    load = [os.getloadavg()[0]]
    for r in range(args.reps):
        for kind in ARMS if r % 2 == 0 else ARMS[::-1]:
            cmd = [sys.executable, __file__, "--arm", kind, "--data", url, "--student", student, "--teacher", teacher, "--ir-layers", ir_layers,
                   "--out", str(work / f"run-{kind}-{r}"), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise SystemExit(f"arm {kind} failed:\n{res.stderr[-4000:]}")
            runs[kind].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  {kind}: step {runs[kind][-1]['step_s']:.3f} s, peak {runs[kind][-1]['peak_mb']:.0f} MB", file=sys.stderr)
    load.append(os.getloadavg()[0])
    med, ratios = summarise(runs)
    result = {
        "benchmark": "online",
        "created": now_iso(),
        "command": " ".join(["bench/online.py", *sys.argv[1:]]),
        "machine": machine(),
        "load_average_1min": [round(x, 2) for x in load],
        "setup": {k: getattr(args, k) for k in ("teacher", "rows", "new_tokens", "k", "hidden", "layers", "batch", "steps", "warmup", "reps")}
        | {"ir_layers": ir_layers, "vocab": 49152, "loss": "fkl", "training_data": "synthetic rows (random ids), 48 prompt + new_tokens completion tokens"},
        "median": med,
        "ratios": ratios,
        "runs": runs,
    }
    write_result("online", result)
    print(json.dumps({"median": med, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
