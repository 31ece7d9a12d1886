"""`dvc repro` of the whole pipeline in a temporary git repository, with a tiny budget."""

import copy
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
    params["synth"]["check_against"] = ""  # this project's data.dvc versions the tiny volume, not the sample
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

    # One scoring path: `socseg evaluate --json`, the evaluate stage's metrics.json and the accuracy
    # benchmark give identical per-class IoU for the same model and test slab.
    start, stop = prepared["volumes"]["tiny"]["test"]
    cli = json.loads(_run([sys.executable, "-m", "socseg.cli", "evaluate", metrics["model_uri"], "data/tiny",
                           "--slices", f"{start}:{stop}", "--json"], project, env_tracking))
    bench = json.loads(_run([sys.executable, "-c", (
        f"import json, sys; sys.path.insert(0, {str(repo_root / 'benchmarks')!r}); import accuracy; "
        f"setting = accuracy.Setting('slab', None, ['tiny'], {{}}, [(accuracy.Path('data/tiny'), ({start}, {stop}))]); "
        f"print(json.dumps(accuracy.score_model({metrics['model_uri']!r}, setting, 'ni').scores))")],
        project, env_tracking).strip().splitlines()[-1])
    for name in metrics["class_names"]:
        assert cli[f"iou_{name}"] == metrics[f"test_iou_{name}"] == bench[f"iou_{name}"], name
    assert cli["confusion"] == metrics["confusion_matrix"]

    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-qm", "repro"], project, env)
    second = _run(dvc + ["repro"], project, env)
    assert "up to date" in second.lower()

    # Each stage depends on its own code: an edit of the microstructure code reruns the evaluate
    # stage (it reports microstructure numbers), not the search.
    analysis = project / "src" / "socseg" / "analysis" / "microstructure.py"
    original = analysis.read_text()
    analysis.write_text(original + "\n# edited\n")
    stale = set(json.loads(_run(dvc + ["status", "--json"], project, env)))
    assert "evaluate" in stale and "search" not in stale and "prepare" not in stale
    analysis.write_text(original)

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


def _tiny_project(repo_root, tiny_params, project: Path) -> dict:
    """The repository's MLproject + code in ``project`` with a tiny params.yaml and the tiny phantom."""
    project.mkdir()
    for name in ("dvc.yaml", "MLproject", "conda.yaml", "data.dvc"):
        shutil.copy(repo_root / name, project / name)
    shutil.copytree(repo_root / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(tiny_params["data"]["dir"]), project / "data")
    params = copy.deepcopy(tiny_params)
    params["data"]["dir"] = "data"
    params["search"].update(storage="sqlite:///optuna.db", n_trials=1)
    params["search"]["space"] = {"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    params["mlflow"]["tracking_uri"] = "sqlite:///mlflow.db"
    params["tiles"]["size"] = 32
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


@pytest.mark.slow
def test_mlproject_main_trains_what_each_invocation_asks_for(repo_root, tiny_params, tmp_path):
    """`mlflow run . -P encoder=unet`, then vgg16, then task=phases in one store; then the first again."""
    project = tmp_path / "project"
    _tiny_project(repo_root, tiny_params, project)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    mlflow = [sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "socseg"]

    def invoke(*args):
        out = _run(mlflow + [a for pair in args for a in ("-P", pair)], project, env)
        search = json.loads((project / "outputs" / "search.json").read_text())
        registered = json.loads((project / "outputs" / "registered.json").read_text())
        return out, search, registered

    def version_tags(name, version):
        code = ("import json, sys; from mlflow.tracking import MlflowClient; c = MlflowClient(); "
                f"v = c.get_model_version('{name}', '{version}'); "
                f"ch = c.get_registered_model('{name}').aliases.get('champion'); "
                "print(json.dumps({'tags': v.tags, 'champion': str(ch)}))")
        return json.loads(_run([sys.executable, "-c", code], project, env).strip().splitlines()[-1])

    unet_out, unet_search, unet_reg = invoke("encoder=unet")
    assert "trained 1 trial(s) now" in unet_out and unet_search["best_encoder"] == "unet"
    assert unet_reg["name"] == "socseg-ni" and unet_reg["promoted"]
    assert {"encoder": "unet", "task": "ni"}.items() <= version_tags("socseg-ni", unet_reg["version"])["tags"].items()

    vgg_out, vgg_search, vgg_reg = invoke("encoder=vgg16")
    assert "trained 1 trial(s) now" in vgg_out and vgg_search["best_encoder"] == "vgg16"
    assert vgg_search["study_name"] != unet_search["study_name"]
    assert vgg_reg["name"] == "socseg-ni" and vgg_reg["version"] != unet_reg["version"]
    vgg = version_tags("socseg-ni", vgg_reg["version"])
    assert vgg["tags"]["encoder"] == "vgg16" and vgg["tags"]["task"] == "ni"
    # The gate decided on the re-evaluated unet champion: whichever won, the champion's tags are its own.
    assert vgg["champion"] == (vgg_reg["version"] if vgg_reg["promoted"] else unet_reg["version"])
    assert vgg_reg["champion_score_before"] is not None

    phases_out, phases_search, phases_reg = invoke("encoder=unet", "task=phases")
    assert "trained 1 trial(s) now" in phases_out and phases_search["study_name"].startswith("socseg-phases-unet-")
    assert phases_reg["name"] == "socseg-phases" and phases_reg["promoted"] and phases_reg["version"] == "1"
    phases = version_tags("socseg-phases", phases_reg["version"])
    assert phases["tags"]["task"] == "phases" and phases["tags"]["encoder"] == "unet" and phases["champion"] == "1"
    metrics = json.loads((project / "metrics.json").read_text())
    assert {"test_iou_pore", "test_iou_ysz", "test_iou_ni"} <= set(metrics)  # scored as a 3-phase model

    champion_before = version_tags("socseg-ni", vgg_reg["version"])["champion"]
    again_out, again_search, again_reg = invoke("encoder=unet")
    assert "trained 0 trial(s) now" in again_out
    assert again_search["study_name"] == unet_search["study_name"]
    assert again_search["best_run_id"] == unet_search["best_run_id"]
    assert again_reg["already_registered"] and again_reg["version"] == unet_reg["version"]
    assert version_tags("socseg-ni", unet_reg["version"])["champion"] == champion_before  # nothing moved


@pytest.mark.slow
def test_dvc_repro_is_the_first_command_of_a_fresh_clone(repo_root, tmp_path):
    """No data, no stores: `dvc repro prepare` makes the built-in sample (checked against data.dvc) and prepares it."""
    project = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo_root), str(project)], tmp_path, dict(os.environ))
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):  # the working tree's versions, committed or not
        shutil.copy(repo_root / name, project / name)
    shutil.rmtree(project / "src")
    shutil.copytree(repo_root / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    assert not (project / "samples").exists() and not (project / "data").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = _run([sys.executable, "-m", "dvc", "repro", "prepare"], project, env)
    assert "Running stage 'sample'" in out and "Running stage 'prepare'" in out
    prepared = json.loads((project / "outputs" / "prepare.json").read_text())
    assert list(prepared["volumes"]) == ["sample"]
    # The generated sample is the one data.dvc versions, byte for byte.
    from socseg.data.synth import dvc_dir_md5, recorded_dvc_md5

    files = {f"sample/{p.name}": p for p in (project / "samples" / "sample").iterdir() if p.is_file()}
    assert dvc_dir_md5(files) == recorded_dvc_md5(project / "data.dvc")
