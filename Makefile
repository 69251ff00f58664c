# Two entry points for a fresh machine with only Python >= 3.11, git and make:
#   make demo   -- build .venv from constraints.txt, then run the main job on the embedded default model
#   make test   -- build .venv from constraints.txt, then run the test suite (what .ci/run calls)
# Both are idempotent: the venv is rebuilt only when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH_VENV := .venv-torch
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast golden bench bench-train bench-eval bench-judge bench-safedelta bench-sqsd bench-theory bench-aot bench-memory device-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "safetrade needs Python >= 3.11, found " + sys.version'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/safetrade demo

test: setup
	@start=$$(date +%s); \
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS); rc=$$?; \
	echo "suite time: $$(( $$(date +%s) - start )) s"; exit $$rc

test-fast: setup
	$(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

# Golden files need transformers' torch model; torch lives in its own venv, never in .venv.
$(TORCH_VENV)/.installed: tests/golden/requirements-torch.txt
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q --disable-pip-version-check -r tests/golden/requirements-torch.txt
	touch $@

GGUF_PATH = $$($(BIN)/python -c 'from safetrade import hub; print(hub.resolve_model("smollm2-135m-instruct"))')

golden: setup $(TORCH_VENV)/.installed
	$(TORCH_VENV)/bin/python tests/golden/make_golden.py --phase reference --gguf "$(GGUF_PATH)"
	$(BIN)/python -m tests.golden.export_roundtrip
	$(TORCH_VENV)/bin/python tests/golden/make_golden.py --phase roundtrip
	$(BIN)/python -m tests.golden.make_peft_golden --phase export
	$(TORCH_VENV)/bin/python tests/golden/make_peft_golden.py --phase torch

bench: setup $(TORCH_VENV)/.installed
	$(BIN)/python bench/forward.py --torch-python $(TORCH_VENV)/bin/python

bench-train: setup $(TORCH_VENV)/.installed
	$(BIN)/python bench/train_step.py --torch-python $(TORCH_VENV)/bin/python --loop-log-every 1 10

bench-eval: setup $(TORCH_VENV)/.installed
	$(BIN)/python bench/evaluate.py --torch-python $(TORCH_VENV)/bin/python

# A guard judge (Llama Guard prompt, the model's own weights) judging 500 replies vs generating them.
bench-judge: setup
	$(BIN)/python bench/evaluate.py --judge llama_guard --n 500

bench-safedelta: setup $(TORCH_VENV)/.installed
	$(BIN)/python bench/safedelta.py --torch-python $(TORCH_VENV)/bin/python

bench-sqsd: setup $(TORCH_VENV)/.installed
	$(BIN)/python bench/sqsd.py --torch-python $(TORCH_VENV)/bin/python

# HVP and power-iteration cost against a gradient on SmolLM2-135M (no torch reference needed: the ratio is internal).
bench-theory: setup
	$(BIN)/python bench/theory.py

bench-aot: setup
	$(BIN)/python bench/aot_compile.py --preset llama2_7b --devices 8 --fsdp 8

# Peak device memory of the 7-8B programs (LoRA / full fine-tuning, Safe Delta, Hessians), compiled ahead of time
# on one CPU device from abstract shapes: nothing is allocated.
bench-memory: setup
	$(BIN)/python bench/memory_plan.py

# On a machine with one NVIDIA GPU and a preinstalled JAX (no venv is built: the image's packages are used).
# DEVICE_CHECK_ARGS=--dry-run runs every section at tiny shapes on the CPU in seconds.
DEVICE_CHECK_OUT ?= device_check_out
DEVICE_CHECK_ARGS ?=
device-check:
	$(PYTHON) bench/device_check.py --out $(DEVICE_CHECK_OUT) $(DEVICE_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(TORCH_VENV)
