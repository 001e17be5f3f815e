"""`kdgen generate` / `kdgen score`: prompts in, a complete teacher dataset out.

    run(cfg): validate + read prompts -> teacher identity remembered from an earlier run? then
              fingerprint -> cache hit? return; every planned shard written but not committed?
              commit (both without importing transformers) -> resolve teacher (config +
              tokenizer only) -> encode prompts -> fingerprint -> cache hit? return
              -> plan shards (under the dataset lock)
              -> skip complete shards (resume) -> index reusable rows of sibling datasets
              -> per shard: claim it -> reused rows + generated rows (engine started on first
                 need) -> atomic write -> release -> card -> manifest (last, under the lock)

Shards are fixed blocks of prompts (all n samples of a prompt live in one shard), planned once and
recorded in `.kdgen-plan.json`, so a resumed or sliced run writes exactly the shards an
uninterrupted one would. `--shard-index i --num-shards m` makes this process write shards
j with j % m == i; whoever completes the last shard writes the manifest, or run `kdgen merge`.

Reliability (issue 7): two processes on the same request split the shards through per-shard
claims (kdgen/locks.py) and never write the same shard at once; a SIGKILL at any moment leaves
only complete shards, temp files and stale locks, all of which a rerun handles. Row reuse
(kdgen/store.py): rows of complete datasets under the same root made with the same teacher and
generation settings are taken by row id instead of generated again.

Test: `pytest tests/test_generate.py` (hf backend, tiny model) and `-m slow` (vLLM, real teacher).
"""

from __future__ import annotations

import json
import math
import posixpath
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Iterator

import pyarrow as pa

import kdgen
from kdcore import format as fmt
from kdgen import locks
from kdcore.backends import Request, SamplingConfig, default_backend, engine_version, make_backend, request_seed, vllm_available
from kdcore.config import doc_field as _f
from kdcore.config import field_help
from kdcore.errors import KdError, collect
from kdcore.progress import RowProgress, console, status
from kdcore.prompts import Prompt, encode_prompt, load_prompts
from kdgen.locks import FileLock, lock_path
from kdcore.models import ResolvedModel, resolve
from kdgen.store import RowReuse
from kdcore.teacher import Teacher, load_teacher, remembered_identity

PLAN = ".kdgen-plan.json"
WAIT_POLL_S = 1.0  # how often a process waiting for another's shards or lock looks again


@dataclass
class GenerateConfig:
    prompts: str = _f("", "Prompt file (.jsonl, .parquet, .csv) or HF dataset directory.")
    out: str = _f("teacher-datasets", "Root directory or URL (s3://, gs://, hf://, memory://); the dataset goes to OUT/<fingerprint>.")
    teacher: str = _f("smollm2-135m-instruct", "Teacher: built-in name, .gguf file, HF checkpoint directory or hub id.")
    prompt_column: str | None = _f(None, "Column holding the prompt (chat messages or text). Default: messages, prompt, text, instruction, question or input.")
    completion_column: str = _f("completion", "Column holding the completion to score (`kdgen score` only).")
    split: str = _f("train", "Split to read from an HF dataset directory.")
    limit: int | None = _f(None, "Use only the first N prompts (after dropping duplicates).")
    backend: str = _f("auto", "Generation backend: vllm, hf, or auto (vllm where importable).")
    dtype: str = _f("auto", "Teacher dtype: float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on GPU).")
    temperature: float = _f(0.7, "Sampling temperature for the completions (0 = greedy). Stored log-probs are always at temperature 1.")
    top_p: float = _f(0.95, "Nucleus sampling for the completions (1 = off).")
    top_k: int = _f(0, "Top-k sampling filter for the completions (0 = off); not the stored k.")
    max_new_tokens: int = _f(256, "Maximum completion length in tokens.")
    n: int = _f(1, "Samples per prompt.")
    seed: int = _f(0, "Base seed; each row's seed is derived from it and the row id.")
    k: int = _f(20, "How many top log-probs to store per completion token (1..vocab).")
    chat_template: str = _f("auto", "auto: chat messages get the teacher's chat template, text is used raw; always: wrap text prompts as a user message.")
    shard_prompts: int = _f(128, "Prompts per shard (resume granularity). Not part of the fingerprint.")
    batch_size: int = _f(64, "Requests handed to the engine at once (progress updates per batch).")
    shard_index: int = _f(0, "This machine's slice of the prompt set (0-based); see --num-shards.")
    num_shards: int = _f(1, "Split the work over this many machines; each runs with its own --shard-index.")
    gpu_memory_utilization: float | None = _f(None, "vLLM memory fraction (of RAM on CPU). Default 0.3 on CPU, 0.9 on GPU.")
    append_eos: bool = _f(True, "`kdgen score`: end each given completion with the EOS token.")

    @classmethod
    def help(cls, name: str) -> str:
        return field_help(cls, name)


