"""Aliases in a real MLflow registry (SQLite): challenger always, champion only when not worse."""

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from socseg.training.promotion_lock import lock_factory
from socseg.training.registry import CHALLENGER, CHAMPION, MicrostructureGuard, champion_version, register_and_promote


def local_lock():
    """The promotion lock of the test's local store (a file lock beside its SQLite file)."""
    return lock_factory("auto", mlflow.get_tracking_uri(), "", timeout=60)


@pytest.fixture()
def logged_model(trained, in_store):
    """A logged segmenter (the module's tiny "bad" model: these tests fake the scores anyway)."""
    return trained[1]["bad"]["uri"]


def test_champion_moves_only_to_models_that_are_not_worse(logged_model):
    client = MlflowClient()
    scores = {}  # version -> its test score, as a re-evaluation would measure it

    def evaluate(uri):
        assert uri == f"models:/socseg-test@{CHAMPION}"
        return scores[str(client.get_model_version_by_alias("socseg-test", CHAMPION).version)]

    first = register_and_promote(logged_model, "socseg-test", 0.80, evaluate, local_lock(), tags={"encoder": "unet"})
    scores[first.version] = 0.80
    assert first.promoted and first.champion_version_before is None
    assert champion_version("socseg-test") == first.version

    worse = register_and_promote(logged_model, "socseg-test", 0.75, evaluate, local_lock())
    scores[worse.version] = 0.75
    assert not worse.promoted and worse.champion_score_before == pytest.approx(0.80)
    assert champion_version("socseg-test") == first.version
    assert str(client.get_model_version_by_alias("socseg-test", CHALLENGER).version) == worse.version
    assert client.get_model_version("socseg-test", worse.version).tags["promotion"] == "rejected"

    equal = register_and_promote(logged_model, "socseg-test", 0.80, evaluate, local_lock())
    assert equal.promoted and champion_version("socseg-test") == equal.version
    version = client.get_model_version("socseg-test", equal.version)
    assert version.tags["promotion"] == CHAMPION and version.tags["test_mean_iou"] == "0.800000"
    assert "re-evaluated" in version.tags["champion_compared"]
    assert client.get_model_version("socseg-test", first.version).tags["encoder"] == "unet"


def test_a_higher_score_does_not_promote_a_model_whose_tpb_error_is_worse(logged_model):
    """The microstructure guard: the champion's TPB error is re-measured, and a version more than
    the tolerance above it stays challenger however high its score; within it, the score decides."""
    client = MlflowClient()
    errors = {}  # version -> |TPB density error| a re-measurement would give
    measured = []

    def champion_error(uri):
        measured.append(uri)
        return errors[str(client.get_model_version_by_alias("socseg-tpb", CHAMPION).version)]

    def guard(error):
        return MicrostructureGuard("TPB density", "test_tpb_abs_relerr", error, 0.03, champion_error)

    first = register_and_promote(logged_model, "socseg-tpb", 0.97, lambda uri: 0.97, local_lock(), guard=guard(0.02))
    errors[first.version] = 0.02
    assert first.promoted and measured == [] and first.guard == ""  # nothing to compare with

    specks = register_and_promote(logged_model, "socseg-tpb", 0.99, lambda uri: 0.97, local_lock(), guard=guard(0.06))
    errors[specks.version] = 0.06
    assert not specks.promoted and champion_version("socseg-tpb") == first.version
    assert measured == [f"models:/socseg-tpb@{CHAMPION}"]
    version = client.get_model_version("socseg-tpb", specks.version)
    assert version.tags["promotion"] == "rejected" and version.tags["test_tpb_abs_relerr"] == "0.060000"
    assert specks.guard == "|TPB density error| 0.0600 > champion's 0.0200 + 0.03"
    assert version.tags["champion_compared"] == f"v{first.version} test_mean_iou=0.970000 (re-evaluated); {specks.guard}"

    within = register_and_promote(logged_model, "socseg-tpb", 0.98, lambda uri: 0.97, local_lock(), guard=guard(0.045))
    assert within.promoted and champion_version("socseg-tpb") == within.version
    worse_score = register_and_promote(logged_model, "socseg-tpb", 0.96, lambda uri: 0.98, local_lock(), guard=guard(0.0))
    assert not worse_score.promoted and len(measured) == 2  # the score already decided: the guard is not measured


