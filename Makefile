# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv (seeing system packages, so an importable torch is reused), install torch==2.13.0
# only when no torch is importable (the CPU build on these machines; never a CUDA build), pin every other
# install to that torch, and build the package with its native extension.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_PEERS := pytest pytest-benchmark bitsandbytes==0.50.2 peft==0.21.2 transformers==5.24.0 accelerate==1.15.0 \
              matplotlib==3.11.2 tqdm trl==1.16.0 datasets==5.2.0

.PHONY: demo test clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q -c $(VENV)/constraints.txt triton==3.9.0
	$(PY) -m pip install -q -c $(VENV)/constraints.txt setuptools wheel ninja pybind11 numpy $(TEST_PEERS)
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qlora-kernels demo

test: $(STAMP)
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) build python/*.egg-info python/qlora_kernels/_C*.so
