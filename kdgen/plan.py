"""What a `kdgen generate` / `kdgen score` run will write, decided before any row is generated.

    locate(cfg, kind) -> Job: options checked, prompts read, the dataset's fingerprint — from the
        teacher identity an earlier run remembered (no tokenizer load, no transformers import), else
        from the loaded teacher (`prepare`)
    every_shard_written(job): the fast case — a killed run's shards are all there, only the commit is missing
    claim_plan(job): the shard plan (fixed blocks of prompts, `.kdgen-plan.json`), created once under
        the dataset lock, so a resumed or sliced run writes exactly the shards an uninterrupted one would
    dataset_lock(fs, dir): the short-lived lock around the plan and the commit (kdgen/locks.py);
        per-shard claims are taken by the loop in kdgen/generate.py

Test: `pytest tests/test_kdgen_generate.py tests/test_kdgen_concurrency.py`.
"""

from __future__ import annotations

import json
import math
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

from kdcore import codec
import kdcore.dataset as kds
import kdcore.io as kio
from kdcore import engine_options
from kdcore.backends import default_backend, engine_version
from kdcore.errors import KdError
from kdcore.models import ResolvedModel, resolve
from kdcore.progress import console
from kdcore.prompts import Prompt, encode_prompt, load_prompts
from kdcore.teacher import Teacher, load_teacher, remembered_identity
from kdgen import locks
from kdgen.config import GenerateConfig, validate
from kdgen.locks import FileLock, lock_path

PLAN = ".kdgen-plan.json"
WAIT_POLL_S = 1.0  # how often a process waiting for another's shards or lock looks again


def generation_info(cfg: GenerateConfig, backend: str, kind: str) -> dict:
    """The generation settings that go into the fingerprint (the rest of the config does not)."""
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
        # the seed changes the rows when anything is drawn: the completions, or the sampled targets
        "seed": 0 if greedy and not cfg.sampled_targets else cfg.seed,
        "k": cfg.k,
        "sampled_targets": cfg.sampled_targets,
        "logprob_mode": "raw_logprobs_temperature_1",
        "quantization": engine_options.numerics(cfg.quantization, cfg.engine_arg),
        **({"server_url": cfg.server_url} if cfg.backend == "server" else {}),
    }


@dataclass
class Job:
    """Everything decided before any row is generated. `teacher`, `prompt_ids` and
    `completion_ids` are None until `load()` (a run whose shards all exist never needs them)."""

    cfg: GenerateConfig
    kind: str
    prompts: list[Prompt]
    prompt_info: dict
    model: ResolvedModel | None
    manifest_core: dict
    fingerprint: str
    fs: object
    root: str
    dataset_dir: str
    teacher: Teacher | None = None
    prompt_ids: list[list[int]] | None = None
    completion_ids: list[list[int]] | None = None

    @property
    def url(self) -> str:
        return self.cfg.out.rstrip("/") + "/" + self.fingerprint

    @property
    def n(self) -> int:
        return self.manifest_core["generation"]["n"]

    def load(self) -> None:
        """Load the teacher's tokenizer and encode the prompts (checking them against its context)."""
        if self.teacher is None:
            full = prepare(self.cfg, self.kind, (self.prompts, self.prompt_info), self.model)
            if full.fingerprint != self.fingerprint:  # the remembered identity is checked against the files
                raise RuntimeError(f"teacher identity changed under the run: {self.fingerprint} -> {full.fingerprint}")
            self.teacher, self.prompt_ids, self.completion_ids = full.teacher, full.prompt_ids, full.completion_ids


def read_request(cfg: GenerateConfig, kind: str) -> tuple[list[Prompt], dict]:
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
        prompt_info["content_hash"] = kio.sha256_hex("\n".join(p.content_hash for p in prompts))
    return prompts, prompt_info


def manifest_core(cfg: GenerateConfig, kind: str, teacher_info: dict, tokenizer_info: dict, prompt_info: dict) -> dict:
    """What the fingerprint is computed from (kdcore.dataset.FINGERPRINT_FIELDS picks from it)."""
    backend = default_backend(full_distribution=cfg.sampled_targets > 0) if cfg.backend == "auto" else cfg.backend
    if backend == "server":  # a vLLM engine behind HTTP: the same rows as in-process, so the same key
        backend = "vllm"
    return {
        "format_version": codec.FORMAT_VERSION,
        "teacher": teacher_info,
        "tokenizer": tokenizer_info,
        "generation": generation_info(cfg, backend, kind),
        "prompts": prompt_info,
    }


def _job(cfg: GenerateConfig, kind: str, request: tuple[list[Prompt], dict], model, teacher_info: dict, tokenizer_info: dict) -> Job:
    """The job of this request and teacher identity: the fingerprint and where the dataset lives."""
    prompts, prompt_info = request
    core = manifest_core(cfg, kind, teacher_info, tokenizer_info, prompt_info)
    fp = kds.fingerprint(core)
    fs, root = kio.open_fs(cfg.out)
    return Job(cfg, kind, prompts, prompt_info, model, core, fp, fs, root, kio.join(root, fp))