# The generation settings that go into the fingerprint (the rest of the config does not).
def generation_info(cfg: GenerateConfig, backend: str, kind: str) -> dict:
    greedy = cfg.temperature == 0 or kind == "score"
    return {
        "kind": kind,
        "backend": backend,
        "engine_version": engine_version(backend),
        "temperature": 0.0 if kind == "score" else cfg.temperature,
        # sampling filters do nothing under greedy decoding: normalise them so they don't split the cache
        "top_p": 1.0 if greedy else cfg.top_p,
        "top_k": 0 if greedy else cfg.top_k,
        "max_new_tokens": 0 if kind == "score" else cfg.max_new_tokens,
        "n": 1 if kind == "score" else cfg.n,
        "seed": 0 if greedy else cfg.seed,
        "k": cfg.k,
        "logprob_mode": "raw_logprobs_temperature_1",
    }


def validate(cfg: GenerateConfig, kind: str) -> None:
    problems = []
    if not cfg.prompts:
        problems.append("--prompts is required: a .jsonl, .parquet, .csv file or an HF dataset directory")
    if cfg.backend not in ("auto", "vllm", "hf"):
        problems.append(f"--backend {cfg.backend}: choose vllm, hf or auto")
    if cfg.backend == "vllm" and not vllm_available():
        problems.append("--backend vllm: vLLM is not installed here; install '.[cpu]' or '.[gpu]', or use --backend hf")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"--dtype {cfg.dtype}: choose float32, bfloat16, float16 or auto")
    if cfg.temperature < 0:
        problems.append(f"--temperature {cfg.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < cfg.top_p <= 1:
        problems.append(f"--top-p {cfg.top_p}: must be in (0, 1]")
    if cfg.top_k < 0:
        problems.append(f"--top-k {cfg.top_k}: must be >= 0 (0 = off)")
    if cfg.max_new_tokens < 1 and kind == "generate":
        problems.append(f"--max-new-tokens {cfg.max_new_tokens}: must be >= 1")
    if cfg.n < 1:
        problems.append(f"--n {cfg.n}: must be >= 1")
    if cfg.k < 1:
        problems.append(f"--k {cfg.k}: top-k must be between 1 and the teacher vocab")
    if cfg.chat_template not in ("auto", "always"):
        problems.append(f"--chat-template {cfg.chat_template}: choose auto or always")
    if cfg.shard_prompts < 1 or cfg.batch_size < 1:
        problems.append("--shard-prompts and --batch-size must be >= 1")
    if cfg.num_shards < 1 or not 0 <= cfg.shard_index < cfg.num_shards:
        problems.append(f"--shard-index {cfg.shard_index} --num-shards {cfg.num_shards}: need 0 <= index < num-shards")
    if cfg.limit is not None and cfg.limit < 1:
        problems.append(f"--limit {cfg.limit}: must be >= 1")
    collect(problems)


@dataclass
class Job:
    """Everything decided before any row is generated."""

    cfg: GenerateConfig
    kind: str
    teacher: Teacher
    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]] | None
    manifest_core: dict
    fingerprint: str
    fs: object
    root: str
    dataset_dir: str


def _read_request(cfg: GenerateConfig, kind: str) -> tuple[list[Prompt], dict]:
    """Validate the options and read the prompts (cheap: no tokenizer, no transformers import)."""
    validate(cfg, kind)
    prompts, prompt_info = load_prompts(
        cfg.prompts, cfg.prompt_column, cfg.split, cfg.completion_column if kind == "score" else None, cfg.limit
    )
    if prompt_info["duplicates_dropped"]:
        console.print(f"[yellow]note:[/] {prompt_info['duplicates_dropped']} duplicate prompt(s) dropped (identical content)")
    if cfg.chat_template == "always":
        for p in prompts:
            if p.text is not None:
                p.messages, p.text = [{"role": "user", "content": p.text}], None
        prompt_info["content_hash"] = fmt.sha256_hex("\n".join(p.content_hash for p in prompts))
    return prompts, prompt_info


