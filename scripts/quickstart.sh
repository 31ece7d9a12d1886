#!/usr/bin/env bash
# Fresh machine -> one trained, MLflow-tracked VGG16 U-Net on the built-in synthetic PXCT phantom.
# Extra arguments are passed to `mlflow run` (e.g. -P epochs=20 -P encoder=resnet50).
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1 TF_CPP_MIN_LOG_LEVEL=2
bash scripts/setup_env.sh
source .venv/bin/activate
[ -d data/sample ] || socseg data synth sample
# Small budget so the first run takes minutes on a laptop CPU; params.yaml holds the real defaults.
mlflow run . -e train --env-manager local -P encoder=vgg16 -P epochs=3 -P steps_per_epoch=10 "$@"
echo "Done. Browse the run with: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1"
