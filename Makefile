# Two commands users need: `make demo` and `make test`. Both create .venv (Python 3.11) if missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast lint format demo bench clean cluster-up cluster-down

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# ruff (pinned in the dev extras): lint and format check, line length 120 (pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	bash infra/demo.sh

# The local multi-node cluster (root; README "Running on a cluster"): CLUSTER_DIR defaults to /tmp/rna-cluster.
CLUSTER_DIR ?= /tmp/rna-cluster
cluster-up: $(STAMP)
	$(PY) -m pip install --quiet -e '.[cluster]'
	$(PY) infra/local_cluster.py up --dir $(CLUSTER_DIR)

cluster-down:
	$(PY) infra/local_cluster.py down --dir $(CLUSTER_DIR)

bench: $(STAMP)
	$(PY) bench/at_step.py

clean:
	rm -rf $(VENV) mlflow.db mlruns ray_results eval_results .pytest_cache
