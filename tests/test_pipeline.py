"""`dvc repro` of the whole pipeline in a temporary git repository, with a tiny budget."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def _run(args, cwd, env, timeout=900):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_dvc_repro_runs_all_stages_then_nothing_then_only_what_changed(repo_root, tiny_params, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "MLproject", "conda.yaml"):
        shutil.copy(repo_root / name, project / name)
    shutil.copytree(repo_root / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(tiny_params["data"]["dir"]), project / "data")
    params = dict(tiny_params)
    params["data"] = {**params["data"], "dir": "data"}
    params["search"].update(storage="sqlite:///optuna.db", study_name="repro", n_trials=2)
    params["search"]["space"] = {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    params["registry"]["model_name"] = "socseg-repro"
    params["mlflow"]["tracking_uri"] = "sqlite:///mlflow.db"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / ".gitignore").write_text("/data\nmlflow.db\noptuna.db\nmlartifacts/\nmlruns/\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], project, env)
    _run(dvc + ["init", "-q"], project, env)
    _run(dvc + ["add", "-q", "data"], project, env)
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-qm", "init"], project, env)

    _run(dvc + ["repro"], project, env)
    metrics = json.loads((project / "metrics.json").read_text())
    assert 0.0 <= metrics["test_mean_iou"] <= 1.0 and "test_iou_ni" in metrics
    # Microstructure of the predicted test slab beside the labels' (voxel units).
    assert 0.0 <= metrics["micro_pred.vf.ni"] <= 1.0
    cm = metrics["confusion_matrix"]
    ni = metrics["class_names"].index("ni")
    assert metrics["micro_true.vf.ni"] == pytest.approx(sum(cm[ni]) / sum(map(sum, cm)), abs=1e-9)
    assert metrics["micro_pred.vf.ni"] == pytest.approx(sum(row[ni] for row in cm) / sum(map(sum, cm)), abs=1e-9)
    assert "micro_true.perc.ni.z" in metrics
    assert metrics["test_ni_fraction_error"] == pytest.approx(abs(metrics["micro_pred.vf.ni"] - metrics["micro_true.vf.ni"]), abs=1e-9)
    registered = json.loads((project / "outputs" / "registered.json").read_text())
    assert registered["promoted"] and registered["version"] == "1"
    env_tracking = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    check = _run([sys.executable, "-c", (
        "from mlflow.tracking import MlflowClient; c = MlflowClient(); "
        "v = c.get_model_version_by_alias('socseg-repro', 'champion'); "
        "print(v.version, v.tags['data_fingerprint'], v.tags['study_name'], v.tags['test_mean_iou'])")],
        project, env_tracking)
    version, fingerprint, study, score = check.split()
    assert version == "1" and study == "repro"
    prepared = json.loads((project / "outputs" / "prepare.json").read_text())
    assert fingerprint == prepared["data_fingerprint"]
    assert float(score) == pytest.approx(metrics["test_mean_iou"], abs=1e-6)

    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-qm", "repro"], project, env)
    second = _run(dvc + ["repro"], project, env)
    assert "up to date" in second.lower()

    # Change one search parameter: only search and what follows are stale, not prepare.
    changed = yaml.safe_load((project / "params.yaml").read_text())
    changed["search"]["n_trials"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    status = _run(dvc + ["status", "--json"], project, env)
    stale = set(json.loads(status))
    assert "search" in stale and "prepare" not in stale
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # dvc exp run -S: a registry-only change reruns just the register stage.
    out = _run(dvc + ["exp", "run", "-S", "registry.model_name=socseg-exp"], project, env)
    assert "Running stage 'register'" in out and "Running stage 'search'" not in out
    champion = _run([sys.executable, "-c", (
        "from mlflow.tracking import MlflowClient; "
        "print(MlflowClient().get_model_version_by_alias('socseg-exp', 'champion').version)")],
        project, env_tracking)
    assert champion.strip() == "1"
