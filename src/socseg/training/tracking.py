"""MLflow plumbing shared by training, search and registry: where to track, what code and data were used."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Mapping

import mlflow
import yaml

from socseg.params import Params, typed


def tracking_uri(params: Mapping | Params, explicit: str | None = None) -> str:
    """Where runs and models live: ``explicit``, else ``$MLFLOW_TRACKING_URI`` (``mlflow run`` sets
    it), else params' ``mlflow.tracking_uri``."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or typed(params).mlflow.tracking_uri


def configure_tracking(params: Mapping | Params) -> str:
    """Track to :func:`tracking_uri`, in params' ``mlflow.experiment`` unless MLflow's environment names one."""
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    if not os.environ.get("MLFLOW_EXPERIMENT_ID") and not os.environ.get("MLFLOW_RUN_ID"):
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or typed(params).mlflow.experiment
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
