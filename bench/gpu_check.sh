#!/usr/bin/env bash
# The device data plane on a lent GPU in one short run (see bench/gpu_check.py for what it checks).
#   bash bench/gpu_check.sh --dry-run   # CPU rehearsal at tiny sizes: proves the script before GPU time
#   bash bench/gpu_check.sh             # on a CUDA machine (~3-5 min); writes bench/results/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [[ "${1:-}" != "--dry-run" ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  # The device-API tests that skip on CPU machines run here for real.
  "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py
fi
exec "$PY" bench/gpu_check.py "$@"
