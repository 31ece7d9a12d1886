"""Scale-out: two search workers on one study in a real PostgreSQL, logging to a real `mlflow server`.

The services are conftest's ``lab`` fixture: ``SOCSEG_TEST_PG_URL`` / ``SOCSEG_TEST_MLFLOW_URI`` when
set (``.ci/run`` starts them), otherwise ``scripts/lab_services.sh`` on free loopback ports.
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

REPO = Path(__file__).resolve().parents[1]
N_TRIALS = 4  # study-wide target: 2-3 trials per worker (~25 s each here when both run)
WORKERS = 2


@pytest.fixture()
def reset_tracking_uri():
    """This test points MLflow's process-wide tracking URI at a server that stops after it."""
    yield
    import mlflow

    mlflow.set_tracking_uri(None)


def _wait_all(workers, deadline: float) -> None:
    """Wait for every worker until ``deadline``; kill the stragglers' process groups past it."""
    try:
        for worker, _ in workers:
            worker.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for worker, _ in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)


@pytest.mark.slow(seconds=40)
def test_two_workers_share_one_study_and_one_register_step_promotes(lab, tiny_params, tmp_path, monkeypatch,
                                                                    reset_tracking_uri):
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    tag = uuid.uuid4().hex[:8]
    study_name, experiment, model_name = f"scaleout-{tag}", f"scaleout-{tag}", f"socseg-scaleout-{tag}"
    params = tiny_params
    params["search"].update(n_trials=N_TRIALS, study_name=study_name, storage=lab["storage"])
    params["search"]["space"] = {
        "train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "train.loss": {"type": "categorical", "choices": ["ce", "ce_dice"]},
    }
    params["mlflow"]["experiment"] = experiment
    params["registry"]["model_name"] = model_name
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    for key, value in lab["env"].items():  # PGPASSFILE: read by libpq in this process too
        monkeypatch.setenv(key, value)
    client = MlflowClient(lab["tracking_uri"])
    # Created before the workers start, as lab_services.sh does for the lab's experiments:
    # MLflow's set_experiment loses the active experiment when two processes create one name at once.
    experiment_id = client.create_experiment(experiment)

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=lab["tracking_uri"],
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    workers = []
    started = time.time()
    for number in range(WORKERS):
        log = open(tmp_path / f"worker{number}.log", "wb")
        command = [sys.executable, "-m", "socseg.cli", "search", "--params", str(params_file), "--encoder", "unet",
                   "--storage", lab["storage"], "--study-name", study_name, "--n-trials", str(N_TRIALS),
                   "--out", str(tmp_path / f"worker{number}.json")]
        workers.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True), log))
    _wait_all(workers, deadline=started + 240)
    for number, (worker, log) in enumerate(workers):
        log.close()
        output = (tmp_path / f"worker{number}.log").read_text(errors="replace")
        assert worker.returncode == 0, f"worker {number} exited {worker.returncode}:\n{output[-4000:]}"
    print(f"{WORKERS} workers, {N_TRIALS} trials: {time.time() - started:.0f} s")

    # Optuna: one study, every trial finished once, numbers 0..n-1 without gaps or duplicates.
    study = optuna.load_study(study_name=study_name, storage=lab["storage"])
    trials = study.trials
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    # MaxTrialsCallback is checked per worker after its own trial: at most WORKERS - 1 extra trials.
    assert N_TRIALS <= len(trials) <= N_TRIALS + WORKERS - 1
    by_worker = {t.user_attrs["worker"] for t in trials}
    assert len(by_worker) == WORKERS, f"not every worker ran a trial: {by_worker}"

    # MLflow: one parent run per worker, each trial's child run under its worker's parent.
    runs = client.search_runs([experiment_id], filter_string=f"tags.optuna_study = '{study_name}'", max_results=1000)
    parents = {r.data.tags["search_worker"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert set(parents) == by_worker
    assert all(p.info.status == "FINISHED" and p.info.run_name.startswith(f"search {study_name} @ ")
               for p in parents.values())
    assert len(children) == len(trials)
    for trial in trials:
        run = client.get_run(trial.user_attrs["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["optuna_trial"] == str(trial.number)
        assert run.data.tags["search_worker"] == trial.user_attrs["worker"]
        assert run.data.tags["mlflow.parentRunId"] == parents[trial.user_attrs["worker"]].info.run_id
    assert not client.search_registered_models(f"name = '{model_name}'")  # workers never register

    # The one register step, after all workers: summarise the finished study (no new trial), then
    # the real evaluate and register stages (what `socseg evaluate-best` / `socseg register` run).
    from socseg.training.pipeline import evaluate_best, register
    from socseg.training.registry import CHAMPION
    from socseg.training.search import run_search, write_result

    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", lab["tracking_uri"])
    result = run_search(params, encoder="unet")
    assert len(optuna.load_study(study_name=study_name, storage=lab["storage"]).trials) == len(trials)
    assert result.best_trial == study.best_trial.number and result.n_finished == len(trials)
    write_result(result, tmp_path / "search.json")
    metrics = evaluate_best(params, tmp_path / "search.json", tmp_path / "metrics.json")
    score = metrics["test_mean_iou"]
    params["registry"]["model_name"] = model_name
    promotion = register(params, tmp_path / "search.json", tmp_path / "metrics.json", tmp_path / "registered.json")
    assert promotion["promoted"] and promotion["version"] == "1"
    champion = client.get_model_version_by_alias(model_name, CHAMPION)
    assert str(champion.version) == "1" and champion.tags["study_name"] == study_name
    assert champion.tags["run_id"] == study.best_trial.user_attrs["run_id"]
    assert float(champion.tags["test_mean_iou"]) == pytest.approx(score, abs=1e-6)
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 1


@pytest.mark.slow
def test_scaleout_bench_writes_its_result_file(lab, tmp_path):
    """benchmarks/scaleout_bench.py on the lab's services, one worker, one tiny trial: the figures it
    prints land in scaleout.json / scaleout.md with the command, commit, hardware and software."""
    import json

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(SOCSEG_STORAGE=lab["storage"], MLFLOW_TRACKING_URI=lab["tracking_uri"], **lab["env"],
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    args = ["--workers", "1", "--trials", "1", "--timeout", "240", "--out", str(out)]
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scaleout_bench.py"), *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    record = json.loads((out / "scaleout.json").read_text())
    assert record["command"] == "python benchmarks/scaleout_bench.py " + " ".join(args)
    assert record["git_commit"] and record["hardware"]["cores"] >= 1 and "optuna" in record["software"]
    (row,) = record["rows"]
    assert row["workers"] == 1 and row["trials"] >= 1 and row["per_hour_wall"] > 0 and row["speedup_wall"] == 1
    assert record["figures"]["by_workers"]["1"]["trials"] == row["trials"]
    assert f"{row['per_hour_wall']:.0f} trials/h" in run.stdout  # the printed figure is the recorded one
    assert f"| 1 | {row['trials']} |" in (out / "scaleout.md").read_text()
