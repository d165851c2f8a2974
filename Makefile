# pyminigpt: every set-up step in one place. On a fresh machine:
#   make demo   # creates .venv, installs pyminigpt (builds the C++ kernels), runs `pyminigpt demo`
#   make test   # the same install, then the whole test suite (what CI runs)
#
# TORCH_SPEC pins the torch the extension is built against; installs use
# --no-build-isolation so that the build sees exactly that torch.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test test-python test-triton compile-triton compile-cuda test-cuda-emulated test-native test-sanitized bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

install: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet "numpy<2.4" transformers tokenizers safetensors tqdm matplotlib triton \
		pytest pytest-benchmark expecttest ninja "cmake>=3.18,<4"
	$(BIN)/pip install --quiet --no-build-isolation --no-deps .
	$(BIN)/pyminigpt info

demo: install
	$(BIN)/pyminigpt demo

# The tests import the installed package (not the source tree), which proves the wheel
# carries everything: the extension, pyminigpt.kernels, the CLI.
test: install test-python test-sanitized test-triton compile-triton test-native compile-cuda test-cuda-emulated

test-python:
	cd tests && PYMINIGPT_REQUIRE_BACKENDS=cpu ../$(BIN)/pytest -q -p no:cacheprovider --ignore=cuda_emulator .

# The same tests against the C++ CPU kernels built with AddressSanitizer and UBSan: an
# out-of-bounds access that leaves the values right fails here.
test-sanitized:
	PYTHON=$(BIN)/python bash .ci/sanitize_cpu.sh

# The Triton kernels on CPU tensors through the interpreter, at small sizes.
test-triton:
	cd tests && TRITON_INTERPRET=1 PYMINIGPT_REQUIRE_BACKENDS=triton ../$(BIN)/pytest -q -p no:cacheprovider \
		test_op_softmax.py test_op_layer_norm.py test_op_sampling.py test_op_causal_attention.py test_triton_kernels.py

# Every Triton kernel of the installed package compiled for sm_80 and sm_90 through its
# launcher, down to ptxas (no GPU needed): the interpreter above checks what the kernels
# compute, this that a GPU's compiler accepts them.
compile-triton:
	$(BIN)/python .ci/compile_triton.py

# Every CUDA kernel through nvcc for sm_80 and sm_90 (skipped where there is no nvcc).
compile-cuda:
	@if command -v nvcc >/dev/null 2>&1; then PYTHON=$(BIN)/python bash .ci/compile_cuda.sh; else echo "nvcc not found: CUDA compile check skipped"; fi

# The CUDA kernels' own code compiled by g++ and run on the CPU by tests/cuda_emulator/
# (a thread per fiber, barriers, shuffles, ldmatrix and mma emulated), against the reference
# ops. Needs the CUDA toolkit's headers, so it runs where nvcc is, like compile-cuda.
test-cuda-emulated:
	@if command -v nvcc >/dev/null 2>&1; then . .ci/cuda_home.sh && cd tests && ../$(BIN)/pytest -q -p no:cacheprovider cuda_emulator; \
	else echo "nvcc not found: CUDA emulator tests skipped"; fi

# The same C++ sources through CMake (CMakeLists.txt) and the native tests (ctest), against
# the venv's torch (`make test` installs first; alone, run `make install` before).
test-native:
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
