"""End to end: `mlflow run . -e train --env-manager local` on a tiny phantom, as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient


@pytest.mark.slow
def test_mlflow_run_train_entry_point(repo_root, tiny_params, mlflow_env, tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_EXPERIMENT_NAME"] = "e2e"
    command = [
        sys.executable, "-m", "mlflow", "run", str(repo_root), "-e", "train", "--env-manager", "local",
        "-P", "encoder=vgg16", "-P", "epochs=1", "-P", "steps_per_epoch=2", "-P", "batch_size=2",
        "-P", "tile_size=32", "-P", f"data_dir={tiny_params['data']['dir']}", "-P", "volume=tiny",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["encoder"] == "vgg16"  # logged by `mlflow run`
    assert run.data.params["train.encoder"] == "vgg16"  # logged by socseg
    assert run.data.params["train.epochs"] == "1"
    assert run.data.params["tiles.size"] == "32"
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert 0.0 <= run.data.metrics["test_iou_ni"] <= 1.0
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert any(m.source_run_id == run.info.run_id for m in models)
