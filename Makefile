# `make demo` and `make test` build .venv from nothing when it is missing; both are quick when it exists.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NLTK_DATA ?= $(abspath ../shared/nltk_data)

.PHONY: venv demo test test-slow clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade -q "pip>=24" -c constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[triton,video,eval,notebooks,dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: venv
	$(BIN)/vlmkit demo

test: venv
	$(BIN)/python -m pytest -q -n 2 --durations=15

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV)
