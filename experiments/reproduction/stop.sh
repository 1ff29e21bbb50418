#!/usr/bin/env bash
# Stop the experiment that launch.sh started: SIGINT (what Ctrl+C sends: Tune saves its state, the
# evaluation keeps its finished units) to the process group recorded last in $RNA_BASE_DIR/pids.
set -euo pipefail
BASE=${RNA_BASE_DIR:?set RNA_BASE_DIR}
PGID=$(tail -n1 "$BASE/pids")
if kill -0 "-$PGID" 2>/dev/null; then
  kill -INT -- "-$PGID"
  echo "sent SIGINT to process group $PGID; resume with launch.sh"
else
  echo "process group $PGID is not running"
fi
