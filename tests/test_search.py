"""Optuna search against a real SQLite storage and a real MLflow store."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState


@pytest.fixture()
def search_params(tiny_params, tmp_path):
    p = tiny_params
    p["search"].update(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="t", n_trials=2)
    p["search"]["space"] = {
        "train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "train.loss": {"type": "categorical", "choices": ["ce", "ce_dice"]},
        "tiles.augment.intensity_jitter": {"type": "float", "low": 0.0, "high": 0.1},
    }
    return p


def test_trial_params_apply_the_space_from_params(search_params):
    from socseg.training.search import trial_params

    trial = optuna.trial.FixedTrial(
        {"train.learning_rate": 0.0023, "train.loss": "ce", "tiles.augment.intensity_jitter": 0.07, "train.encoder": "vgg16"}
    )
    before = copy.deepcopy(search_params)
    assert before["train"]["learning_rate"] != 0.0023 and before["train"]["loss"] != "ce"  # the trial changes both
    tree = trial_params(search_params, "all", trial)
    assert tree["train"]["learning_rate"] == 0.0023 and tree["train"]["loss"] == "ce"
    assert tree["tiles"]["augment"]["intensity_jitter"] == 0.07
    assert tree["train"]["encoder"] == "vgg16"
    assert search_params == before  # base params untouched, nested sections included
    assert trial_params(search_params, "unet", trial)["train"]["encoder"] == "unet"


def test_unknown_space_type_is_rejected(search_params):
    from socseg.training.search import suggest

    with pytest.raises(ValueError, match="unknown type"):
        suggest(optuna.trial.FixedTrial({"x": 1}), {"x": {"type": "gaussian"}})


def test_search_logs_parent_and_child_runs_and_resumes(search_params, mlflow_env):
    from socseg.training.search import run_search

    result = run_search(search_params, encoder="unet")
    assert result.n_finished == 2
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    assert sorted(c.data.tags["optuna_trial"] for c in children) == ["0", "1"]
    for child in children:
        assert child.data.tags["state"] in {"COMPLETE", "PRUNED"}
        assert "test_mean_iou" not in child.data.metrics  # trials never see the test slab
        assert child.data.params["train.encoder"] == "unet"
    assert parent.data.metrics["best_val_mean_iou"] == pytest.approx(result.best_value)
    # The best model is the best trial's one logged model: the segmenter.
    import mlflow

    from socseg.inference.pyfunc import model_config

    assert result.best_model_uri.startswith("models:/")
    assert mlflow.models.get_model_info(result.best_model_uri).run_id == result.best_run_id
    assert model_config(result.best_model_uri).encoder == "unet"
    assert "best_segmenter_uri" not in result.to_dict()
    assert "best.train.learning_rate" in parent.data.params
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "search")}
    assert {"search/trials.csv", "search/optimization_history.png"} <= artifacts
    assert artifacts & {"search/param_importances.png", "search/param_importances.txt"}

    # Same command again: the 2 finished trials are kept, nothing is recomputed.
    again = run_search(search_params, encoder="unet")
    study = optuna.load_study(study_name="t", storage=search_params["search"]["storage"])
    assert len(study.trials) == 2 and again.best_trial == result.best_trial
    # A larger budget adds exactly the missing trial.
    run_search(search_params, encoder="unet", n_trials=3)
    study = optuna.load_study(study_name="t", storage=search_params["search"]["storage"])
    assert len([t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 3
    assert len({t.number for t in study.trials}) == len(study.trials)


def test_pruned_trial_closes_its_run_as_pruned(tiny_params, mlflow_env, tmp_path):
    from socseg.training.search import OptunaPruning
    from socseg.training.train import train

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()
    tiny_params["train"].update(epochs=3, patience=5)
    pruning = OptunaPruning(trial)
    result = train(tiny_params, extra_callbacks=[pruning])
    assert result.pruned and pruning.pruned
    assert len(result.history["val_mean_iou"]) == 1  # stopped after the first report
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["state"] == "PRUNED" and run.info.status == "FINISHED"
    assert result.model_uri == ""


@pytest.mark.slow(seconds=32)
def test_a_killed_search_leaves_a_study_that_continues(search_params, mlflow_env, tmp_path):
    """kill -9 in the middle of a trial; the next run fails the stale trial (heartbeat) and finishes."""
    storage = search_params["search"]["storage"]
    search_params["search"].update(heartbeat_interval=1, grace_period=3, n_trials=2)
    search_params["train"].update(epochs=200, patience=200)  # a first trial that would run for minutes
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(search_params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "socseg.cli", "search", "--params", str(params_file), "--encoder", "unet",
               "--out", str(tmp_path / "search.json")]
    worker = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                study = optuna.load_study(study_name="t", storage=storage)
                if any(t.state == TrialState.RUNNING for t in study.trials):
                    break
            except KeyError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the search never started a trial")
        time.sleep(4)  # inside the trial's training loop
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    study = optuna.load_study(study_name="t", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    time.sleep(4)  # past the grace period

    search_params["train"].update(epochs=1, patience=1)
    params_file.write_text(yaml.safe_dump(search_params))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="t", storage=storage)
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.FAIL  # the killed one
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 2
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(study.trials[1])
    assert retried == 0  # its parameters were retried


@pytest.mark.slow(seconds=40)
def test_real_data_search_benchmark_writes_what_accuracy_reads(search_params, mlflow_env, repo_root, tmp_path):
    """benchmarks/search_real.py (the search on SOCPristine) on a phantom: its search.json drives accuracy.py."""
    import csv
    import json

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(search_params))
    out, storage = tmp_path / "found", f"sqlite:///{tmp_path / 'real.db'}"
    command = [sys.executable, str(repo_root / "benchmarks/search_real.py"), "--params", str(params_file),
               "--train-volume", f"{search_params['data']['dir']}/tiny", "--split", "0.6,0.2,0.2,2", "--n-trials", "2",
               "--epochs", "1", "--storage", storage, "--out", str(out), "--set", "train.reduce_lr_patience=3"]
    env = {**os.environ, "PYTHONPATH": str(repo_root / "src")}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads((out / "search.json").read_text())
    assert found["best_encoder"] == "unet" and found["study_name"] == "real-unet-ni" and found["n_finished"] == 2
    assert set(found["best_params"]) == set(search_params["search"]["space"])
    assert found["best_model_uri"].startswith("models:/") and "best_segmenter_uri" not in found
    trials = list(csv.DictReader((out / "trials.csv").open()))
    assert sorted(t["number"] for t in trials) == ["0", "1"] and "train.learning_rate" in trials[0]
    assert "val mean IoU" in (out / "search.md").read_text()
    study = optuna.load_study(study_name="real-unet-ni", storage=storage)
    child = MlflowClient().get_run(study.best_trial.user_attrs["run_id"])
    assert child.data.params["train.reduce_lr_patience"] == "3"  # --set reaches every trial

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)  # resumes: no new trial
    assert rerun.returncode == 0 and len(optuna.load_study(study_name="real-unet-ni", storage=storage).trials) == 2

    accuracy = subprocess.run([sys.executable, str(repo_root / "benchmarks/accuracy.py"), "--params", str(params_file),
                               "--train-volume", f"{search_params['data']['dir']}/tiny", "--split", "0.6,0.2,0.2,2",
                               "--tasks", "ni", "--methods", "searched", "--variant", "searched=unet", "--leakage", "none",
                               "--epochs", "1", "--from-search", f"searched={out / 'search.json'}", "--out", str(tmp_path / "acc")],
                              capture_output=True, text=True, timeout=600, env=env)
    assert accuracy.returncode == 0, accuracy.stderr[-3000:]
    row = next(csv.DictReader((tmp_path / "acc/accuracy.csv").open()))
    lr = found["best_params"]["train.learning_rate"]
    assert f"lr {lr}" in row["settings"] and f"trial {found['best_trial']}" in row["settings"]


# --------------------------------------------------------------------------- study identity


def test_study_name_follows_task_encoder_data_space_and_budget(search_params):
    from socseg.training.search import resolve_study_name, study_identity

    template = "socseg-{task}-{encoder}-{identity}"

    def name(params, encoder="unet", fingerprint="f1"):
        return resolve_study_name(template, study_identity(params, encoder, fingerprint))

    base = name(search_params)
    assert base.startswith("socseg-ni-unet-") and base == name(copy.deepcopy(search_params))  # same inputs, same study
    changed = {"encoder": name(search_params, encoder="vgg16"), "data": name(search_params, fingerprint="f2")}
    for label, edit in {
        "task": lambda p: p["train"].update(task="phases"),
        "space": lambda p: p["search"]["space"]["train.learning_rate"].update(high=0.05),
        "budget": lambda p: p["train"].update(epochs=7),
        "steps": lambda p: p["tiles"].update(steps_per_epoch=9),
        "weights": lambda p: p["train"].update(encoder_weights="imagenet"),
    }.items():
        params = copy.deepcopy(search_params)
        edit(params)
        changed[label] = name(params)
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed
    # A searched key's base value does not define the study (the trials never use it).
    params = copy.deepcopy(search_params)
    params["train"]["learning_rate"] = 0.123
    assert name(params) == base
    assert resolve_study_name("my-study", study_identity(search_params, "unet", "f1")) == "my-study"
    with pytest.raises(ValueError, match="placeholders"):
        resolve_study_name("s-{model}", study_identity(search_params, "unet", "f1"))


def test_an_explicit_study_name_refuses_other_task_encoder_or_data(search_params, tmp_path):
    from socseg.training.search import StudyMismatch, check_study_identity, open_study, study_identity

    study = open_study(search_params, "mine", search_params["search"]["storage"])
    identity = study_identity(search_params, "unet", "f1")
    check_study_identity(study, identity)  # recorded in the new study
    check_study_identity(open_study(search_params, "mine"), identity)  # same inputs: resumes
    for encoder, fingerprint, task, differs in (("vgg16", "f1", "ni", "encoder"), ("unet", "f2", "ni", "data_fingerprint"),
                                               ("unet", "f1", "phases", "task")):
        other = copy.deepcopy(search_params)
        other["train"]["task"] = task
        with pytest.raises(StudyMismatch, match=differs):
            check_study_identity(open_study(search_params, "mine"), study_identity(other, encoder, fingerprint))


def test_freezing_is_searched_only_for_pretrained_encoders(search_params, tmp_path):
    from socseg.training.search import trial_params

    space = search_params["search"]["space"]
    space["train.freeze_encoder"] = {"type": "categorical", "choices": [False, True]}
    space["train.unfreeze_after"] = {"type": "int", "low": 1, "high": 3}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def sampled(encoder, weights, n=6):
        params = copy.deepcopy(search_params)
        params["train"]["encoder_weights"] = weights
        keys = set()
        for _ in range(n):
            trial = study.ask()
            tree = trial_params(params, encoder, trial)
            keys |= set(trial.params)
            if not trial.params.get("train.freeze_encoder", False):
                assert "train.unfreeze_after" not in trial.params
                assert tree["train"]["freeze_encoder"] is False
            study.tell(trial, 0.5)
        return keys

    assert not {"train.freeze_encoder", "train.unfreeze_after"} & sampled("vgg16", "none")
    assert not {"train.freeze_encoder", "train.unfreeze_after"} & sampled("unet", "imagenet")
    weights = tmp_path / "encoder.weights.h5"
    weights.write_bytes(b"")  # only its being a path matters to the space
    assert {"train.freeze_encoder", "train.unfreeze_after"} <= sampled("vgg16", str(weights), n=12)


def test_changed_data_starts_a_new_study_and_the_same_data_resumes(search_params, mlflow_env):
    """The same command before and after the data changed: a new study that trains; unchanged: nothing trained."""
    from socseg.training.search import run_search
    from socseg.data.synth import synth_from_params
    from socseg.data.volumes import save_volume

    search_params["search"].update(study_name="socseg-{task}-{encoder}-{identity}", n_trials=1)
    first = run_search(search_params, encoder="unet")
    again = run_search(search_params, encoder="unet")
    assert first.n_trained == 1 and again.n_trained == 0 and again.study_name == first.study_name
    assert again.best_run_id == first.best_run_id

    volume = synth_from_params(search_params, "tiny", shape=(24, 64, 64), seed=2)  # new data, same name
    save_volume(volume, Path(search_params["data"]["dir"]) / "tiny", overwrite=True)
    changed = run_search(search_params, encoder="unet")
    assert changed.study_name != first.study_name and changed.n_trained == 1
    assert changed.best_run_id != first.best_run_id


def test_normalisation_mode_is_searchable(search_params):
    """``normalise.mode`` as a categorical of search.space: each trial trains with the sampled mode."""
    from socseg.params import ParamsError, typed
    from socseg.training.search import trial_params

    search_params["search"]["space"] = {"normalise.mode": {"type": "categorical", "choices": ["fixed", "per_volume"]}}
    assert typed(search_params).normalise.mode == "per_volume"  # params.yaml's default; each trial's own below
    for mode in ("fixed", "per_volume"):
        tree = trial_params(search_params, "unet", optuna.trial.FixedTrial({"normalise.mode": mode}))
        assert typed(tree).normalise.mode == mode
    search_params["search"]["space"]["normalise.mode"]["choices"].append("per_slice")  # a typo in the space
    tree = trial_params(search_params, "unet", optuna.trial.FixedTrial({"normalise.mode": "per_slice"}))
    with pytest.raises(ParamsError, match="normalise.mode: 'per_slice' is not one of"):
        typed(tree)


def test_a_searched_context_wider_than_the_gap_is_refused_before_any_trial(search_params, tmp_path, monkeypatch):
    """train.context_slices searched with choices [0, 1, 3] on tiny's gap of 2: refused before the
    study, the data or MLflow are touched (the volume named does not exist), naming both values;
    choices that all fit the gap pass that check, and a searched split.gap counts with its narrowest."""
    from click.testing import CliRunner

    from socseg.cli import main
    from socseg.training.search import check_search_context_gap, run_search

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    search_params["data"]["volumes"] = ["missing"]
    search_params["search"]["space"]["train.context_slices"] = {"type": "categorical", "choices": [0, 1, 3]}
    with pytest.raises(ValueError, match=r"split gap 2 is smaller than train.context_slices 3.*train.context_slices \[0, 1, 3\]"):
        run_search(search_params, encoder="unet")
    params_file = tmp_path / "search-params.yaml"
    params_file.write_text(yaml.safe_dump(search_params))
    result = CliRunner().invoke(main, ["search", "--params", str(params_file), "--encoder", "unet"])
    assert result.exit_code == 2 and "split gap 2 is smaller than train.context_slices 3" in result.output
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()

    search_params["search"]["space"]["train.context_slices"]["choices"] = [0, 1, 2]  # params.yaml's choices
    check_search_context_gap(search_params)
    search_params["search"]["space"]["split.gap"] = {"type": "int", "low": 1, "high": 4}
    with pytest.raises(ValueError, match=r"split gap 1 is smaller than train.context_slices 2.*split.gap \[1, 4\]"):
        check_search_context_gap(search_params)


def test_params_yaml_searches_only_contexts_its_gap_holds(params):
    """The shipped params.yaml: split.gap 4 holds every searched train.context_slices (0, 1, 2)."""
    from socseg.training.search import check_search_context_gap, searchable_values

    assert max(searchable_values(params["search"]["space"], "train.context_slices", None)) <= params["split"]["gap"]
    check_search_context_gap(params)


def _completed(number: int, iou: float, tpb_error: float | None) -> optuna.trial.FrozenTrial:
    from socseg.inference.evaluate import TPB_ERROR

    attrs = {} if tpb_error is None else {f"val_{TPB_ERROR}": tpb_error}
    trial = optuna.trial.create_trial(value=iou, params={}, distributions={}, user_attrs=attrs)
    trial.number = number
    return trial


def test_the_best_trial_is_the_best_iou_among_those_near_the_least_tpb_error():
    """The champion gate's TPB rule applied among trials: a higher IoU whose |TPB error| is more
    than the tolerance above the least any trial reached is passed over."""
    from socseg.training.search import choose_best_trial

    trials = [_completed(0, 0.985, 0.08), _completed(1, 0.984, -0.02), _completed(2, 0.980, 0.01),
              _completed(3, 0.9845, 0.041)]
    assert choose_best_trial(trials, 0.03).number == 1  # trial 0 and 3: more than 0.01 + 0.03
    assert choose_best_trial(trials, 0.05).number == 3  # 0.041 within 0.01 + 0.05, 0.08 not
    assert choose_best_trial(trials, 0.08).number == 0
    assert choose_best_trial(trials, None).number == 0  # the metric alone, as optuna's best_trial
    ni_task = [_completed(0, 0.97, None), _completed(1, 0.98, None), _completed(2, 0.98, None)]
    assert choose_best_trial(ni_task, 0.03).number == 1  # no TPB error: IoU alone; a tie goes to the earlier
    with pytest.raises(ValueError, match="no completed trial"):
        choose_best_trial([], 0.03)


def test_a_real_three_phase_search_hands_on_the_trial_the_tpb_rule_chooses(search_params, mlflow_env):
    """A real 3-phase search (SQLite study, MLflow store, trained trials): every completed trial
    carries its validation TPB error, and with a zero tolerance the trial handed on is the one
    with the least |TPB error|, tagged on the parent run whenever that is not the best IoU."""
    from socseg.inference.evaluate import TPB_ERROR
    from socseg.training.search import run_search

    search_params["train"].update(task="phases")
    search_params["search"].update(n_trials=3)
    search_params["search"]["space"] = {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}}
    search_params["registry"]["tpb_tolerance"] = 0.0
    result = run_search(search_params, encoder="unet")

    study = optuna.load_study(study_name="t", storage=search_params["search"]["storage"])
    completed = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(completed) >= 2
    errors = {t.number: abs(t.user_attrs[f"val_{TPB_ERROR}"]) for t in completed}  # KeyError: not recorded
    least_error = min(errors, key=lambda n: (errors[n], n))
    assert result.best_trial == least_error
    assert result.best_value == pytest.approx(study.trials[least_error].value)
    assert result.best_run_id == study.trials[least_error].user_attrs["run_id"]
    rule_tag = MlflowClient().get_run(result.parent_run_id).data.tags.get("best_trial_rule")
    assert (rule_tag is not None) == (least_error != study.best_trial.number)
