"""Quality against references: ROUGE-1/2/L and BLEU through `evaluate`, with the metric modules
shipped in `kdeval/metrics/` (the hub copies cannot be fetched offline), plus reading a reference
file.

    scores = quality_scores(predictions, references, ["rouge", "bleu"])
    # {"rouge1": 0.41, "rouge2": 0.18, "rougeL": 0.37, "bleu": 12.3}   ROUGE in [0, 1], BLEU 0-100

Test: `pytest tests/test_kdeval_metrics.py` (against `rouge_score` and `sacrebleu` directly).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from kdcore.errors import KdError

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
REFERENCE_COLUMNS = ("reference", "completion", "output", "answer", "target", "text")


@functools.lru_cache(maxsize=None)
def load_metric(name: str):
    """`evaluate.load` of a module in kdeval/metrics/ (rouge, bleu), by local path: works offline."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def quality_scores(predictions: list[str], references: list[str], metrics: list[str] | tuple[str, ...]) -> dict:
    """Corpus-level ROUGE-1/2/L (mean F-measure, [0, 1]) and BLEU (sacrebleu, 0-100)."""
    out: dict = {}
    if not predictions:
        return out
    if "rouge" in metrics:
        out.update(load_metric("rouge").compute(predictions=predictions, references=references))
    if "bleu" in metrics:
        out["bleu"] = load_metric("bleu").compute(predictions=predictions, references=[[r] for r in references])["score"]
    return out


def load_references(path: str, column: str | None = None) -> list[str]:
    """References, one per prompt: .txt (one per line), .jsonl/.json, .csv/.tsv or .parquet."""
    p = Path(path)
    flag = f"--references {path}"
    if not p.is_file():
        raise KdError(f"{flag}: no such file")
    if p.suffix.lower() == ".txt":
        lines = p.read_text(encoding="utf-8").splitlines()
        if column:
            raise KdError(f"--reference-column does not apply to a .txt file ({flag} holds one reference per line)")
        refs = [line.replace("\\n", "\n") for line in lines if line.strip()]
    else:
        from kdcore.prompts import read_records

        try:
            records = read_records(p, "train")
        except KdError as e:
            raise KdError(str(e).replace("--prompts", "--references")) from None
        if not records:
            refs = []
        else:
            keys = list(records[0])
            col = column or next((c for c in REFERENCE_COLUMNS if c in keys), None)
            if col is None or col not in keys:
                wanted = f"column {column!r}" if column else f"a column named {', '.join(REFERENCE_COLUMNS)}"
                raise KdError(f"{flag}: no {wanted}; the file has {', '.join(keys)} (name it with --reference-column)")
            refs = []
            for n, rec in enumerate(records, 1):
                v = rec.get(col)
                if isinstance(v, list) and v and isinstance(v[-1], dict):  # chat messages: the last turn
                    v = v[-1].get("content")
                if not isinstance(v, str):
                    raise KdError(f"{flag}: row {n}: column {col!r} must be text, got {json.dumps(v)[:40]}")
                refs.append(v)
    if not refs:
        raise KdError(f"{flag}: the file holds no references")
    return refs
