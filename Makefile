# The README's two commands: `make demo` and `make test`; `make docs` builds the site.
# All create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.favor-installed
# torch is pinned to the CPU wheel on this machine's disk: never let pip resolve a newer
# (multi-GB CUDA) torch.
TORCH ?= torch==2.13.0

.PHONY: demo test test-all test-properties-slow gpu-check bench peers lint docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/favor demo

# lint first (ruff check; `make lint` adds the format check), then the suite
test: $(STAMP)
	$(VENV)/bin/ruff check favor tests benchmarks examples
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

# the property tests with many fresh random cases each (tests/conftest.py: profiles)
test-properties-slow: $(STAMP)
	HYPOTHESIS_PROFILE=slow $(PY) -m pytest -q tests -k properties --hypothesis-show-statistics

# on a machine with a GPU: the device tests and a short benchmark, JSON in runs/gpu_check/
gpu-check: $(STAMP)
	bash benchmarks/gpu_check.sh --python $(PY)

bench: $(STAMP)
	$(VENV)/bin/favor bench

# the peers of `favor bench` and `favor paper speed` (pyproject's `compare` extra), without
# letting pip touch torch
peers: $(STAMP)
	$(PY) -m pip install -q --no-deps performer-pytorch reformer-pytorch linformer "local-attention==1.9.0" \
		axial-positional-embedding einops "product-key-memory==0.1.10"

lint: $(STAMP)
	$(VENV)/bin/ruff check favor tests benchmarks examples
	$(VENV)/bin/ruff format --check favor tests benchmarks examples

# strict: a broken link, a missing reference or a docstring that fails to render fails it
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs site .pytest_cache
