"""The promotion lock: which store holds it, that it excludes, and that concurrent promotions on a
real lab (PostgreSQL + ``mlflow server``) always crown the best model, even when one is SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from socseg.training.promotion_lock import (
    PromotionLockError,
    _advisory_key,
    file_lock,
    lock_factory,
    postgres_lock,
)


def test_auto_takes_postgres_from_the_tracking_store_or_the_optuna_storage_else_a_local_file(tmp_path):
    pg = "postgresql+psycopg2://socseg@127.0.0.1:5432/optuna"
    assert lock_factory("auto", "postgresql://u@h/mlflow", "", 1)("m").func.__name__ == "postgres_lock"
    assert lock_factory("auto", "http://127.0.0.1:5000", pg, 1)("m").func.__name__ == "postgres_lock"
    beside = lock_factory("auto", f"sqlite:///{tmp_path}/mlflow.db", "sqlite:///optuna.db", 1)("m")
    assert beside.func.__name__ == "file_lock" and beside.args[0] == tmp_path
    assert lock_factory("auto", str(tmp_path / "mlruns"), "", 1)("m").args[0] == tmp_path / "mlruns"
    assert lock_factory(str(tmp_path / "locks"), "http://h:5000", "", 1)("m").args[0] == tmp_path / "locks"
    assert lock_factory(pg, f"sqlite:///{tmp_path}/mlflow.db", "", 1)("m").func.__name__ == "postgres_lock"
    with pytest.warns(RuntimeWarning, match="only promoters on this machine wait"):
        fallback = lock_factory("auto", "http://127.0.0.1:5000", "sqlite:///optuna.db", 1, cache_dir=tmp_path)("m")
    assert fallback.func.__name__ == "file_lock" and fallback.args[0].parent == tmp_path / "promotion-locks"
    assert _advisory_key("socseg-ni") == _advisory_key("socseg-ni") != _advisory_key("socseg-phases")


def test_a_file_lock_excludes_a_second_holder_until_released_and_times_out_with_a_message(tmp_path):
    order = []
    with file_lock(tmp_path, "socseg-ni", timeout=5):
        waiter = threading.Thread(target=lambda: _hold(file_lock(tmp_path, "socseg-ni", timeout=5), order, "second"))
        waiter.start()
        time.sleep(0.6)
        order.append("first done")
        with file_lock(tmp_path, "socseg-phases", timeout=0.5):  # another model: not blocked
            pass
    waiter.join(10)
    assert order == ["first done", "second"]
    with file_lock(tmp_path, "socseg-ni", timeout=5):
        with pytest.raises(PromotionLockError, match=r"another promotion of 'socseg-ni' has held the promotion lock "
                                                     r"\(file lock .*\) for over 0.3 s"):
            with file_lock(tmp_path, "socseg-ni", timeout=0.3):
                pass


def _hold(lock, order, label):
    with lock:
        order.append(label)


def test_an_unreachable_postgres_is_a_lock_error_naming_the_server():
    with pytest.raises(PromotionLockError, match="cannot take the promotion lock of 'm' .*127.0.0.1:1"):
        with postgres_lock("postgresql+psycopg2://nobody@127.0.0.1:1/x?connect_timeout=2", "m", timeout=5):
            pass


# --- Concurrent promotions on the real lab ------------------------------------------------------

# One promoter process: for each round, wait for its go-file, then register the model with its
# score; re-scoring the champion reads the champion's score tag and sleeps (slower for worse models,
# so that without the lock the worse promoter would write the alias last).
PROMOTER = r"""
import json, os, sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient
from socseg.training.promotion_lock import lock_factory
from socseg.training.registry import register_and_promote

folder, model_uri, run_id = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rounds = json.loads(sys.argv[4])  # [[name, score, delay], ...]
client = MlflowClient()
lock = lock_factory("auto", os.environ["MLFLOW_TRACKING_URI"], os.environ["SOCSEG_STORAGE"], 120)
for number, (name, score, delay) in enumerate(rounds):
    go = folder / f"go-{number}"
    while not go.exists():
        time.sleep(0.02)

    def evaluate(uri, name=name, delay=delay):
        version = client.get_model_version_by_alias(name, "champion")
        time.sleep(delay)
        return float(version.tags["test_mean_iou"])

    done = register_and_promote(model_uri, name, score, evaluate, lock, run_id=run_id)
    print(json.dumps(done.to_dict()), flush=True)
"""


@pytest.fixture(scope="module")
def lab_models(lab):
    """Two logged models in the lab's tracking server, from two runs: (uri, run id) each."""
    import mlflow
    import mlflow.pyfunc

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    for key, value in lab["env"].items():
        os.environ[key] = value  # PGPASSFILE for this process's advisory locks
    mlflow.set_tracking_uri(lab["tracking_uri"])
    mlflow.set_experiment(f"promotion-lock-{uuid.uuid4().hex[:6]}")
    out = []
    for label in ("a", "b"):
        with mlflow.start_run(run_name=f"model {label}") as run:
            info = mlflow.pyfunc.log_model(name="model", python_model=Constant())
        out.append((info.model_uri, run.info.run_id))
    yield out
    mlflow.set_tracking_uri(None)