def locate(cfg: GenerateConfig, kind: str) -> Job:
    """The job, its fingerprint computed without loading the teacher's tokenizer (importing
    transformers costs seconds) when an earlier run remembered the teacher's identity."""
    request = read_request(cfg, kind)
    model = resolve(cfg.teacher)
    identity = remembered_identity(model, cfg.dtype)
    if identity is None:
        return prepare(cfg, kind, request, model)
    return _job(cfg, kind, request, model, *identity)


def prepare(
    cfg: GenerateConfig, kind: str = "generate", request: tuple[list[Prompt], dict] | None = None, model: ResolvedModel | None = None
) -> Job:
    """The job with the teacher loaded (config and tokenizer) and every prompt encoded; `request`
    and `model`: the prompts already read and the teacher spec already resolved."""
    # prompts first: reading them is cheap, loading the teacher's tokenizer imports transformers
    request = request or read_request(cfg, kind)
    prompts = request[0]
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
    job = _job(cfg, kind, request, teacher.model, teacher.teacher_info(), teacher.tokenizer_info())
    job.teacher, job.prompt_ids, job.completion_ids = teacher, prompt_ids, completion_ids
    return job


def check_output(job: Job) -> None:
    """The output root must not be a different dataset, and must be writable."""
    cfg, fs, root = job.cfg, job.fs, job.root
    existing = kds.read_manifest(fs, root) if fs.exists(root) else None
    if existing is not None:
        raise KdError(
            f"--out {cfg.out} is itself a dataset (fingerprint {existing.get('fingerprint')}); --out takes the "
            f"root that holds datasets: use its parent directory"
        )
    probe = kio.join(root, f".kdgen-write-test-{job.fingerprint}-{uuid.uuid4().hex[:8]}")
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except (OSError, PermissionError) as e:
        raise KdError(f"--out {cfg.out}: cannot write there ({e.__class__.__name__}: {e}); choose a writable location") from None
    plan = read_plan(fs, job.dataset_dir)
    if plan is not None and plan.get("fingerprint") != job.fingerprint:
        raise KdError(f"{job.dataset_dir} holds a different dataset (fingerprint {plan.get('fingerprint')}); remove it or choose another --out")


def read_plan(fs, dataset_dir: str) -> dict | None:
    path = kio.join(dataset_dir, PLAN)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def blocks(plan: dict, num_prompts: int) -> list[range]:
    """The prompt indices of each planned shard (all n samples of a prompt live in one shard)."""
    per = plan["shard_prompts"]
    return [range(i * per, min((i + 1) * per, num_prompts)) for i in range(plan["num_shards"])]


def _new_plan(job: Job) -> dict:
    return {
        "fingerprint": job.fingerprint,
        "shard_prompts": job.cfg.shard_prompts,
        "num_shards": max(1, math.ceil(len(job.prompts) / job.cfg.shard_prompts)),
        "core": job.manifest_core,  # what `kdgen merge` needs to write the manifest
        "config": asdict(job.cfg),
    }


def every_shard_written(job: Job) -> bool:
    """Whether every planned shard is already complete (a run killed just before its commit; slices
    that all finished on one root): then the commit is all that is left, and the teacher never loads."""
    if not job.fs.exists(kio.join(job.dataset_dir, kds.DATA_DIR)):
        return False
    plan = read_plan(job.fs, job.dataset_dir) or _new_plan(job)
    if plan["fingerprint"] != job.fingerprint or plan["num_shards"] != max(1, math.ceil(len(job.prompts) / plan["shard_prompts"])):
        return False
    num = plan["num_shards"]
    return all(shard_has_rows(job.fs, job.dataset_dir, kds.shard_name(i, num), len(b) * job.n) for i, b in enumerate(blocks(plan, len(job.prompts))))


def claim_plan(job: Job) -> dict | None:
    """The dataset's shard plan, written once under the dataset lock (an existing one wins);
    None when another process committed the dataset meanwhile."""
    with dataset_lock(job.fs, job.dataset_dir):
        if kds.read_manifest(job.fs, job.dataset_dir) is not None:
            return None
        plan = read_plan(job.fs, job.dataset_dir)
        if plan is not None:
            if plan["shard_prompts"] != job.cfg.shard_prompts:
                console.print(
                    f"[yellow]note:[/] resuming with the existing plan of {plan['shard_prompts']} prompts per shard "
                    f"(--shard-prompts {job.cfg.shard_prompts} ignored)"
                )
            return plan
        plan = _new_plan(job)
        job.fs.makedirs(job.dataset_dir, exist_ok=True)
        kio.write_bytes_atomic(job.fs, kio.join(job.dataset_dir, PLAN), json.dumps(plan).encode())
        return plan


def shard_has_rows(fs, dataset_dir: str, name: str, expected_rows: int) -> bool:
    """A renamed shard is complete by construction; still check its footer and row count."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(kio.join(dataset_dir, kds.DATA_DIR, name), filesystem=fs)
        return meta.num_rows == expected_rows
    except Exception:
        return False


@contextmanager
def dataset_lock(fs, dataset_dir: str) -> Iterator[FileLock]:
    """The dataset's short-lived lock (plan creation, commit); says so when it has to wait."""
    lock = FileLock(fs, lock_path(dataset_dir, "dataset"))
    lock.acquire(WAIT_POLL_S, on_wait=lambda info: console.print(f"waiting for the dataset lock held by {locks.describe(info)}"))
    try:
        yield lock
    finally:
        lock.release()
