# make run  -> install, then run the embedded default task
# make test -> install, then the test suite
# make check-wheel -> build the wheel, install it (no -e) into a fresh venv, run metadyn outside the checkout
# install = .venv + metadyn (editable) with the dev, vision and peers extras, and learn2learn 0.2.0
# (scripts/install_peers.sh: its PyPI sdist needs re-cythonising on Python 3.11)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.metadyn-installed
EXTRAS ?= dev,vision,peers

.PHONY: install run test lint bench check-wheel clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install_peers.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	scripts/install_peers.sh $(PY)
	@touch $(STAMP)

run: install
	$(VENV)/bin/metadyn run digits_anytime

test: install
	$(VENV)/bin/pytest -q -n 2  # two workers: the quick task runs and notebooks dominate

lint: install
	$(VENV)/bin/ruff check metadyn tests

bench: install
	names=$$($(PY) -c 'from metadyn.registry import BENCHMARKS; print(*BENCHMARKS)') && \
	for b in $$names; do \
		$(VENV)/bin/metadyn bench $$b --json runs/bench_$$b.json --overwrite || exit 1; \
		$(VENV)/bin/metadyn bench $$b --under-load --json runs/bench_$${b}_load.json --overwrite || exit 1; \
	done

check-wheel: install
	scripts/check_wheel.sh $(PY)

clean:
	rm -rf runs .pytest_cache .ruff_cache
