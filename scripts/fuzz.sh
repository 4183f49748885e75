#!/usr/bin/env bash
# scripts/fuzz.sh [--seconds N] [--jobs J] [--seeds] [TARGET...]
#
# Builds the libFuzzer targets of fuzz/ with clang 16 (-fsanitize=fuzzer,address,undefined) in
# build-fuzz/ and runs each for N seconds (default 60) from its seed corpus fuzz/corpus/<target>/.
# TARGETs: step_metadata, trace_parser, config (default: all). New inputs found go to
# build-fuzz/corpus/<target>/ (the committed seeds are never modified); a crash leaves its input
# in build-fuzz/artifacts/ and the script exits non-zero.
#   --seeds   regenerate fuzz/corpus/step_metadata/ from real encoded messages, then exit.
#   --jobs J  run J fuzzing processes per target (libFuzzer -fork), for long runs.
# Long run (hours): scripts/fuzz.sh --seconds 14400 --jobs "$(nproc)"
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
jobs_per_target=1
seeds_only=0
targets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --jobs) jobs_per_target="$2"; shift 2 ;;
    --seeds) seeds_only=1; shift ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    -*) echo "scripts/fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if ! [[ "$seconds" =~ ^[0-9]+$ && "$jobs_per_target" =~ ^[1-9][0-9]*$ ]]; then
  echo "scripts/fuzz.sh: --seconds and --jobs take decimal integers" >&2
  exit 2
fi
all_targets=(step_metadata trace_parser config)
if [[ ${#targets[@]} -eq 0 ]]; then targets=("${all_targets[@]}"); fi
for t in "${targets[@]}"; do
  if [[ ! -f "fuzz/${t}_fuzz.cpp" ]]; then
    echo "scripts/fuzz.sh: no fuzz target '$t' (targets: ${all_targets[*]})" >&2
    exit 2
  fi
done

clangxx="${KVBM_FUZZ_CXX:-clang++-16}"
clangc="${KVBM_FUZZ_CC:-clang-16}"
if ! command -v "$clangxx" >/dev/null; then
  echo "scripts/fuzz.sh: $clangxx not found: apt-get install clang-16 libclang-rt-16-dev (scripts/install_deps.sh)" >&2
  exit 1
fi
build_dir="build-fuzz"
# ccache keys on the compiler, so it is safe to share with the g++ build.
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$clangxx" \
  -DCMAKE_C_COMPILER="$clangc" -DKVBM_BUILD_FUZZERS=ON -DKVBM_BUILD_TESTS=OFF -DKVBM_BUILD_BENCH=OFF \
  -DKVBM_BUILD_PYTHON=OFF -DKVBM_BUILD_CUDA_KERNELS=OFF "${launcher[@]}" >/dev/null
ninja_targets=(kvbm_fuzz_seeds)
for t in "${targets[@]}"; do ninja_targets+=("${t}_fuzz"); done
ninja -C "$build_dir" -j "${KVBM_JOBS:-$(nproc)}" "${ninja_targets[@]}"

if [[ $seeds_only -eq 1 ]]; then
  mkdir -p fuzz/corpus/step_metadata
  "$build_dir/kvbm_fuzz_seeds" fuzz/corpus/step_metadata
  echo "scripts/fuzz.sh: wrote fuzz/corpus/step_metadata/"
  exit 0
fi

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
mkdir -p "$build_dir/artifacts"
status=0
for t in "${targets[@]}"; do
  work="$build_dir/corpus/$t"
  mkdir -p "$work"
  args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1
        -artifact_prefix="$build_dir/artifacts/${t}-")
  if [[ -f "fuzz/${t}.dict" ]]; then args+=(-dict="fuzz/${t}.dict"); fi
  if [[ "$jobs_per_target" -gt 1 ]]; then args+=(-fork="$jobs_per_target"); fi
  echo "== fuzz $t: ${seconds} s"
  # The first corpus directory receives new inputs; the committed seeds are only read.
  if ! "$build_dir/${t}_fuzz" "${args[@]}" "$work" "fuzz/corpus/$t" 2>"$build_dir/$t.log"; then
    echo "scripts/fuzz.sh: $t FAILED; its log: $build_dir/$t.log, the input: $build_dir/artifacts/" >&2
    tail -n 40 "$build_dir/$t.log" >&2
    status=1
  else
    grep -E "^(stat::number_of_executed_units|stat::new_units_added|Done )" "$build_dir/$t.log" || true
  fi
done
exit $status