def _core(cfg: GenerateConfig, kind: str, teacher_info: dict, tokenizer_info: dict, prompt_info: dict) -> dict:
    """What the fingerprint is computed from."""
    backend = default_backend() if cfg.backend == "auto" else cfg.backend
    return {
        "format_version": fmt.FORMAT_VERSION,
        "teacher": teacher_info,
        "tokenizer": tokenizer_info,
        "generation": generation_info(cfg, backend, kind),
        "prompts": prompt_info,
    }


def _quick_finish(cfg: GenerateConfig, kind: str, request: tuple[list[Prompt], dict], model: ResolvedModel, t0: float) -> str | None:
    """Answer without loading the teacher's tokenizer (importing transformers costs seconds) when its
    identity is remembered from an earlier run: the URL of the finished dataset for this request (a
    cache hit), or of the one committed here because every planned shard was already written (a run
    killed just before its commit; slices that all finished on one root)."""
    identity = remembered_identity(model, cfg.dtype)
    if identity is None:
        return None
    prompts, prompt_info = request
    core = _core(cfg, kind, *identity, prompt_info)
    fp = fmt.fingerprint(core)
    fs, root = fmt.open_fs(cfg.out)
    dataset_dir = fmt.join(root, fp)
    url = cfg.out.rstrip("/") + "/" + fp
    existing = fmt.read_manifest(fs, dataset_dir)
    if existing is not None:
        console.print(f"[green]cache hit:[/] {url} already holds this dataset ({_summary(existing)})")
        return url
    if not fs.exists(fmt.join(dataset_dir, fmt.DATA_DIR)):
        return None
    plan = _read_plan(fs, dataset_dir) or {"fingerprint": fp, "shard_prompts": cfg.shard_prompts}
    per, n = plan["shard_prompts"], core["generation"]["n"]
    num = max(1, math.ceil(len(prompts) / per))
    if plan["fingerprint"] != fp or plan.get("num_shards", num) != num:
        return None
    sizes = [(min((i + 1) * per, len(prompts)) - i * per) * n for i in range(num)]
    if not all(_shard_has_rows(fs, dataset_dir, fmt.shard_name(i, num), rows) for i, rows in enumerate(sizes)):
        return None
    _check_output(cfg, fs, root, fp)
    console.print(f"resuming: {sum(sizes)} of {sum(sizes)} rows already in complete shards")
    _commit(fs, dataset_dir, core, cfg, url, num, time.perf_counter() - t0, 0.0, 0)
    locks.remove_lock_dir(fs, dataset_dir)
    return url


def prepare(
    cfg: GenerateConfig, kind: str = "generate", request: tuple[list[Prompt], dict] | None = None, model: ResolvedModel | None = None
) -> Job:
    """Everything before generation; `request` and `model`: the prompts already read and the teacher
    spec already resolved (by `run`)."""
    # prompts first: reading them is cheap, loading the teacher's tokenizer imports transformers
    prompts, prompt_info = request or _read_request(cfg, kind)
    teacher = load_teacher(cfg.teacher, cfg.dtype, model)
    vocab = teacher.embedding_rows
    if cfg.k > vocab:
        raise KdError(f"--k {cfg.k}: top-k must be between 1 and the teacher vocab ({vocab})")
    teacher.remember()
    tok = teacher.tokenizer
    prompt_ids = []
    for p in prompts:
        ids = encode_prompt(p, tok)
        budget = len(ids) + (cfg.max_new_tokens if kind == "generate" else 0)
        if budget > teacher.context:
            raise KdError(
                f"prompt {p.index + 1} has {len(ids)} tokens; with --max-new-tokens {cfg.max_new_tokens} it exceeds "
                f"the teacher's context of {teacher.context} tokens: shorten it or lower --max-new-tokens"
            )
        prompt_ids.append(ids)
    completion_ids = None
    if kind == "score":
        completion_ids = []
        eos = tok.eos_token_id
        for p, pids in zip(prompts, prompt_ids):
            if p.completion_ids is not None:  # exact tokens (a teacher dataset of student samples): as given
                ids = list(p.completion_ids)
                if max(ids) >= vocab:
                    raise KdError(f"row {p.index + 1}: completion_ids hold id {max(ids)} beyond the teacher's {vocab} embedding rows; score with the model whose tokenizer made them")
            else:
                ids = tok(p.completion, add_special_tokens=False)["input_ids"]
                if cfg.append_eos and eos is not None:
                    ids = ids + [eos]
            if len(pids) + len(ids) > teacher.context:
                raise KdError(f"row {p.index + 1}: prompt + completion ({len(pids) + len(ids)} tokens) exceed the teacher's context ({teacher.context})")
            completion_ids.append(ids)
    if any(max(ids, default=0) >= vocab for ids in prompt_ids):
        raise KdError("the tokenizer produced ids beyond the model's embedding rows; tokenizer and weights do not match")
    core = _core(cfg, kind, teacher.teacher_info(), teacher.tokenizer_info(), prompt_info)
    fp = fmt.fingerprint(core)
    fs, root = fmt.open_fs(cfg.out)
    return Job(cfg, kind, teacher, prompts, prompt_ids, completion_ids, core, fp, fs, root, fmt.join(root, fp))


