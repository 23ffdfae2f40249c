# The commands a newcomer needs. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml scripts/setup.sh
	scripts/setup.sh
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install the project (CPU torch where there is no GPU)

quickstart: $(STAMP) ## set up, then train the default experiment (small GPT, ~1 min on 2 CPU cores)
	$(VENV)/bin/trainer train $(ARGS)

train: $(STAMP) ## train with Hydra overrides: make train ARGS="experiment=digits_mlp"
	$(VENV)/bin/trainer train $(ARGS)

test: $(STAMP) lint ## set up, lint, then run every test tier that needs no GPU (what CI runs)
	$(PY) -m pytest -m "not gpu" $(ARGS)

test-unit: $(STAMP) ## only the fast unit tests
	$(PY) -m pytest -m unit $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: ## remove caches (keeps .venv and runs/)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

.PHONY: help setup quickstart train test test-unit lint format clean
