# Two entry points a person needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/turboquant demo --out demo-out

# pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python benchmarks/foundation.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache

# Reference-tool benchmark (llm-compressor, GPTQModel) in its own venv: llmcompressor caps transformers <= 5.17.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: bench-env bench-methods

$(BENCH_STAMP): benchmarks/constraints-bench.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -c benchmarks/constraints-bench.txt torch llmcompressor gptqmodel
	touch $(BENCH_STAMP)

bench-env: $(BENCH_STAMP)

bench-methods: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python benchmarks/methods_vs_reference.py
