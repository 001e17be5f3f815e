"""kdeval: score distilled checkpoints against their teacher and against references, and compare them.

    kdeval run --model runs/s1 --model runs/s2 --data <held-out teacher dataset> --out evals/cmp
    kdeval compare evals/a evals/b --out report/
    kdeval lm-eval --model runs/s1 --tasks data/lm_eval/kd_tiny_task.yaml

Modules: `config` (typed options, the CLI help), `fidelity` (sparse KL with the tail bucket, top-1
agreement, ECE, perplexity, NLL per byte), `crosstok` (chunk-level fidelity for a student with
another tokenizer than the teacher's), `quality` (ROUGE/BLEU through local `evaluate` modules in `metrics/`),
`models` (loading, tokenizer matching, cost), `generate` (greedy generation, speed and memory;
vLLM in a worker process),
`run` (the `kdeval run` stage), `report` (`kdeval compare`: REPORT.md and plots), `harness`
(`kdeval lm-eval`). kdeval reads teacher datasets only through `kdcore.dataset.TeacherDataset`.
"""

__version__ = "0.1.0"
