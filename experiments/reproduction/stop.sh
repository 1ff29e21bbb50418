#!/usr/bin/env bash
# Stop the experiment that launch.sh started: SIGINT (what Ctrl+C sends: Tune saves its state, the
# evaluation keeps its finished units) to the process group recorded last in $RNA_BASE_DIR/pids;
# if the group still runs after $RNA_STOP_WAIT_S seconds (default 60; a job blocked in a long Ray
# wait can miss the interrupt), SIGTERM, which every job treats like Ctrl+C (run KILLED, exit 130).
set -euo pipefail
BASE=${RNA_BASE_DIR:?set RNA_BASE_DIR}
WAIT=${RNA_STOP_WAIT_S:-60}
PGID=$(tail -n1 "$BASE/pids")
if ! kill -0 "-$PGID" 2>/dev/null; then
  echo "process group $PGID is not running"
  exit 0
fi
kill -INT -- "-$PGID"
echo "sent SIGINT to process group $PGID"
for _ in $(seq "$WAIT"); do
  kill -0 "-$PGID" 2>/dev/null || { echo "stopped; resume with launch.sh"; exit 0; }
  sleep 1
done
kill -TERM -- "-$PGID" 2>/dev/null || true
echo "still running after ${WAIT}s: sent SIGTERM to process group $PGID; resume with launch.sh"
