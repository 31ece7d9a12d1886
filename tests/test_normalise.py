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


# --------------------------------------------------------------------------- per-volume grey range


def _volume(seed: int = 0, shape=(20, 40, 50)) -> np.ndarray:
    return np.random.default_rng(seed).integers(20000, 43000, shape).astype(np.uint16)


def test_grey_range_is_deterministic_and_follows_an_affine_rescaling():
    from socseg.data.normalise import grey_range

    volume = _volume()
    first = grey_range(volume, 0.5, 99.5)
    assert first == grey_range(volume, 0.5, 99.5)  # fixed seed: same volume, same range
    assert 20000 <= first.low < 20300 and 42700 < first.high <= 43000
    assert (first.low_percentile, first.high_percentile) == (0.5, 99.5)
    # A float32 phase reconstruction of the same values: the range follows a * x + b.
    a, b = 2.5e-5, -0.55
    rescaled = grey_range((a * volume.astype(np.float64) + b).astype(np.float32), 0.5, 99.5)
    assert rescaled.low == pytest.approx(a * first.low + b, abs=1e-6)
    assert rescaled.high == pytest.approx(a * first.high + b, abs=1e-6)
    # The same percentiles as Normaliser.fit on all of it: one percentile code for both modes.
    whole = Normaliser.fit([volume], 0.5, 99.5)
    assert first.low == pytest.approx(whole.low, rel=1e-3) and first.high == pytest.approx(whole.high, rel=1e-3)


def test_grey_range_reads_a_sample_of_slices_one_at_a_time():
    from socseg.data.normalise import grey_range

    class Counting:
        """An array-like (Z, H, W) that records which slices are read."""

        def __init__(self, array):
            self.array, self.shape, self.read = array, array.shape, []

        def __getitem__(self, z):
            assert isinstance(z, int), "reads one slice at a time"
            self.read.append(z)
            return self.array[z]

    deep = Counting(np.broadcast_to(_volume(shape=(1, 30, 30)), (500, 30, 30)))
    grey_range(deep, 1, 99)
    assert len(deep.read) == 64 and deep.read[0] == 0 and deep.read[-1] == 499  # evenly spaced, ends included


def test_grey_range_of_a_slice_reader_equals_that_of_the_array(tmp_path):
    import tifffile

    from socseg.data.normalise import grey_range, sampled_grey_range
    from socseg.data.stacks import SliceReader

    volume = _volume(1)
    tifffile.imwrite(tmp_path / "v.tif", volume, photometric="minisblack")
    with SliceReader(tmp_path / "v.tif") as reader:
        streamed, n = sampled_grey_range(reader, 0.5, 99.5)
    assert streamed == grey_range(volume, 0.5, 99.5)
    assert n == volume.size  # small slices are sampled whole


def test_grey_range_ignores_nan_and_infinity():
    from socseg.data.normalise import grey_range, sampled_grey_range

    volume = _volume(2).astype(np.float32)
    holed = volume.copy()
    holed[:, :5] = np.nan  # e.g. outside a reconstruction's field of view
    holed[:, -1] = np.inf
    found, n = sampled_grey_range(holed, 0.5, 99.5)
    assert np.isfinite([found.low, found.high]).all()
    assert n == np.isfinite(holed).sum()
    assert found.low == pytest.approx(grey_range(volume, 0.5, 99.5).low, rel=2e-3)


@pytest.mark.parametrize("volume, message", [
    (np.full((4, 8, 8), 7, np.uint16), "grey values are constant"),
    (np.full((4, 8, 8), np.nan, np.float32), "no finite grey values"),
    (np.zeros((0, 8, 8), np.uint16), "empty"),
])
def test_grey_range_of_an_unusable_volume_is_a_clear_error(volume, message):
    from socseg.data.normalise import GreyRangeEstimateError, grey_range

    with pytest.raises(GreyRangeEstimateError, match=message) as error:
        grey_range(volume, 0.5, 99.5)
    assert isinstance(error.value, ValueError) and "volume of shape" in str(error.value)


def test_parse_grey_range():
    from socseg.data.normalise import parse_grey_range

    assert parse_grey_range("20000, 43000") == (20000.0, 43000.0)
    assert parse_grey_range("-0.05,0.52") == (-0.05, 0.52)
    for bad, message in (("1", "LOW,HIGH"), ("a,b", "LOW,HIGH"), ("5,5", "below"), ("nan,1", "finite")):
        with pytest.raises(ValueError, match=message):
            parse_grey_range(bad)


