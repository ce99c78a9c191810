# The README's two commands: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.favor-installed
# torch is pinned to the CPU wheel on this machine's disk: never let pip resolve a newer
# (multi-GB CUDA) torch.
TORCH ?= torch==2.13.0

.PHONY: demo test test-all bench peers lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/favor demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/favor bench

# the peers of `favor bench` and `favor paper speed` (pyproject's `compare` extra), without
# letting pip touch torch
peers: $(STAMP)
	$(PY) -m pip install -q --no-deps performer-pytorch reformer-pytorch linformer "local-attention==1.9.0" \
		axial-positional-embedding einops "product-key-memory==0.1.10"

lint: $(STAMP)
	$(VENV)/bin/ruff check favor tests benchmarks
	$(VENV)/bin/ruff format --check favor tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
