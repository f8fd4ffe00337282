#!/usr/bin/env bash
# The test command (README.md): C++ tests under CTest, then pytest.
# Expects the package installed (bash .ci/setup).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=$(nproc 2>/dev/null || echo 2)

# C++: Catch2 tests (plain, and again under ASan + UBSan: sqllm_tests_asan), the
# emulated CUDA kernels (ASan + UBSan), a bounded run of the CSR fuzz target
# (ASan + UBSan) and the C++ example (headers used directly).  The CUDA sources
# are compiled by the package build (.ci/setup) when nvcc is present.
cmake -S . -B build/tests -DSQLLM_BUILD_PYTHON=OFF -DSQLLM_CUDA=OFF -DSQLLM_NATIVE=ON >/dev/null
cmake --build build/tests -j "$JOBS"
ctest --test-dir build/tests --output-on-failure
./build/tests/examples/quantize_matrix 256 512 3

# Python: run from a folder outside the checkout so the installed package
# (with its compiled module) is what gets imported.
cd tests
python3 -m pytest -q python "$@"

# Bounded fuzz run of the loaders and validators (about a minute; the long
# run and its numbers: docs/reliability.md).  The C++ CSR fuzz target already
# ran under CTest (sqllm_fuzz_csr, ASan/UBSan).
bash fuzz/run_fuzz.sh "${SQLLM_FUZZ_SECONDS:-45}"
