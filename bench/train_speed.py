"""kdtrain speed: sparse-logit KD vs plain SFT step time and peak memory, and shard -> batch reading.

    python bench/train_speed.py                       # defaults below; ~6 minutes on 2 CPU cores
    python bench/train_speed.py --hidden 576 --layers 4 --batch 8 --steps 12

One run, side by side:

1. A teacher dataset in the real format (`make_dataset`: identity from a tiny teacher run through
   `kdgen generate`, rows synthetic), SmolLM2 vocabulary of 49,152, k=20.
2. Reading (one thread): shards -> examples (`kdtrain.data.logit_examples`: decode, align, build
   Arrow columns), then examples -> padded batches the way the Trainer's DataLoader does it
   (`Dataset.__getitems__` + `KDCollator`). Figures in teacher (completion) tokens per second;
   each stage repeated for >= 1.5 s. Target: >= 1M tokens/s end to end, so loading never holds
   training up.
3. Training step time and peak memory, the same student (a Llama with the SmolLM2 vocabulary,
   --hidden/--layers), the same batches, the same TrainingArguments:
     sft — TRL's stock `SFTTrainer` (its chunked fused LM-head cross-entropy; on CPU its tiles
           are folded with plain torch ops, on GPU with Triton);
     ce  — `KDTrainer` in text mode: cross-entropy through kdtrain's own fused head, i.e. the
           same machinery as kd without the top-k term (isolates what the KD term costs);
     kd  — `KDTrainer`, forward KL over top-20 + tail bucket (`kdtrain.losses.fused_sparse_kd`).
   Each arm runs in a fresh subprocess (peak memory is per process), arms interleaved and repeated
   (--reps), median step time over the steps after --warmup. Memory: CUDA peak allocated on a GPU;
   on CPU the peak RSS, and the peak RSS above the RSS just before training (the step's working
   set, which is what the loss can change). Targets: kd/sft step time <= 1.15, memory <= 1.10.

Writes bench/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KD_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, results_path, tiny_model, write_result  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_dataset(work: Path, n_rows: int, new_tokens: int, k: int) -> str:
    """A teacher dataset of `n_rows` x `new_tokens` completion tokens, in the real format.

    A tiny teacher writes a small dataset through `kdgen generate` (hf backend, greedy) for the
    manifest's teacher/tokenizer/generation identity; the rows of the big one are synthetic
    (random ids, sorted random top-k log-probs with ~10% tail mass), written with the format's own
    writer (`rows_to_table`, `write_shard`) and committed with `kdgen.generate.finalize`.
    Reading and training cost depend on shapes, not on which tokens they are.
    """
    import numpy as np
    from transformers import AutoTokenizer

    from kdgen import format as fmt
    from kdgen.generate import GenerateConfig, finalize, run
    from kdgen.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct").path)
    rows = [json.loads(line) for line in (Path(__file__).resolve().parents[1] / "data" / "prompts.jsonl").read_text().splitlines()[:4]]
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    seed_url = run(GenerateConfig(prompts=str(prompts), out=str(work / "seed"), teacher=tiny_model(tok), backend="hf", max_new_tokens=8, k=k, temperature=0.0), "generate")
    m = fmt.TeacherDataset(seed_url).manifest
    core = {key: m[key] for key in ("teacher", "tokenizer", "generation", "prompts")} | {"format_version": m["format_version"]}
    core["prompts"] = {**core["prompts"], "source": "synthetic", "content_hash": fmt.sha256_hex(f"synthetic:{n_rows}:{new_tokens}"), "count": n_rows}
    core["generation"] = {**core["generation"], "max_new_tokens": new_tokens}
    fs, root = fmt.open_fs(str(work / "datasets"))
    ddir = fmt.join(root, fmt.fingerprint(core))
    vocab = core["tokenizer"]["embedding_rows"]
    rng = np.random.default_rng(0)
    per_shard = 256
    n_shards = -(-n_rows // per_shard)
    for s in range(n_shards):
        batch = []
        for i in range(s * per_shard, min(n_rows, (s + 1) * per_shard)):
            mass = rng.exponential(size=(new_tokens, k + 1)) ** 3
            mass /= mass.sum(-1, keepdims=True)
            lp = np.log(np.sort(mass[:, :k], axis=-1)[:, ::-1]).astype(np.float32)
            ids = rng.integers(0, len(tok), size=(new_tokens, k))
            batch.append(fmt.Row(id=fmt.row_id(core["prompts"]["content_hash"], i), messages=None, prompt="synthetic", prompt_ids=rng.integers(0, len(tok), 48).tolist(), completion="", completion_ids=ids[:, 0].tolist(), token_logprobs=lp[:, 0].copy(), topk_ids=ids, topk_logprobs=lp, finish_reason="length"))
        fmt.write_shard(fs, ddir, fmt.shard_name(s, n_shards), fmt.rows_to_table(batch, vocab, k))
    finalize(fs, ddir, core, {"synthetic_from": seed_url}, 0.0, 0.0, 0)
    return ddir


def make_student(work: Path, hidden: int, layers: int) -> str:
    import shutil

    from transformers import AutoTokenizer

    from kdgen.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct").path)
    path = tiny_model(tok, layers=layers, hidden=hidden)
    dest = work / "student"
    shutil.move(path, dest)
    return str(dest)


# ----------------------------------------------------------------------------------------------
# Reading


def bench_reading(url: str, batch: int, min_s: float = 1.5) -> dict:
    import torch

    from kdtrain.data import KDCollator, open_teacher_data, logit_examples, to_hf_dataset

    torch.set_num_threads(1)
    data = open_teacher_data([url])
    teacher_tokens = data.num_tokens

    def repeat(fn) -> float:
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_s:
                return dt / n

    prepared = logit_examples(data, 4096, "truncate", 49152)
    prepare_s = repeat(lambda: logit_examples(data, 4096, "truncate", 49152))
    ds = to_hf_dataset(prepared)
    collate = KDCollator(prepared, pad_id=0)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()

    def one_pass():
        for i in range(0, len(order), batch):
            collate(ds.__getitems__(order[i : i + batch]))

    collate_s = repeat(one_pass)
    return {
        "rows": data.num_rows,
        "teacher_tokens": teacher_tokens,
        "sequence_tokens": prepared.num_tokens,
        "k": data.k,
        "threads": 1,
        "shards_to_examples_tokens_per_s": round(teacher_tokens / prepare_s),
        "examples_to_batches_tokens_per_s": round(teacher_tokens / collate_s),
        "end_to_end_tokens_per_s": round(teacher_tokens / (prepare_s + collate_s)),
        "note": "teacher (completion) tokens, each with k top-k ids and log-probs; one thread",
    }


# ----------------------------------------------------------------------------------------------
# Training step (one arm per subprocess)


def arm(kind: str, url: str, student: str, out: str, batch: int, steps: int, warmup: int) -> dict:
    import torch
    from transformers import TrainerCallback

    from kdtrain.config import load_config
    from kdtrain.data import KDCollator, open_teacher_data, text_examples, to_hf_dataset
    from kdtrain.student import from_spec
    from kdtrain.train import build_trainer, training_args

    cfg = load_config(None, {"data": [url], "student": student, "out": out, "batch_size": batch, "max_steps": steps, "save_steps": 10**6, "logging_steps": 10**6, "lr": 1e-4, "warmup_ratio": 0.0, "loss": "fkl"})
    if kind in ("kd", "ce"):
        trainer = build_trainer(cfg if kind == "kd" else load_config(None, {**cfg.to_dict(), "mode": "text"}))
    else:
        from trl import SFTTrainer

        s = from_spec(student)
        s.tokenizer.pad_token = s.tokenizer.pad_token or s.tokenizer.eos_token
        prepared = text_examples(open_teacher_data([url]), s.tokenizer, True, 4096, "truncate")
        trainer = SFTTrainer(model=s.model, args=training_args(cfg), train_dataset=to_hf_dataset(prepared), data_collator=KDCollator(prepared, s.tokenizer.pad_token_id, with_topk=False), processing_class=s.tokenizer)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Clock())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"arm": kind, "step_s": statistics.median(times[warmup:]), "steps": times, "peak_mb": peak, "base_mb": base, "working_mb": peak - base, "memory": "cuda_allocated" if cuda else "rss"}


def bench_steps(url: str, student: str, work: Path, batch: int, steps: int, warmup: int, reps: int) -> dict:
    runs: dict[str, list[dict]] = {"sft": [], "ce": [], "kd": []}
    for r in range(reps):
        for kind in ("sft", "ce", "kd") if r % 2 == 0 else ("kd", "ce", "sft"):
            cmd = [sys.executable, __file__, "--arm", kind, "--data", url, "--student", student, "--out", str(work / f"run-{kind}-{r}"), "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise SystemExit(f"arm {kind} failed:\n{res.stderr[-4000:]}")
            runs[kind].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  {kind}: step {runs[kind][-1]['step_s']:.3f} s, peak {runs[kind][-1]['peak_mb']:.0f} MB", file=sys.stderr)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("step_s", "peak_mb", "working_mb")} for k, v in runs.items()}
    ratio = lambda a, b, m: round(med[a][m] / med[b][m], 3)  # noqa: E731
    return {
        "median": med,
        "step_time_ratio": ratio("kd", "sft", "step_s"),
        "peak_memory_ratio": ratio("kd", "sft", "peak_mb"),
        "working_memory_ratio": ratio("kd", "sft", "working_mb"),
        "kd_vs_ce": {"step_time_ratio": ratio("kd", "ce", "step_s"), "peak_memory_ratio": ratio("kd", "ce", "peak_mb"), "working_memory_ratio": ratio("kd", "ce", "working_mb")},
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048, help="rows of the synthetic teacher dataset")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    # internal: one training arm in this process
    ap.add_argument("--arm", choices=("sft", "ce", "kd"))
    ap.add_argument("--data")
    ap.add_argument("--student")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args.data, args.student, args.out, args.batch, args.steps, args.warmup)))
        return
    work = Path(tempfile.mkdtemp(prefix="kd-train-speed-"))
    t0 = time.perf_counter()
    url = make_dataset(work, args.rows, args.new_tokens, args.k)
    print(f"dataset: {url} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    reading = bench_reading(url, args.batch)
    print(f"reading: {reading['end_to_end_tokens_per_s']:,} teacher tokens/s end to end", file=sys.stderr)
    student = make_student(work, args.hidden, args.layers)
    steps = bench_steps(url, student, work, args.batch, args.steps, args.warmup, args.reps)
    result = {
        "benchmark": "train_speed",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "setup": {k: getattr(args, k) for k in ("rows", "new_tokens", "k", "hidden", "layers", "batch", "steps", "warmup", "reps")} | {"vocab": 49152, "loss": "fkl + tail bucket"},
        "reading": reading,
        "training": steps,
        "targets": {"step_time_ratio": "<= 1.15", "memory_ratio": "<= 1.10", "reading_tokens_per_s": ">= 1,000,000 on one core"},
    }
    write_result("train_speed", result)
    print(json.dumps({k: steps[k] for k in ("step_time_ratio", "peak_memory_ratio", "working_memory_ratio", "kd_vs_ce")} | {"reading": {k: v for k, v in reading.items() if k.endswith("per_s")}}, indent=2))
    print(f"wrote {results_path('train_speed')}", file=sys.stderr)


if __name__ == "__main__":
    main()
