#!/usr/bin/env bash
# GPU check for a lent machine: builds the CUDA backend standalone (nvcc + g++, no fmt, xxhash,
# liburing, zmq or gtest needed), then runs byte-exact round trips for every device layout and
# copy path and the data-path benchmark. Finishes well within 8 minutes on an H100.
#
#   scripts/gpu_check.sh [--build-only] [--pinned-gib G]
#
# Writes gpu_check.json (and the build and run logs) to $OUT when set, else to the build dir.
# Exit status: 0 pass, 1 a round trip failed, 2 no CUDA device, 3 build failed.
# Optional: if build-gpu/kvbm_gpu_tests (the gtest binary of a full build) was carried along and
# its libraries resolve here, it runs too; so does scripts/trtllm_check.sh (trtllm-serve with
# kvbm) when TensorRT-LLM, kvbm and a local model (KVBM_TRTLLM_MODEL) are there.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${KVBM_GPU_CHECK_BUILD:-$ROOT/build-gpu-check}"
RESULTS="${OUT:-$BUILD}"
BUILD_ONLY=0
PINNED_GIB=8
while [ $# -gt 0 ]; do
  case "$1" in
    --build-only) BUILD_ONLY=1 ;;
    --pinned-gib) PINNED_GIB="$2"; shift ;;
    *) echo "usage: $0 [--build-only] [--pinned-gib G]" >&2; exit 64 ;;
  esac
  shift
done
mkdir -p "$BUILD" "$RESULTS"
LOG="$RESULTS/gpu_check_build.log"
: > "$LOG"

NVCC="${NVCC:-$(command -v nvcc || true)}"
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc

# A host compiler with <expected> (C++23: g++ >= 12 or clang++ >= 16 with libstdc++ 12).
CXX_CANDIDATES="${CXX:-} g++ g++-14 g++-13 g++-12 clang++"
HOSTCXX=""
probe="$BUILD/probe.cpp"
printf '#include <expected>\nint main(){std::expected<int,int> e=1;return *e-1;}\n' > "$probe"
for c in $CXX_CANDIDATES; do
  command -v "$c" >/dev/null 2>&1 || continue
  if "$c" -std=c++23 "$probe" -o "$BUILD/probe" >>"$LOG" 2>&1; then HOSTCXX="$c"; break; fi
done
if [ -z "$HOSTCXX" ]; then
  echo "gpu_check: no C++23 compiler with <expected> found (tried: $CXX_CANDIDATES); see $LOG" >&2
  exit 3
fi
echo "gpu_check: host compiler $HOSTCXX ($("$HOSTCXX" --version | head -1)); nvcc ${NVCC:-absent}"

SRC="$ROOT/src"
DEFS="-DKVBM_CUDA_STANDALONE"
EXTRA=""
t0=$(date +%s)
if [ -n "$NVCC" ]; then
  if "$NVCC" -fatbin -O3 \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -gencode arch=compute_90,code=compute_90 \
      -o "$BUILD/kvbm_kernels.fatbin" "$SRC/transfer/cuda/kernels.cu" >>"$LOG" 2>&1 &&
     cmake -DINPUT="$BUILD/kvbm_kernels.fatbin" -DOUTPUT="$BUILD/kvbm_kernels_fatbin.cpp" \
      -DSYMBOL=kvbm_cuda_fatbin -P "$ROOT/cmake/embed_fatbin.cmake" >>"$LOG" 2>&1; then
    DEFS="$DEFS -DKVBM_HAVE_CUDA_KERNELS=1"
    EXTRA="$BUILD/kvbm_kernels_fatbin.cpp"
  else
    echo "gpu_check: nvcc failed (see $LOG); building without the copy kernel" >&2
  fi
else
  echo "gpu_check: nvcc not found; building without the copy kernel" >&2
fi

# shellcheck disable=SC2086
if ! "$HOSTCXX" -std=c++23 -O2 -g -Wall -Wextra -Werror -Wno-missing-field-initializers $DEFS \
    -I"$ROOT/include" -I"$SRC" -I"$ROOT/scripts/gpu_check_shim" \
    "$SRC"/transfer/cuda/{cuda_loader,cuda_backend,copy_plan,pinned_host,gpu_roundtrip,gpu_check_main}.cpp \
    "$SRC/memory/layout.cpp" "$SRC/common/error.cpp" $EXTRA \
    -ldl -lpthread -o "$BUILD/kvbm_gpu_check" >>"$LOG" 2>&1; then
  echo "gpu_check: build failed; last lines of $LOG:" >&2
  tail -30 "$LOG" >&2
  exit 3
fi
echo "gpu_check: built $BUILD/kvbm_gpu_check in $(( $(date +%s) - t0 )) s"
[ "$BUILD_ONLY" = 1 ] && exit 0

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader | tee "$RESULTS/gpu_check_device.txt"

timeout 420 "$BUILD/kvbm_gpu_check" --json "$RESULTS/gpu_check.json" --pinned-gib "$PINNED_GIB" 2>&1 | tee "$RESULTS/gpu_check_run.log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ]; then echo "gpu_check: timed out after 420 s" >&2; rc=1; fi

GT="$ROOT/build-gpu/kvbm_gpu_tests"
if [ "$rc" != 2 ] && [ -x "$GT" ]; then
  if ldd "$GT" 2>/dev/null | grep -q "not found"; then
    echo "gpu_check: skipping $GT (libraries missing here)"
  else
    timeout 300 "$GT" --gtest_output="json:$RESULTS/kvbm_gpu_tests.json" 2>&1 | tail -20
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  fi
fi

# Optional: a real trtllm-serve with kvbm's connector when TensorRT-LLM is installed here
# (scripts/trtllm_check.sh skips, saying why, otherwise).
if [ "$rc" != 2 ]; then
  timeout "${KVBM_TRTLLM_CHECK_TIMEOUT:-300}" bash "$ROOT/scripts/trtllm_check.sh" "$RESULTS" || rc=1
fi
exit "$rc"
