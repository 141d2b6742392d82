# `make demo` and `make test` each create .venv (venv + pip install -e ".[test]") when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format gpu-check clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m visionlin.cli demo --out benchmarks/results/cpu

test: $(STAMP)
	$(BIN)/ruff check visionlin tests benchmarks scripts
	$(BIN)/ruff format --check visionlin tests benchmarks scripts
	$(BIN)/python -m pytest -n 2 --maxschedchunk 2 -q --durations=30 tests

lint: $(STAMP)
	$(BIN)/ruff check visionlin tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff format visionlin tests benchmarks scripts
	$(BIN)/ruff check --fix visionlin tests benchmarks scripts

clean:
	rm -rf $(VENV) build *.egg-info
