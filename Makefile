# Two entry points a person needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

# llama-cpp-python compiles llama.cpp on install. Portable build (AVX2 baseline, not -march=native): a native build
# turns on AMX wherever the CPU advertises it, and in VMs that do not grant the tile state its first matmul segfaults
# (ldtilecfg); a native wheel also breaks on any other CPU. --no-cache-dir: pip's wheel cache is keyed by the sdist,
# not by CMAKE_ARGS, so a natively built wheel cached earlier would be reused.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF

# The report test renders report.html in headless Chromium: Debian's chromium + chromium-driver, installed once.
BROWSER_PACKAGES := chromium chromium-driver

$(STAMP): pyproject.toml constraints.txt Makefile
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq \
	    --no-install-recommends $(BROWSER_PACKAGES); }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet --no-cache-dir -c constraints.txt llama-cpp-python
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/turboquant demo --out demo-out

# pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30; rc=$$?; \
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
