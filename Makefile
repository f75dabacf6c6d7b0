# Everything a fresh machine needs: `make run` serves the default model, `make test` runs the suite.
# A development install has the extras: `export` (torch and the exporters), `test` (the tools), `tracing` (OpenTelemetry) and `ray` (Ray Serve,
# for the tests that run `kiln deploy ray`'s config on a real local cluster). The Dockerfile
# repeats the install step (a venv, then `pip install '.[export]'` to export, and the base install alone to serve);
# tests/test_dockerfile.py keeps them in step.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
MODEL ?= digits
ARTIFACTS ?= artifacts/$(MODEL)
PORT ?= 8000

.PHONY: install run export lint test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[export,test,ray,tracing]'
	touch $(STAMP)

install: $(STAMP)

$(ARTIFACTS)/manifest.json: $(STAMP)
	$(BIN)/kiln export $(MODEL) --out $(ARTIFACTS) --force

export: $(ARTIFACTS)/manifest.json

run: $(ARTIFACTS)/manifest.json
	$(BIN)/kiln serve $(ARTIFACTS) --port $(PORT)

# mypy reads packages, and kiln's rooms live in top-level folders mapped onto kiln.*: it checks a link tree
# laid out as the installed package is.
TYPED := kiln kiln.cli kiln.serve.protocol kiln.serve.kinds kiln.serve.v2_binary kiln.serve.repository kiln.serve.metrics kiln.models.base kiln.models.registry kiln.export.variants \
	kiln.export.recipe kiln.export.emitter kiln.export.precision kiln.bench.select kiln.deploy.common kiln.deploy.triton kiln.deploy.kserve kiln.deploy.ray
lint: $(STAMP)
	$(BIN)/ruff check .
	rm -rf build/typecheck && mkdir -p build/typecheck/kiln
	cp -rs $(CURDIR)/kiln/. build/typecheck/kiln/
	for room in core models export bench serve deploy; do ln -s $(CURDIR)/$$room build/typecheck/kiln/$$room; done
	cd build/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p kiln.core $(addprefix -m ,$(TYPED))

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

test: lint
	$(BIN)/python -m pytest -q -ra --durations=25

clean:
	rm -rf $(VENV) artifacts build *.egg-info
