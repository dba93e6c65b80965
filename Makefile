# make run  -> install, then run the embedded default task
# make test -> install, then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.metadyn-installed
EXTRAS ?= dev,vision

.PHONY: install run test lint bench peers clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	@touch $(STAMP)

run: install
	$(VENV)/bin/metadyn run tasks/digits_anytime.yaml

test: install
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check metadyn tests benchmarks

bench: install
	$(VENV)/bin/metadyn bench inference --json runs/bench_inference.json

clean:
	rm -rf runs .pytest_cache .ruff_cache
