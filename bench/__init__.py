"""kd benchmarks: each script measures ratios side by side in one run and writes
bench/results/<name>.json. See README.md (Benchmarks) for the figures and how to reproduce them."""
