"""`dvc repro` of the whole pipeline in a temporary git repository, with a tiny budget."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml


@pytest.mark.slow(seconds=70)
def test_dvc_repro_runs_all_stages_then_nothing_then_only_what_changed(repo_root, tiny_params, tmp_path, run_checked):
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
    params["synth"]["check_against"] = ""  # this project's data.dvc versions the tiny volume, not the sample
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / ".gitignore").write_text("/data\nmlflow.db\noptuna.db\nmlartifacts/\nmlruns/\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    dvc = [sys.executable, "-m", "dvc"]
    run_checked(["git", "init", "-q"], project, env)
    run_checked(dvc + ["init", "-q"], project, env)
    run_checked(dvc + ["add", "-q", "data"], project, env)
    run_checked(["git", "add", "-A"], project, env)
    run_checked(["git", "commit", "-qm", "init"], project, env)

    run_checked(dvc + ["repro"], project, env)
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
    check = run_checked([sys.executable, "-c", (
        "from mlflow.tracking import MlflowClient; c = MlflowClient(); "
        "v = c.get_model_version_by_alias('socseg-repro', 'champion'); "
        "print(v.version, v.tags['data_fingerprint'], v.tags['study_name'], v.tags['test_mean_iou'])")],
        project, env_tracking)
    version, fingerprint, study, score = check.split()
    assert version == "1" and study == "repro"
    # `socseg prepare` (no stage: the stages compute the same split) writes the split and fingerprint to inspect
    run_checked([sys.executable, "-m", "socseg.cli", "prepare", "--out", str(tmp_path / "prepare.json")], project, env)
    prepared = json.loads((tmp_path / "prepare.json").read_text())
    assert fingerprint == prepared["data_fingerprint"]
    assert float(score) == pytest.approx(metrics["test_mean_iou"], abs=1e-6)

    # One scoring path: `socseg evaluate --json`, the evaluate stage's metrics.json and the accuracy
    # benchmark give identical per-class IoU for the same model and test slab.
    start, stop = prepared["volumes"]["tiny"]["test"]
    cli = json.loads(run_checked([sys.executable, "-m", "socseg.cli", "evaluate", metrics["model_uri"], "data/tiny",
                           "--slices", f"{start}:{stop}", "--json"], project, env_tracking))
    bench = json.loads(run_checked([sys.executable, "-c", (
        f"import json, sys; sys.path.insert(0, {str(repo_root / 'benchmarks')!r}); import accuracy; "
        f"setting = accuracy.Setting('slab', None, ['tiny'], {{}}, [(accuracy.Path('data/tiny'), ({start}, {stop}))]); "
        f"print(json.dumps(accuracy.score_model({metrics['model_uri']!r}, setting, 'ni').scores))")],
        project, env_tracking).strip().splitlines()[-1])
    for name in metrics["class_names"]:
        assert cli[f"iou_{name}"] == metrics[f"test_iou_{name}"] == bench[f"iou_{name}"], name
    assert cli["confusion"] == metrics["confusion_matrix"]

    run_checked(["git", "add", "-A"], project, env)
    run_checked(["git", "commit", "-qm", "repro"], project, env)
    second = run_checked(dvc + ["repro"], project, env)
    assert "up to date" in second.lower()

    # Each stage depends on its own code: an edit of the report code reruns the evaluate stage
    # (it writes the report), not the search (training measures microstructure, not reports).
    analysis = project / "src" / "socseg" / "analysis" / "report.py"
    original = analysis.read_text()
    analysis.write_text(original + "\n# edited\n")
    stale = set(json.loads(run_checked(dvc + ["status", "--json"], project, env)))
    assert "evaluate" in stale and "search" not in stale and "sample" not in stale
    analysis.write_text(original)

    # Change one search parameter: only search and what follows are stale, not the sample before it.
    changed = yaml.safe_load((project / "params.yaml").read_text())
    changed["search"]["n_trials"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    status = run_checked(dvc + ["status", "--json"], project, env)
    stale = set(json.loads(status))
    assert "search" in stale and "sample" not in stale
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # dvc exp run -S: a registry-only change reruns just the register stage.
    out = run_checked(dvc + ["exp", "run", "-S", "registry.model_name=socseg-exp"], project, env)
    assert "Running stage 'register'" in out and "Running stage 'search'" not in out
    champion = run_checked([sys.executable, "-c", (
        "from mlflow.tracking import MlflowClient; "
        "print(MlflowClient().get_model_version_by_alias('socseg-exp', 'champion').version)")],
        project, env_tracking)
    assert champion.strip() == "1"


@pytest.mark.slow
def test_dvc_repro_is_the_first_command_of_a_fresh_clone(repo_root, tmp_path, run_checked):
    """No data, no stores: `dvc repro sample` makes the built-in sample (checked against data.dvc), which the
    search stage then reads."""
    project = tmp_path / "clone"
    run_checked(["git", "clone", "-q", str(repo_root), str(project)], tmp_path, dict(os.environ))
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):  # the working tree's versions, committed or not
        shutil.copy(repo_root / name, project / name)
    shutil.rmtree(project / "src")
    shutil.copytree(repo_root / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    assert not (project / "samples").exists() and not (project / "data").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = run_checked([sys.executable, "-m", "dvc", "repro", "sample"], project, env)
    assert "Running stage 'sample'" in out
    plan = run_checked([sys.executable, "-m", "dvc", "repro", "--dry", "search"], project, env)
    assert "Running stage 'search'" in plan and "Running stage 'sample'" not in plan  # the sample is made: search is next
    run_checked([sys.executable, "-m", "socseg.cli", "prepare", "--out", "outputs/prepare.json"], project, env)
    prepared = json.loads((project / "outputs" / "prepare.json").read_text())
    assert list(prepared["volumes"]) == ["sample"]  # what the search stage reads: the built-in sample alone
    # The generated sample is the one data.dvc versions, byte for byte.
    from socseg.data.synth import dvc_dir_md5, recorded_dvc_md5

    files = {f"sample/{p.name}": p for p in (project / "samples" / "sample").iterdir() if p.is_file()}
    assert dvc_dir_md5(files) == recorded_dvc_md5(project / "data.dvc")
