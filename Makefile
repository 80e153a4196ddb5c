# Every target bootstraps what it needs and is idempotent.
# torch is pinned to the CPU build that lies on this machine's disk; an unpinned torch
# would pull a CUDA build of several GB.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.ffr_fast-installed

.PHONY: demo test bench sweep clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=64" wheel ninja
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"

# Reinstall (and recompile the C++ extension) whenever the build inputs change.
$(INSTALLED): $(BIN)/python setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]" "$(TORCH_PIN)"
	$(BIN)/python -c "import ffr_fast.ops as o; o.require_compiled_cpu_kernel()"
	touch $@

demo: $(INSTALLED)
	$(BIN)/python -m ffr_fast demo

test: $(INSTALLED)
	$(BIN)/python -m pytest -q tests

bench: $(INSTALLED)
	$(BIN)/python -m pytest -q --benchmark-only bench

sweep: $(INSTALLED)
	$(BIN)/python -m ffr_fast sweep

clean:
	rm -rf $(VENV) build *.egg-info ffr_fast/*.so
