#!/usr/bin/env bash
# What `make demo` runs: get CIFAR-10, train the smoke preset with 2 Ray workers (adversarial
# training, then a final evaluation: clean, PGD-20 transfer, EOT-PGD), fan a small attack
# evaluation out over Ray tasks (jobs/evaluate.py), and say where to look.
#
#   make demo                                  # downloads CIFAR-10 once into data/ (offline: synthetic images)
#   RNA_DATA_DIR=/path/with/parquet make demo  # offline: a folder with train.parquet/test.parquet
#   bash infra/demo.sh --set train.epochs=3    # extra arguments go to jobs/train.py
#
# A few minutes on 2 CPU cores. Ray is started by the job itself (local, stopped at the end);
# the MLflow store is mlflow.db + mlruns/ in the repository.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
if [ ! -x "$PY" ] || [ ! -f "$ROOT/.venv/.installed" ]; then
    echo "demo: installing into .venv (once) ..."
    make -C "$ROOT" install
fi

if [ -n "${RNA_DATA_DIR:-}" ]; then
    DATA="$(cd "$RNA_DATA_DIR" 2>/dev/null && pwd || true)"
    if [ -z "$DATA" ] || [ ! -f "$DATA/train.parquet" ] || [ ! -f "$DATA/test.parquet" ]; then
        echo "demo: RNA_DATA_DIR=$RNA_DATA_DIR has no train.parquet and test.parquet; write them with" \
             "'python jobs/prepare_data.py --dataset cifar10 --out DIR' on a machine with internet" >&2
        exit 2
    fi
else
    DATA="$ROOT/data/cifar10"
    if [ ! -f "$DATA/train.parquet" ] || [ ! -f "$DATA/test.parquet" ]; then
        echo "demo: downloading CIFAR-10 and writing Parquet files to $DATA (once) ..."
        if ! "$PY" jobs/prepare_data.py --dataset cifar10 --out "$DATA" --root "$ROOT/data"; then
            DATA=""
            echo "demo: no CIFAR-10 here (offline?), so this demo runs on SYNTHETIC images: the pipeline is real," \
                 "the accuracies mean nothing. For real data: RNA_DATA_DIR=/folder/with/parquet make demo" >&2
        fi
    fi
fi
if [ -n "$DATA" ]; then
    DATA_ARGS=(--set "data.data_dir=$DATA")
else
    DATA="synthetic images"
    DATA_ARGS=(--set data.dataset=synthetic --set data.synthetic_size=4096)
fi

echo "demo: training configs/smoke.yaml with 2 workers on $DATA"
unset RAY_ADDRESS
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
"$PY" jobs/train.py --config configs/smoke.yaml --set ray.num_workers=2 "${DATA_ARGS[@]}" "$@" | tee "$LOG"
RUN_ID="$(awk '$1 == "mlflow" && $2 == "run" {print $3}' "$LOG" | tail -n 1)"
EXP_URL="$(awk '$1 == "then" && $2 == "open" {print $3}' "$LOG" | tail -n 1)"

echo
echo "demo: evaluating the run's MLflow model runs:/$RUN_ID/model on 256 test images (paper protocol 'transfer'" \
     "beside 'eot') as Ray tasks"
"$PY" jobs/evaluate.py --model-uri "runs:/$RUN_ID/model" --attacks fgsm,pgd20,mifgsm,eot_pgd --protocols transfer,eot \
    --limit 256 --eot-iter 4 "${DATA_ARGS[@]}"

BASE="${RNA_BASE_DIR:-$ROOT}"
STORE="${MLFLOW_TRACKING_URI:-sqlite:///$BASE/mlflow.db}"
cat <<MSG

demo: finished. Where to look:
  - the lines above: per-epoch loss/accuracy, final clean / PGD-20 (transfer) / EOT-PGD accuracy,
    the MLflow run id and the checkpoint path
  - MLflow UI:   MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui --workers 1 --host 127.0.0.1 --backend-store-uri $STORE
                 then open ${EXP_URL:-http://127.0.0.1:5000} (experiment 'rna-smoke', model training view: params,
                 metrics per epoch, datasets, system metrics, the logged model, config, checkpoint, model card)
  - the model in a notebook: mlflow.pytorch.load_model("runs:/$RUN_ID/model")  (a fresh path every forward)
  - checkpoints: $BASE/ray_results/
  - a paper run: .venv/bin/python jobs/train.py --config configs/paper_resnet18_cifar10.yaml   (GPUs; or via ray job submit)
MSG
if [ "$DATA" = "synthetic images" ]; then
    echo "demo: this run used SYNTHETIC images (no CIFAR-10 here); its accuracies say nothing about robustness."
fi