def _check_output(cfg: GenerateConfig, fs, root: str, fingerprint: str) -> None:
    """The output root must not be a different dataset, and must be writable."""
    existing = fmt.read_manifest(fs, root) if fs.exists(root) else None
    if existing is not None:
        raise KdError(
            f"--out {cfg.out} is itself a dataset (fingerprint {existing.get('fingerprint')}); --out takes the "
            f"root that holds datasets: use its parent directory"
        )
    probe = fmt.join(root, f".kdgen-write-test-{fingerprint}-{uuid.uuid4().hex[:8]}")
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except (OSError, PermissionError) as e:
        raise KdError(f"--out {cfg.out}: cannot write there ({e.__class__.__name__}: {e}); choose a writable location") from None
    dataset_dir = fmt.join(root, fingerprint)
    plan = _read_plan(fs, dataset_dir)
    if plan is not None and plan.get("fingerprint") != fingerprint:
        raise KdError(f"{dataset_dir} holds a different dataset (fingerprint {plan.get('fingerprint')}); remove it or choose another --out")


def _read_plan(fs, dataset_dir: str) -> dict | None:
    path = fmt.join(dataset_dir, PLAN)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def _plan(job: Job) -> dict:
    plan = _read_plan(job.fs, job.dataset_dir)
    if plan is not None:
        if plan["shard_prompts"] != job.cfg.shard_prompts:
            console.print(
                f"[yellow]note:[/] resuming with the existing plan of {plan['shard_prompts']} prompts per shard "
                f"(--shard-prompts {job.cfg.shard_prompts} ignored)"
            )
        return plan
    num = max(1, math.ceil(len(job.prompts) / job.cfg.shard_prompts))
    plan = {
        "fingerprint": job.fingerprint,
        "shard_prompts": job.cfg.shard_prompts,
        "num_shards": num,
        "core": job.manifest_core,  # what `kdgen merge` needs to write the manifest
        "config": asdict(job.cfg),
    }
    job.fs.makedirs(job.dataset_dir, exist_ok=True)
    fmt.write_bytes_atomic(job.fs, fmt.join(job.dataset_dir, PLAN), json.dumps(plan).encode())
    return plan


def _shard_is_complete(job: Job, name: str, expected_rows: int) -> bool:
    return _shard_has_rows(job.fs, job.dataset_dir, name, expected_rows)