def test_champion_alias_loads_as_pyfunc_and_predicts(logged_model):
    import socseg.model.unet  # noqa: F401

    promotion = register_and_promote(logged_model, "socseg-load", 0.5, evaluate=lambda uri: 0.0, lock=local_lock())
    assert promotion.promoted
    model = mlflow.pyfunc.load_model(f"models:/socseg-load@{CHAMPION}")
    slices = np.random.default_rng(0).integers(20000, 42000, (2, 64, 64)).astype(np.float32)
    predicted = model.predict(slices)
    predicted = predicted if isinstance(predicted, np.ndarray) else np.asarray(predicted["labels"] if isinstance(predicted, dict) else predicted)
    assert predicted.shape[:3] == (2, 64, 64)


# --- The promotion gate end to end: real models, real re-evaluation, real registry -----------------

GOOD_OVER_BAD = 0.15  # the good model's test score beats the bad one's by at least this much


def _tiny_params(folder):
    """The ``tiny_params`` phantom and settings (conftest), built once for this module."""
    import copy
    from pathlib import Path

    from socseg.params import load_params
    from socseg.data.synth import synth_from_params
    from socseg.data.volumes import save_volume

    p = copy.deepcopy(load_params(Path(__file__).resolve().parents[1] / "params.yaml"))
    p["data"]["dir"] = str(folder / "data")
    p["data"]["volumes"] = ["tiny"]
    p["split"].update(train=0.6, val=0.2, test=0.2, gap=2)
    p["tiles"].update(size=32, steps_per_epoch=2)
    p["train"].update(encoder="unet", epochs=1, batch_size=2, base_filters=4, patience=1, precision="float32")
    p["mlflow"]["tracking_uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    save_volume(synth_from_params(p, "tiny", shape=(24, 64, 64), seed=1), Path(p["data"]["dir"]) / "tiny")
    return p


def _with(params, train=None, tiles=None, registry=None):
    import copy

    p = copy.deepcopy(params)
    for section, values in (("train", train), ("tiles", tiles), ("registry", registry)):
        p[section].update(values or {})
    return p


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite tracking store (artifacts beside it) for this module's trained models."""
    folder = tmp_path_factory.mktemp("registry-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            patch.delenv(var, raising=False)
        mlflow.set_tracking_uri(uri)
        MlflowClient().create_experiment("socseg", artifact_location=(folder / "artifacts").as_uri())
        yield {"uri": uri, "folder": folder}
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


@pytest.fixture()
def in_store(store):
    """Point MLflow back at the module's store for each test (another fixture may have moved it)."""
    mlflow.set_tracking_uri(store["uri"])
    return store


@pytest.fixture(scope="module")
def trained(store):
    """A clearly good and a clearly bad tiny model, each with its real test score (``test_mean_iou``)."""
    from socseg.training.pipeline import held_out_data, score_on_test_slabs
    from socseg.training.train import train

    params = _tiny_params(store["folder"])
    slabs = held_out_data(params, "ni").slabs["test"]
    recipes = {
        "good": dict(train={"epochs": 6, "patience": 6, "learning_rate": 0.005}, tiles={"steps_per_epoch": 8}),
        "bad": dict(train={"epochs": 1, "learning_rate": 1e-6}, tiles={"steps_per_epoch": 1}),
    }
    models = {}
    for name, recipe in recipes.items():
        result = train(_with(params, **recipe), run_name=name, evaluate_test=False)
        scores = score_on_test_slabs(result.model_uri, slabs).scores
        models[name] = {"run_id": result.run_id, "uri": result.model_uri, "score": scores["mean_iou"]}
    return params, models


def _pipeline_files(folder, model, study_name="registry-test-study"):
    """search.json and metrics.json as `socseg search` and `socseg evaluate` write them for ``model``."""
    import json

    from socseg.training.search import SearchResult, write_result

    folder.mkdir(parents=True, exist_ok=True)
    search = SearchResult(study_name=study_name, storage="sqlite:///optuna.db", parent_run_id="", n_finished=1,
                          n_trained=1, best_trial=0, best_value=0.0, best_params={}, best_encoder="unet",
                          best_run_id=model["run_id"], best_model_uri=model["uri"])
    write_result(search, folder / "search.json")
    metrics = {"test_mean_iou": model["score"], "model_uri": model["uri"], "best_trial": 0,
               "best_run_id": model["run_id"], "study_name": study_name}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder / "search.json", folder / "metrics.json"


def _register(params, model, folder, name):
    from socseg.training.pipeline import register

    search_json, metrics_json = _pipeline_files(folder, model)
    p = _with(params, registry={"model_name": name + "-{task}"})
    return register(p, search_json, metrics_json, folder / "registered.json")


def _versions(name):
    return sorted(str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))


def test_the_two_models_differ_clearly(trained):
    _, models = trained
    assert models["good"]["score"] > 0.65, models  # 0.70-0.8 on the CPUs seen (0.6998 on a 2-core AMX Xeon)
    assert models["good"]["score"] - models["bad"]["score"] >= GOOD_OVER_BAD, models


def test_a_worse_model_stays_challenger_against_the_re_evaluated_champion(trained, in_store, tmp_path):
    params, models = trained
    good, bad = models["good"], models["bad"]
    first = _register(params, good, tmp_path / "good", "good-first")
    assert first["promoted"] and first["version"] == "1" and first["champion_version_before"] is None
    second = _register(params, bad, tmp_path / "bad", "good-first")
    assert second["version"] == "2" and not second["promoted"] and not second["already_registered"]
    # The champion was scored again, on the same test slabs, by the real model: its score came back.
    assert second["champion_version_before"] == "1"
    assert second["champion_score_before"] == pytest.approx(good["score"], abs=1e-6)
    assert second["score"] == pytest.approx(bad["score"])

    client, name = MlflowClient(), "good-first-ni"
    assert champion_version(name) == "1"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion"] == "rejected"
    assert tags["champion_compared"] == f"v1 test_mean_iou={good['score']:.6f} (re-evaluated)"
    assert tags["run_id"] == bad["run_id"] and tags["test_mean_iou"] == f"{bad['score']:.6f}"
    assert client.get_model_version(name, "1").tags["promotion"] == CHAMPION


def test_the_register_stage_guards_tpb_where_the_metrics_hold_it(trained, in_store, tmp_path, monkeypatch):
    """The register stage builds the guard from metrics.json's TPB error and registry.tpb_tolerance,
    re-measures the champion with the one evaluation that scores it, and builds none for a model
    without TPB (the ni task) or with the tolerance null."""
    import json

    import socseg.training.pipeline as pipeline
    from socseg.training.registry import Promotion

    params, models = trained
    good = models["good"]
    seen = {}

    def fake_promote(model_uri, name, score, evaluate, guard=None, **kwargs):
        seen.update(guard=guard, score=evaluate(good["uri"]), error=guard.measure(good["uri"]) if guard else None)
        return Promotion(name, "1", score, None, None, True)

    monkeypatch.setattr(pipeline, "register_and_promote", fake_promote)
    search_json, metrics_json = _pipeline_files(tmp_path, good)
    metrics = json.loads(metrics_json.read_text())
    metrics[pipeline.TPB_ERROR] = -0.05
    metrics_json.write_text(json.dumps(metrics))
    pipeline.register(_with(params, registry={"tpb_tolerance": 0.03}), search_json, metrics_json, tmp_path / "r.json")
    guard = seen["guard"]
    assert guard.error == pytest.approx(0.05) and guard.tolerance == 0.03 and guard.tag == "test_tpb_abs_relerr"
    assert seen["score"] == pytest.approx(good["score"], abs=1e-6)
    assert seen["error"] == np.inf  # an ni model's prediction has no triple-phase boundary: never the stricter one
    pipeline.register(_with(params, registry={"tpb_tolerance": None}), search_json, metrics_json, tmp_path / "r.json")
    assert seen["guard"] is None
    metrics.pop(pipeline.TPB_ERROR)
    metrics_json.write_text(json.dumps(metrics))
    pipeline.register(_with(params, registry={"tpb_tolerance": 0.03}), search_json, metrics_json, tmp_path / "r.json")
    assert seen["guard"] is None


def test_a_better_model_takes_the_champion_from_a_worse_one(trained, in_store, tmp_path):
    params, models = trained
    good, bad = models["good"], models["bad"]
    first = _register(params, bad, tmp_path / "bad", "bad-first")
    assert first["promoted"] and first["version"] == "1"
    second = _register(params, good, tmp_path / "good", "bad-first")
    assert second["promoted"] and second["version"] == "2"
    assert second["champion_score_before"] == pytest.approx(bad["score"], abs=1e-6)

    client, name = MlflowClient(), "bad-first-ni"
    assert champion_version(name) == "2"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion"] == CHAMPION
    assert tags["champion_compared"] == f"v1 test_mean_iou={bad['score']:.6f} (re-evaluated)"


def test_registering_the_same_run_again_adds_no_version(trained, in_store, tmp_path):
    params, models = trained
    first = _register(params, models["good"], tmp_path / "run1", "rerun")
    again = _register(params, models["good"], tmp_path / "run2", "rerun")
    assert not first["already_registered"] and first["promoted"]
    assert again["already_registered"] and again["version"] == first["version"]
    assert again["promoted"]  # it is (still) the champion
    assert _versions("rerun-ni") == [first["version"]]
    assert champion_version("rerun-ni") == first["version"]


def test_champion_version_is_none_only_for_a_missing_model_or_alias(trained, in_store):
    _, models = trained
    client = MlflowClient()
    assert champion_version("never-registered") is None
    client.create_registered_model("no-alias")
    assert champion_version("no-alias") is None
    mlflow.register_model(models["bad"]["uri"], "no-alias")
    assert _versions("no-alias") == ["1"] and champion_version("no-alias") is None


def test_a_refused_registry_read_stops_registration_and_promotes_nothing(trained, in_store, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    from socseg.training.registry import RegistryError

    _, models = trained
    good, bad = models["good"], models["bad"]
    existing = register_and_promote(good["uri"], "denied", good["score"], evaluate=lambda uri: good["score"],
                                    lock=local_lock())
    assert existing.promoted

    def denied(self, name):
        raise MlflowException("denied", error_code=PERMISSION_DENIED)

    evaluated = []
    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "get_registered_model", denied)
        for name in ("denied", "denied-new"):
            with pytest.raises(RegistryError, match="denied"):
                register_and_promote(bad["uri"], name, 1.0, evaluate=evaluated.append, lock=local_lock())
        with pytest.raises(RegistryError, match="denied"):
            champion_version("denied")
    assert not evaluated
    client = MlflowClient()  # the real registry, unpatched: nothing was created or moved
    assert _versions("denied") == [existing.version] and champion_version("denied") == existing.version
    assert str(client.get_model_version_by_alias("denied", CHALLENGER).version) == existing.version
    assert _versions("denied-new") == [] and champion_version("denied-new") is None


def test_a_tracking_server_that_is_down_stops_registration(trained, in_store, monkeypatch, tmp_path):
    import socket

    from socseg.training.registry import RegistryError

    _, models = trained
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    mlflow.set_tracking_uri(down)
    evaluated = []
    try:
        with pytest.raises(RegistryError) as error:
            register_and_promote(models["good"]["uri"], "unreachable", 1.0, evaluate=evaluated.append,
                                 lock=lock_factory(str(tmp_path), down, "", timeout=60))
        with pytest.raises(RegistryError):
            champion_version("unreachable")
    finally:
        mlflow.set_tracking_uri(in_store["uri"])
    assert f"127.0.0.1:{port}" in str(error.value) and not evaluated
