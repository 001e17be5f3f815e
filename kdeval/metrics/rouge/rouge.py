"""ROUGE-1/2/L as a local `evaluate` module (offline: `evaluate.load("rouge")` fetches from the hub).

Wraps Google's `rouge_score` exactly as the hub's `rouge` metric does, with one difference: the
aggregate is the plain mean of per-example F-measures (the hub module bootstraps, which adds
sampling noise to a number users compare across runs).

    import evaluate; m = evaluate.load("kdeval/metrics/rouge")
    m.compute(predictions=["a cat"], references=["the cat"])  # {"rouge1": 0.5, ...}

Test: `pytest tests/test_kdeval_metrics.py` (against `rouge_score` directly).
"""

from __future__ import annotations

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE-N / ROUGE-L F-measure (Lin 2004) via rouge_score; mean over examples, in [0, 1]."
_KWARGS = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, one per prediction.
    rouge_types: which scores (default rouge1, rouge2, rougeL).
    use_stemmer: Porter-stem words before matching (default False).
    use_aggregator: mean over examples (default True); False gives per-example lists.
Returns: {rouge_type: F-measure}
"""
DEFAULT_TYPES = ("rouge1", "rouge2", "rougeL")


class Rouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False, use_aggregator=True):
        types = list(rouge_types or DEFAULT_TYPES)
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
        per = {t: [] for t in types}
        for pred, ref in zip(predictions, references):
            scores = scorer.score(ref, pred)  # rouge_score takes (target, prediction)
            for t in types:
                per[t].append(scores[t].fmeasure)
        if not use_aggregator:
            return per
        return {t: (sum(v) / len(v) if v else 0.0) for t, v in per.items()}
