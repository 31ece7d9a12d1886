"""The study's storage rides out database outages; a search survives its services restarting.

The unit tests break a SQLite storage's connection on purpose; the fault drills restart the real
PostgreSQL or the real ``mlflow server`` of a lab of their own (``lab_services.sh restart``, the
service kept down for a few seconds) while a ``socseg search`` worker is in the middle of a trial.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import own_lab

N_TRIALS = 3
DOWN_SECONDS = 6


def _connection_lost() -> Exception:
    from sqlalchemy import exc

    return exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


def test_unreachable_tells_connection_failures_from_refused_statements():
    import optuna
    from sqlalchemy import exc

    from socseg.training.study_storage import unreachable

    wrapped = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    wrapped.__cause__ = _connection_lost()
    assert unreachable(wrapped)
    invalidated = exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
    assert unreachable(invalidated)
    refused = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    refused.__cause__ = exc.IntegrityError("INSERT", {}, Exception("duplicate key"))
    assert not unreachable(refused)
    assert not unreachable(ValueError("bad value"))


def test_calls_are_retried_through_an_outage_and_other_errors_raise_at_once(tmp_path, monkeypatch, capsys):
    import optuna
    from sqlalchemy import exc

    from socseg.training import study_storage
    from socseg.training.study_storage import OutageTolerantStorage

    monkeypatch.setattr(study_storage.time, "sleep", lambda seconds: None)
    storage = OutageTolerantStorage(f"sqlite:///{tmp_path / 'study.db'}", outage_seconds=60)
    study_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    real = optuna.storages.RDBStorage.create_new_trial
    failures = iter([_connection_lost(), _connection_lost()])

    def create_new_trial(self, *args, **kwargs):  # fails twice as if the server were restarting
        error = next(failures, None)
        if error is not None:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(optuna.storages.RDBStorage, "create_new_trial", create_new_trial)
    monkeypatch.setattr(OutageTolerantStorage, "create_new_trial",
                        study_storage._tolerant(optuna.storages.RDBStorage.create_new_trial))
    trial_id = storage.create_new_trial(study_id)
    assert [t._trial_id for t in storage.get_all_trials(study_id)] == [trial_id]  # one trial, not three
    err = capsys.readouterr().err
    assert "is unreachable (server closed the connection unexpectedly); retrying create_new_trial" in err
    assert "answers again; create_new_trial done" in err

    def create_new_trial(self, *args, **kwargs):  # noqa: F811 (the database refuses the statement)
        raise exc.IntegrityError("INSERT", {}, Exception("duplicate key"))

    monkeypatch.setattr(optuna.storages.RDBStorage, "create_new_trial", create_new_trial)
    monkeypatch.setattr(OutageTolerantStorage, "create_new_trial",
                        study_storage._tolerant(optuna.storages.RDBStorage.create_new_trial))
    with pytest.raises(exc.IntegrityError):
        storage.create_new_trial(study_id)
    assert "retrying" not in capsys.readouterr().err


def test_an_outage_longer_than_the_grace_period_fails_with_a_message_naming_the_database(tmp_path, monkeypatch):
    import optuna

    from socseg.training import study_storage
    from socseg.training.study_storage import OutageTolerantStorage

    clock = iter(range(0, 10_000, 7))
    monkeypatch.setattr(study_storage.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(study_storage.time, "sleep", lambda seconds: None)
    storage = OutageTolerantStorage(f"sqlite:///{tmp_path / 'study.db'}", outage_seconds=30,
                                    redacted_url="postgresql+psycopg2://socseg:***@db:5432/optuna")

    def get_all_studies(self, *args, **kwargs):  # the server never comes back
        raise optuna.exceptions.StorageInternalError("commit") from _connection_lost()

    monkeypatch.setattr(OutageTolerantStorage, "get_all_studies", study_storage._tolerant(get_all_studies))
    with pytest.raises(optuna.exceptions.StorageInternalError,
                       match=r"postgresql\+psycopg2://socseg:\*\*\*@db:5432/optuna stayed unreachable for 30 s"):
        storage.get_all_studies()


@pytest.fixture(scope="module")
def fault_lab(serving_client):
    """A lab of its own (the session's shared one must not restart under other tests)."""
    with own_lab(serving_client, prefix="socseg-fault-lab-", LAB_RESTART_DOWN=str(DOWN_SECONDS)) as started:
        yield started


def _search_command(params_file: Path, lab: dict, study_name: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "socseg.cli", "search", "--params", str(params_file), "--encoder", "unet",
            "--storage", lab["storage"], "--study-name", study_name, "--n-trials", str(N_TRIALS), "--out", str(out)]


@pytest.mark.slow(seconds=120)
@pytest.mark.parametrize("service", ["postgres", "mlflow"])
def test_a_search_goes_on_through_a_restart_and_its_rerun_resumes_without_losing_a_trial(
        service, fault_lab, tiny_params, tmp_path, monkeypatch):
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    tag = uuid.uuid4().hex[:8]
    study_name = experiment = f"fault-{service}-{tag}"
    params = tiny_params
    params["train"]["epochs"] = 4  # several reports per trial, and trials outlast the outage
    params["tiles"]["steps_per_epoch"] = 6
    params["search"].update(n_trials=N_TRIALS, study_name=study_name, storage=fault_lab["storage"])
    params["search"]["space"] = {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    params["search"]["pruner"]["n_startup_trials"] = N_TRIALS  # no pruning: every trial trains all epochs
    params["mlflow"]["experiment"] = experiment
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    for key, value in fault_lab["env"].items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(fault_lab["tracking_uri"])
    experiment_id = client.create_experiment(experiment)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=fault_lab["tracking_uri"], **fault_lab["env"],
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    command = _search_command(params_file, fault_lab, study_name, tmp_path / "search.json")

    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Mid-trial: the first trial has reported an epoch, so its process holds pooled connections
        # to the database and a running MLflow run.
        deadline = time.time() + 240
        while True:
            assert worker.poll() is None, f"the worker exited early:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"no trial reported an epoch:\n{log_path.read_text()[-3000:]}"
            try:
                trials = optuna.load_study(study_name=study_name, storage=fault_lab["storage"]).trials
            except KeyError:  # the study is not created yet
                trials = []
            if any(t.state == TrialState.RUNNING and t.intermediate_values for t in trials):
                break
            time.sleep(0.5)
        fault_lab["restart"](service)
        assert worker.poll() is None, f"the search ended before the {service} came back:\n{log_path.read_text()[-3000:]}"
        worker.wait(timeout=420)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
    output = log_path.read_text(errors="replace")
    assert worker.returncode == 0, f"the search did not survive the {service} restart:\n{output[-4000:]}"

    # No trial lost: N finished trials numbered 0..N-1, each with its finished MLflow run.
    study = optuna.load_study(study_name=study_name, storage=fault_lab["storage"])
    trials = study.trials
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
    assert sorted(t.number for t in trials) == list(range(N_TRIALS))
    for trial in trials:
        run = client.get_run(trial.user_attrs["run_id"])
        assert run.info.status == "FINISHED" and run.info.experiment_id == experiment_id
        assert "val_mean_iou" in run.data.metrics

    # The next run of the same command resumes the complete study: no new trial, the same best.
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    again = optuna.load_study(study_name=study_name, storage=fault_lab["storage"])
    assert len(again.trials) == N_TRIALS and again.best_trial.number == study.best_trial.number