def _shard_has_rows(fs, dataset_dir: str, name: str, expected_rows: int) -> bool:
    """A renamed shard is complete by construction; still check its footer and row count."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(fmt.join(dataset_dir, fmt.DATA_DIR, name), filesystem=fs)
        return meta.num_rows == expected_rows
    except Exception:
        return False


def _requests_for(job: Job, prompt_indices: range) -> tuple[list[Request], list[tuple[Prompt, list[int]]]]:
    reqs, meta = [], []
    n = job.manifest_core["generation"]["n"]
    for i in prompt_indices:
        p = job.prompts[i]
        for s in range(n):
            rid = fmt.row_id(p.content_hash, s)
            comp = job.completion_ids[i] if job.completion_ids is not None else None
            reqs.append(Request(rid, job.prompt_ids[i], request_seed(job.cfg.seed, rid), comp))
            meta.append((p, job.prompt_ids[i]))
    return reqs, meta


def run(cfg: GenerateConfig, kind: str = "generate") -> str:
    """Generate (or score) the dataset; returns its URL. Idempotent: a complete dataset returns at once.

    Safe to run twice at once on the same request and root (issue 7): shards are claimed before
    they are generated, so two processes split the shards, and each waits for the shards the other
    holds; the plan and the commit happen under the dataset lock (kdgen/locks.py).
    """
    url, job = _run(cfg, kind)
    if job is not None and fmt.read_manifest(job.fs, job.dataset_dir) is not None:
        # every process that leaves a committed dataset tidies up once its own locks are gone, so the
        # last one out removes the lock directory whichever path (commit, or "another process did") it took
        locks.remove_lock_dir(job.fs, job.dataset_dir)
    return url


def _run(cfg: GenerateConfig, kind: str) -> tuple[str, "Job | None"]:
    t0 = time.perf_counter()
    with status(f"resolving teacher {cfg.teacher} and reading prompts"):
        request = _read_request(cfg, kind)
        model = resolve(cfg.teacher)
        done = _quick_finish(cfg, kind, request, model, t0)
        if done is not None:
            return done, None
        job = prepare(cfg, kind, request, model)
    url = cfg.out.rstrip("/") + "/" + job.fingerprint
    existing = fmt.read_manifest(job.fs, job.dataset_dir)
    if existing is not None:
        console.print(f"[green]cache hit:[/] {url} already holds this dataset ({_summary(existing)})")
        return url, None
    _check_output(cfg, job.fs, job.root, job.fingerprint)
    with _dataset_lock(job.fs, job.dataset_dir):
        existing = fmt.read_manifest(job.fs, job.dataset_dir)
        if existing is None:
            plan = _plan(job)
    if existing is not None:  # another process committed it while we waited
        console.print(f"[green]cache hit:[/] {url} was completed by another process ({_summary(existing)})")
        return url, job
    per, num = plan["shard_prompts"], plan["num_shards"]
    n = job.manifest_core["generation"]["n"]

    def block(i: int) -> range:
        return range(i * per, min((i + 1) * per, len(job.prompts)))

    mine = [i for i in range(num) if i % cfg.num_shards == cfg.shard_index]
    total_rows = sum(len(block(i)) * n for i in mine)
    pending = [i for i in mine if not _shard_is_complete(job, fmt.shard_name(i, num), len(block(i)) * n)]
    done_rows = total_rows - sum(len(block(i)) * n for i in pending)
    if done_rows:
        console.print(f"resuming: {done_rows} of {total_rows} rows already in complete shards")

    work = _Work(job)
    if pending:
        reuse = RowReuse(job.fs, job.root, job.manifest_core, exclude=job.fingerprint)
        if len(reuse):
            want = [fmt.row_id(job.prompts[p].content_hash, s) for i in pending for p in block(i) for s in range(n)]
            found = reuse.count(want)
            console.print(
                f"row reuse: {found} of {len(want)} rows already exist in {len(reuse.sources)} dataset(s) under "
                f"{cfg.out} with the same teacher and generation settings; generating the other {len(want) - found}"
            )
            work.reuse = reuse
    try:
        with RowProgress(total_rows, "scoring" if kind == "score" else "generating", done_rows) as bar:
            waiting_noted = False
            while pending:
                progressed = False
                for i in list(pending):
                    name = fmt.shard_name(i, num)
                    expected = len(block(i)) * n
                    if _shard_is_complete(job, name, expected):  # written by another process
                        pending.remove(i)
                        bar.advance(expected, 0)
                        continue
                    claim = FileLock(job.fs, lock_path(job.dataset_dir, name))
                    if not claim.try_acquire():
                        continue  # another process is writing it
                    try:
                        if fmt.read_manifest(job.fs, job.dataset_dir) is not None:
                            console.print(f"another process committed {url} meanwhile; stopping")
                            return url, job
                        if not _shard_is_complete(job, name, expected):
                            rows = work.rows_for(block(i), bar)
                            if claim.lost:
                                raise KdError(f"lost the claim on {name} to another process (this one stalled for minutes); run the command again")
                            fmt.write_shard(
                                job.fs, job.dataset_dir, name, fmt.rows_to_table(rows, job.teacher.embedding_rows, cfg.k), job.fingerprint
                            )
                        else:
                            bar.advance(expected, 0)
                    finally:
                        claim.release()
                    pending.remove(i)
                    progressed = True
                if pending and not progressed:
                    if not waiting_noted:
                        holders = {locks.describe(FileLock(job.fs, lock_path(job.dataset_dir, fmt.shard_name(i, num))).holder() or {}) for i in pending}
                        console.print(f"waiting for {len(pending)} shard(s) that another process is writing ({'; '.join(sorted(holders))})")
                        waiting_noted = True
                    _pause()
    finally:
        work.close()
    if work.reused or (work.reuse is not None):
        console.print(f"rows: {work.reused} reused from existing datasets, {work.generated} generated")

    present = set(fmt.list_shards(job.fs, job.dataset_dir))
    missing = [fmt.shard_name(i, num) for i in range(num) if fmt.shard_name(i, num) not in present]
    if missing:
        console.print(
            f"slice {cfg.shard_index} of {cfg.num_shards} done; {len(missing)} shard(s) still missing (other slices). "
            f"When every slice has finished, run `kdgen merge {url}`"
        )
        return url, job
    _commit(job.fs, job.dataset_dir, job.manifest_core, cfg, url, num, time.perf_counter() - t0, work.gen_wall, work.gen_tokens)
    return url, job


def _commit(fs, dataset_dir: str, core: dict, cfg: GenerateConfig, url: str, num_shards: int, wall: float, gen_wall: float, gen_tokens: int) -> None:
    """Every shard is written: commit the dataset under its lock, unless another process just did."""
    with _dataset_lock(fs, dataset_dir):
        manifest = fmt.read_manifest(fs, dataset_dir)
        committed_here = manifest is None
        if committed_here:
            manifest = finalize(fs, dataset_dir, core, cfg, wall, gen_wall, gen_tokens, num_shards)
    console.print(f"[green]done:[/] {_summary(manifest)} -> {url}" + ("" if committed_here else " (committed by another process)"))


class _Work:
    """Produces a shard's rows: reused ones from `RowReuse`, the rest from the engine (started on
    first need, so a run whose rows all exist never loads the teacher's weights)."""

    def __init__(self, job: Job):
        self.job = job
        self.reuse: RowReuse | None = None
        self.backend = None
        self.reused = self.generated = 0
        self.gen_wall, self.gen_tokens = 0.0, 0

    def _engine(self):
        if self.backend is None:
            job, cfg = self.job, self.job.cfg
            longest = max(len(p) for p in job.prompt_ids) + (
                cfg.max_new_tokens if job.kind == "generate" else max(len(c) for c in job.completion_ids)
            )
            backend_name = job.manifest_core["generation"]["backend"]
            options = {"batch_size": min(cfg.batch_size, 16)} if backend_name == "hf" else {
                "gpu_memory_utilization": cfg.gpu_memory_utilization,
                "seed": cfg.seed,
            }
            with status(f"starting the {backend_name} engine on {job.teacher.model.path}"):
                self.backend = make_backend(
                    backend_name, job.teacher.model.path, job.teacher.dtype, cfg.k, min(job.teacher.context, longest + 8), options
                )
        return self.backend

    def rows_for(self, prompt_indices: range, bar: RowProgress) -> list[fmt.Row]:
        """The rows of these prompts, in the order an uninterrupted run writes them."""
        job, cfg = self.job, self.job.cfg
        reqs, meta = _requests_for(job, prompt_indices)
        rows: list[fmt.Row | None] = [None] * len(reqs)
        todo = []
        for j, (r, (p, pids)) in enumerate(zip(reqs, meta)):
            old = self.reuse.get(r.row_id, pids, r.completion_ids) if self.reuse is not None else None
            if old is None:
                todo.append(j)
            else:  # the request's own prompt fields; the stored arrays
                rows[j] = replace(old, messages=p.messages, prompt=p.text, prompt_ids=pids)
                self.reused += 1
        if len(todo) < len(reqs):
            bar.advance(len(reqs) - len(todo), 0)
        sampling = SamplingConfig(
            temperature=job.manifest_core["generation"]["temperature"],
            top_p=job.manifest_core["generation"]["top_p"],
            top_k=job.manifest_core["generation"]["top_k"],
            max_new_tokens=max(cfg.max_new_tokens, 1),
            k=cfg.k,
        )
        tok = job.teacher.tokenizer
        for b in range(0, len(todo), cfg.batch_size):
            idx = todo[b : b + cfg.batch_size]
            chunk = [reqs[j] for j in idx]
            backend = self._engine()
            tb = time.perf_counter()
            outs = backend.score(chunk, cfg.k) if job.kind == "score" else backend.generate(chunk, sampling)
            self.gen_wall += time.perf_counter() - tb
            for j, r, o in zip(idx, chunk, outs):
                p, pids = meta[j]
                rows[j] = fmt.Row(
                    id=r.row_id,
                    messages=p.messages,
                    prompt=p.text,
                    prompt_ids=pids,
                    completion=tok.decode(o.completion_ids, skip_special_tokens=True),
                    completion_ids=o.completion_ids,
                    token_logprobs=o.token_logprobs,
                    topk_ids=o.topk_ids,
                    topk_logprobs=o.topk_logprobs,
                    finish_reason=o.finish_reason,
                )
            toks = sum(len(o.completion_ids) for o in outs)
            self.gen_tokens += toks
            self.generated += len(chunk)
            bar.advance(len(chunk), toks)
        return rows

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


