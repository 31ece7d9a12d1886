"""The MLproject: its entry points run end to end (`mlflow run . --env-manager local`, as a user
runs them), and every parameter is a params.yaml setting."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
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


# Where each MLproject parameter lands in params.yaml (the schema in socseg.params). A parameter
# that maps to nothing, or to a field the schema does not have, fails here.
MLPROJECT_TO_PARAMS = {
    "tile_size": "tiles.size", "steps_per_epoch": "tiles.steps_per_epoch", "data_dir": "data.dir",
    "n_trials": "search.n_trials", "timeout": "search.timeout", "study_name": "search.study_name",
    "storage": "search.storage", "model_name": "registry.model_name", "volume": "data.volumes",
}


def _schema_field(dotted: str):
    import dataclasses
    import typing

    from socseg.params import Params

    section, name = dotted.split(".")
    cls = typing.get_type_hints(Params)[section]
    return {f.name: f for f in dataclasses.fields(cls)}.get(name)


def test_every_mlproject_parameter_is_a_params_yaml_setting(repo_root):
    import yaml

    project = yaml.safe_load((repo_root / "MLproject").read_text())
    for entry in ("main", "train"):
        for name, spec in project["entry_points"][entry]["parameters"].items():
            dotted = MLPROJECT_TO_PARAMS.get(name, f"train.{name}")
            assert _schema_field(dotted) is not None, f"MLproject {entry}.{name} -> {dotted}: not in the schema"
            assert spec["default"] == "", f"{entry}.{name}: a default besides params.yaml's"


def test_cli_choices_are_the_schema_constants():
    import click

    from socseg.cli import main
    from socseg.params import ENCODERS, LOSSES, PRECISIONS, TASKS, AUTO

    expected = {"encoder": list(ENCODERS), "task": list(TASKS), "loss": list(LOSSES), "precision": [AUTO, *PRECISIONS]}
    train = main.commands["train"]
    seen = set()
    for option in train.params:
        inner = getattr(option.type, "inner", option.type)
        if isinstance(inner, click.Choice):
            field = _schema_field(f"train.{option.name}")
            assert field is not None and list(inner.choices) == list(field.metadata["choices"]), option.name
            if option.name in expected:
                assert list(inner.choices) == expected[option.name]
                seen.add(option.name)
    assert seen == set(expected)
    given_nothing = train.make_context("train", [], resilient_parsing=True).params
    own_defaults = {k: v for k, v in given_nothing.items() if v not in (None, ())}
    assert not own_defaults, f"options with a default of their own (params.yaml is the only place): {own_defaults}"
    # Every train.* setting can be set from the command line.
    names = {o.name for o in train.params}
    import dataclasses

    from socseg.params import TrainParams

    assert {f.name for f in dataclasses.fields(TrainParams)} <= names
    search = {o.name: getattr(o.type, "inner", o.type) for o in main.commands["search"].params}
    assert list(search["encoder"].choices) == [*ENCODERS, "all"]


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


@pytest.mark.slow(seconds=165)
def test_mlproject_main_trains_what_each_invocation_asks_for(repo_root, tiny_params, tmp_path, run_checked):
    """`mlflow run . -P encoder=unet`, then vgg16, then task=phases in one store; then the first again."""
    project = tmp_path / "project"
    _tiny_project(repo_root, tiny_params, project)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    mlflow = [sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "socseg"]

    def invoke(*args):
        out = run_checked(mlflow + [a for pair in args for a in ("-P", pair)], project, env)
        search = json.loads((project / "outputs" / "search.json").read_text())
        registered = json.loads((project / "outputs" / "registered.json").read_text())
        return out, search, registered

    def version_tags(name, version):
        code = ("import json, sys; from mlflow.tracking import MlflowClient; c = MlflowClient(); "
                f"v = c.get_model_version('{name}', '{version}'); "
                f"ch = c.get_registered_model('{name}').aliases.get('champion'); "
                "print(json.dumps({'tags': v.tags, 'champion': str(ch)}))")
        return json.loads(run_checked([sys.executable, "-c", code], project, env).strip().splitlines()[-1])

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
