"""kdgen: write teacher datasets (completions + top-k log-probs) for offline distillation.

`kdgen.format` owns the dataset format; `kdgen.models` resolves model specs for all three CLIs.
Importing kdgen never imports vLLM (only `kdgen.backends.vllm_backend` does).
"""

__version__ = "0.1.0"
