# The README's two commands live here: `make run` (the main job) and `make test` (every check).
# Both create .venv on first use and install Kensho with its extras under constraints.txt,
# which pins the CPU build of PyTorch so set-up never pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kensho-installed
LLAMA  := $(VENV)/.kensho-llama-installed
# `make run ENGINE=llama` serves the demo's GGUF on llama.cpp (compiled on first use).
ENGINE ?=

.PHONY: help run test lint typecheck pytest chromium bench clean

help:
	@echo "make run        serve the embedded demo model: kensho up (set-up included)"
	@echo "make test       ruff, ruff format --check, mypy --strict, pytest with coverage"
	@echo "make bench      run every benchmark in bench/ and print the tables"
	@echo "make clean      remove .venv and caches"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench,ml,otel,s3]'
	@touch $@

# llama-cpp-python has no wheel on PyPI: pip compiles llama.cpp (4-7 min on 2 cores) the
# first time, then reuses its cached wheel. Only `make test` and ENGINE=llama need it.
$(LLAMA): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install --quiet \
		-c constraints.txt -e '.[llama]'
	@touch $@

run: $(STAMP) $(if $(filter llama,$(ENGINE)),$(LLAMA))
	$(BIN)/kensho up $(if $(ENGINE),--engine $(ENGINE))

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck: $(STAMP)
	$(BIN)/mypy --strict src

# The dashboard test drives a real headless Chromium (Debian's package): install it
# when missing and we may (root); elsewhere that test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && apt-get install -y -qq chromium; } || \
		echo "chromium not installed: tests/test_dashboard.py will skip its browser tests"

# Two workers (pytest-xdist; coverage is combined across them, subprocesses included):
# most of the suite waits on `kensho` subprocesses, so two cores run it in less time.
pytest: $(LLAMA) chromium
	$(BIN)/python -m pytest -n 2 --dist worksteal --cov --cov-report=term

test: lint typecheck pytest

bench: $(LLAMA)
	@for b in bench/*_bench.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .coverage htmlcov
