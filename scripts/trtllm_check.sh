#!/usr/bin/env bash
# Optional step of scripts/gpu_check.sh: a real `trtllm-serve` with kvbm as its KV cache
# connector, when the GPU machine has TensorRT-LLM. Skips (exit 0, saying why) when
# `import tensorrt_llm` or `import kvbm._core` fails, or no local model is given.
#
#   KVBM_TRTLLM_MODEL=/path/to/hf/model scripts/trtllm_check.sh [results_dir]
#
# Sends one long prompt twice to 127.0.0.1; between them kvbm's G2 must hold the first one's
# blocks, and the second must onboard them (kvbm_onboard_blocks_h2d > 0 on kvbm's metrics
# endpoint). Writes trtllm_check.json. Exit status: 0 pass or skipped, 1 failed.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RESULTS="${1:-${OUT:-$ROOT/build-gpu-check}}"
PY="${PYTHON:-python3}"
mkdir -p "$RESULTS"

skip() { echo "trtllm_check: skipped: $*"; printf '{"ran": false, "reason": "%s"}\n' "$*" > "$RESULTS/trtllm_check.json"; exit 0; }

"$PY" -c "import tensorrt_llm" >/dev/null 2>&1 || skip "tensorrt_llm does not import here"
"$PY" -c "import kvbm._core" >/dev/null 2>&1 || skip "kvbm is not installed in this Python (pip install . first)"
command -v trtllm-serve >/dev/null 2>&1 || skip "trtllm-serve is not on PATH"
MODEL="${KVBM_TRTLLM_MODEL:-}"
[ -n "$MODEL" ] && [ -d "$MODEL" ] || skip "no local model (set KVBM_TRTLLM_MODEL to a Hugging Face model directory)"

PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
MPORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
CFG="$RESULTS/trtllm_kvbm.yaml"
cat > "$CFG" <<YAML
backend: pytorch
kv_cache_config:
  enable_block_reuse: false
  tokens_per_block: 32
  free_gpu_memory_fraction: 0.3
kv_connector_config:
  connector_module: kvbm.trtllm_integration.connector
  connector_scheduler_class: DynamoKVBMConnectorLeader
  connector_worker_class: DynamoKVBMConnectorWorker
YAML
export DYN_KVBM_CPU_CACHE_GB="${DYN_KVBM_CPU_CACHE_GB:-4}" DYN_KVBM_METRICS=true DYN_KVBM_METRICS_HOST=127.0.0.1 \
  DYN_KVBM_METRICS_PORT="$MPORT" HF_HUB_OFFLINE=1
LOG="$RESULTS/trtllm_serve.log"
trtllm-serve "$MODEL" --host 127.0.0.1 --port "$PORT" --extra_llm_api_options "$CFG" > "$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null' EXIT
ok=0
for _ in $(seq 1 240); do  # up to 240 s for the engine to load
  if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then ok=1; break; fi
  kill -0 "$SERVER" 2>/dev/null || break
  sleep 1
done
if [ "$ok" != 1 ]; then
  echo "trtllm_check: trtllm-serve did not come up; last lines of $LOG:" >&2
  tail -30 "$LOG" >&2
  printf '{"ran": true, "pass": false, "reason": "server did not start"}\n' > "$RESULTS/trtllm_check.json"
  exit 1
fi
PROMPT=$("$PY" -c "print(' '.join('token%d' % (i % 97) for i in range(1500)))")
body=$("$PY" -c "import json,sys; print(json.dumps({'model': sys.argv[1], 'prompt': sys.argv[2], 'max_tokens': 8, 'temperature': 0}))" "$MODEL" "$PROMPT")
r1=$(curl -sf -H 'Content-Type: application/json' -d "$body" "http://127.0.0.1:$PORT/v1/completions")
r2=$(curl -sf -H 'Content-Type: application/json' -d "$body" "http://127.0.0.1:$PORT/v1/completions")
onboard=$(curl -sf "http://127.0.0.1:$MPORT/metrics" | awk '/^kvbm_onboard_blocks_h2d/ {s+=$2} END {print s+0}')
same=0
[ -n "$r1" ] && [ "$("$PY" -c "import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); print(int(a['choices'][0]['text']==b['choices'][0]['text']))" "$r1" "$r2")" = 1 ] && same=1
pass=0
[ "${onboard:-0}" -gt 0 ] && [ "$same" = 1 ] && pass=1
printf '{"ran": true, "pass": %s, "onboard_blocks_h2d": %s, "same_text": %s}\n' \
  "$([ $pass = 1 ] && echo true || echo false)" "${onboard:-0}" "$([ $same = 1 ] && echo true || echo false)" \
  > "$RESULTS/trtllm_check.json"
echo "trtllm_check: onboarded blocks $onboard, identical completions $same"
[ "$pass" = 1 ]
