#!/usr/bin/env bash
# scripts/soak.sh [--quick] [--duration SECONDS] [--json FILE] [--plot FILE] [soak.py options...]
#
# The soak test of kvbm's connector core (scripts/soak.py: what it runs, injects and checks).
# Default: 30 minutes of traffic; --quick: about 75 s (CI runs it through
# tests/python/test_soak.py). Exits 0 only when every check passed. The interpreter is $PYTHON
# (default: python3) with kvbm installed (pip install .). G4 runs on a Redis Cluster of its own
# (free ports on 127.0.0.1) when redis-server is installed; --g4 off leaves it out.
#
# Everything lives in a fresh directory under ${TMPDIR:-/tmp}, removed at the end, with any Redis
# node still running there (also after a hang, where the soak exits without cleaning up).
set -euo pipefail
cd "$(dirname "$0")/.."

py="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/kvbm-soak-run-XXXXXX")"

cleanup() {
  local pidfile pid
  for pidfile in "$work"/*/redis/*/redis.pid; do
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || continue
    # Only a redis-server whose pid file is ours.
    if [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q '^redis-server'; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf -- "$work"
}
trap cleanup EXIT

"$py" scripts/soak.py --dir "$work" "$@"
