# Two commands set up everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing (torch pinned to the CPU build 2.13.0).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hatlm-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hatlm demo $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
