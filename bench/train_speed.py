"""kdtrain speed: sparse-logit KD vs plain SFT step time and peak memory, and shard -> batch reading.

    python bench/train_speed.py                       # defaults below; ~6 minutes on 2 CPU cores
    python bench/train_speed.py --only reading        # the reading part alone (~1 minute)
    python bench/train_speed.py --hidden 576 --layers 4 --batch 8 --steps 12

One run, side by side:

1. Reading data: real teacher rows. `--real-data` (default: the demo's request — the embedded
   SmolLM2-135M-Instruct on the first 48 prompts of data/train.jsonl, 128 new tokens, k=20 —
   generated once through `kdgen generate` into --cache; later runs hit kdgen's cache) replicated
   into a dataset of >= --reading-tokens completion tokens, 128 rows per shard like `kdgen
   generate`. Real rows matter: real top-k ids and log-probs compress (and so decompress)
   differently from random ones.
2. Reading (one thread; torch and pyarrow pinned to one): shards -> examples
   (`kdtrain.data.logit_examples`: Parquet decode, top-k ids and log-probs, sequences), then
   examples -> padded batches the way the Trainer's DataLoader does it (`Dataset.__getitems__` +
   `KDCollator`). Figures in teacher (completion) tokens per second, median of --reading-reps runs.
   Target: shards -> examples >= 1M tokens/s on one core (`shards_to_examples_target_met`), so
   loading never holds training up.
3. Training step time and peak memory on a synthetic dataset in the real format (`make_dataset`:
   identity from a tiny teacher run through `kdgen generate`, random rows of --new-tokens tokens;
   step time depends on shapes only), the same student (a Llama with the SmolLM2 vocabulary,
   --hidden/--layers), the same batches, the same TrainingArguments:
     sft — TRL's stock `SFTTrainer` (its chunked fused LM-head cross-entropy; on CPU its tiles
           are folded with plain torch ops, on GPU with Triton);
     ce  — `KDTrainer` in text mode: cross-entropy through kdtrain's own fused head, i.e. the
           same machinery as kd without the top-k term (isolates what the KD term costs);
     kd  — `KDTrainer`, forward KL over top-20 + tail bucket (`kdtrain.losses.fused_sparse_kd`);
     dense — what offline sparse KD replaces: the teacher (the embedded SmolLM2-135M-Instruct, same
           vocabulary) run online on every batch and a forward KL over the full vocabulary, by TRL's
           `GKDTrainer` (off-policy: lmbda 0, beta 0).
   Each arm runs in a fresh subprocess (peak memory is per process), arms interleaved and repeated
   (--reps), median step time over the steps after --warmup. Memory: CUDA peak allocated on a GPU;
   on CPU the peak RSS, and the peak RSS above the RSS just before training (the step's working
   set, which is what the loss can change). Targets: kd/sft step time <= 1.15, memory <= 1.10;
   kd vs dense is reported.

Writes bench/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KD_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, results_path, scratch, timed_train, tiny_model, write_result  # noqa: E402
from kdcore.io import now_iso  # noqa: E402

DENSE_TEACHER = "smollm2-135m-instruct"


def _write_dataset(root: Path, core: dict, rows: list, prompts: list, shard_rows: int, note: dict) -> str:
    """Commit `rows` as a teacher dataset under `root` with the format's own writer (`rows_to_table`,
    `write_shard`, `kdgen.commit.finalize`), `shard_rows` rows per shard. `prompts`
    (`kdcore.prompts.Prompt`, one per prompt in row order) become the manifest's prompt set, so the
    dataset passes `kdgen verify` (kdtrain verifies what it opens)."""
    from kdcore import codec
    import kdcore.dataset as kds
    import kdcore.io as kio
    from kdgen.commit import finalize

    core = {**core, "prompts": {"source": note["source"], "count": len(prompts), "content_hash": kio.sha256_hex("\n".join(p.content_hash for p in prompts))}}
    fs, base = kio.open_fs(str(root))
    ddir = kio.join(base, kds.fingerprint(core))
    vocab, k = core["tokenizer"]["embedding_rows"], core["generation"]["k"]
    n_shards = -(-len(rows) // shard_rows)
    for s in range(n_shards):
        table = codec.rows_to_table(rows[s * shard_rows : (s + 1) * shard_rows], vocab, k)
        kds.write_shard(fs, ddir, kds.shard_name(s, n_shards), table, kds.fingerprint(core))
    finalize(fs, ddir, core, note, 0.0, 0.0, 0)
    return ddir


def _identity(manifest: dict) -> dict:
    """The fingerprinted part of a manifest (teacher, tokenizer, generation, format version)."""
    return {key: manifest[key] for key in ("teacher", "tokenizer", "generation", "format_version")}


def make_dataset(work: Path, n_rows: int, new_tokens: int, k: int) -> str:
    """A teacher dataset of `n_rows` x `new_tokens` completion tokens, in the real format, for the
    training arms (step time depends on shapes, not on which tokens they are).

    A tiny teacher writes a small dataset through `kdgen generate` (hf backend, greedy) for the
    manifest's teacher/tokenizer/generation identity; the rows of the big one are synthetic
    (random ids, sorted random top-k log-probs with ~10% tail mass, prompt "synthetic <i>").
    """
    import numpy as np
    from transformers import AutoTokenizer

    from kdcore import codec
    import kdcore.dataset as kds
    from kdgen.generate import GenerateConfig, run
    from kdcore.models import resolve
    from kdcore.prompts import Prompt

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct").path)
    rows = [json.loads(line) for line in (Path(__file__).resolve().parents[1] / "data" / "prompts.jsonl").read_text().splitlines()[:4]]
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    seed_url = run(GenerateConfig(prompts=str(prompts), out=str(work / "seed"), teacher=tiny_model(tok), backend="hf", max_new_tokens=8, k=k, temperature=0.0), "generate")
    core = _identity(kds.TeacherDataset(seed_url).manifest)
    core["generation"] = {**core["generation"], "max_new_tokens": new_tokens}
    rng = np.random.default_rng(0)
    synthetic, batch = [Prompt(i, None, f"synthetic {i}") for i in range(n_rows)], []
    for p in synthetic:
        mass = rng.exponential(size=(new_tokens, k + 1)) ** 3
        mass /= mass.sum(-1, keepdims=True)
        lp = np.log(np.sort(mass[:, :k], axis=-1)[:, ::-1]).astype(np.float32)
        ids = rng.integers(0, len(tok), size=(new_tokens, k))
        batch.append(codec.Row(id=kds.row_id(p.content_hash, 0), messages=None, prompt=p.text, prompt_ids=rng.integers(0, len(tok), 48).tolist(), completion="", completion_ids=ids[:, 0].tolist(), token_logprobs=lp[:, 0].copy(), topk_ids=ids, topk_logprobs=lp, finish_reason="length"))
    return _write_dataset(work / "datasets", core, batch, synthetic, 256, {"source": "synthetic", "synthetic_from": seed_url})


def real_teacher_dataset(cache: Path) -> str:
    """A small teacher dataset of real teacher output: the demo's request (`make demo` step 1: the
    embedded SmolLM2-135M-Instruct, the first 48 prompts of data/train.jsonl, 128 new tokens, k=20,
    T=0.7) through `kdgen generate` into `cache`. kdgen's cache makes later runs free (an identical
    request returns the existing dataset), and a copy of the demo's dataset placed there counts."""
    from kdgen.generate import GenerateConfig, run

    root = Path(__file__).resolve().parents[1]
    return run(GenerateConfig(prompts=str(root / "data" / "train.jsonl"), limit=48, max_new_tokens=128, out=str(cache)), "generate")


