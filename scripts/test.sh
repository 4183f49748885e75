#!/usr/bin/env bash
# Runs every test that needs no GPU: the C++ suite (ctest) and the Python suite (pytest).
# Builds the C++ tests first (incrementally) in ${KVBM_BUILD_DIR:-build}. The Python tests use
# the installed package: run `pip install .` first.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir="${KVBM_BUILD_DIR:-build}"
jobs="${KVBM_JOBS:-$(nproc)}"

if [[ ! -f "$build_dir/build.ninja" ]]; then
  cmake -S . -B "$build_dir" -G Ninja
fi
ninja -C "$build_dir" -j "$jobs"
# Tests labelled "gpu" need a CUDA device: scripts/gpu_check.sh runs them on a lent machine.
ctest --test-dir "$build_dir" --output-on-failure -LE gpu

if ! python -c "import kvbm._core" 2>/dev/null; then
  echo "scripts/test.sh: kvbm is not installed (or its extension is missing): run 'pip install .' first" >&2
  exit 1
fi
# pytest exits 5 when it collected no test: that is not a failure of the code under test.
status=0
python -m pytest -q tests/python "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "scripts/test.sh: pytest collected no tests"
  status=0
fi
exit $status
