"""`kdtrain map-report`: how well a teacher dataset maps onto a student's tokenizer, before training.

    kdtrain map-report --data ds/<fp> --student gemma3-270m [--out map_report.json]

Loads only the two tokenizers (the teacher's from --teacher or the dataset manifest), aligns the
completions exactly as cross-tokenizer training does (`kdtrain.crosstok`), and measures:

* round trip — rows whose student tokens spell the teacher's text byte for byte (else those rows
  train on cross-entropy only);
* shared-boundary coverage — teacher / student completion tokens that start a span (the
  positions that get the sparse KD term), tokens per span;
* teacher top-k mass at those positions — landing on a student id exactly, via prefix, or in the
  residual bucket (unmapped candidates + the tail outside the top-k); collisions (several
  candidates summed onto one student id);
* the same mass broken down by token class of the candidate (word, whitespace, digits,
  punctuation, code, non-ASCII, special).

Prints a table, writes JSON (atomic), and warns when the mapped share of the top-k mass is low.
Test: `pytest tests/test_kdtrain_crosstok_train.py -k map_report`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from kdcore.errors import KdError
from kdcore.io import write_bytes_atomic
from kdcore.vocab_map import EXACT, NONE, PREFIX, TokenBytes

CLASSES = ("word", "whitespace", "digits", "punctuation", "code", "non_ascii", "special")
_CODE = set(b"{}[]()<>=;_\\|&^%$#@~`*/+")
_SPACE = set(b" \t\n\r\x0b\x0c")


def token_class(piece: bytes, special: bool) -> int:
    """Index into CLASSES for one token's bytes (first matching class in this order:
    special, non-ASCII, whitespace only, digits, code symbols, punctuation only, word)."""
    if special or not piece:
        return CLASSES.index("special")
    if any(b >= 0x80 for b in piece):
        return CLASSES.index("non_ascii")
    if all(b in _SPACE for b in piece):
        return CLASSES.index("whitespace")
    if any(48 <= b <= 57 for b in piece):
        return CLASSES.index("digits")
    if any(b in _CODE for b in piece):
        return CLASSES.index("code")
    if not any(chr(b).isalnum() for b in piece):
        return CLASSES.index("punctuation")
    return CLASSES.index("word")


def vocab_classes(tb: TokenBytes, rows: int) -> np.ndarray:
    """[rows] class index of every teacher id (ids past the tokenizer: special)."""
    out = np.full(rows, CLASSES.index("special"), np.int8)
    for i in range(tb.size):
        out[i] = token_class(tb.token(i), bool(tb.special[i]))
    return out


def measure(data, ctx, limit: int | None = None) -> dict:
    """The report's numbers over the first `limit` rows (all by default)."""
    from kdcore.crosstok import iter_aligned

    vm = ctx.vmap
    n_ids = len(vm.student_id)
    classes = vocab_classes(ctx.teacher, n_ids)
    rows = rt = text_match = cut_rows = 0
    t_pos = s_pos = t_first = s_first = spans = one_to_one = 0
    mass = np.zeros(4)  # exact, prefix, unmapped (in top-k), tail
    by_class = np.zeros((len(CLASSES), 3))  # mass exact / prefix / unmapped per candidate class
    kd_positions = collide_pos = merged_away = 0
    for b, aligned in iter_aligned(data, ctx, limit):
        for i, row in enumerate(aligned):
            rows += 1
            rt += row.round_trip
            cut_rows += row.cut_bytes > 0
            if b.completions and b.completions[i] == row.text:
                text_match += 1
            a0, a1 = b.offsets[i], b.offsets[i + 1]
            t_pos += a1 - a0
            s_pos += len(row.student_ids)
            if not row.n_spans:
                continue
            spans += row.n_spans
            t_sizes = np.bincount(row.t_span[row.t_span >= 0], minlength=row.n_spans)
            s_sizes = np.bincount(row.s_span[row.s_span >= 0], minlength=row.n_spans)
            one_to_one += int(((t_sizes == 1) & (s_sizes == 1)).sum())
            t_first += row.n_spans
            s_first += row.n_spans
            ids = b.topk_ids[a0:a1][row.t_first]  # [C, k]
            p = np.exp(b.topk_logprobs[a0:a1][row.t_first].astype(np.float64))
            safe = np.minimum(ids, n_ids - 1)
            kind = np.where(ids < n_ids, vm.kind[safe], NONE)
            sid = np.where(ids < n_ids, vm.student_id[safe], -1)
            for k_, col in ((EXACT, 0), (PREFIX, 1), (NONE, 2)):
                mass[col] += (p * (kind == k_)).sum()
                cls = np.where(ids < n_ids, classes[safe], CLASSES.index("special"))
                np.add.at(by_class[:, col], cls[kind == k_], p[kind == k_])
            mass[3] += np.clip(1.0 - p.sum(-1), 0.0, 1.0).sum()
            kd_positions += len(ids)
            valid = sid >= 0
            distinct = np.array([len(set(r[v].tolist())) for r, v in zip(sid, valid)])
            extra = valid.sum(-1) - distinct
            collide_pos += int((extra > 0).sum())
            merged_away += int(extra.sum())
    if rows == 0:
        raise KdError("map-report: the dataset holds no rows")
    n = max(kd_positions, 1)
    topk = mass[:3].sum()
    mapped_share = float((mass[0] + mass[1]) / topk) if topk > 0 else 0.0
    class_total = by_class.sum()
    return {
        "rows": rows,
        "round_trip_rate": rt / rows,
        "teacher_text_match_rate": text_match / rows,
        "rows_cut_invalid_utf8": cut_rows,
        "coverage": {
            "teacher_tokens": int(t_pos),
            "student_tokens": int(s_pos),
            "spans": int(spans),
            "teacher_shared_boundary": t_first / max(t_pos, 1),
            "student_shared_boundary": s_first / max(s_pos, 1),
            "one_to_one_spans": one_to_one / max(spans, 1),
            "teacher_tokens_per_span": t_pos / max(spans, 1),
            "student_tokens_per_span": s_pos / max(spans, 1),
        },
        "mass": {  # mean per KD position, of the teacher's whole distribution
            "exact": mass[0] / n,
            "prefix": mass[1] / n,
            "unmapped": mass[2] / n,
            "tail": mass[3] / n,
            "residual": (mass[2] + mass[3]) / n,
            "mapped_share_of_topk": mapped_share,
        },
        "collisions": {
            "positions_with_collision": collide_pos / n,
            "candidates_merged_per_position": merged_away / n,
        },
        "by_class": {
            c: {
                "share_of_topk_mass": float(by_class[j].sum() / class_total) if class_total else 0.0,
                "exact": float(by_class[j, 0] / by_class[j].sum()) if by_class[j].sum() else 0.0,
                "prefix": float(by_class[j, 1] / by_class[j].sum()) if by_class[j].sum() else 0.0,
                "unmapped": float(by_class[j, 2] / by_class[j].sum()) if by_class[j].sum() else 0.0,
            }
            for j, c in enumerate(CLASSES)
        },
        "vocab": vm.summary(ctx.teacher),
    }


