#!/usr/bin/env bash
# scripts/sanitize.sh address|thread|undefined [gtest args...]
# scripts/sanitize.sh python [pytest args...]
#
# Builds kvbm_tests with the sanitizer in build-<sanitizer>/ and runs the whole suite (or what
# --gtest_filter=... chooses). address also enables undefined (see CMakeLists.txt).
#
# python: builds the extension kvbm._core with ASan + UBSan in build-asan-python/, stages the
# package beside it (build-asan-python/site/kvbm) and runs pytest on the connector tests (the
# real vLLM ones included; default: tests/python/test_vllm_*.py test_connector_core.py) with
# the ASan runtime preloaded into the interpreter (LD_PRELOAD), since python itself is not
# instrumented. Leak checking is off there (CPython and torch keep memory until exit by
# design); any ASan report or UBSan finding fails the run. The interpreter is $PYTHON (default:
# python3); it needs nanobind (pip install nanobind==2.9.2) and, for the vLLM tests, vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."

san="${1:-}"
case "$san" in
  address | thread | undefined) shift ;;
  python)
    shift
    py="${PYTHON:-python3}"
    build_dir="build-asan-python"
    jobs="${KVBM_JOBS:-$(nproc)}"
    cmake -S . -B "$build_dir" -G Ninja -DKVBM_SANITIZER=address -DKVBM_BUILD_PYTHON=ON -DKVBM_BUILD_TESTS=OFF \
      -DKVBM_BUILD_BENCH=OFF -DKVBM_BUILD_CUDA_KERNELS=OFF -DPython_EXECUTABLE="$(command -v "$py")" \
      -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    ninja -C "$build_dir" -j "$jobs" _core
    site="$build_dir/site"
    rm -rf "$site"
    mkdir -p "$site"
    cp -r python/kvbm "$site/kvbm"
    cp "$build_dir"/_core*.so "$site/kvbm/"
    # libstdc++ is preloaded with the runtime: python does not link it, and ASan resolves the
    # real __cxa_throw when it starts, so without it the first C++ exception aborts ASan itself.
    libasan="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)"
    args=("$@")
    if [[ ${#args[@]} -eq 0 ]]; then
      args=(tests/python/test_connector_core.py tests/python/test_vllm_connector.py
            tests/python/test_vllm_interface.py tests/python/test_vllm_tp.py)
    fi
    # The staged package must win over an installed kvbm.
    export PYTHONPATH="$PWD/$site${PYTHONPATH:+:$PYTHONPATH}"
    export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:detect_odr_violation=0}"
    export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
    LD_PRELOAD="$libasan" "$py" -c "import kvbm._core, sys; assert kvbm._core.__file__.startswith('$PWD/$site'), kvbm._core.__file__"
    exec env LD_PRELOAD="$libasan" "$py" -m pytest -q -p no:cacheprovider "${args[@]}"
    ;;
  *)
    echo "usage: scripts/sanitize.sh address|thread|undefined [gtest args...] | python [pytest args...]" >&2
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

if [[ "$san" == thread ]]; then
  # gcc 12's TSan cannot map its shadow memory under the high ASLR entropy of recent kernels;
  # running without address randomisation avoids that without changing what is tested.
  exec setarch "$(uname -m)" -R "$build_dir/kvbm_tests" "${args[@]}"
fi
exec "$build_dir/kvbm_tests" "${args[@]}"
