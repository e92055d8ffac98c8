# The two commands the README promises. Both keep the environment in .venv/.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo lint test-gpu test-all

setup:
	@bash scripts/setup_env.sh

## make test: set up if needed, then the CPU suite (unit, distributed, functional).
test: setup
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

## make demo: set up if needed, then the main job on the embedded default corpus.
demo: setup
	$(PY) scripts/demo.py

## make test-gpu: the GPU tier (run on the device machine).
test-gpu: setup
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
