"""One sentence that says what a comparison shows, computed from the report's numbers.

`verdict(models)` takes the models of a results.json (`kdeval run` / `kdeval compare`), picks the
largest group of students and baselines scored on the same prompts and data, ranks them by the
sparse KL to the teacher (else by ROUGE-L) and says who leads on KL, top-1 agreement and ROUGE-L,
with the numbers. Nothing is hard-coded: swap the winner's numbers and the sentence swaps too.
REPORT.md puts it under the results table (`kdeval.report.write_report`).

Test: ``pytest tests/test_kdeval_metrics.py -k verdict``.
"""

from __future__ import annotations

import math

# (key, what a reader calls it, higher is better, format)
MEASURES = [
    ("kl", "KL to the teacher", False, "{:.3f}"),
    ("top1", "top-1 agreement", True, "{:.3f}"),
    ("rougeL", "ROUGE-L", True, "{:.3f}"),
]


def _metric(model: dict, key: str) -> float | None:
    v = (model.get("metrics") or {}).get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def verdict(models: list[dict]) -> str | None:
    """The sentence, or None when fewer than two students/baselines share an eval set."""
    groups: dict = {}
    for m in models:
        if m.get("role") != "teacher":
            groups.setdefault(m.get("eval_key"), []).append(m)
    group = max(groups.values(), key=len, default=[])
    measures = [x for x in MEASURES if all(_metric(m, x[0]) is not None for m in group)]
    if len(group) < 2 or not measures:
        return None
    key, label, higher, fmt = measures[0]
    ranked = sorted(group, key=lambda m: _metric(m, key), reverse=higher)
    first = ranked[0]
    others = ", ".join(f"{m['name']} {fmt.format(_metric(m, key))}" for m in ranked[1:])
    text = f"Of {len(group)} models scored on the same held-out teacher data, **{first['name']}** is closest to the teacher by {label} ({fmt.format(_metric(first, key))} vs {others})"
    leads, trails = [], []
    for k, lab, hi, f in measures[1:]:
        best = (max if hi else min)(group, key=lambda m: _metric(m, k))
        runner = max((m for m in group if m is not best), key=lambda m: _metric(m, k) * (1 if hi else -1))
        pair = f"{f.format(_metric(best, k))} vs {f.format(_metric(runner, k))}"
        if f.format(_metric(best, k)) == f.format(_metric(runner, k)):
            trails.append(f"{lab} is a tie ({pair})")
        elif best is first:
            leads.append(f"{lab} ({pair})")
        else:
            trails.append(f"{best['name']} leads on {lab} ({pair})")
    if leads:
        text += " and also leads on " + " and ".join(leads)
    if trails:
        text += ", while " + "; ".join(trails)
    return text + " — one run each, so read small gaps as noise."
