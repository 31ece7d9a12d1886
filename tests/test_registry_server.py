"""The lab server with users (``scripts/lab_services.sh`` with ``LAB_AUTH=basic``: ``mlflow server
--app-name socseg-lab``): a reader segments with the champion, a member registers challengers but
cannot move ``champion``, a maintainer (MANAGE on the registered model) can; the admin password
stays out of every file and log."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import own_lab

REPO = Path(__file__).resolve().parents[1]
MODEL = "socseg-ni"
EXPERIMENT = "socseg"
USERS = {"reader": None, "member": "EDIT", "maintainer": "MANAGE"}  # permission on the registered model


@pytest.fixture(scope="module")
def auth_lab(serving_client):
    """A lab of its own with authentication: {"tracking_uri", "dir", "admin_password", "env", ...}."""
    password = secrets.token_urlsafe(16)
    with own_lab(serving_client, prefix="socseg-auth-lab-", LAB_AUTH="basic", LAB_EXPERIMENTS=EXPERIMENT,
                 LAB_MODELS=MODEL, MLFLOW_AUTH_ADMIN_PASSWORD=password) as started:
        assert password not in started["output"]
        yield {**started, "admin_password": password}


@pytest.fixture()
def as_user(auth_lab, monkeypatch):
    """``as_user(name)``: MLflow calls of this process from now on log in as ``name``."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_lab["tracking_uri"])
    mlflow.set_tracking_uri(auth_lab["tracking_uri"])
    passwords = {"admin": auth_lab["admin_password"], **{u: f"{u}-{auth_lab['admin_password'][:8]}" for u in USERS}}

    def login(name: str) -> dict[str, str]:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", passwords[name])
        return {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": passwords[name]}

    login.passwords = passwords
    yield login
    mlflow.set_tracking_uri(None)


@pytest.mark.slow(seconds=60)
def test_roles_reader_segments_member_registers_challengers_only_maintainer_moves_champion(
        auth_lab, as_user, constant_segmenter, tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    from socseg.training.promotion_lock import lock_factory
    from socseg.training.registry import CHALLENGER, CHAMPION, PromotionDenied, register_and_promote

    lock = lock_factory(str(tmp_path / "locks"), auth_lab["tracking_uri"], "", timeout=60)
    as_user("admin")
    admin = get_app_client("basic-auth", tracking_uri=auth_lab["tracking_uri"])
    experiment_id = MlflowClient().get_experiment_by_name(EXPERIMENT).experiment_id
    for user, permission in USERS.items():
        admin.create_user(user, as_user.passwords[user])
        if permission is not None:
            admin.grant_user_permission(user, "experiment", experiment_id, "EDIT")
            admin.grant_user_permission(user, "registered_model", MODEL, permission)

    # No credentials: nothing, not even reading.
    anonymous = subprocess.run([sys.executable, "-c", "from mlflow.tracking import MlflowClient; "
                                f"MlflowClient().get_registered_model({MODEL!r})"],
                               env={**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
                                    "MLFLOW_TRACKING_URI": auth_lab["tracking_uri"]}, capture_output=True, text=True)
    assert anonymous.returncode != 0 and "401" in anonymous.stderr

    # The maintainer registers the first champion: "all rest".
    as_user("maintainer")
    mlflow.set_experiment(EXPERIMENT)
    rest_uri, _ = constant_segmenter("all-rest", ni=False)
    first = register_and_promote(rest_uri, MODEL, 0.5, lambda uri: 0.0, lock)
    assert first.promoted

    # A reader loads the champion and segments a volume with socseg's own command, logged in through
    # MLflow's credentials file (the in-process calls here use its environment variables) ...
    home = tmp_path / "home"
    (home / ".mlflow").mkdir(parents=True)
    credentials = home / ".mlflow" / "credentials"
    credentials.write_text(f"[mlflow]\nmlflow_tracking_username = reader\n"
                           f"mlflow_tracking_password = {as_user.passwords['reader']}\n")
    credentials.chmod(0o600)
    reader_env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
                  "MLFLOW_TRACKING_URI": auth_lab["tracking_uri"], "HOME": str(home)}
    volume = np.random.default_rng(0).integers(20000, 40000, (3, 48, 48)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "scan.tif", volume, photometric="minisblack")
    segmented = subprocess.run([sys.executable, "-m", "socseg.cli", "segment", f"models:/{MODEL}@{CHAMPION}",
                                str(tmp_path / "scan.tif"), str(tmp_path / "labels.tif")],
                               env=reader_env, capture_output=True, text=True, timeout=300)
    assert segmented.returncode == 0, segmented.stderr[-2000:]
    assert (tifffile.imread(tmp_path / "labels.tif") == 0).all()  # "all rest"
    # ... but cannot log a run or register.
    as_user("reader")
    with pytest.raises(MlflowException, match="403|Permission denied"):
        MlflowClient().create_run(experiment_id)
    with pytest.raises(MlflowException, match="403|Permission denied"):
        MlflowClient().set_registered_model_alias(MODEL, CHALLENGER, first.version)

    # A member logs a better model and registers it: it stays challenger, champion does not move.
    as_user("member")
    ni_uri, _ = constant_segmenter("all-ni", ni=True)
    with pytest.raises(PromotionDenied) as denied:
        register_and_promote(ni_uri, MODEL, 0.9, lambda uri: 0.5, lock)
    message = str(denied.value)
    assert "\n" not in message and "MANAGE" in message and "'member'" in message, message
    client = MlflowClient()
    challenger = client.get_model_version_by_alias(MODEL, CHALLENGER)
    assert challenger.version != first.version and challenger.tags["promotion"] == "denied"
    assert client.get_model_version_by_alias(MODEL, CHAMPION).version == first.version
    with pytest.raises(MlflowException, match="needs MANAGE permission"):  # the server's rule, not only socseg's
        client.set_registered_model_alias(MODEL, CHAMPION, challenger.version)
    with pytest.raises(MlflowException, match="403"):  # deleting an alias needs more than EDIT in basic-auth itself
        client.delete_registered_model_alias(MODEL, CHAMPION)
    client.set_registered_model_alias(MODEL, CHALLENGER, challenger.version)  # EDIT suffices for challenger

    # The maintainer moves champion.
    as_user("maintainer")
    MlflowClient().set_registered_model_alias(MODEL, CHAMPION, challenger.version)
    assert MlflowClient().get_model_version_by_alias(MODEL, CHAMPION).version == challenger.version

    # The admin password is in no file of the lab's folder and no log.
    for path in auth_lab["dir"].rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert auth_lab["admin_password"].encode() not in path.read_bytes(), path
