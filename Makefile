# pyminigpt: every set-up step in one place. On a fresh machine:
#   make demo        # creates .venv, installs pyminigpt (builds the C++ kernels), runs `pyminigpt demo`
#   make install     # the tools and pyminigpt itself, as a user gets it (a regular install)
#   make test        # what CI runs (.ci/run): check + every test below (installs first on a fresh machine)
# While changing code:
#   make dev         # an editable install: Python edits are live; rerun it after C++ edits
#   make check       # lint: ruff check, ruff format --check, clang-format over csrc/ and the emulator
#   make test-fast   # the Python suite on the cpu + reference backends, no rebuild
#   make test-unit   # the same without the tests marked slow (end to end, DDP, demo, explore): < 2 min
#   make format      # apply clang-format to the C++/CUDA sources (ruff format: see README)
#
# TORCH_SPEC pins the torch the extension is built against; installs use
# --no-build-isolation so that the build sees exactly that torch. The linters are pinned so
# that `make check` says the same on every machine.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
RUFF_SPEC ?= ruff==0.17.6
CLANG_FORMAT_SPEC ?= clang-format==23.1.3
BIN := $(VENV)/bin
# The tools and test dependencies, installed once per venv (redone when this Makefile changes).
TOOLS := $(VENV)/.pyminigpt-tools
CXX_SOURCES = $(sort $(shell find csrc tests/cuda_emulator -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh'))
PYTEST := $(abspath $(BIN)/python) -m pytest -q -p no:cacheprovider
# The tests the Triton interpreter runs (from tests/): every op's tests, picked by name, and the kernels' own.
TRITON_TESTS = ops/test_op_*.py ops/test_triton_kernels.py

.PHONY: install dev demo check format test test-fast test-unit test-python test-triton compile-triton compile-cuda \
	test-cuda-emulated test-native test-sanitized bench gpu-check installed clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

$(TOOLS): $(BIN)/python Makefile
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet "numpy<2.4" transformers tokenizers safetensors tqdm matplotlib triton \
		pytest pytest-benchmark expecttest ninja "cmake>=3.18,<4" "$(RUFF_SPEC)" "$(CLANG_FORMAT_SPEC)"
	touch $@

# A regular install: the tests then import the installed package (not the source tree), which
# proves the wheel carries everything: the extension, pyminigpt.kernels, the CLI.
install: $(TOOLS)
	$(BIN)/pip install --quiet --no-build-isolation --no-deps .
	$(BIN)/pyminigpt info

# An editable install: pyminigpt/ and kernels/ are imported from the source tree, the
# extension is built in place (incrementally: only changed kernel files are recompiled).
dev: $(TOOLS)
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	$(BIN)/pyminigpt info

# The regular install with the `demo` extra (matplotlib for the pictures, tqdm for the bar).
demo: $(TOOLS)
	$(BIN)/pip install --quiet --no-build-isolation ".[demo]"
	$(BIN)/pyminigpt demo

# The test targets run against whatever `make install` or `make dev` installed, and rebuild
# nothing; on a fresh machine (nothing installed in $(VENV)) they run `make install` first.
installed:
	@$(BIN)/python -c "import torch, pyminigpt._C" 2>/dev/null || $(MAKE) --no-print-directory install

# Lint. ruff reads pyproject.toml, clang-format .clang-format. All three run even when one fails.
check: $(TOOLS)
	@status=0; \
	$(BIN)/python -m ruff check . || status=1; \
	$(BIN)/python -m ruff format --check . || status=1; \
	$(BIN)/clang-format --dry-run -Werror $(CXX_SOURCES) || status=1; \
	exit $$status

format: $(TOOLS)
	$(BIN)/clang-format -i $(CXX_SOURCES)

# Everything CI checks: lint, then each test stage below.
test: check test-python test-sanitized test-triton compile-triton test-native compile-cuda test-cuda-emulated

test-fast: test-python

# The suite without the tests marked slow (the command end to end, DDP, the demo, explore): under
# 2 minutes on 2 cores, for the edit-test loop.
test-unit: installed
	cd tests && PYMINIGPT_REQUIRE_BACKENDS=cpu $(PYTEST) --ignore=cuda_emulator -m "not slow" .

test-python: installed
	cd tests && PYMINIGPT_REQUIRE_BACKENDS=cpu $(PYTEST) --ignore=cuda_emulator .

# The same tests against the C++ CPU kernels built with AddressSanitizer and UBSan: an
# out-of-bounds access that leaves the values right fails here. (A build of its own, apart
# from the installed one, in build/sanitize.)
test-sanitized: installed
	PYTHON=$(BIN)/python bash .ci/sanitize_cpu.sh

# The Triton kernels on CPU tensors through the interpreter, at small sizes.
test-triton: installed
	cd tests && TRITON_INTERPRET=1 PYMINIGPT_REQUIRE_BACKENDS=triton $(PYTEST) $(TRITON_TESTS)

# Every Triton kernel of the installed package compiled for sm_80 and sm_90 through its
# launcher, down to ptxas (no GPU needed): the interpreter above checks what the kernels
# compute, this that a GPU's compiler accepts them.
compile-triton: installed
	$(BIN)/python .ci/compile_triton.py

# Every CUDA kernel through nvcc for sm_80 and sm_90 (skipped where there is no nvcc).
compile-cuda: $(TOOLS)
	@if command -v nvcc >/dev/null 2>&1; then PYTHON=$(BIN)/python bash .ci/compile_cuda.sh; else echo "nvcc not found: CUDA compile check skipped"; fi

# The CUDA kernels' own code compiled by g++ and run on the CPU by tests/cuda_emulator/
# (a thread per fiber, barriers, shuffles, ldmatrix and mma emulated), against the reference
# ops. Needs the CUDA toolkit's headers, so it runs where nvcc is, like compile-cuda.
test-cuda-emulated: installed
	@if command -v nvcc >/dev/null 2>&1; then . .ci/cuda_home.sh && cd tests && $(PYTEST) cuda_emulator; \
	else echo "nvcc not found: CUDA emulator tests skipped"; fi

# The same C++ sources through CMake (CMakeLists.txt) and the native tests (ctest), against
# the venv's torch. build/cmake is kept, so a second run recompiles only what changed.
test-native: $(TOOLS)
	$(BIN)/cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DPython3_EXECUTABLE="$(abspath $(BIN)/python)"
	$(BIN)/cmake --build build/cmake -j2
	$(BIN)/ctest --test-dir build/cmake --output-on-failure

bench: install
	$(BIN)/pyminigpt bench

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build dist *.egg-info pyminigpt/_C*.so $(VENV)
