"""`kdeval run`: score models against a held-out teacher dataset and/or references.

    run(cfg): validate -> open + verify the dataset -> prompts + references -> resolve models
              (config + tokenizer) -> match tokenizers (the teacher's tokenizer for the others) ->
              [vllm: every model's generations in one worker process] -> per model: load,
              [hf: generate (timed, metered)], fidelity (teacher-forced: token-level with the
              dataset's tokenizer, chunk-level with another), quality, size -> samples ->
              results.json -> REPORT.md + plots

Writes to --out: `results.json` (every model's identity, config, kd_config and the fingerprints it
was trained on, the dataset's fingerprint, the generation settings and seeds, all metrics and
costs, side-by-side samples), `REPORT.md` and PNG plots (the same report `kdeval compare` writes).
Test: `pytest tests/test_kdeval_e2e.py tests/test_kdeval_crosstok.py`, `-m slow tests/test_kdeval_vllm.py`.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass

import kdeval
from kdeval import quality
from kdeval.config import CHUNK_MEASURES, FIDELITY_METRICS, METRICS, QUALITY_METRICS, TOKEN_MEASURES, EvalConfig, validate_eval
from kdeval.models import EvalModel, count_parameters, load_weights, prepare, size_on_disk, unique_names
from kdeval.report import write_json, write_report
from kdcore.artifacts import RESULTS
from kdcore.backends import SamplingConfig, default_backend, engine_version
from kdcore.errors import KdError
from kdcore.dataset import TeacherDataset
from kdcore.io import canonical_json, now_iso, sha256_hex
from kdcore.progress import console, status
from kdcore.prompts import Prompt, chat_template_of, encode_prompt, load_prompts



@dataclass
class EvalSet:
    """What every model is asked: prompts (text for any tokenizer, dataset ids for the teacher's)."""

    prompts: list[Prompt]
    dataset_prompt_ids: list[list[int]] | None  # the exact ids the teacher saw, when from --data
    references: list[str]
    reference_source: str

    @property
    def keys(self) -> list[str]:
        return [p.content_hash for p in self.prompts]


def open_dataset(cfg: EvalConfig) -> TeacherDataset | None:
    if not cfg.data:
        return None
    if cfg.verify:
        from kdcore.verify import require_valid

        try:
            require_valid(cfg.data)
        except KdError as e:
            raise KdError(f"--data {e}") from None
    try:
        return TeacherDataset(cfg.data)
    except KdError as e:
        raise KdError(f"--data {e}") from None


def prepare_models(cfg: EvalConfig, ds: TeacherDataset | None) -> list[EvalModel]:
    models = []
    if cfg.teacher:
        models.append(prepare(cfg.teacher, "teacher", "--teacher"))
    models += [prepare(s, "student", "--model") for s in cfg.models]
    models += [prepare(s, "baseline", "--baseline") for s in cfg.baselines]
    unique_names(models)
    if ds is not None:
        want = ds.manifest["tokenizer"]["tokenizer_hash"]
        for m in models:
            m.matches_dataset = m.tokenizer_hash == want
    return models


def wants_fidelity(cfg: EvalConfig, ds: TeacherDataset | None) -> bool:
    return ds is not None and cfg.fidelity and any(x in FIDELITY_METRICS for x in metrics_of(cfg))


def teacher_tokenizer(cfg: EvalConfig, ds: TeacherDataset, models: list[EvalModel]):
    """The dataset's tokenizer, for the chunk-level fidelity of models with another one: a model of
    this run that has it, else the teacher recorded in the manifest (its path, or its built-in name),
    checked against the dataset's tokenizer hash."""
    from kdcore.models import BUILTINS
    from kdcore.crosstok import load_teacher_tokenizer

    for m in models:
        if m.matches_dataset:
            return m.tokenizer
    t = ds.manifest["teacher"]
    source, path = t["source"], t.get("path")
    builtin = source.split(":", 1)[1] if source.startswith("builtin:") else None
    for spec in (path if path and os.path.isdir(path) else None, builtin if builtin in BUILTINS else None):
        if spec:
            try:
                return load_teacher_tokenizer(spec, ds.manifest)
            except KdError:
                continue
    others = ", ".join(m.name for m in models if not m.matches_dataset)
    raise KdError(
        f"--data {cfg.data}: {others} use another tokenizer than the dataset's (teacher {source}); their chunk-level "
        f"fidelity needs the teacher's tokenizer, and the teacher recorded in the dataset (at {path}) is not on this machine "
        f"(or no longer has that tokenizer). "
        f"Pass --teacher with the dataset's teacher, or --no-fidelity to use the dataset only for prompts and references"
    )


def backend_of(cfg: EvalConfig) -> str:
    """--backend auto: vLLM where it is importable, else transformers (as kdgen)."""
    return default_backend() if cfg.backend == "auto" else cfg.backend


def metrics_of(cfg: EvalConfig) -> tuple[str, ...]:
    return tuple(cfg.metrics) if cfg.metrics else METRICS


def build_eval_set(cfg: EvalConfig, ds: TeacherDataset | None) -> EvalSet:
    """Prompts and references: from --prompts/--references, else from the dataset's rows.
    Counts are checked on the whole files; --limit then keeps the first N of both."""
    ids = refs = None
    if cfg.prompts:
        prompts, _ = load_prompts(cfg.prompts, cfg.prompt_column)
        source = None
    else:
        table = ds.read_table(columns=["messages", "prompt", "prompt_ids", "completion"]).to_pylist()
        prompts, ids, refs, seen = [], [], [], set()
        for row in table:  # one entry per distinct prompt (n > 1 samples share it); its first sample is the reference
            key = tuple(row["prompt_ids"])
            if key in seen:
                continue
            seen.add(key)
            prompts.append(Prompt(len(prompts), row["messages"], row["prompt"]))
            ids.append(list(key))
            refs.append(row["completion"])
        if not prompts:
            raise KdError(f"--data {cfg.data}: the dataset holds no rows")
        source = f"teacher completions in {ds.fingerprint}"
    if cfg.references:
        refs = quality.load_references(cfg.references, cfg.reference_column)
        if len(refs) != len(prompts):
            what = f"--prompts {cfg.prompts}" if cfg.prompts else f"--data {cfg.data}"
            raise KdError(
                f"--references {cfg.references} holds {len(refs)} references but {what} gives {len(prompts)} prompts; "
                f"give exactly one reference per prompt, in the same order"
            )
        source = f"file {cfg.references}"
    if refs is None:
        source, refs = "teacher generations in this run", []  # filled in once the teacher has generated
    n = cfg.limit or len(prompts)
    return EvalSet(prompts[:n], ids[:n] if ids is not None else None, refs[:n], source)


def prompt_text(p: Prompt) -> str:
    if p.messages is None:
        return p.text or ""
    return "\n".join(f"{m['role']}: {m['content']}" for m in p.messages)


def sampling_of(cfg: EvalConfig, ds: TeacherDataset | None) -> SamplingConfig:
    max_new = cfg.max_new_tokens or (ds.manifest["generation"]["max_new_tokens"] if ds is not None else 0) or 128
    return SamplingConfig(cfg.temperature, cfg.top_p if cfg.temperature > 0 else 1.0, 0, max_new, 1)


def model_prompt_ids(p: Prompt, tokenizer) -> list[int]:
    """What a model is prompted with: its chat template; for chat prompts and a tokenizer without
    one (base-model tokenizers, as cross-tokenizer students often have), the turns as plain
    paragraphs — the form kdtrain trains such students on (kdtrain.data.encode_prompts)."""
    if p.messages is not None and chat_template_of(tokenizer) is None:
        from kdcore.teacher_data import encode_prompts

        return encode_prompts(tokenizer, [(p.messages, None)])[0]
    return encode_prompt(p, tokenizer)


def requests_of(m: EvalModel, cfg: EvalConfig, es: EvalSet) -> list:
    """One generation request per prompt, in the model's own token ids."""
    from kdeval.generate import requests_for

    if es.dataset_prompt_ids is not None and m.matches_dataset:
        prompt_ids = es.dataset_prompt_ids  # exactly what the teacher saw
    else:
        try:
            prompt_ids = [model_prompt_ids(p, m.tokenizer) for p in es.prompts]
        except KdError as e:
            raise KdError(f"{m.name}: {e}") from None
    return requests_for(prompt_ids, es.keys, cfg.seed)


def evaluate_model(m: EvalModel, cfg: EvalConfig, ds: TeacherDataset | None, es: EvalSet, sampling: SamplingConfig, teacher_tok=None, gen=None) -> dict:
    """Generate (timed) unless `gen` holds the model's generations already (vLLM worker), teacher-force
    on the dataset, measure size. Returns the model's entry.
    teacher_tok: the dataset's tokenizer, for chunk-level fidelity when `m` has another one."""
    from kdeval.generate import generate

    hf_model = None
    if gen is None:
        requests = requests_of(m, cfg, es)
        with status(f"{m.name}: loading and generating {len(requests)} completions"):
            gen, hf_model = generate("hf", m.path, lambda: load_weights(m, cfg.dtype), requests, sampling, cfg.dtype, cfg.batch_size)
    if hf_model is None:
        hf_model = load_weights(m, cfg.dtype)
    fid = {"metrics": {}, "fidelity": None, "fidelity_note": None}
    if wants_fidelity(cfg, ds):
        fid = score_fidelity(m, hf_model, cfg, ds, teacher_tok)
    params = count_parameters(hf_model)
    del hf_model
    gc.collect()
    cost = {
        "params": params,
        "bytes_on_disk": size_on_disk(m.path),
        "generated_tokens": gen.tokens,
        "generation_s": round(gen.seconds, 4),
        "tokens_per_s": round(gen.tokens_per_s, 2),
        "peak_memory_bytes": gen.peak_memory_bytes,
        "memory_kind": gen.memory_kind,
    }
    return {**m.record(), **fid, "cost": cost, "outputs": gen.texts(m.tokenizer)}


def score_fidelity(m: EvalModel, hf_model, cfg: EvalConfig, ds: TeacherDataset, teacher_tok) -> dict:
    """Token-level fidelity for a model with the dataset's tokenizer, chunk-level for one with another.
    Returns the entry's "metrics" (the measures asked for), "fidelity" (what was measured on what)
    and "fidelity_note" (for the report)."""
    from kdcore.vocab_map import TokenBytes

    wanted = metrics_of(cfg)
    if m.matches_dataset:
        from kdeval.fidelity import score_model

        with status(f"{m.name}: teacher-forced fidelity on {ds.fingerprint}"):
            got = score_model(hf_model, ds, cfg.batch_size, cfg.limit, TokenBytes.from_tokenizer(m.tokenizer).lengths)
        keep = {k for x in wanted for k in TOKEN_MEASURES.get(x, ())}
        metrics = {"tokens": got["tokens"], "teacher_ppl": got.get("teacher_ppl"), "teacher_nll_per_byte": got.get("teacher_nll_per_byte")}
        metrics.update({k: got.get(k) for k in sorted(keep)})
        return {"metrics": metrics, "fidelity": {"kind": "token", "tokens": got["tokens"]}, "fidelity_note": None}
    from kdeval.crosstok import VOCAB_MATCH, crosstok_context, score_crosstok
    from kdcore.teacher_data import TeacherData

    with status(f"{m.name}: aligning its tokenizer with the teacher's ({len(teacher_tok):,} -> {len(m.tokenizer):,} entries)"):
        ctx = crosstok_context(teacher_tok, m.tokenizer, ds.manifest)
    with status(f"{m.name}: teacher-forced chunk-level fidelity on {ds.fingerprint}"):
        got = score_crosstok(hf_model, TeacherData([ds]), ctx, cfg.limit)
    keep = {k for x in wanted for k in CHUNK_MEASURES.get(x, ())}
    metrics = {"chunks": got["chunks"], "teacher_chunk_nll": got.get("teacher_chunk_nll"), "teacher_nll_per_byte": got.get("teacher_nll_per_byte")}
    metrics.update({k: got.get(k) for k in sorted(keep)})
    record = {
        "kind": "chunk",
        "vocab_match": VOCAB_MATCH,
        "vocab_map": ctx.vmap.summary(ctx.teacher),
        **{k: got.get(k) for k in ("rows", "unaligned_rows", "chunks", "bytes", "chunk_top1_positions")},
    }
    note = (
        f"tokenizer differs from the teacher's: chunk-level fidelity over {got['chunks']} chunks of {got['rows'] - got['unaligned_rows']} "
        f"row(s) (token-level KL, top-1, ECE and PPL are not defined across tokenizers)"
    )
    if got["unaligned_rows"]:
        note += f"; {got['unaligned_rows']} row(s) left out: its tokens do not spell the teacher's text byte for byte"
    return {"metrics": metrics, "fidelity": record, "fidelity_note": note}


def run(cfg: EvalConfig) -> str:
    """Evaluate every model; returns the output directory."""
    t0 = time.perf_counter()
    validate_eval(cfg)
    ds = open_dataset(cfg)
    with status("reading prompts and references, resolving models"):
        es = build_eval_set(cfg, ds)  # before the models: bad prompt/reference files fail fast
        models = prepare_models(cfg, ds)
        cross = wants_fidelity(cfg, ds) and any(not m.matches_dataset for m in models)
        teacher_tok = teacher_tokenizer(cfg, ds, models) if cross else None
    if not es.references and not any(m.role == "teacher" for m in models):
        raise KdError("no references: give --references FILE, --data (its teacher completions), or --teacher")
    os.makedirs(cfg.out, exist_ok=True)
    sampling = sampling_of(cfg, ds)
    wanted = metrics_of(cfg)
    models.sort(key=lambda m: m.role != "teacher")  # the teacher first: its outputs may be the references
    backend = backend_of(cfg)
    generated = [None] * len(models)
    if backend == "vllm":  # every model's generations first, in one worker process (kdeval.generate)
        from kdeval.generate import generate_in_worker

        jobs = [(m.path, requests_of(m, cfg, es)) for m in models]
        try:
            with status(f"generating {len(es.prompts)} completions with vLLM for {', '.join(m.name for m in models)} (worker process)"):
                generated = generate_in_worker(jobs, sampling, cfg.dtype)
        except KdError as e:
            if cfg.backend != "auto":
                raise
            # auto: a model vLLM cannot serve (e.g. a head size its CPU attention rejects) is no reason to stop
            console.print(f"[yellow]note:[/] {e}; --backend auto falls back to hf for every model of the run")
            backend, generated = "hf", [None] * len(models)
    entries = []
    for m, gen in zip(models, generated):
        entry = evaluate_model(m, cfg, ds, es, sampling, teacher_tok, gen)
        if not es.references and m.role == "teacher":
            es.references = entry["outputs"]
        entries.append(entry)
        console.print(f"[green]{m.name}[/]: {_brief(entry)}")
    for e in entries:
        e["metrics"].update(quality.quality_scores(e["outputs"], es.references, [x for x in QUALITY_METRICS if x in wanted]))
        if "cost" not in wanted:
            e["cost"] = {"params": e["cost"]["params"], "bytes_on_disk": e["cost"]["bytes_on_disk"]}
    results = {
        "kdeval_version": kdeval.__version__,
        "created": now_iso(),
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "config": asdict(cfg),
        "dataset": _dataset_record(ds),
        "eval_set": {
            "prompts": len(es.prompts),
            "prompts_source": cfg.prompts or (cfg.data and f"prompts in {ds.fingerprint}"),
            "prompts_hash": sha256_hex("\n".join(es.keys)),
            "references": es.reference_source,
            "references_hash": sha256_hex(canonical_json(es.references)),
        },
        "generation": {
            "backend": backend,
            "engine_version": engine_version(backend),
            "greedy": sampling.temperature == 0,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_new_tokens": sampling.max_new_tokens,
            "dtype": cfg.dtype,
            "seed": cfg.seed,
            "seed_rule": "per prompt: kdcore.backends.request_seed(seed, prompt content hash)",
        },
        "models": [{k: v for k, v in e.items() if k != "outputs"} for e in entries],
        "samples": [
            {
                "prompt": prompt_text(es.prompts[i]),
                "reference": es.references[i],
                "outputs": {e["name"]: e["outputs"][i] for e in entries},
            }
            for i in range(min(cfg.samples, len(es.prompts)))
        ],
    }
    write_json(os.path.join(cfg.out, RESULTS), results)
    write_report(results, cfg.out, cfg.samples)
    console.print(f"[green]done:[/] {len(entries)} model(s) on {len(es.prompts)} prompts -> {cfg.out}/REPORT.md")
    return cfg.out


def _dataset_record(ds: TeacherDataset | None) -> dict | None:
    if ds is None:
        return None
    m = ds.manifest
    return {
        "url": ds.url,
        "fingerprint": ds.fingerprint,
        "teacher": m["teacher"]["source"],
        "teacher_weights_hash": m["teacher"]["weights_hash"],
        "tokenizer_hash": m["tokenizer"]["tokenizer_hash"],
        "prompts": m["prompts"]["source"],
        "rows": ds.num_rows,
        "tokens": ds.num_tokens,
        "k": ds.k,
        "generation": m["generation"],
    }


def _brief(e: dict) -> str:
    m, c = e["metrics"], e["cost"]
    keys = ("kl", "top1", "ece", "ppl", "chunk_nll", "chunk_kl", "chunk_start_kl", "chunk_top1", "nll_per_byte")
    parts = [f"{k}={m[k]:.4g}" for k in keys if m.get(k) is not None]
    parts.append(f"{c['params'] / 1e6:.2f}M params, {c['tokens_per_s']:.1f} tok/s")
    return ", ".join(parts)