def _pause() -> None:
    """Wait a moment for other processes (a function, so tests can stand in for the other process)."""
    time.sleep(WAIT_POLL_S)


@contextmanager
def _dataset_lock(fs, dataset_dir: str) -> Iterator[FileLock]:
    """The dataset's short-lived lock (plan creation, commit); says so when it has to wait."""
    lock = FileLock(fs, lock_path(dataset_dir, "dataset"))
    lock.acquire(WAIT_POLL_S, on_wait=lambda info: console.print(f"waiting for the dataset lock held by {locks.describe(info)}"))
    try:
        yield lock
    finally:
        lock.release()


def finalize(
    fs, dataset_dir: str, core: dict, cfg: GenerateConfig | dict, wall: float, gen_wall: float, gen_tokens: int, num_shards: int | None = None
) -> dict:
    """Collect shard entries, write the dataset card, then the manifest (last: the commit).

    `num_shards`: the plan's; shards of another numbering (an earlier plan of the same dataset, whose
    manifest was deleted and rerun with another --shard-prompts) hold the same rows again, and are removed.
    """
    from kdcore.card import write_card

    names = fmt.list_shards(fs, dataset_dir)
    if num_shards is not None:
        planned = {fmt.shard_name(i, num_shards) for i in range(num_shards)}
        strays = [n for n in names if n not in planned]
        if strays:
            console.print(f"[yellow]note:[/] removing {len(strays)} shard(s) of an earlier plan of this dataset (their rows are in the new shards)")
            for n in strays:
                fs.rm(fmt.join(dataset_dir, fmt.DATA_DIR, n))
        names = [n for n in names if n in planned]
    shards = [fmt.shard_entry_from_file(fs, dataset_dir, f"{fmt.DATA_DIR}/{n}") for n in names]
    rows = sum(s["rows"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)
    nbytes = sum(s["bytes"] for s in shards)
    ids_t = fmt.id_type(core["tokenizer"]["embedding_rows"])
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "fingerprint": fmt.fingerprint(core),
        "kdgen_version": kdgen.__version__,
        "created": fmt.now_iso(),
        "created_by": _who(),
        **{key: core[key] for key in ("teacher", "tokenizer", "generation", "prompts")},
        "encoding": {
            "id_type": str(ids_t),
            "logprob_scale": fmt.LOGPROB_SCALE,
            "topk_layout": "flat T*k per row, position-major; logprob = -cumsum(topk_logprob_deltas)/logprob_scale",
            "parquet": {k: v for k, v in fmt.PARQUET_OPTIONS.items() if k != "column_encoding"},
        },
        "shards": shards,
        "totals": {
            "rows": rows,
            "tokens": tokens,
            "bytes": nbytes,
            "bytes_per_token": round(nbytes / tokens, 2) if tokens else None,
        },
        "wall_time_s": round(wall, 2),
        "generation_time_s": round(gen_wall, 2),
        "tokens_per_s": round(gen_tokens / gen_wall, 1) if gen_wall > 0 else None,
        "fingerprint_fields": list(fmt.FINGERPRINT_FIELDS),
        "config": asdict(cfg) if not isinstance(cfg, dict) else cfg,
    }
    write_card(fs, dataset_dir, manifest)
    for p in fs.ls(fmt.join(dataset_dir, locks.LOCK_DIR), detail=False) if fs.exists(fmt.join(dataset_dir, locks.LOCK_DIR)) else []:
        if not p.rstrip("/").endswith("/dataset.lock"):
            fs.rm(p)  # shard claims left by killed runs: every shard is complete now
    for p in fs.ls(fmt.join(dataset_dir, fmt.DATA_DIR), detail=False):
        if p.rstrip("/").rsplit("/", 1)[-1].startswith(fmt.TMP_PREFIX):
            fs.rm(p)  # leftovers of interrupted writes
    fmt.write_manifest(fs, dataset_dir, manifest)
    plan = fmt.join(dataset_dir, PLAN)
    if fs.exists(plan):
        fs.rm(plan)
    return manifest


