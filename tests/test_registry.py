"""Aliases in a real MLflow registry (SQLite): challenger always, champion only when not worse."""

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from socseg.registry import CHALLENGER, CHAMPION, champion_version, register_and_promote


@pytest.fixture()
def logged_model(tiny_params, mlflow_env):
    from socseg.train import train

    return train(tiny_params, evaluate_test=False).segmenter_uri


def test_champion_moves_only_to_models_that_are_not_worse(logged_model):
    client = MlflowClient()
    scores = {}  # version -> its test score, as a re-evaluation would measure it

    def evaluate(uri):
        assert uri == f"models:/socseg-test@{CHAMPION}"
        return scores[str(client.get_model_version_by_alias("socseg-test", CHAMPION).version)]

    first = register_and_promote(logged_model, "socseg-test", 0.80, evaluate, tags={"encoder": "unet"})
    scores[first.version] = 0.80
    assert first.promoted and first.champion_version_before is None
    assert champion_version("socseg-test") == first.version

    worse = register_and_promote(logged_model, "socseg-test", 0.75, evaluate)
    scores[worse.version] = 0.75
    assert not worse.promoted and worse.champion_score_before == pytest.approx(0.80)
    assert champion_version("socseg-test") == first.version
    assert str(client.get_model_version_by_alias("socseg-test", CHALLENGER).version) == worse.version
    assert client.get_model_version("socseg-test", worse.version).tags["promotion"] == "rejected"

    equal = register_and_promote(logged_model, "socseg-test", 0.80, evaluate)
    assert equal.promoted and champion_version("socseg-test") == equal.version
    version = client.get_model_version("socseg-test", equal.version)
    assert version.tags["promotion"] == CHAMPION and version.tags["test_mean_iou"] == "0.800000"
    assert "re-evaluated" in version.tags["champion_compared"]
    assert client.get_model_version("socseg-test", first.version).tags["encoder"] == "unet"


def test_champion_alias_loads_as_pyfunc_and_predicts(logged_model):
    import socseg.models  # noqa: F401

    promotion = register_and_promote(logged_model, "socseg-load", 0.5, evaluate=lambda uri: 0.0)
    assert promotion.promoted
    model = mlflow.pyfunc.load_model(f"models:/socseg-load@{CHAMPION}")
    slices = np.random.default_rng(0).integers(20000, 42000, (2, 64, 64)).astype(np.float32)
    predicted = model.predict(slices)
    predicted = predicted if isinstance(predicted, np.ndarray) else np.asarray(predicted["labels"] if isinstance(predicted, dict) else predicted)
    assert predicted.shape[:3] == (2, 64, 64)
