"""The inference request: per-call options checked when made, resolved once against a model and a source."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from socseg.data.normalise import FixedRange, PerVolume, grey_range
from socseg.inference.config import ModelConfig
from socseg.inference.request import InferenceOptions, InferenceRequest
from socseg.inference.window import WindowSettings

PHASE_MAP = {0: "pore", 128: "ysz", 255: "ni"}


def config(normalisation=None, **fields) -> ModelConfig:
    values = dict(task="ni", encoder="unet", class_names=["rest", "ni"], phase_map=PHASE_MAP, tile_size=64,
                  context_slices=0, normalisation=normalisation or FixedRange(low=100.0, high=900.0), window="sliding",
                  whole_slice_max_pixels=0, step_fraction=0.5, tta=True, batch_size=4, max_slice_pixels=10**6,
                  max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime="keras", planes="z", fusion_depth=64, fusion_halo=16)
    return ModelConfig(**{**values, **fields})


@pytest.fixture()
def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(500.0, 100.0, (5, 40, 40)).astype(np.float32)


def test_options_are_checked_when_made_with_messages_naming_the_setting():
    assert InferenceOptions(step_fraction="0.25").step_fraction == 0.25  # a served request's text
    assert InferenceOptions(grey_range=(1, 2)).grey_range == (1.0, 2.0)
    for bad, message in [({"step_fraction": 0.0}, r"step_fraction must be in \(0, 1\], got 0.0"),
                         ({"step_fraction": 1.5}, r"step_fraction must be in \(0, 1\], got 1.5"),
                         ({"step_fraction": "half"}, "step_fraction must be a number"),
                         ({"window": "tiles"}, "unknown window 'tiles': use one of whole_slice, sliding"),
                         ({"grey_range": (5.0, 5.0)}, "LOW must be below HIGH"),
                         ({"grey_range": (float("nan"), 5.0)}, "must be finite"),
                         ({"smoothing_sigma": -1}, r"smoothing_sigma must be in \[0, 3\] pixels, got -1"),
                         ({"smoothing_sigma": "wide"}, "smoothing_sigma must be a number of pixels")]:
        with pytest.raises(ValueError, match=message):
            InferenceOptions(**bad)
    assert InferenceOptions(tta=False, window="whole_slice").record() == {"tta": False, "step_fraction": None,
                                                                          "window": "whole_slice"}
    # A store written before smoothing existed records no smoothing_sigma: unset, it still resumes.
    assert InferenceOptions(smoothing_sigma="0.7").record()["smoothing_sigma"] == 0.7
    assert "planes" not in InferenceOptions().record() and InferenceOptions(planes="zyx").record()["planes"] == "zyx"


def test_a_request_takes_the_model_settings_unless_overridden(volume):
    model = config()
    default = InferenceRequest.resolve(model, source=volume)
    assert default.window == WindowSettings(64, 0.5, True, 4, "sliding", 0)
    assert default.grey_range is None  # fixed: raw values reach the layer
    assert default.check_range  # refused out of range unless allowed
    custom = InferenceRequest.resolve(model, InferenceOptions(tta=False, step_fraction=0.25, window="whole_slice",
                                                              allow_out_of_range=True), source=volume)
    assert custom.window == WindowSettings(64, 0.25, False, 4, "whole_slice", 0) and not custom.check_range
    assert InferenceRequest.resolve(model, InferenceOptions(allow_out_of_range=True), check_range=True).check_range
    assert custom.record() == {"tta": False, "step_fraction": 0.25, "window": "whole_slice", "smoothing_sigma": 0.0,
                               "planes": "z", "allow_out_of_range": True, "grey_range": None}
    assert InferenceRequest.resolve(config(smoothing_sigma=1.0), source=volume).window.smoothing_sigma == 1.0
    assert InferenceRequest.resolve(config(smoothing_sigma=1.0), InferenceOptions(smoothing_sigma=0),
                                    source=volume).window.smoothing_sigma == 0.0
    fused = InferenceRequest.resolve(config(planes="zyx", fusion_depth=32, fusion_halo=6), source=volume)
    assert (fused.planes, fused.fuses, fused.context(1), fused.context(9), fused.chunk_slices(8)) == ("zyx", True, 6, 9, 32)
    alone = InferenceRequest.resolve(config(planes="zyx"), InferenceOptions(planes="Z"), source=volume)
    assert (alone.planes, alone.fuses, alone.context(1), alone.chunk_slices(8)) == ("z", False, 1, 8)
    assert InferenceRequest.resolve(model, InferenceOptions(planes="xz"), source=volume).planes == "zx"


def test_the_grey_range_is_resolved_by_the_model_normalisation(volume):
    """per_volume: the source's own estimate unless one is given; fixed: only a given one."""
    per_volume = config(PerVolume(low_percentile=0.5, high_percentile=99.5))
    own = grey_range(volume, 0.5, 99.5)
    assert InferenceRequest.resolve(per_volume, source=volume).grey_range == (own.low, own.high)
    given = InferenceOptions(grey_range=(10.0, 20.0))
    assert InferenceRequest.resolve(per_volume, given, source=volume).grey_range == (10.0, 20.0)
    assert InferenceRequest.resolve(config(), given).grey_range == (10.0, 20.0)  # a fixed model maps a given range
    with pytest.raises(ValueError, match="constant"):  # nothing to estimate from: refused when resolved
        InferenceRequest.resolve(per_volume, source=np.zeros((2, 8, 8), np.float32))


def test_a_resolved_request_travels_to_dask_workers_unchanged(volume):
    """The Zarr path resolves on the client and pickles the request into each task."""
    request = InferenceRequest.resolve(config(PerVolume(low_percentile=0.5, high_percentile=99.5)), source=volume)
    assert pickle.loads(pickle.dumps(request)) == request