def _who() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _summary(m: dict) -> str:
    t = m["totals"]
    tps = m.get("tokens_per_s")
    rate = f", {tps:,.0f} tokens/s" if tps else ""
    return f"{t['rows']:,} rows, {t['tokens']:,} tokens, {t['bytes_per_token']} bytes/token{rate}"


def merge(url: str, sources: list[str] = ()) -> dict:
    """Finish a dataset written in slices: copy in shards from `sources` (other machines' copies of
    the same OUT/<fingerprint>), check every planned shard is there, then commit it."""
    fs, path = fmt.open_fs(url)
    if fmt.read_manifest(fs, path) is not None:
        raise KdError(f"{url} is already complete (it has a manifest)")
    for src in sources:
        sfs, spath = fmt.open_fs(src)
        if not sfs.exists(fmt.join(spath, PLAN)):
            raise KdError(f"{src}: not a slice of a sliced `kdgen generate` (no {PLAN})")
        with sfs.open(fmt.join(spath, PLAN), "rb") as f:
            if json.loads(f.read())["fingerprint"] != posixpath.basename(path.rstrip("/")):
                raise KdError(f"{src} is a slice of a different dataset than {url}")
        fs.makedirs(fmt.join(path, fmt.DATA_DIR), exist_ok=True)
        if not fs.exists(fmt.join(path, PLAN)):
            with sfs.open(fmt.join(spath, PLAN), "rb") as f:
                fmt.write_bytes_atomic(fs, fmt.join(path, PLAN), f.read())
        for name in fmt.list_shards(sfs, spath):
            dest = fmt.join(path, fmt.DATA_DIR, name)
            if not fs.exists(dest):
                with sfs.open(fmt.join(spath, fmt.DATA_DIR, name), "rb") as f:
                    fmt.write_bytes_atomic(fs, dest, f.read())
    plan_path = fmt.join(path, PLAN)
    if not fs.exists(plan_path):
        raise KdError(f"{url}: no generation plan found; point at OUT/<fingerprint> of a sliced `kdgen generate`")
    with fs.open(plan_path, "rb") as f:
        plan = json.loads(f.read())
    present = set(fmt.list_shards(fs, path))
    missing = [fmt.shard_name(i, plan["num_shards"]) for i in range(plan["num_shards"]) if fmt.shard_name(i, plan["num_shards"]) not in present]
    if missing:
        raise KdError(f"{url}: {len(missing)} shard(s) missing ({', '.join(missing[:3])}...); finish the other slices first")
    core, cfg = plan["core"], plan["config"]
    with _dataset_lock(fs, path):
        manifest = fmt.read_manifest(fs, path) or finalize(fs, path, core, cfg, 0.0, 0.0, 0, plan["num_shards"])
    locks.remove_lock_dir(fs, path)
    return manifest


__all__ = ["GenerateConfig", "run", "merge", "prepare", "pa"]
