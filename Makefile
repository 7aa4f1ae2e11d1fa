# `make demo` and `make test` build .venv from nothing when it is missing; both are quick when it exists.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3.11
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow test-gpu clean readme

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile plugins/lmms-eval-vlmkit/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade -q "pip>=24" -c constraints.txt $(PIP_QUIET)
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision $(PIP_QUIET)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[triton,video,eval,notebooks,dev,lmms]" -e plugins/lmms-eval-vlmkit $(PIP_QUIET)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: venv
	$(BIN)/vlmkit demo

test: venv
	$(BIN)/python -m pytest -q -n 2 --durations=15

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

test-gpu: venv
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV)

readme: venv
	$(BIN)/vlmkit methods --update-readme README.md
