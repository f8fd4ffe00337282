#!/usr/bin/env bash
# GPU checks of the CUDA kernels in one command, for a machine with a CUDA
# device, nvcc, CMake, PyTorch (CUDA build), pybind11 and pytest:
#
#   bash cuda/gpu_check.sh [all|build|test|sanitize|bench|e2e|vq|glut] [bench options...]
#
#   build     configure + build sqllm._C with the CUDA kernels into $BUILD
#             (default build/gpu; CMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH, default
#             the visible GPU's, e.g. 90 on an H100); the module lands in
#             python/sqllm (developer layout, PYTHONPATH=python).
#   test      pytest tests/python/test_cuda.py (GPU tests included).
#   sanitize  compute-sanitizer memcheck over a subset of those tests.
#   bench     python tests/bench/bench_cuda.py [bench options] (markdown table).
#   e2e       python tests/bench/bench_generate.py: greedy-generation tokens/s,
#             quantized (3 and 4 bits) vs fp16, for a random LLaMA with 7B
#             widths (8 layers) and for SmolLM2-135M.
#   vq        the VQ (VPTQ) kernels: pytest tests/python/test_vptq_cuda.py, then
#             python tests/bench/bench_cuda.py --vq [bench options] (run after build).
#   glut      the glut (grouped lookup table) kernels, one command: builds first
#             unless the module in python/sqllm already has CUDA kernels, then
#             pytest tests/python/test_glut_cuda.py, compute-sanitizer memcheck
#             over a subset of it (when installed), and
#             python tests/bench/bench_glut_cuda.py [bench options] (GEMV, dequantize
#             + cuBLAS, dense fp16 cuBLAS; batch 1/4/16; 4096^2 and 576-wide; GB/s).
#   all       build, test, sanitize, bench, e2e (the default).
#
# Logs go to $OUT when it is set (the device tool's result folder), else $BUILD.
# Eigen: the system's (find_package(Eigen3)) or, when the machine has none, the
# headers under $EIGEN_INCLUDE (default .gpu_deps/eigen3, e.g. a copy of
# /usr/include/eigen3 carried along and ignored through .git/info/exclude).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${BUILD:-$ROOT/build/gpu}
PY=${PYTHON:-python3}
LOGDIR=${OUT:-$BUILD}
mkdir -p "$BUILD" "$LOGDIR"
step=${1:-all}
[ $# -gt 0 ] && shift
status=0

do_build() {
  nvidia-smi -L || true
  local arch=${CUDA_ARCH:-}
  if [ -z "$arch" ]; then
    arch=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
  fi
  local extra=()
  if [ ! -d /usr/include/eigen3/Eigen ] && [ ! -d /usr/local/include/eigen3/Eigen ]; then
    local inc=${EIGEN_INCLUDE:-$ROOT/.gpu_deps/eigen3}
    if [ ! -d "$inc/Eigen" ]; then
      echo "gpu_check: Eigen headers not found; set EIGEN_INCLUDE or copy /usr/include/eigen3 to .gpu_deps/eigen3" >&2
      return 2
    fi
    mkdir -p "$BUILD/eigen-cmake"
    cat >"$BUILD/eigen-cmake/Eigen3Config.cmake" <<EOF
if(NOT TARGET Eigen3::Eigen)
  add_library(Eigen3::Eigen INTERFACE IMPORTED)
  set_target_properties(Eigen3::Eigen PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "$inc")
endif()
EOF
    cat >"$BUILD/eigen-cmake/Eigen3ConfigVersion.cmake" <<'EOF'
set(PACKAGE_VERSION "3.4.0")
set(PACKAGE_VERSION_COMPATIBLE TRUE)
EOF
    extra+=("-DEigen3_DIR=$BUILD/eigen-cmake")
  fi
  local gen=()
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  local t0=$SECONDS
  cmake -S "$ROOT" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DSQLLM_BUILD_PYTHON=ON -DSQLLM_BUILD_TESTS=OFF -DSQLLM_BUILD_EXAMPLES=OFF -DSQLLM_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" "${extra[@]}" 2>&1 | tee "$LOGDIR/configure.log" &&
    cmake --build "$BUILD" -j"$(nproc)" 2>&1 | tee "$LOGDIR/build.log"
  local rc=$?
  echo "gpu_check: build rc=$rc in $((SECONDS - t0)) s (CUDA arch $arch)"
  grep -i "warning" "$LOGDIR/build.log" | sort | uniq -c | head -20
  return $rc
}

do_test() {
  (cd "$ROOT/tests" && PYTHONPATH="$ROOT/python" $PY -m pytest -q -c "$ROOT/pyproject.toml" \
    -p no:cacheprovider python/test_cuda.py 2>&1 | tee "$LOGDIR/test_cuda.log")
}

do_sanitize() {
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    echo "gpu_check: compute-sanitizer not found; skipped"
    return 0
  fi
  (cd "$ROOT/tests" && PYTHONPATH="$ROOT/python" PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 900 \
    compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -x -c "$ROOT/pyproject.toml" \
    -p no:cacheprovider python/test_cuda.py \
    -k "(test_fast_vs_float64 and shape0 and True and auto) or (test_fast_vs_float64 and shape1 and True and (warp or tiled)) or test_noncontiguous or (test_dequantize and row) or (test_exact_bitwise and fp16 and 17)" \
    2>&1 | tee "$LOGDIR/sanitize.log")
}

do_bench() {
  PYTHONPATH="$ROOT/python" $PY "$ROOT/tests/bench/bench_cuda.py" "$@" 2>&1 | tee "$LOGDIR/bench.md"
}

do_e2e() {
  local rc=0
  PYTHONPATH="$ROOT/python" $PY "$ROOT/tests/bench/bench_generate.py" --model llama-random -q "$@" \
    2>&1 | tee "$LOGDIR/e2e_llama.md" || rc=$?
  PYTHONPATH="$ROOT/python" $PY "$ROOT/tests/bench/bench_generate.py" --model smollm2 -q "$@" \
    2>&1 | tee "$LOGDIR/e2e_smollm2.md" || rc=$?
  return $rc
}

do_vq() {
  local rc=0
  (cd "$ROOT/tests" && PYTHONPATH="$ROOT/python" $PY -m pytest -q -c "$ROOT/pyproject.toml" \
    -p no:cacheprovider python/test_vptq_cuda.py 2>&1 | tee "$LOGDIR/test_vq_cuda.log") || rc=$?
  PYTHONPATH="$ROOT/python" $PY "$ROOT/tests/bench/bench_cuda.py" --vq "$@" 2>&1 |
    tee "$LOGDIR/bench_vq.md" || rc=$?
  return $rc
}

do_glut() {
  local rc=0
  if ! PYTHONPATH="$ROOT/python" $PY -c "import sys, sqllm; sys.exit(0 if sqllm._C.cuda_compiled() and hasattr(sqllm._C, 'cuda_glut_matmul') else 1)" 2>/dev/null; then
    do_build || return $?
  fi
  (cd "$ROOT/tests" && PYTHONPATH="$ROOT/python" $PY -m pytest -q -c "$ROOT/pyproject.toml" \
    -p no:cacheprovider python/test_glut_cuda.py 2>&1 | tee "$LOGDIR/test_glut_cuda.log") || rc=$?
  if command -v compute-sanitizer >/dev/null 2>&1; then
    (cd "$ROOT/tests" && PYTHONPATH="$ROOT/python" PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 600 \
      compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -x -c "$ROOT/pyproject.toml" \
      -p no:cacheprovider python/test_glut_cuda.py -k "(test_gemv_equals_float64 and fp16 and (b3g33 or b4g288)) or test_dequantize" \
      2>&1 | tee "$LOGDIR/sanitize_glut.log") || rc=$?
  fi
  PYTHONPATH="$ROOT/python" $PY "$ROOT/tests/bench/bench_glut_cuda.py" "$@" 2>&1 |
    tee "$LOGDIR/bench_glut.md" || rc=$?
  return $rc
}

case "$step" in
  build) do_build || status=$? ;;
  test) do_test || status=$? ;;
  sanitize) do_sanitize || status=$? ;;
  bench) do_bench "$@" || status=$? ;;
  e2e) do_e2e "$@" || status=$? ;;
  vq) do_vq "$@" || status=$? ;;
  glut) do_glut "$@" || status=$? ;;
  all)
    do_build || exit $?
    do_test || status=$?
    do_sanitize || status=$?
    do_bench "$@" || status=$?
    do_e2e || status=$?
    ;;
  *)
    echo "usage: bash cuda/gpu_check.sh [all|build|test|sanitize|bench|e2e|vq|glut] [options]" >&2
    exit 2
    ;;
esac
exit $status
