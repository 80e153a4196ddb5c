# Every target bootstraps what it needs and is idempotent.
# torch is pinned to the CPU build that lies on this machine's disk; an unpinned torch
# would pull a CUDA build of several GB. torchvision 0.28.0 is the release made for it.
PYTHON ?= python3
PINS ?= torch==2.13.0 torchvision==0.28.0
VENV := .venv
BIN := $(VENV)/bin
BUILD_INPUTS := setup.py $(wildcard csrc/*.cpp csrc/*.h)
STUDY_INSTALLED := $(VENV)/.ffr_fast-study
TEST_INSTALLED := $(VENV)/.ffr_fast-test
BENCH_INSTALLED := $(VENV)/.ffr_fast-bench
LM_INSTALLED := $(VENV)/.ffr_fast-lm

# -P: the repository root stays off sys.path, so its top-level kernels/ (installed as
# ffr_fast.kernels) never shadows Hugging Face's `kernels` package, which transformers
# imports where it is installed (a fresh environment gets it with transformers 5.25); the
# README's install section says why kernels/ stays a regular package.
RUN := $(BIN)/python -P

.PHONY: demo demo-vit demo-lm test bench sweep sweep-vit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=64" wheel ninja
	$(BIN)/python -m pip install -q $(PINS)

# Reinstall (and recompile the C++ extension) whenever the build inputs change.
# The study extra (training loop, demo, plots, CLI) for `make demo`; the test extra adds
# Triton (its interpreter runs the GPU kernels on CPU), pytest, ruff, and transformers and
# timm (real models the tests build from configs, nothing downloaded).
$(STUDY_INSTALLED): $(BIN)/python $(BUILD_INPUTS)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[study]" $(PINS)
	$(BIN)/python -c "import ffr_fast.flow.ops as o; o.require_compiled_cpu_kernel()"
	touch $@

$(TEST_INSTALLED): $(STUDY_INSTALLED)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]" $(PINS)
	touch $@

# The ResNet-20 story over three seeds: 2.7 min measured from a fresh clone on 2 cores
# (bootstrap aside). The ViT story is a second target: 3.4 min.
demo: $(STUDY_INSTALLED)
	$(RUN) -m ffr_fast demo

demo-vit: $(STUDY_INSTALLED)
	$(RUN) -m ffr_fast demo --model vit_tiny

# The language-model story needs transformers (the lm extra); one seed by default, the
# README gives the three-seed command.
$(LM_INSTALLED): $(STUDY_INSTALLED)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[lm]" $(PINS)
	touch $@

demo-lm: $(LM_INSTALLED)
	$(RUN) -m ffr_fast demo-lm

# The linter (settings in pyproject.toml) first: a lint error fails the run before the tests.
test: $(TEST_INSTALLED)
	$(BIN)/ruff check .
	$(RUN) -m pytest -q tests

# The bench extra adds the reference pruning tool (Torch-Pruning) for bench/vs_torch_pruning.py.
$(BENCH_INSTALLED): $(TEST_INSTALLED)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,bench]" $(PINS)
	touch $@

bench: $(BENCH_INSTALLED)
	$(RUN) -m pytest -q --benchmark-only bench

sweep: $(STUDY_INSTALLED)
	$(RUN) -m ffr_fast sweep

sweep-vit: $(STUDY_INSTALLED)
	$(RUN) -m ffr_fast sweep --model vit_tiny

clean:
	rm -rf $(VENV) build *.egg-info ffr_fast/*.so
