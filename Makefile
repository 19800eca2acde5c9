# Two entry points on a fresh machine: `make demo` (set up, then the main job) and `make test`.
# Everything installs into .venv; torch is pinned to the CPU build available on this kind of machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
RUN ?= runs/demo-heart
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml

.PHONY: setup demo test test-all lint ctest cuda-check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel ninja

# The editable install builds the native extension; it is redone whenever a C++/CUDA source changes.
$(VENV)/.installed: $(BIN)/python $(NATIVE_SOURCES)
	$(BIN)/pip install -q $(TORCH)
	MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The main job on the embedded toy-world model: learn the example subject (a yellow|purple heart the world never
# draws) from its 4 images, then draw it somewhere new. Settings that work for this tiny model: QUALITY.md.
demo: setup
	$(BIN)/dbfast doctor
	$(BIN)/dbfast train --images examples/subject --class heart --output $(RUN) --overwrite \
	  --captions --num-class-images 50 --class-guidance-scale 2 \
	  --steps 3000 --lr 3e-4 --lr-schedule cosine --min-snr-gamma 5 --stages base
	$(BIN)/dbfast generate "a [V] heart on a red background" --model $(RUN) -n 8 --stages base --out $(RUN)/samples

lint: setup
	$(BIN)/ruff check .

ctest: setup
	$(BIN)/cmake --version >/dev/null 2>&1 || true
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(BIN)/python >/dev/null
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

cuda-check: setup
	PYTHON=$(BIN)/python scripts/check_cuda.sh

# The default test run: lint, the fast tests, the C++ tests, the CUDA compile check.
test: lint
	$(BIN)/pytest -m "not slow" -q
	$(MAKE) ctest cuda-check

# Everything, slow end-to-end tests included.
test-all: lint
	$(BIN)/pytest -q
	$(MAKE) ctest cuda-check

bench: setup
	$(BIN)/python -m benchmarks --suite all --quick

clean:
	rm -rf build $(VENV) *.egg-info dreambooth_fast/_C*.so
