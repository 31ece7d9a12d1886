"""MLflow plumbing shared by training, search and registry: where to track, what data was used."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Iterable, Mapping

import mlflow
import yaml


def configure_tracking(params: Mapping) -> str:
    """Use ``$MLFLOW_TRACKING_URI`` if set (``mlflow run`` sets it), else params' ``mlflow.tracking_uri``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.get("mlflow", {}).get("tracking_uri", "sqlite:///mlflow.db")
    mlflow.set_tracking_uri(uri)
    if not os.environ.get("MLFLOW_EXPERIMENT_ID") and not os.environ.get("MLFLOW_RUN_ID"):
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or params.get("mlflow", {}).get("experiment", "socseg")
        # Set by id as well: when two workers create the experiment at once, set_experiment(name)
        # can return for the loser without activating it, and its runs would land in "Default".
        experiment = mlflow.set_experiment(name)
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return uri


def dvc_data_md5(dvc_file: str | Path = "data.dvc") -> str | None:
    """The md5 DVC recorded for ``data/`` (None where there is no .dvc file)."""
    path = Path(dvc_file)
    if not path.is_file():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def volumes_fingerprint(checksums: Iterable[Mapping[str, str]]) -> str:
    """One sha256 over the stored-file checksums of the volumes used: the data version of a run."""
    digest = hashlib.sha256()
    for entry in checksums:
        digest.update(json.dumps(dict(sorted(entry.items())), sort_keys=True).encode())
    return digest.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def flat_params(params: Mapping, prefix: str = "") -> dict[str, str]:
    """Flatten a nested params dict to ``section.key`` strings (MLflow params are flat)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_params(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


def pinned_requirements() -> list[str]:
    """Pinned runtime packages of this environment (skips MLflow's slow requirement inference).

    socseg itself is not on PyPI; the segmenter carries its code (``code_paths``), so these are
    all a serving environment needs besides it.
    """
    from importlib.metadata import PackageNotFoundError, version

    import keras

    names = ["mlflow", "keras", "numpy", "pandas", "tifffile", "pyyaml"]
    names += {"tensorflow": ["tensorflow-cpu", "tensorflow"], "jax": ["jax", "jaxlib"]}.get(keras.backend.backend(), [])
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return pins


@contextlib.contextmanager
def _keras_input_example_fix():
    """Work around mlflow/mlflow#16183 (open in 3.17.2): ``mlflow.keras.save_model`` writes the
    input example before it creates the model folder and fails with FileNotFoundError."""
    import mlflow.keras.save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model, input_example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, input_example, path, *args, **kwargs)

    keras_save._save_example = save_example
    try:
        yield
    finally:
        keras_save._save_example = original


def log_keras_model(model, signature, input_example, metadata: Mapping | None = None, name: str = "model"):
    """``mlflow.keras.log_model`` with signature and input example; returns the ModelInfo."""
    import mlflow.keras

    with _keras_input_example_fix():
        return mlflow.keras.log_model(
            model, name=name, signature=signature, input_example=input_example, metadata=dict(metadata or {}),
            pip_requirements=pinned_requirements(),
        )
