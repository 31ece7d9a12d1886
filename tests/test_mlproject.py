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
