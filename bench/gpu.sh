#!/usr/bin/env bash
# Benchmark 6 on a lent GPU machine (H100/H200; torch + torchvision, no Ray/MLflow, no internet).
# Run from anywhere:  bash bench/gpu.sh [gpu.py options]      e.g. bash bench/gpu.sh --json /tmp/gpu.json
# On CPU, for a quick check:  bash bench/gpu.sh --device cpu --tiny
# PYTHON picks the interpreter (default: python3, the one holding torch on the GPU machines).
# The defaults finish in a few minutes on an H100; `timeout` keeps a stuck run under 10 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" exec timeout 570 "$PY" bench/gpu.py "$@"
