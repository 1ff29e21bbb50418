#!/usr/bin/env bash
# Benchmark 6 on a lent GPU machine (H100/H200; torch + torchvision, no Ray/MLflow, no internet).
# Run from anywhere:  bash bench/gpu.sh [gpu.py options]      e.g. bash bench/gpu.sh --json /tmp/gpu.json
# On CPU, for a quick check:  bash bench/gpu.sh --device cpu --tiny
# PYTHON picks the interpreter (default: python3, the one holding torch on the GPU machines).
# The defaults finish in a few minutes on an H100; `timeout` keeps a stuck run under 10 minutes.
# It first runs issue 18's correctness checks (bench/gpu_checks.py: bit-identical steps under
# train.deterministic, bf16 passes of bgn:8 / rpt / small_cnn, GroupNorm's channels_last layout, the
# random start's device); --json is rewritten after every stage, so a late error keeps what was measured.
# Benchmark 3 (our PGD-20 vs torchattacks) also runs on the GPU when torchattacks is importable; the
# bare GPU machines lack it (its needs numpy, scipy, requests, tqdm are there). To carry it:
#   here:  echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps --only-binary=:all: \
#            --python-version 3.12 --implementation cp -d .whl torchattacks==3.3.0
#   there (carry .whl):  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#            && PYTHONPATH=/tmp/site bash bench/gpu.sh --json $OUT/gpu.json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" exec timeout 570 "$PY" bench/gpu.py "$@"
