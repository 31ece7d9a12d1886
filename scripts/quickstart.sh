#!/usr/bin/env bash
# Fresh machine -> search, evaluate, register and use a U-Net (params.yaml's train.encoder) on the
# built-in synthetic PXCT phantom. Extra arguments are passed to `mlflow run` (e.g. -P encoder=vgg16,
# -P n_trials=8 -P encoder=all).
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1 TF_CPP_MIN_LOG_LEVEL=2
SOCSEG_NO_TEST=1 SOCSEG_TOOLS= bash scripts/setup_env.sh   # the pipeline only: no test or docs tools
source .venv/bin/activate
# One trial of the default encoder (the from-scratch U-Net), 4 x 40 steps: minutes on 2 CPU cores
# (times per CPU class: benchmarks/results/quickstart*); params.yaml holds the real defaults.
# Precision is chosen from the hardware (train.precision: auto).
mlflow run . --env-manager local -P n_trials=1 -P epochs=4 -P steps_per_epoch=40 \
  "$@"
socseg segment models:/socseg-ni@champion samples/sample/image.tif outputs/sample_segmented.tif --overwrite
echo "Done. Champion: models:/socseg-ni@champion; labels: outputs/sample_segmented.tif"
echo "Browse the runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1"
