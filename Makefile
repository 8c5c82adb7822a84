# Two entry points do all set-up on a fresh machine (see README):
#   make demo   - create .venv on first use, train on the built-in synthetic data, evaluate
#   make test   - create .venv on first use, run the CPU test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint test-gpu clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU torch wheel first: a bare "torch" would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements/cpu.txt
	# --no-deps: torchrec's metadata asks for the CUDA fbgemm-gpu by name.
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m ksa_rec.env_check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python pipelines/demo.py

# The full tier (what CI runs): lint, then every CPU test.
test: lint
	$(BIN)/python -m pytest -q -x --durations=15

# The edit-run loop: everything but the tests that start processes or run long (marked slow).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) .cache runs lightning_logs demo-out
