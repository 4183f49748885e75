#!/usr/bin/env bash
# Installs SGLang's HiCache storage interface for kvbm's SGLang backend tests, into the current
# Python, WITHOUT SGLang's CUDA stack: sglang 0.5.23 with --no-deps (its pins would replace the
# CPU torch with torch 2.14.1 and pull flashinfer, cutlass, deep-ep, ...), then only the modules
# `import sglang.srt.mem_cache.hicache_storage` needs on CPU (found by importing it in an empty
# virtual environment: docs/ENGINES.md), held to vLLM's pins by constraints-vllm.txt.
# Run after scripts/install_vllm.sh. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if "$PY" -c "import sglang.srt.mem_cache.hicache_storage" >/dev/null 2>&1; then
  echo "install_sglang: SGLang's storage interface already imports"
  exit 0
fi
"$PY" -m pip install -q --no-deps "sglang==0.5.23"
"$PY" -m pip install -q -c constraints-vllm.txt numpy orjson psutil pybase64 requests triton packaging pillow \
  starlette msgspec pydantic pyzmq tqdm ipython aiohttp
"$PY" -c "import sglang.srt.mem_cache.hicache_storage" || {
  echo "install_sglang: sglang.srt.mem_cache.hicache_storage still does not import" >&2
  exit 1
}
