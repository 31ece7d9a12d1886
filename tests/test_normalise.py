import keras
import numpy as np
import pytest

from socseg.data.normalise import Normaliser
from socseg.model.export import IntensityNormalisation


def test_fit_uses_percentiles_of_the_given_images_only():
    train = np.linspace(1000, 2000, 10_001).reshape(1, 1, -1)
    norm = Normaliser.fit([train], 1.0, 99.0)
    assert norm.low == pytest.approx(1010, rel=1e-3)
    assert norm.high == pytest.approx(1990, rel=1e-3)
    out = norm.apply(np.array([0, 1010, 1500, 1990, 60000], np.uint16))
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-3)
    assert out.dtype == np.float32


def test_constant_or_empty_training_data_is_rejected():
    with pytest.raises(ValueError, match="constant"):
        Normaliser.fit([np.full((2, 4, 4), 7, np.uint16)], 1, 99)
    with pytest.raises(ValueError, match="empty"):
        Normaliser.fit([np.zeros((0, 4, 4))], 1, 99)


def test_save_load_round_trip(tmp_path):
    norm = Normaliser(100.0, 200.0, 0.5, 99.5)
    norm.save(tmp_path / "n.json")
    assert Normaliser.load(tmp_path / "n.json") == norm


def test_keras_layer_applies_the_same_mapping_and_serialises(tmp_path):
    norm = Normaliser(20000.0, 42000.0, 0.5, 99.5)
    raw = np.random.default_rng(1).integers(15000, 47000, (2, 32, 32, 1)).astype(np.float32)
    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, IntensityNormalisation(norm.low, norm.high)(inputs))
    np.testing.assert_allclose(model.predict_on_batch(raw), norm.apply(raw), atol=1e-6)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again.predict_on_batch(raw), norm.apply(raw), atol=1e-6)
