# dicom-node — `make demo` and `make test` install what is missing, then do their job.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: deps demo test lint bench clean

deps:
	@./deploy/install-deps.sh

demo: deps
	$(BIN)/dicom-node demo

test: deps lint
	$(BIN)/python -m pytest -q

lint: deps
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/mypy dicom_node pipelines models audit policies

bench: deps
	$(BIN)/python tests/bench/bench_ingest.py
	$(BIN)/python tests/bench/bench_audit.py
	$(BIN)/python tests/bench/bench_restoration_e2e.py

clean:
	rm -rf demo-home .pytest_cache .ruff_cache .mypy_cache
