#!/usr/bin/env bash
# scripts/sanitize.sh address|thread|undefined [gtest args...]
#
# Builds kvbm_tests with the sanitizer in build-<sanitizer>/ and runs it. address also enables
# undefined (see CMakeLists.txt). thread runs the concurrency tests by default (TSan slows
# everything ~10x and the rest is single-threaded); pass --gtest_filter=... to choose others.
set -euo pipefail
cd "$(dirname "$0")/.."

san="${1:-}"
case "$san" in
  address | thread | undefined) shift ;;
  *)
    echo "usage: scripts/sanitize.sh address|thread|undefined [gtest args...]" >&2
    exit 2
    ;;
esac

build_dir="build-$san"
jobs="${KVBM_JOBS:-$(nproc)}"
cmake -S . -B "$build_dir" -G Ninja -DKVBM_SANITIZER="$san" -DKVBM_BUILD_BENCH=OFF -DKVBM_BUILD_PYTHON=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C "$build_dir" -j "$jobs" kvbm_tests

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:suppressions=$PWD/scripts/tsan.supp}"

args=("$@")
if [[ "$san" == thread && ${#args[@]} -eq 0 ]]; then
  args=(--gtest_filter='*Concurrent*:*Stress*:*Thread*:*Race*')
fi

if [[ "$san" == thread ]]; then
  # gcc 12's TSan cannot map its shadow memory under the high ASLR entropy of recent kernels;
  # running without address randomisation avoids that without changing what is tested.
  exec setarch "$(uname -m)" -R "$build_dir/kvbm_tests" "${args[@]}"
fi
exec "$build_dir/kvbm_tests" "${args[@]}"