def test_prepare_per_volume_maps_each_volume_by_its_own_range(tiny_params):
    """per_volume: each labelled volume by its whole-volume grey range, the model's layer 0..1;
    fixed: the training slabs' percentiles, as before."""
    from socseg.data.normalise import grey_range
    from socseg.data.prepare import load_labelled_volumes, prepare_data
    from socseg.params import typed
    from socseg.training.train import model_config

    volumes = load_labelled_volumes(tiny_params)
    tiny_params["normalise"]["mode"] = "fixed"
    fixed = prepare_data(tiny_params, volumes, "ni")
    (volume,) = volumes
    start, stop = fixed.splits["tiny"].train
    assert fixed.normaliser == Normaliser.fit([volume.image[start:stop]], 0.5, 99.5)
    assert fixed.normalisation.mode == "fixed" and fixed.volume_ranges == {"tiny": None} and fixed.grey_ranges() is None
    fixed_config = model_config(fixed, typed(tiny_params))
    assert fixed_config.normalisation == fixed.normalisation
    assert fixed_config.normalisation.to_dict() == {"mode": "fixed", **fixed.normaliser.to_dict()}

    tiny_params["normalise"]["mode"] = "per_volume"
    per_volume = prepare_data(tiny_params, volumes, "ni")
    own = grey_range(volume.image, 0.5, 99.5)
    assert per_volume.volume_ranges == {"tiny": (own.low, own.high)} and own != fixed.normaliser
    assert per_volume.slab_normaliser(per_volume.slabs["train"][0]) == own
    assert per_volume.normaliser == Normaliser(0.0, 1.0, 0.5, 99.5)  # what the exported layer holds
    slab = per_volume.slabs["val"][0]
    a, b = slab.z_range
    np.testing.assert_array_equal(per_volume.normalised(slab), own.apply(volume.image[a:b]))
    config = model_config(per_volume, typed(tiny_params))
    assert config.normalisation.mode == "per_volume"
    assert config.normalisation.to_dict() == {"mode": "per_volume", "low": 0.0, "high": 1.0, "low_percentile": 0.5,
                                              "high_percentile": 99.5}
    from socseg.inference.predictor import ModelConfig

    assert ModelConfig.from_dict(config.to_dict()) == config


def test_normalise_mode_is_checked_by_the_schema(params):
    from socseg.params import ParamsError, typed

    params["normalise"]["mode"] = "per_slice"
    with pytest.raises(ParamsError, match="normalise.mode: 'per_slice' is not one of fixed, per_volume"):
        typed(params)


def test_the_normalisation_types_resolve_a_source_range_and_round_trip():
    """FixedRange maps nothing unless a range is given; PerVolume estimates the source's own; both
    map a given range, refuse a bad one, and survive their one dict encoding (old ones too)."""
    from socseg.data.normalise import FixedRange, Normalisation, PerVolume, grey_range

    volume = np.random.default_rng(3).normal(30000, 4000, (6, 32, 32)).astype(np.float32)
    fixed = Normalisation.fit("fixed", [volume[:3]], 0.5, 99.5)
    per_volume = Normalisation.fit("per_volume", [volume[:3]], 0.5, 99.5)
    assert isinstance(fixed, FixedRange) and isinstance(per_volume, PerVolume)
    assert fixed.layer == Normaliser.fit([volume[:3]], 0.5, 99.5) and per_volume.layer == Normaliser(0.0, 1.0, 0.5, 99.5)
    assert fixed.source_range(volume) is None  # raw values reach the layer
    own = grey_range(volume, 0.5, 99.5)
    assert per_volume.source_range(volume) == (own.low, own.high)
    for normalisation in (fixed, per_volume):
        assert normalisation.source_range(volume, (1.0, 2.0)) == (1.0, 2.0)
        with pytest.raises(ValueError, match="LOW must be below HIGH"):
            normalisation.source_range(volume, (2.0, 1.0))
        assert Normalisation.from_dict(normalisation.to_dict()) == normalisation
        # the earlier encoding: the mode beside the record (normalisation_mode), or nowhere (fixed)
        earlier = {k: v for k, v in normalisation.to_dict().items() if k != "mode"}
        assert Normalisation.from_dict(earlier, normalisation.mode) == normalisation
    assert Normalisation.from_dict({"low": 1.0, "high": 2.0}) == FixedRange(low=1.0, high=2.0)
    # the mapping training applies: a per_volume source's own range, else the layer
    assert per_volume.unit_mapping((own.low, own.high)) == own and fixed.unit_mapping(None) == fixed.layer
    with pytest.raises(ValueError, match="normalisation mode 'per_slice' is not one of fixed, per_volume"):
        Normalisation.fit("per_slice", [volume], 0.5, 99.5)
    with pytest.raises(ValueError, match="per_volume normalisation's layer maps 0..1"):
        Normalisation.from_dict({"mode": "per_volume", "low": 3.0, "high": 9.0})
