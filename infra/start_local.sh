#!/usr/bin/env bash
# A local Ray head on 127.0.0.1 plus the MLflow UI, both from this repository's .venv, so that
#   ray job submit --working-dir . -- python jobs/train.py --config configs/smoke.yaml
# runs against a standing cluster and its runs show up in the UI.
#
#   bash infra/start_local.sh          # start (prints the submit command and the UI address)
#   bash infra/start_local.sh stop     # stop the MLflow UI and Ray (`ray stop`: all Ray processes of this user)
#
# Jobs inherit the head's environment: RNA_BASE_DIR (relative config paths and the default
# MLflow store resolve against the repository, not Ray's temporary copy of the working dir) and
# MLFLOW_TRACKING_URI (the store the UI shows). Ports: RAY_PORT (6379), DASHBOARD_PORT (8265),
# MLFLOW_PORT (5000).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STATE="$ROOT/outputs"  # git-ignored: UI log and pid
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"

if [ ! -x "$VENV/bin/ray" ]; then
    echo "start_local.sh: no Ray in $VENV; run 'make install' first" >&2
    exit 2
fi
export PATH="$VENV/bin:$PATH"  # the job's `python` is the venv's: Ray starts jobs with the head's PATH

if [ "${1:-start}" = "stop" ]; then
    if [ -f "$STATE/mlflow-ui.pid" ]; then
        kill "$(cat "$STATE/mlflow-ui.pid")" 2>/dev/null || true
        rm -f "$STATE/mlflow-ui.pid"
    fi
    ray stop
    exit 0
fi

export RNA_BASE_DIR="${RNA_BASE_DIR:-$ROOT}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}"
# Token authentication (Ray's default once ~/.ray/auth_token exists); the `ray job` CLI sends the
# token only when RAY_AUTH_MODE=token, so say it explicitly here and in the submit command below.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = "token" ] && [ ! -f "$HOME/.ray/auth_token" ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    ray get-auth-token --generate >/dev/null
fi

ray start --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --disable-usage-stats

case "$MLFLOW_TRACKING_URI" in
    http://*|https://*)
        UI="$MLFLOW_TRACKING_URI"
        echo "start_local.sh: MLFLOW_TRACKING_URI is a server ($UI); not starting a local UI"
        ;;
    *)
        mkdir -p "$STATE"
        (cd "$ROOT" && MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup mlflow ui --workers 1 --host 127.0.0.1 \
            --port "$MLFLOW_PORT" --backend-store-uri "$MLFLOW_TRACKING_URI" >"$STATE/mlflow-ui.log" 2>&1 &
         echo $! >"$STATE/mlflow-ui.pid")
        UI="http://127.0.0.1:$MLFLOW_PORT"
        ;;
esac

cat <<MSG

Ray dashboard  http://127.0.0.1:$DASHBOARD_PORT
MLflow UI      $UI   (store $MLFLOW_TRACKING_URI; log $STATE/mlflow-ui.log)
Submit a job from $ROOT:
  RAY_AUTH_MODE=token $VENV/bin/ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- \\
      python jobs/train.py --config configs/smoke.yaml
Stop:          bash infra/start_local.sh stop
MSG
