# The README's quick start: `make up` (set up + run the stack), `make test` (set up + all tests).
.PHONY: setup up down test test-quick lint

setup:
	bash scripts/setup.sh

up: setup
	.venv/bin/labelloop up

down:
	.venv/bin/labelloop down

# Everything, slow end-to-end tests included (real tritonserver, Label Studio, training).
test: setup
	.venv/bin/python -m pytest -ra

# The development loop: pure and fast tests only.
test-quick:
	.venv/bin/python -m pytest -ra -m "not slow"

lint:
	.venv/bin/ruff check core labelloop serving ls_bridge trainer scripts tests
	.venv/bin/ruff format --check core labelloop serving ls_bridge trainer scripts tests
	.venv/bin/mypy