def run_report(data_url: str, student: str, teacher: str | None, out: str, limit: int | None, vocab_match: str, warn_below: float) -> dict:
    """Load both tokenizers, measure, print the table, write the JSON; returns the report."""
    from rich.console import Console

    from kdcore.models import resolve
    from kdcore.crosstok import CrossTok, load_teacher_tokenizer
    from kdcore.teacher_data import open_teacher_data
    from kdcore.models import load_tokenizer
    from kdtrain.student import teacher_spec
    from kdtrain.config import TrainConfig

    data = open_teacher_data([data_url])
    spec = teacher_spec(TrainConfig(teacher=teacher), data.manifest)
    teacher_tok = load_teacher_tokenizer(spec, data.manifest)
    student_tok = load_tokenizer(resolve(student).path)
    ctx = CrossTok.build(teacher_tok, student_tok, vocab_match, data.manifest["tokenizer"].get("embedding_rows"))
    t0 = time.perf_counter()
    report = {
        "dataset": data.describe()[0],
        "teacher_tokenizer": {"spec": spec, "class": type(teacher_tok).__name__, "size": len(teacher_tok), "scheme": ctx.teacher.scheme},
        "student_tokenizer": {"spec": student, "class": type(student_tok).__name__, "size": len(student_tok), "scheme": ctx.student.scheme},
        "vocab_match": vocab_match,
        **measure(data, ctx, limit),
    }
    report["seconds"] = round(time.perf_counter() - t0, 2)
    warnings = []
    if report["mass"]["mapped_share_of_topk"] < warn_below:
        warnings.append(
            f"only {report['mass']['mapped_share_of_topk']:.0%} of the teacher's top-k mass maps onto student ids "
            f"(threshold {warn_below:.0%}); the residual bucket will carry most of the KD signal — consider --vocab-match prefix, "
            f"a student with a closer tokenizer, or --mode text"
        )
    if report["round_trip_rate"] < 0.99:
        warnings.append(f"only {report['round_trip_rate']:.1%} of rows round-trip through the student tokenizer; the rest train on cross-entropy only")
    report["warnings"] = warnings
    console = Console(highlight=False)  # the report goes to stdout
    _print(report, console)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(None, path, json.dumps(report, indent=2, default=float))
    console.print(f"wrote {path}")
    return report


def _print(r: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"{r['teacher_tokenizer']['spec']} -> {r['student_tokenizer']['spec']} ({r['rows']} rows, vocab_match={r['vocab_match']})")
    t.add_column("measure")
    t.add_column("value", justify="right")
    c, m = r["coverage"], r["mass"]
    rows = [
        ("byte round trip (rows)", f"{r['round_trip_rate']:.1%}"),
        ("teacher positions at a shared boundary", f"{c['teacher_shared_boundary']:.1%}"),
        ("student positions at a shared boundary", f"{c['student_shared_boundary']:.1%}"),
        ("1:1 spans", f"{c['one_to_one_spans']:.1%}"),
        ("tokens per span (teacher / student)", f"{c['teacher_tokens_per_span']:.2f} / {c['student_tokens_per_span']:.2f}"),
        ("teacher mass mapped exactly", f"{m['exact']:.3f}"),
        ("teacher mass mapped via prefix", f"{m['prefix']:.3f}"),
        ("residual: unmapped top-k + tail", f"{m['unmapped']:.3f} + {m['tail']:.3f}"),
        ("mapped share of the top-k mass", f"{m['mapped_share_of_topk']:.1%}"),
        ("positions with collisions", f"{r['collisions']['positions_with_collision']:.1%}"),
        ("vocab: exact / prefix / none", f"{r['vocab']['exact']:,} / {r['vocab']['prefix']:,} / {r['vocab']['none']:,}"),
    ]
    for a, b in rows:
        t.add_row(a, b)
    console.print(t)
    cls = Table(title="teacher top-k mass by token class")
    for col in ("class", "share", "exact", "prefix", "unmapped"):
        cls.add_column(col, justify="left" if col == "class" else "right")
    for name, v in r["by_class"].items():
        if v["share_of_topk_mass"] > 0:
            cls.add_row(name, f"{v['share_of_topk_mass']:.1%}", f"{v['exact']:.1%}", f"{v['prefix']:.1%}", f"{v['unmapped']:.1%}")
    console.print(cls)
    for w in r["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
