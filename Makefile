# Two commands do all set-up: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.diffscale-installed

.PHONY: demo paper test lint format bench bench-gpu clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.2"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffscale submit sweeps/demo.yaml
	$(BIN)/diffscale fit demo --metric eval/nll_bpd --min-compute 4e11
	$(BIN)/diffscale isoflop demo --metric eval/nll_bpd
	$(BIN)/diffscale summary demo --metric eval/nll_bpd
	@echo "Samples: one grid per trial and eval point, under mlruns/<experiment>/<run>/artifacts/samples/ (listed above)"
	@echo "More:   $(BIN)/diffscale status demo; $(BIN)/diffscale table demo; $(BIN)/diffscale fit demo --metric fid (its own folder); $(BIN)/diffscale eval demo --cell c00"

paper: $(STAMP)
	$(BIN)/diffscale submit sweeps/paper_digits.yaml
	$(BIN)/diffscale paper paper-digits

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

bench-gpu: $(STAMP)  # on a machine with a GPU: benchmarks/results/gpu.json (under 6 minutes)
	bash benchmarks/gpu.sh

clean-venv:
	rm -rf $(VENV)
