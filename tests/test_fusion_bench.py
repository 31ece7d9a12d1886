"""benchmarks/fusion_bench.py: chunks cut as `socseg segment` cuts them, the halo it reads, and
a summary whose keys the docs can name."""

from __future__ import annotations


import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("fusion_bench")


@pytest.fixture(scope="module")
def fused_predictor(tmp_path_factory):
    """A one-convolution 3-phase predictor (3x3: it looks one row beyond each pixel) fusing z, y, x."""
    import keras

    from socseg.data.normalise import FixedRange
    from socseg.inference.config import ModelConfig
    from socseg.inference.predictor import Predictor

    keras.utils.set_random_seed(2)
    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Conv2D(3, 3, padding="same", activation="softmax")(inputs)
    config = ModelConfig(task="phases", encoder="unet", class_names=["pore", "ysz", "ni"],
                         phase_map={0: "pore", 128: "ysz", 255: "ni"}, tile_size=32, context_slices=0,
                         normalisation=FixedRange(low=0.0, high=1.0), window="whole_slice",
                         whole_slice_max_pixels=10**8, step_fraction=0.5, tta=False, batch_size=4,
                         max_slice_pixels=10**8, max_clipped_fraction=1.0, smoothing_sigma=0.0, runtime="keras",
                         planes="zyx", fusion_depth=4, fusion_halo=2)
    return Predictor(keras.Model(inputs, outputs), config)


def test_streamed_chunks_need_their_halo_to_equal_whole_volume_fusion(bench, fused_predictor):
    """Chunks aligned at slice 0 and cropped to the slab: with a halo, what fusing the whole volume
    gives; without one, the y and x planes stop at the chunk borders inside the slab and differ."""
    image = np.random.default_rng(0).random((14, 20, 24)).astype(np.float32)
    request = fused_predictor.request(source=image, check_range=False)
    whole = fused_predictor.probabilities(image, 3, 14 - 11, request)  # slab 3..10, the rest as context
    streamed = bench.streamed_probabilities(fused_predictor, request, image, (3, 11), 4, 2)
    assert streamed.shape == whole.shape == (8, 20, 24, 3)
    np.testing.assert_allclose(streamed, whole, atol=1e-6)
    bare = bench.streamed_probabilities(fused_predictor, request, image, (3, 11), 4, 0)
    assert not np.allclose(bare, whole, atol=1e-4)


def test_the_summary_is_keyed_by_way_without_dots(bench):
    rows = [{"fold": f, "way": "zyx, chunks of 64, halo 16", "way_id": "halo16", "mean_iou": iou,
             "err.tpb.density": tpb, "err.tpb.active_density.z": 0.0, "same_as_whole": 0.9995, "s_per_slice": 0.4}
            for f, iou, tpb in ((1, 0.98, 0.10), (2, 0.99, -0.02))]
    summary = bench.summary(rows)
    entry = summary["halo16"]
    assert entry["label"] == "zyx, chunks of 64, halo 16" and entry["folds"] == 2
    assert entry["mean_iou"]["mean"] == pytest.approx(0.985) and entry["tpb_err"]["mean"] == pytest.approx(0.04)
    assert entry["mean_abs_tpb_err"] == pytest.approx(0.06)
    assert all("." not in key for key in entry)
