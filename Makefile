# Two entry points do all set-up on a fresh machine (see README):
#   make demo   - create .venv on first use, train on the built-in synthetic data, evaluate
#   make test   - create .venv on first use, run the CPU test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
# PyTorch's index of CPU-only wheels (about 190 MB for torch, against several GB for PyPI's CUDA build on
# Linux). Where it cannot be reached (an offline mirror, an air-gapped CI box), torch comes from pip's
# configured index instead; `make venv TORCH_INDEX=` always does that.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv torch-cpu redis-server demo test test-fast lint test-gpu clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(MAKE) --no-print-directory torch-cpu
	$(BIN)/pip install -q -r requirements/cpu.txt
	# --no-deps: torchrec's metadata asks for the CUDA fbgemm-gpu by name.
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m ksa_rec.env_check
	touch $(STAMP)

# The CPU torch wheel first, so that nothing installed later pulls the CUDA build in as a dependency.
torch-cpu:
	@if [ -n "$(TORCH_INDEX)" ] && $(BIN)/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" "$(TORCH_INDEX)/torch/" 2>/dev/null; then \
		echo "torch==$(TORCH_VERSION), CPU build, from $(TORCH_INDEX)"; \
		$(BIN)/pip install -q --index-url "$(TORCH_INDEX)" torch==$(TORCH_VERSION); \
	else \
		echo "TORCH_INDEX ($(TORCH_INDEX)) cannot be reached: torch==$(TORCH_VERSION) from pip's configured index"; \
		$(BIN)/pip install -q torch==$(TORCH_VERSION); \
	fi

demo: $(STAMP)
	$(BIN)/python pipelines/demo.py

# The full tier (what CI runs): lint, then every CPU test (the serving tests start a real redis-server).
test: lint redis-server
	$(BIN)/python -m pytest -q -x --durations=15

# Debian's redis-server, installed where it is missing and apt-get can run (root, as on CI); else one line.
redis-server:
	@command -v redis-server >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
		else \
			echo "make: redis-server is needed by the serving tests: install it (Debian: apt-get install redis-server)"; \
			exit 1; \
		fi; }

# The edit-run loop: everything but the tests that start processes or run long (marked slow).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) .cache runs lightning_logs demo-out
