# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: demo test lint docs bench-kernels clean

# torch is installed first and pinned, so that no other requirement pulls a different (CUDA) build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/longattn bench --quick --out results/bench_quick.jsonl

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check longattn tests benchmarks
	$(BIN)/ruff format --check longattn tests benchmarks

docs: $(STAMP)
	$(BIN)/longattn docs --out docs/methods.md

clean:
	rm -rf $(VENV) results .pytest_cache
