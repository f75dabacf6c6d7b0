# Everything a fresh machine needs: `make run` serves the default model, `make test` runs the suite.
# The Dockerfile repeats the install step (`pip install .` into a venv); tests/test_dockerfile.py keeps them in step.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
MODEL ?= digits
ARTIFACTS ?= artifacts/$(MODEL)
PORT ?= 8000

.PHONY: install run export test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(ARTIFACTS)/manifest.json: $(STAMP)
	$(BIN)/kiln export $(MODEL) --out $(ARTIFACTS) --force

export: $(ARTIFACTS)/manifest.json

run: $(ARTIFACTS)/manifest.json
	$(BIN)/kiln serve $(ARTIFACTS) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) artifacts build *.egg-info
