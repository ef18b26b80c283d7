# Two commands: `make demo` and `make test`. Each sets up what is missing first (idempotent, quick the
# second time).
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: setup setup-test demo test test-quick lint format bench clean

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

demo: setup
	$(BIN)/hpcdiff demo --out $(DEMO_OUT)

lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tests for local work: no Slurm cluster, no test marked slow or mpi (the full suite is `make test`).
test-quick: lint
	$(BIN)/python -m pytest -m "not slow and not slurm and not mpi" $(PYTEST_ARGS)

format: setup-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
