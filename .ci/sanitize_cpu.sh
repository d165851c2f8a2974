#!/usr/bin/env bash
# The C++ CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer, and the
# Python test suite run against that build. A kernel that reads or writes past a buffer can
# still compute every value right (a padded tile row added back unchanged, say) and pass the
# value tests; here the first such access stops the run with the kernel's stack.
#
# The build is installed into build/sanitize/site (pip --target), apart from the venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(realpath -s "${PYTHON:-.venv/bin/python}")  # absolute, the venv kept
CXX=${CXX:-c++}
out=$PWD/build/sanitize
rm -rf "$out" && mkdir -p "$out"

sanitizers="-fsanitize=address,undefined"
CFLAGS="$sanitizers -fno-sanitize-recover=undefined -fno-omit-frame-pointer" LDFLAGS="$sanitizers" \
  "$PYTHON" -m pip install --quiet --no-build-isolation --no-deps --target "$out/site" .

# torch itself is not instrumented, so the ASan runtime is preloaded; libstdc++ with it, or
# ASan's __cxa_throw interceptor finds no real one when an extension loaded later throws.
export LD_PRELOAD="$("$CXX" -print-file-name=libasan.so) $("$CXX" -print-file-name=libstdc++.so)"
# pytest captures stderr, and a report printed there would die with the process: log to files.
export ASAN_OPTIONS="detect_leaks=0:log_path=$out/report"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$out/report"
export PYTHONPATH="$out/site"
status=0
(cd tests && PYMINIGPT_REQUIRE_BACKENDS=cpu "$PYTHON" -m pytest -q -p no:cacheprovider --ignore=cuda_emulator .) ||
  status=$?
if compgen -G "$out/report.*" >/dev/null; then
  cat "$out"/report.*
  status=1
fi
exit "$status"
