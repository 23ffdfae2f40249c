# The commands a newcomer needs. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# Test processes: one per core, at most 4 (each test starts training processes of its own). The SLURM tests
# share one test cluster, so they run one after another on one of them (tests/conftest.py).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST_PARALLEL = -n $(TEST_WORKERS)

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

test: $(STAMP) lint slurm-deps ## set up, lint, then run every test tier that needs no GPU (what CI runs)
	$(PY) -m pytest $(PYTEST_PARALLEL) -m "not gpu and not extended" $(ARGS)

test-extended: $(STAMP) slurm-deps ## the extended tier: slower tests CI leaves out to stay within 30 minutes
	$(PY) -m pytest $(PYTEST_PARALLEL) -m extended $(ARGS)

# The slurm-marked tests bring up a real 2-node SLURM cluster on this machine (root, Debian's packages).
# Where the packages cannot be installed (not root, not Debian) those tests are skipped, and say why.
slurm-deps: ## install Debian's SLURM packages for the slurm tests (root only; no-op when present)
	@scripts/slurm-test-cluster install || echo "note: SLURM packages not installed: the slurm tests will be skipped"

test-unit: $(STAMP) ## only the fast unit tests
	$(PY) -m pytest -m unit $(ARGS)

bench: $(STAMP) ## measure overhead, DDP scaling, MFU, start-up, checkpoint and data wait; writes benchmarks/
	$(PY) scripts/bench.py $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: ## remove caches (keeps .venv and runs/)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

.PHONY: help setup quickstart train test test-extended test-unit slurm-deps bench lint format clean
