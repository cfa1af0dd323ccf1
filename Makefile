# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || \
	    $(BIN)/python -m pip install --quiet torch torchvision
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fra run pipelines/demo.yaml

# Two pytest workers: one runs every module that starts Ray, the other the rest beside it
# (tests/conftest.py, "Two processes on two cores").
XDIST  := -n 2

# Everything, the cluster-shaped end-to-end tests included (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15 $(XDIST) tests

# The fast set for development: no test marked slow or cluster (see pyproject.toml's markers).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow and not cluster" $(XDIST) tests

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
