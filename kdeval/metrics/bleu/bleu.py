"""Corpus BLEU as a local `evaluate` module, wrapping `sacrebleu` (offline: the hub's `sacrebleu`
metric is fetched at load time).

Same computation as the hub's `sacrebleu` module: `sacrebleu.corpus_bleu` with its default
13a tokenizer and exponential smoothing, score on the 0-100 scale.

    import evaluate; m = evaluate.load("kdeval/metrics/bleu")
    m.compute(predictions=["the cat sat"], references=[["the cat sat down"]])  # {"score": ..., ...}

Test: `pytest tests/test_kdeval_metrics.py` (against `sacrebleu` directly).
"""

from __future__ import annotations

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus BLEU (Papineni et al. 2002) via sacrebleu (Post 2018); 0-100."
_KWARGS = """
Args:
    predictions: list of generated texts.
    references: list of lists of references (every prediction needs the same number).
    tokenize: sacrebleu tokenizer (default "13a").
    lowercase: compare lowercased text (default False).
Returns: {"score", "counts", "totals", "precisions", "bp", "sys_len", "ref_len"}
"""


class Bleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, M. (2018). A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=["https://github.com/mjpost/sacreBLEU"],
        )

    def _compute(self, predictions, references, tokenize="13a", lowercase=False):
        n_refs = {len(r) for r in references}
        if len(n_refs) > 1:
            raise ValueError("every prediction needs the same number of references")
        # sacrebleu wants one stream per reference position: [n_refs][n_predictions]
        streams = [[refs[i] for refs in references] for i in range(n_refs.pop() if n_refs else 0)]
        out = sacrebleu.corpus_bleu(predictions, streams, tokenize=tokenize, lowercase=lowercase)
        return {
            "score": out.score,
            "counts": out.counts,
            "totals": out.totals,
            "precisions": out.precisions,
            "bp": out.bp,
            "sys_len": out.sys_len,
            "ref_len": out.ref_len,
        }
