"""benchmarks/fusion_depth.py: each chunk depth and halo against whole-volume fusion."""

from __future__ import annotations

import numpy as np
import pytest


def _tiny_predictor():
    """A 5x5-convolution 'ni' network: its y and x planes see along z, so chunk seams show."""
    import keras

    from socseg.data.normalise import Normalisation
    from socseg.inference.predictor import ModelConfig, Predictor

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Conv2D(1, 5, padding="same", activation="sigmoid")(inputs)
    config = ModelConfig(task="ni", encoder="unet", class_names=["rest", "ni"], phase_map={0: "pore", 128: "ysz", 255: "ni"},
                         tile_size=32, context_slices=0, normalisation=Normalisation.from_dict({"low": 0.0, "high": 1.0}, "fixed"),
                         window="whole_slice", whole_slice_max_pixels=10**6, step_fraction=0.5, tta=False, batch_size=8,
                         max_slice_pixels=10**6, max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime="keras", planes="zyx",
                         fusion_depth=64, fusion_halo=16)
    return Predictor(keras.Model(inputs, outputs), config)


def test_every_way_is_compared_with_whole_volume_fusion(load_benchmark):
    fusion_depth = load_benchmark("fusion_depth")
    image = np.random.default_rng(0).random((24, 32, 32), dtype=np.float32)
    predictor = _tiny_predictor()
    rows = fusion_depth.fusion_ways(predictor, image, fusion_depth.parse_ways("4:0,4:2,12:2"))
    assert [r["way"] for r in rows] == ["whole volume", "chunks of 4, halo 0", "chunks of 4, halo 2", "chunks of 12, halo 2"]
    assert rows[0]["same_as_whole"] == 1.0 and rows[0]["depth"] == 24
    # Seams without a halo change labels near them; a halo of the receptive field's reach (2) removes that.
    assert rows[1]["same_as_whole"] < 1.0
    assert rows[2]["same_as_whole"] == 1.0 and rows[3]["same_as_whole"] == 1.0
    assert all(r["seconds"] > 0 and r["numpy_peak_mib"] > 0 for r in rows)
    assert predictor.config.fusion_depth == 64 and predictor.config.fusion_halo == 16  # restored


def test_ways_put_whole_volume_first_and_refuse_nonsense(load_benchmark):
    fusion_depth = load_benchmark("fusion_depth")
    assert fusion_depth.parse_ways("128:16,whole,64") == [(None, 0), (128, 16), (64, 0)]
    assert fusion_depth.parse_ways("64:8") == [(None, 0), (64, 8)]
    with pytest.raises(Exception, match="depth must be >= 1"):
        fusion_depth.parse_ways("0:4")
    with pytest.raises(Exception, match="use DEPTH:HALO"):
        fusion_depth.parse_ways("deep")
