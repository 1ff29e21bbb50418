#!/usr/bin/env bash
# Start, or resume, the reproduction experiment in the background, from a frozen copy of the
# committed code (so later edits to the checkout never change a running or resumed experiment).
#
#   RNA_BASE_DIR=/work/rna_experiments/reproduction RNA_DATA_DIR=/path/to/cifar10-parquet \
#       PYTHON=/path/to/venv/bin/python bash experiments/reproduction/launch.sh
#
# Everything lives under $RNA_BASE_DIR (outside the checkout): code/ (the frozen copy, with its
# commit in code/COMMIT), run.log, pids (one process-group id per start), and what
# experiments/reproduction/run.py writes (ray_results/, mlflow.db, eval_results/, reproduction/).
# Running this again resumes: the same code copy, the same command; finished work is kept.
# Stop it with experiments/reproduction/stop.sh (Ctrl+C to exactly the processes this started).
# To resume with newer code, remove $RNA_BASE_DIR/code first (finished work is kept; a changed sweep
# config is refused by jobs/sweep.py: give it a new sweep.name then).
set -euo pipefail
BASE=${RNA_BASE_DIR:?set RNA_BASE_DIR to a folder outside the checkout}
DATA=${RNA_DATA_DIR:?set RNA_DATA_DIR to the folder with CIFAR-10 train.parquet and test.parquet}
PY=${PYTHON:-python}
# absolute, without resolving symlinks (a venv's python is a symlink to the base interpreter)
case "$PY" in /*) ;; */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; *) PY=$(command -v "$PY") ;; esac
REPO=$(cd "$(dirname "$0")/../.." && pwd)
case "$(cd "$(dirname "$BASE")" 2>/dev/null && pwd)/$(basename "$BASE")/" in
  "$REPO"/*) echo "launch.sh: RNA_BASE_DIR $BASE is inside the checkout $REPO" >&2; exit 2 ;;
esac
mkdir -p "$BASE"
if [ -s "$BASE/pids" ] && kill -0 "-$(tail -n1 "$BASE/pids")" 2>/dev/null; then
  echo "launch.sh: already running (process group $(tail -n1 "$BASE/pids")); see $BASE/run.log" >&2
  exit 2
fi
CODE=$BASE/code
if [ ! -f "$CODE/COMMIT" ]; then
  mkdir -p "$CODE"
  git -C "$REPO" archive HEAD | tar -x -C "$CODE"
  git -C "$REPO" rev-parse HEAD > "$CODE/COMMIT"
fi
cd "$CODE"
export RNA_BASE_DIR="$BASE" PYTHONPATH="$CODE" OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
# setsid: the driver leads its own process group, so stop.sh reaches its jobs and their local Ray too
setsid nohup "$PY" experiments/reproduction/run.py --data-dir "$DATA" "$@" >> "$BASE/run.log" 2>&1 < /dev/null &
echo $! >> "$BASE/pids"
echo "started: process group $! (code $(cat "$CODE/COMMIT")), log $BASE/run.log"