def _promoters(lab, folder: Path, model_uri: str, plans: list[list], run_id: str = "") -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=lab["tracking_uri"], SOCSEG_STORAGE=lab["storage"], **lab["env"])
    return [subprocess.Popen([sys.executable, "-c", PROMOTER, str(folder), model_uri, run_id, json.dumps(plan)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True) for plan in plans]


def _seed_champion(name: str, model_uri: str, score: float, lab) -> None:
    from socseg.training.registry import register_and_promote

    lock = lock_factory("auto", lab["tracking_uri"], lab["storage"], 60)
    assert register_and_promote(model_uri, name, score, lambda uri: 0.0, lock).promoted


@pytest.mark.slow(seconds=60)
def test_concurrent_promotions_always_crown_the_best_and_tag_every_version(lab, lab_models, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(lab["tracking_uri"])
    (model_uri, _), _ = lab_models
    tag = uuid.uuid4().hex[:6]
    # Rounds of 2 and of 4 promoters; the best is never the slowest to re-score the champion.
    rounds = [[0.9, 0.6], [0.6, 0.9], [0.7, 0.95, 0.8], [0.9, 0.6, 0.8, 0.7], [0.55, 0.65, 0.75, 0.85]]
    width = max(len(r) for r in rounds)
    names = [f"lock-{tag}-{k}" for k in range(len(rounds))]
    for name in names:
        _seed_champion(name, model_uri, 0.5, lab)
    plans = [[[names[k], scores[p], 1.0 - scores[p]] if p < len(scores) else [f"lock-{tag}-solo-{k}-{p}", 0.1, 0.0]
              for k, scores in enumerate(rounds)] for p in range(width)]
    workers = _promoters(lab, tmp_path, model_uri, plans)
    time.sleep(8)  # the promoters import mlflow and socseg before the first go
    for number in range(len(rounds)):
        (tmp_path / f"go-{number}").touch()
        time.sleep(0.1)
    for worker in workers:
        out, err = worker.communicate(timeout=240)
        assert worker.returncode == 0, err[-3000:]
    for name, scores in zip(names, rounds):
        champion = client.get_model_version_by_alias(name, "champion")
        assert float(champion.tags["test_mean_iou"]) == pytest.approx(max(scores)), (name, scores)
        versions = client.search_model_versions(f"name = '{name}'")
        assert len(versions) == len(scores) + 1
        assert all(v.tags.get("promotion") in ("champion", "rejected") for v in versions), [v.tags for v in versions]


@pytest.mark.slow(seconds=30)
def test_a_promotion_killed_midway_frees_the_lock_and_its_rerun_completes_it(lab, lab_models, tmp_path):
    from mlflow.tracking import MlflowClient

    from socseg.training.registry import register_and_promote

    client = MlflowClient(lab["tracking_uri"])
    (champion_uri, _), (model_uri, run_id) = lab_models
    name = f"lock-kill-{uuid.uuid4().hex[:6]}"
    _seed_champion(name, champion_uri, 0.5, lab)
    (tmp_path / "go-0").touch()
    victim = _promoters(lab, tmp_path, model_uri, [[[name, 0.8, 600.0]]], run_id=run_id)[0]
    deadline = time.time() + 120
    while time.time() < deadline:  # registered and re-scoring the champion (the 600 s sleep): kill it there
        versions = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id]
        if versions and "test_mean_iou" in versions[0].tags:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the promoter never registered: {victim.communicate(timeout=10)}")
    time.sleep(1.0)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    interrupted = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id][0]
    assert "promotion" not in interrupted.tags
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    lock = lock_factory("auto", lab["tracking_uri"], lab["storage"], 30)
    started = time.time()  # the killed holder's session is gone: the lock is free at once
    other = register_and_promote(champion_uri, name, 0.6, lambda uri: 0.5, lock)
    assert other.promoted and time.time() - started < 20
    rerun = register_and_promote(model_uri, name, 0.8, lambda uri: 0.6, lock, run_id=run_id)
    assert rerun.version == str(interrupted.version) and rerun.promoted and not rerun.already_registered
    done = client.get_model_version(name, rerun.version)
    assert done.tags["promotion"] == "champion"
    assert str(client.get_model_version_by_alias(name, "champion").version) == rerun.version
    assert len(client.search_model_versions(f"name = '{name}'")) == 3  # no duplicate registered
    again = register_and_promote(model_uri, name, 0.8, lambda uri: 0.8, lock, run_id=run_id)
    assert again.already_registered and again.version == rerun.version
