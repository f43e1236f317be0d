# dicom-node — `make demo` and `make test` install what is missing, then do their job.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: deps install-node lock demo test test-postgres lint bench clean

# Everything, for development and CI: the node, ai, lab, test and dev extras in .venv.
deps:
	@./deploy/install-deps.sh

# A server: the node and its AI pipelines in /opt/dicom-node/.venv, no test or lab tools
# (PREFIX=... to install elsewhere, EXTRAS= for the receiver alone).
install-node:
	@./deploy/install-node.sh

# Re-resolve deploy/constraints.txt after changing dependencies in pyproject.toml
# (UPGRADE=1 to move every pin to the newest release its range allows).
lock:
	@./deploy/lock.sh

demo: deps
	$(BIN)/dicom-node demo $(if $(PIPELINE),--pipeline $(PIPELINE))

# Two test processes by default (most integration tests wait on peers and subprocesses; the
# files are dealt out whole, so a module's fixtures and its peers stay in one process);
# PYTEST_WORKERS=0 runs them in this one process.
PYTEST_WORKERS ?= 2

test: deps lint
	$(BIN)/python -m pytest -q --durations=25 -n $(PYTEST_WORKERS) --dist loadfile

# The whole suite again with every node's index and audit log on PostgreSQL (a throwaway
# server in a temporary directory; Debian's postgresql package). Not part of `make test`:
# it takes as long again.
test-postgres: deps
	$(BIN)/python -m pytest -q --durations=25 --database=postgresql

lint: deps
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/mypy dicom_node pipelines models audit policies

bench: deps
	$(BIN)/python tests/bench/bench_ingest.py
	$(BIN)/python tests/bench/bench_ingest_busy.py
	$(BIN)/python tests/bench/bench_audit.py
	$(BIN)/python tests/bench/bench_restoration_speed.py
	$(BIN)/python tests/bench/bench_restoration_e2e.py
	$(BIN)/python tests/bench/bench_delivery.py
	$(BIN)/python tests/bench/bench_restoration_evaluation.py
	$(BIN)/python tests/bench/bench_scaleout.py

clean:
	rm -rf demo-home .pytest_cache .ruff_cache .mypy_cache
