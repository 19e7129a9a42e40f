# Two commands do all set-up: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.diffscale-installed

.PHONY: demo test lint format bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.2"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffscale submit sweeps/demo.yaml
	$(BIN)/diffscale fit demo --metric eval/nll_bpd --min-compute 4e11
	@echo "Curves: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db  (experiment 'demo')"
	@echo "Plots:  outputs/analysis/demo/*.png (also on the sweep's MLflow parent run, under analysis/)"
	@echo "More:   $(BIN)/diffscale status demo; $(BIN)/diffscale table demo; $(BIN)/diffscale fit demo --metric fid"

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/bits_per_dim.py
	$(BIN)/python benchmarks/loader.py

clean-venv:
	rm -rf $(VENV)
