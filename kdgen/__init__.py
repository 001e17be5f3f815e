"""kdgen: write teacher datasets (completions + top-k log-probs) for offline distillation.

    kdgen generate --prompts data/train.jsonl --out runs/teacher

The format, its reader and the inference backends live in `kdcore`; kdgen owns the runs that
write datasets (`generate`, `score`), the shard-claim `locks`, the `store` (copy, push, pull, row
reuse) and the `cli`. Importing kdgen never imports vLLM.
"""

__version__ = "0.1.0"
