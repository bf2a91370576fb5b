# Two commands set up everything from a fresh clone (Linux, Python >= 3.11):
#   make run    - create .venv, install with the GUI, open napari with the VoCo widgets docked,
#                 the phantom sample loaded and the main job (tiny pretraining on the embedded
#                 phantoms) running; `make demo` is the same job headless (voco demo)
#   make test   - create .venv, install system + Python test deps, lint, run all tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Pins the test/dev environment (torch==2.13.0); the package itself keeps ranges.
CONSTRAINTS := constraints.txt
DEMO_DATA ?= data/phantoms
# Parallel test processes (pytest-xdist), one torch thread each; CI has 2 cores.
TEST_WORKERS ?= 2

.PHONY: run demo test install install-gui install-test lint clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "napari-voco needs Python >= 3.11; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e .

install-test: $(BIN)/python
	bash scripts/system-deps.sh
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[gui,testing]"

install-gui: $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[gui]"

run: install-gui
	$(BIN)/napari-voco --data $(DEMO_DATA) --out runs/gui-$$(date +%Y%m%d-%H%M%S)

demo: install
	$(BIN)/voco demo --data $(DEMO_DATA) --out runs/demo-$$(date +%Y%m%d-%H%M%S)
	$(BIN)/voco info $(DEMO_DATA)/imagesTr/phantom_000.nii.gz

lint: install-test
	$(BIN)/ruff check src tests benchmarks scripts

test: install-test
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not serial" --durations=25
	$(BIN)/python -m pytest -m serial

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