def replicate_dataset(work: Path, source_url: str, min_tokens: int, shard_rows: int = 128) -> str:
    """A teacher dataset of >= `min_tokens` completion tokens made of copies of `source_url`'s rows.

    Reading cost depends on the data, not only on its shape: real top-k ids and log-probs compress
    differently from random ones (docs/FORMAT.md). Copy
    j > 0 of a row gets its own prompt (" #j" appended to its last message) so row ids stay unique
    and derive from their prompts; every per-token array is the source's, re-encoded by the
    format's writer, `shard_rows` rows per shard (kdgen's default: 128 prompts per shard).
    """
    from kdcore import codec
    import kdcore.dataset as kds
    from kdcore.prompts import Prompt

    src = kds.TeacherDataset(source_url)
    text = src.read_table(columns=["id", "messages", "prompt", "completion", "finish_reason"]).to_pylist()
    arrays = [b.row(i) for b in src.iter_batches(text=False) for i in range(b.num_rows)]
    n = src.manifest["generation"]["n"]
    # each source row's sample index: its id is row_id(its prompt's hash, sample)
    samples = [next(s for s in range(n) if kds.row_id(Prompt(0, t["messages"], t["prompt"]).content_hash, s) == t["id"]) for t in text]
    copies = -(-min_tokens // src.num_tokens)
    rows, prompts = [], []
    for j in range(copies):
        for t, a, sample in zip(text, arrays, samples):
            messages, prompt = t["messages"], t["prompt"]
            if j and messages:
                messages = [*messages[:-1], {**messages[-1], "content": f"{messages[-1]['content']} #{j}"}]
            elif j:
                prompt = f"{prompt} #{j}"
            p = Prompt(len(prompts), messages, prompt)
            if sample == 0:
                prompts.append(p)
            rows.append(codec.Row(
                id=kds.row_id(p.content_hash, sample), messages=messages, prompt=prompt, prompt_ids=a["prompt_ids"].tolist(),
                completion=t["completion"], completion_ids=a["completion_ids"].tolist(), token_logprobs=a["token_logprobs"],
                topk_ids=a["topk_ids"], topk_logprobs=a["topk_logprobs"], finish_reason=t["finish_reason"],
                tail_logprobs=a["tail_logprobs"],
            ))
    source = f"{src.manifest['prompts']['source']} x{copies} (rows of dataset {src.fingerprint})"
    return _write_dataset(work / "real-rows", _identity(src.manifest), rows, prompts, shard_rows, {"source": source, "copies": copies})


def make_student(work: Path, hidden: int, layers: int) -> str:
    import shutil

    from transformers import AutoTokenizer

    from kdcore.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct").path)
    path = tiny_model(tok, layers=layers, hidden=hidden)
    dest = work / "student"
    shutil.move(path, dest)
    return str(dest)


# ----------------------------------------------------------------------------------------------
# Reading


READING_TARGET = 1_000_000  # teacher tokens/s, shards -> examples on one core


def bench_reading(url: str, batch: int, reps: int) -> dict:
    """Shards -> examples (`logit_examples`) and examples -> padded batches, `reps` timed runs each
    (after one warm-up run) on one thread; figures are medians in teacher (completion) tokens/s."""
    import pyarrow as pa
    import torch

    from kdcore.teacher_data import open_teacher_data
    from kdtrain.data import KDCollator, logit_examples, to_hf_dataset

    torch.set_num_threads(1)
    pa.set_cpu_count(1)  # the reader already decodes with use_threads=False; this pins the rest of pyarrow
    pa.set_io_thread_count(1)
    data = open_teacher_data([url])
    tokens = data.num_tokens

    def timed(fn) -> tuple[list[float], list[float]]:
        """Wall and CPU seconds of each of `reps` runs (CPU: this process, all threads)."""
        fn()
        wall, cpu = [], []
        for _ in range(reps):
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        return wall, cpu

    load_before = os.getloadavg()[0]
    prep_wall, prep_cpu = timed(lambda: logit_examples(data, 4096, "truncate", 49152))
    prepared = logit_examples(data, 4096, "truncate", 49152)
    ds = to_hf_dataset(prepared)
    collate = KDCollator(prepared, pad_id=0)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()

    def one_pass():
        for i in range(0, len(order), batch):
            collate(ds.__getitems__(order[i : i + batch]))

    coll_wall, _ = timed(one_pass)
    prepare_s, collate_s = statistics.median(prep_wall), statistics.median(coll_wall)
    rate = round(tokens / prepare_s)
    return {
        "shards_to_examples_tokens_per_s": rate,
        "shards_to_examples_target_tokens_per_s": READING_TARGET,
        "shards_to_examples_target_met": rate >= READING_TARGET,
        "shards_to_examples_tokens_per_cpu_s": round(tokens / statistics.median(prep_cpu)),
        "shards_to_examples_runs_tokens_per_s": [round(tokens / t) for t in prep_wall],
        "examples_to_batches_tokens_per_s": round(tokens / collate_s),
        "end_to_end_tokens_per_s": round(tokens / (prepare_s + collate_s)),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "note": f"teacher (completion) tokens, each with k top-k ids and log-probs; one thread; median of {reps} runs "
        "(wall clock; tokens_per_cpu_s divides by this process's CPU time instead, which other work on a shared machine does not inflate)",
    }


# ----------------------------------------------------------------------------------------------
# Training step (one arm per subprocess)


def gkd_args(sft_args, gkd_config_class):
    """TRL's GKD arguments on exactly kdtrain's settings (every SFTConfig field copied), off-policy
    (lmbda 0), beta 0 = forward KL over the full vocabulary, temperature 1. Built here: kdtrain's
    `training_args` knows only SFTConfig."""
    import dataclasses

    same = {f.name: getattr(sft_args, f.name) for f in dataclasses.fields(sft_args) if f.init}
    return gkd_config_class(**same, lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0)


def arm(kind: str, url: str, student: str, out: str, batch: int, steps: int, warmup: int) -> dict:
    import torch


    from kdtrain.config import load_config
    from kdcore.teacher_data import open_teacher_data
    from kdtrain.data import KDCollator, text_examples, to_hf_dataset
    from kdtrain.student import from_spec
    from kdtrain.train import build_trainer, training_args

    cfg = load_config(None, {"data": [url], "student": student, "out": out, "batch_size": batch, "max_steps": steps, "save_steps": 10**6, "logging_steps": 10**6, "lr": 1e-4, "warmup_ratio": 0.0, "loss": "fkl"})
    if kind in ("kd", "ce"):
        trainer = build_trainer(cfg if kind == "kd" else load_config(None, {**cfg.to_dict(), "mode": "text"}))
    else:
        s = from_spec(student)
        s.tokenizer.pad_token = s.tokenizer.pad_token or s.tokenizer.eos_token
        prepared = text_examples(open_teacher_data([url]), s.tokenizer, True, 4096, "truncate")
        common = {"model": s.model, "train_dataset": to_hf_dataset(prepared), "data_collator": KDCollator(prepared, s.tokenizer.pad_token_id, with_topk=False), "processing_class": s.tokenizer}
        if kind == "sft":
            from trl import SFTTrainer

            trainer = SFTTrainer(args=training_args(cfg), **common)
        else:  # dense: TRL's GKD trainer, off-policy (lmbda 0), beta 0 = forward KL over the full vocabulary
            from transformers import AutoModelForCausalLM
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            from kdcore.models import resolve

            teacher = AutoModelForCausalLM.from_pretrained(resolve(DENSE_TEACHER).path, dtype=torch.float32)
            args = gkd_args(training_args(cfg), GKDConfig)
            trainer = GKDTrainer(teacher_model=teacher, args=args, **common)
    return {"arm": kind, **timed_train(trainer, warmup)}


def bench_steps(url: str, student: str, work: Path, batch: int, steps: int, warmup: int, reps: int) -> dict:
    arms = ("sft", "ce", "kd", "dense")
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(reps):
        for kind in arms if r % 2 == 0 else arms[::-1]:
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
        "kd_vs_dense_online": {"step_time_ratio": ratio("kd", "dense", "step_s"), "peak_memory_ratio": ratio("kd", "dense", "peak_mb"), "working_memory_ratio": ratio("kd", "dense", "working_mb")},
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("reading",), help="run only this part; its figures replace that part of the existing result file")
    ap.add_argument("--real-data", help="teacher dataset whose real rows the reading part replicates (default: the demo's request, generated once into --cache)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "kd" / "bench" / "teacher", help="kdgen output root for the default --real-data")
    ap.add_argument("--reading-tokens", type=int, default=262144, help="completion tokens of the replicated real-row dataset (at least)")
    ap.add_argument("--reading-reps", type=int, default=9, help="timed runs of each reading stage (the median is reported)")
    ap.add_argument("--rows", type=int, default=2048, help="rows of the synthetic teacher dataset (training part)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    # internal: one training arm in this process
    ap.add_argument("--arm", choices=("sft", "ce", "kd", "dense"))
    ap.add_argument("--data")
    ap.add_argument("--student")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args.data, args.student, args.out, args.batch, args.steps, args.warmup)))
        return
    from kdcore.dataset import TeacherDataset

    work = scratch("kd-train-speed-")
    t0 = time.perf_counter()
    source = args.real_data or real_teacher_dataset(args.cache)
    real = replicate_dataset(work, source, args.reading_tokens)
    src, m = TeacherDataset(source).manifest, TeacherDataset(real).manifest
    print(f"reading dataset: {real} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    reading = bench_reading(real, args.batch, args.reading_reps)
    print(f"reading: {reading['shards_to_examples_tokens_per_s']:,} teacher tokens/s shards -> examples (target {READING_TARGET:,}), "
          f"{reading['end_to_end_tokens_per_s']:,} end to end", file=sys.stderr)
    reading_setup = {
        "data": f"real teacher rows: the {src['totals']['rows']} rows ({src['totals']['tokens']} completion tokens) of teacher dataset "
        f"{src['fingerprint']} ({src['teacher']['source']}, {src['generation']['backend']}, T={src['generation']['temperature']}, "
        f"k={src['generation']['k']}, prompts {src['prompts']['source']}) replicated into {m['totals']['rows']} rows, "
        f"{m['totals']['tokens']} completion tokens, {len(m['shards'])} shards of <= 128 rows",
        "rows": m["totals"]["rows"], "teacher_tokens": m["totals"]["tokens"], "k": m["generation"]["k"], "threads": 1,
        "batch": args.batch, "reps": args.reading_reps, "max_length": 4096, "student_rows": 49152,
    }
    command = " ".join(["bench/train_speed.py", *sys.argv[1:]])
    if args.only == "reading":
        result = json.loads(results_path("train_speed").read_text()) if results_path("train_speed").exists() else {"benchmark": "train_speed"}
        result["setup"] = {**result.get("setup", {}), "reading": reading_setup}
        result["reading"] = reading | {"created": now_iso(), "command": command}
        result["machine"] = machine()
        write_result("train_speed", result)
        print(json.dumps({k: v for k, v in reading.items() if k.startswith("shards") or k.endswith("per_s")}, indent=2))
        print(f"updated the reading part of {results_path('train_speed')}", file=sys.stderr)
        return
    url = make_dataset(work, args.rows, args.new_tokens, args.k)
    student = make_student(work, args.hidden, args.layers)
    steps = bench_steps(url, student, work, args.batch, args.steps, args.warmup, args.reps)
    result = {
        "benchmark": "train_speed",
        "created": now_iso(),
        "command": command,
        "machine": machine(),
        "setup": {k: getattr(args, k) for k in ("rows", "new_tokens", "k", "hidden", "layers", "batch", "steps", "warmup", "reps")}
        | {"vocab": 49152, "loss": "fkl + tail bucket", "training_data": "synthetic rows (random ids)", "reading": reading_setup},
        "reading": reading,
        "training": steps,
        "targets": {"step_time_ratio": "<= 1.15", "memory_ratio": "<= 1.10", "reading_tokens_per_s": ">= 1,000,000 shards -> examples on one core"},
    }
    write_result("train_speed", result)
    print(json.dumps({k: steps[k] for k in ("step_time_ratio", "peak_memory_ratio", "working_memory_ratio", "kd_vs_ce", "kd_vs_dense_online")} | {"reading": {k: v for k, v in reading.items() if k.endswith("per_s")}}, indent=2))
    print(f"wrote {results_path('train_speed')}", file=sys.stderr)


if __name__ == "__main__":
    main()
