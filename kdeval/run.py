"""`kdeval run`: score models against a held-out teacher dataset and/or references.

    run(cfg): validate -> open + verify the dataset -> prompts + references -> resolve models
              (config + tokenizer) -> match tokenizers -> per model: load, generate (timed, metered),
              fidelity (teacher-forced), quality, size -> samples -> results.json -> REPORT.md + plots

Writes to --out: `results.json` (every model's identity, config, kd_config and the fingerprints it
was trained on, the dataset's fingerprint, the generation settings and seeds, all metrics and
costs, side-by-side samples), `REPORT.md` and PNG plots (the same report `kdeval compare` writes).
Test: `pytest tests/test_kdeval_e2e.py`.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass

import kdeval
from kdeval import quality
from kdeval.config import FIDELITY_METRICS, METRICS, QUALITY_METRICS, EvalConfig, validate_eval
from kdeval.models import EvalModel, count_parameters, load_weights, prepare, size_on_disk, unique_names
from kdeval.report import write_json, write_report
from kdgen.backends import SamplingConfig, engine_version
from kdgen.errors import KdError
from kdgen.format import TeacherDataset, canonical_json, now_iso, sha256_hex
from kdgen.progress import console, status
from kdgen.prompts import Prompt, encode_prompt, load_prompts

RESULTS = "results.json"


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
        from kdgen.verify import require_valid

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
        wants_fidelity = cfg.fidelity and any(x in FIDELITY_METRICS for x in metrics_of(cfg))
        if wants_fidelity and not any(m.matches_dataset for m in models):
            names = ", ".join(f"{m.name} ({m.tokenizer_hash[:12]})" for m in models)
            raise KdError(
                f"--data {cfg.data}: its tokenizer ({want[:12]}, teacher {ds.manifest['teacher']['source']}) matches none of the "
                f"models given: {names}. Fidelity needs a model with the teacher's tokenizer; pass --no-fidelity to use the "
                f"dataset only for prompts and references"
            )
        for m in models:
            if wants_fidelity and not m.matches_dataset:
                console.print(
                    f"[yellow]note:[/] {m.name}: tokenizer differs from the dataset's; fidelity skipped (cross-tokenizer "
                    f"chunk-level measures are not implemented), quality metrics still computed"
                )
    return models


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


def evaluate_model(m: EvalModel, cfg: EvalConfig, ds: TeacherDataset | None, es: EvalSet, sampling: SamplingConfig) -> dict:
    """Generate (timed), teacher-force on the dataset, measure size. Returns the model's entry."""
    from kdeval.generate import generate, requests_for

    wanted = metrics_of(cfg)
    if es.dataset_prompt_ids is not None and m.matches_dataset:
        prompt_ids = es.dataset_prompt_ids  # exactly what the teacher saw
    else:
        try:
            prompt_ids = [encode_prompt(p, m.tokenizer) for p in es.prompts]
        except KdError as e:
            raise KdError(f"{m.name}: {e}") from None
    requests = requests_for(prompt_ids, es.keys, cfg.seed)
    with status(f"{m.name}: loading and generating {len(requests)} completions"):
        gen, hf_model = generate(cfg.backend, m.path, lambda: load_weights(m, cfg.dtype), m.tokenizer, requests, sampling, cfg.dtype, cfg.batch_size)
    if hf_model is None:
        hf_model = load_weights(m, cfg.dtype)
    metrics: dict = {}
    note = None
    if ds is not None and cfg.fidelity and any(x in FIDELITY_METRICS for x in wanted):
        if m.matches_dataset:
            from kdeval.fidelity import score_model

            with status(f"{m.name}: teacher-forced fidelity on {ds.fingerprint}"):
                fid = score_model(hf_model, ds, cfg.batch_size, cfg.limit)
            metrics["tokens"] = fid["tokens"]
            metrics["teacher_ppl"] = fid.get("teacher_ppl")
            metrics.update({k: fid.get(k) for k in FIDELITY_METRICS if k in wanted})
        else:
            note = "tokenizer differs from the dataset's: fidelity skipped (cross-tokenizer measures not implemented)"
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
    return {**m.record(), "metrics": metrics, "cost": cost, "fidelity_note": note, "outputs": gen.texts}


def run(cfg: EvalConfig) -> str:
    """Evaluate every model; returns the output directory."""
    t0 = time.perf_counter()
    validate_eval(cfg)
    ds = open_dataset(cfg)
    with status("reading prompts and references, resolving models"):
        es = build_eval_set(cfg, ds)  # before the models: bad prompt/reference files fail fast
        models = prepare_models(cfg, ds)
    if not es.references and not any(m.role == "teacher" for m in models):
        raise KdError("no references: give --references FILE, --data (its teacher completions), or --teacher")
    os.makedirs(cfg.out, exist_ok=True)
    sampling = sampling_of(cfg, ds)
    wanted = metrics_of(cfg)
    entries = []
    for m in sorted(models, key=lambda m: m.role != "teacher"):  # the teacher first: its outputs may be the references
        entry = evaluate_model(m, cfg, ds, es, sampling)
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
            "backend": cfg.backend,
            "engine_version": engine_version(cfg.backend),
            "greedy": sampling.temperature == 0,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_new_tokens": sampling.max_new_tokens,
            "dtype": cfg.dtype,
            "seed": cfg.seed,
            "seed_rule": "per prompt: kdgen.backends.request_seed(seed, prompt content hash)",
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
    parts = [f"{k}={m[k]:.4g}" for k in ("kl", "top1", "ece", "ppl") if m.get(k) is not None]
    parts.append(f"{c['params'] / 1e6:.2f}M params, {c['tokens_per_s']:.1f} tok/s")
    return ", ".join(parts)
