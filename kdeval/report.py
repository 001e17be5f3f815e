"""`kdeval compare` and the report every `kdeval run` writes: REPORT.md with one table (models x
metrics, the best non-teacher value of each column in bold), PNG plots, side-by-side samples, and a
results.json that keeps every model's config and dataset fingerprints.

Plots (matplotlib, Agg backend: no display needed):
* `metrics.png` — one bar chart per metric, a bar per model;
* `loss_curves.png` — training loss against step, read from each checkpoint's trainer logs
  (kd_config.json / trainer_state.json); models without logs are skipped, and so is the plot;
* `quality_vs_size.png` — ROUGE-L (or BLEU) against parameter count.

Test: `pytest tests/test_kdeval_e2e.py`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import kdeval
from kdeval.config import CompareConfig, validate_compare
from kdeval.verdict import verdict
from kdcore.artifacts import RESULTS
from kdcore.errors import KdError
from kdcore.io import now_iso, write_bytes_atomic

# (key, header, where it lives, higher is better, format)
COLUMNS = [
    ("kl", "KL(t‖s) ↓", "metrics", False, "{:.4g}"),
    ("top1", "top-1 agree ↑", "metrics", True, "{:.3f}"),
    ("ece", "ECE ↓", "metrics", False, "{:.3f}"),
    ("ppl", "PPL ↓", "metrics", False, "{:.4g}"),
    ("nll_per_byte", "NLL/byte ↓", "metrics", False, "{:.4f}"),
    # cross-tokenizer students (kdeval.crosstok): per chunk of text both tokenizers cut alike
    ("chunk_nll", "x-tok chunk NLL ↓", "metrics", False, "{:.4g}"),
    ("chunk_kl", "x-tok chunk KL ↓", "metrics", False, "{:.4g}"),
    ("chunk_start_kl", "x-tok KL@chunk start ↓", "metrics", False, "{:.4g}"),
    ("chunk_top1", "x-tok top-1@chunk start ↑", "metrics", True, "{:.3f}"),
    ("rouge1", "ROUGE-1 ↑", "metrics", True, "{:.3f}"),
    ("rouge2", "ROUGE-2 ↑", "metrics", True, "{:.3f}"),
    ("rougeL", "ROUGE-L ↑", "metrics", True, "{:.3f}"),
    ("bleu", "BLEU ↑", "metrics", True, "{:.2f}"),
    ("params", "params (M) ↓", "cost", False, None),
    ("bytes_on_disk", "size (MB) ↓", "cost", False, None),
    ("tokens_per_s", "tok/s ↑", "cost", True, "{:.1f}"),
    ("peak_memory_bytes", "peak mem (MB) ↓", "cost", False, None),
]
SCALE = {"params": 1e6, "bytes_on_disk": 1e6, "peak_memory_bytes": 1e6}
ROLE_COLOURS = {"teacher": "#444444", "student": "#1f77b4", "baseline": "#ff7f0e"}


def value(model: dict, key: str, where: str) -> float | None:
    v = (model.get(where) or {}).get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v / SCALE.get(key, 1)


def _fmt(key: str, fmt: str | None, v: float) -> str:
    return (fmt or "{:.2f}").format(v)


def table(models: list[dict]) -> str:
    """Markdown table, models x metrics; the best value among non-teacher models in bold."""
    cols = [c for c in COLUMNS if any(value(m, c[0], c[2]) is not None for m in models)]
    best = {}  # (eval set, column) -> best value: models are only ranked against the same prompts and data
    for group in {m.get("eval_key") for m in models}:
        members = [m for m in models if m.get("eval_key") == group and m["role"] != "teacher"]
        for key, _, where, higher, fmt in cols:
            vals = [v for v in (value(m, key, where) for m in members) if v is not None]
            if len(vals) > 1 and len({_fmt(key, fmt, v) for v in vals}) > 1:  # all equal: nothing to single out
                best[group, key] = max(vals) if higher else min(vals)
    lines = ["| model | role | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for m in models:
        cells = []
        for key, _, where, _, fmt in cols:
            v = value(m, key, where)
            if v is None:
                cells.append("–")
                continue
            text = _fmt(key, fmt, v)
            b = best.get((m.get("eval_key"), key))
            bold = m["role"] != "teacher" and b is not None and _fmt(key, fmt, b) == text
            cells.append(f"**{text}**" if bold else text)
        lines.append(f"| {m['name']} | {m['role']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bold_caption(models: list[dict]) -> str:
    ranked = {m.get("eval_key") for m in models if m["role"] != "teacher"}
    if all(sum(1 for m in models if m["role"] != "teacher" and m.get("eval_key") == g) < 2 for g in ranked):
        return "One student or baseline per set of prompts and data: nothing to rank, so nothing is in bold."
    return "Best value among the students and baselines scored on the same prompts and data in **bold**."


# ----------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(models: list[dict], path: str) -> bool:
    cols = [c for c in COLUMNS if any(value(m, c[0], c[2]) is not None for m in models)]
    if not cols:
        return False
    plt = _plt()
    n = len(cols)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    names = [m["name"] for m in models]
    colours = [ROLE_COLOURS.get(m["role"], "#2ca02c") for m in models]
    for ax, (key, header, where, _, _) in zip(axes.flat, cols):
        vals = [value(m, key, where) for m in models]
        ax.bar(range(len(models)), [v if v is not None else 0 for v in vals], color=colours)
        if key == "ppl" and all(v is None or v > 0 for v in vals):
            ax.set_yscale("log")  # perplexities of untrained and trained models differ by orders of magnitude
        ax.set_title(header, fontsize=9)
        ax.set_xticks(range(len(models)), names, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("kdeval: metrics per model (grey = teacher, blue = student, orange = baseline)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_loss_curves(models: list[dict], path: str) -> bool:
    logged = [m for m in models if m.get("train_log")]
    if not logged:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in logged:
        steps = [h["step"] for h in m["train_log"]]
        ax.plot(steps, [h["loss"] for h in m["train_log"]], marker=".", label=f"{m['name']} (loss)")
        # text mode logs kd = 0 (it has no KD term): draw the KD line only where there is one
        if all("kd" in h for h in m["train_log"]) and any(h["kd"] for h in m["train_log"]):
            ax.plot(steps, [h["kd"] for h in m["train_log"]], linestyle="--", label=f"{m['name']} (KD term)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss (from the checkpoints' trainer logs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_quality_vs_size(models: list[dict], path: str) -> bool:
    key = "rougeL" if any(value(m, "rougeL", "metrics") is not None for m in models) else "bleu"
    pts = [(value(m, "params", "cost"), value(m, key, "metrics"), m) for m in models]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for x, y, m in pts:
        ax.scatter([x], [y], color=ROLE_COLOURS.get(m["role"], "#2ca02c"), s=40)
        ax.annotate(m["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (millions, log scale)")
    ax.set_ylabel("ROUGE-L" if key == "rougeL" else "BLEU")
    ax.set_title("quality vs size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# REPORT.md


def _fence(text: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text}\n{fence}"


def write_report(results: dict, out: str, samples: int = 3) -> list[str]:
    """REPORT.md and plots for `results` (one run's, or merged by `compare`); returns files written."""
    os.makedirs(out, exist_ok=True)
    models = results["models"]
    written = []
    plots = [
        ("metrics.png", plot_metrics, "Metrics per model"),
        ("loss_curves.png", plot_loss_curves, "Training loss curves"),
        ("quality_vs_size.png", plot_quality_vs_size, "Quality vs size"),
    ]
    lines = ["# kdeval report", ""]
    runs = results.get("runs") or [results]
    for r in runs:
        d = r.get("dataset")
        src = f"teacher dataset `{d['fingerprint']}` ({d['teacher']}, {d['rows']} rows, {d['tokens']} tokens, k={d['k']})" if d else "no teacher dataset"
        g = r.get("generation", {})
        e = r.get("eval_set", {})
        lines.append(
            f"- {r.get('path', out)}: {src}; {e.get('prompts')} prompts, references: {e.get('references')}; "
            f"generation: {g.get('backend')}, {'greedy' if g.get('greedy') else 'T=' + str(g.get('temperature'))}, "
            f"max {g.get('max_new_tokens')} new tokens, seed {g.get('seed')}"
        )
    if len({(r.get('dataset') or {}).get('fingerprint') for r in runs}) > 1 or len({r.get('eval_set', {}).get('prompts_hash') for r in runs}) > 1:
        lines.append("- **note:** the runs used different datasets or prompts: compare numbers only within a run")
    lines += [
        "",
        "## Results",
        "",
        *([verdict(models), ""] if verdict(models) else []),
        table(models),
        "",
        _bold_caption(models) + " KL is the sparse KL(teacher ‖ student) per token "
        "over the teacher's top-k plus a tail bucket; top-1 agree: student argmax = teacher argmax; ECE: calibration "
        "of the student's top-1 against the teacher's tokens (15 bins); PPL: student perplexity on the teacher's "
        "completions; NLL/byte: the student's NLL of the teacher's completions per byte of text (nats; comparable across tokenizers). "
        "ROUGE: mean F-measure (rouge_score); BLEU: sacrebleu corpus BLEU. Speed and memory are "
        "measured the same way for every model (see results.json `memory_kind`).",
        "",
    ]
    if any(value(m, "chunk_nll", "metrics") is not None or value(m, "chunk_kl", "metrics") is not None for m in models):
        lines += [
            "**x-tok** columns are for models whose tokenizer differs from the teacher's, where token-level measures are not defined: the "
            "teacher's completions are re-tokenised by the student and cut into chunks where both tokenizers end a token at the same "
            "byte. Chunk NLL: -log p_student(chunk), nats per chunk (the teacher's own is in results.json `teacher_chunk_nll`); chunk KL: "
            "KL(teacher ‖ student) over {chunk, anything else}; KL@chunk start: sparse KL at each chunk's first token over the teacher's "
            "top-k mapped to student ids by bytes plus one residual bucket; top-1@chunk start: student argmax = the student id of the "
            "teacher's top-1, where it maps. Chunks depend on the tokenizer pair: compare x-tok columns between models sharing a "
            "tokenizer, and NLL/byte between any.",
            "",
        ]
    notes = [f"- {m['name']}: {m['fidelity_note']}" for m in models if m.get("fidelity_note")]
    if notes:
        lines += ["Notes:", *notes, ""]
    trained = [m for m in models if m.get("trained_on")]
    if trained:
        lines += ["Trained on: " + "; ".join(f"{m['name']} ← {', '.join(m['trained_on'])}" for m in trained), ""]
    for name, fn, title in plots:
        if fn(models, os.path.join(out, name)):
            written.append(name)
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
    lines += _samples_md(results.get("samples", [])[:samples])
    path = os.path.join(out, "REPORT.md")
    write_bytes_atomic(None, path, "\n".join(lines) + "\n")
    return ["REPORT.md", *written]


def _samples_md(samples: list[dict]) -> list[str]:
    if not samples:
        return []
    lines = ["## Side-by-side samples", ""]
    for i, s in enumerate(samples, 1):
        lines += [f"### Sample {i}", "", "**Prompt**", "", _fence(s["prompt"]), "", "**Reference**", "", _fence(s["reference"]), ""]
        for name, text in s["outputs"].items():
            lines += [f"**{name}**", "", _fence(text or "(empty)"), ""]
    return lines


# ----------------------------------------------------------------------------------------------
# kdeval compare


def write_json(path: str, obj: dict) -> None:
    """Temp name then rename: readers never see half a results file."""
    write_bytes_atomic(None, path, json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def load_results(path: str) -> dict:
    p = Path(path)
    f = p / RESULTS if p.is_dir() else p
    if not f.is_file():
        hint = f" (it holds {', '.join(sorted(x.name for x in p.iterdir())[:5]) or 'nothing'})" if p.is_dir() else ""
        raise KdError(f"{path}: no results.json{hint}; give the --out directory of a `kdeval run`")
    try:
        r = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdError(f"{f}: not valid JSON ({e}); re-run `kdeval run`") from None
    if not isinstance(r, dict) or "models" not in r:
        raise KdError(f"{f}: not a kdeval results file (no 'models'); give the --out directory of a `kdeval run`")
    r["path"] = str(f.parent)
    return r


def merge(runs: list[dict]) -> dict:
    """One results object from several runs: models get unique names; identical models scored on
    the same eval set (e.g. the teacher in every run) are kept once; samples merge by prompt."""
    models, kept, names = [], {}, set()
    renames: list[dict[str, str]] = []  # per run: name in that run -> name in the merged report
    for i, r in enumerate(runs):
        fp = ((r.get("dataset") or {}).get("fingerprint"), r.get("eval_set", {}).get("prompts_hash"))
        renames.append({})
        for m in r["models"]:
            key = (m.get("weights_hash"), fp)
            if key not in kept:
                new = {**m, "run": i, "eval_key": "|".join(map(str, fp))}
                if new["name"] in names:
                    new["name"] = f"{m['name']}@{Path(r['path']).name or i}"
                names.add(new["name"])
                kept[key] = new["name"]
                models.append(new)
            renames[i][m["name"]] = kept[key]
    samples: dict[tuple, dict] = {}
    for i, r in enumerate(runs):
        for s in r.get("samples", []):
            cur = samples.setdefault((s["prompt"], s["reference"]), {"prompt": s["prompt"], "reference": s["reference"], "outputs": {}})
            for name, text in s["outputs"].items():
                cur["outputs"].setdefault(renames[i].get(name, name), text)
    return {
        "kdeval_version": kdeval.__version__,
        "created": now_iso(),
        "runs": [{k: r.get(k) for k in ("path", "created", "config", "dataset", "eval_set", "generation")} for r in runs],
        "models": models,
        "samples": list(samples.values()),
    }


def compare(cfg: CompareConfig) -> str:
    """Merge `kdeval run` outputs into one report; returns the output directory."""
    validate_compare(cfg)
    runs = [load_results(p) for p in cfg.runs]
    merged = merge(runs)
    os.makedirs(cfg.out, exist_ok=True)
    write_json(os.path.join(cfg.out, RESULTS), merged)
    write_report(merged, cfg.out, cfg.samples)
    return cfg.out
