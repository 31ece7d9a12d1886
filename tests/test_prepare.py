"""prepare_data: the slabs and normalisation training and scoring work on, with separate test volumes."""

from __future__ import annotations

import numpy as np
import pytest

from socseg.data.normalise import Normaliser, grey_range
from socseg.data.prepare import Slab, load_labelled_volumes, prepare_data
from socseg.data.volumes import Volume, VolumeMeta


def _other_volume(tiny_params, name: str = "other", scale: float = 1.0, offset: float = 0.0) -> Volume:
    """A second phantom (another seed), on the training volume's grey scale or ``scale * x + offset`` (float32)."""
    from socseg.data.synth import synth_from_params

    volume = synth_from_params(tiny_params, name, shape=(10, 48, 48), seed=7)
    if scale == 1.0 and offset == 0.0:
        return volume
    image = (volume.image.astype(np.float32) * np.float32(scale) + np.float32(offset)).astype(np.float32)
    meta = VolumeMeta(name, image.shape, "float32", dict(volume.meta.phase_map), has_labels=True)
    return Volume(image, volume.labels, meta)


def test_slab_normaliser_of_a_separate_test_volume_per_volume(tiny_params):
    """per_volume: a test volume that is not a training volume is mapped by its own whole-volume
    grey range (grey_range, as socseg segment estimates it), which grey_ranges() hands to scoring;
    the same data on another grey scale (a * x + b) then gives the network the same values."""
    tiny_params["normalise"]["mode"] = "per_volume"
    volumes = load_labelled_volumes(tiny_params)
    other = _other_volume(tiny_params)
    data = prepare_data(tiny_params, volumes, "ni", test_volumes=[other])
    test_slab = data.slabs["test"][-1]
    assert test_slab.name == "other" and test_slab.z_range == (0, 10)  # the whole volume, after the tiny test slab
    assert [s.name for s in data.slabs["test"]] == ["tiny", "other"] and "other" not in data.splits
    own = grey_range(other.image, 0.5, 99.5)
    assert data.slab_normaliser(test_slab) == own != data.slab_normaliser(data.slabs["test"][0])
    assert data.grey_ranges()["other"] == (own.low, own.high)
    np.testing.assert_array_equal(data.normalised(test_slab), own.apply(other.image))
    assert data.fingerprint != prepare_data(tiny_params, volumes, "ni").fingerprint  # the test data is part of it

    rescaled = _other_volume(tiny_params, "rescaled", scale=2.5e-4, offset=-3.0)
    moved = prepare_data(tiny_params, volumes, "ni", test_volumes=[rescaled])
    np.testing.assert_allclose(moved.normalised(moved.slabs["test"][-1]), data.normalised(test_slab), atol=1e-4)


def test_slab_normaliser_of_a_separate_test_volume_fixed(tiny_params):
    """fixed: a separate test volume gets the training slabs' range (the model's), and it does not
    move that range even when it is much brighter."""
    tiny_params["normalise"]["mode"] = "fixed"
    volumes = load_labelled_volumes(tiny_params)
    without = prepare_data(tiny_params, volumes, "ni")
    bright = _other_volume(tiny_params, "bright", scale=1.0, offset=20000.0)
    data = prepare_data(tiny_params, volumes, "ni", test_volumes=[bright])
    test_slab = data.slabs["test"][-1]
    assert test_slab.name == "bright" and data.slab_normaliser(test_slab) == data.normaliser == without.normaliser
    assert data.grey_ranges() is None and data.volume_ranges == {"tiny": None, "bright": None}
    np.testing.assert_array_equal(data.normalised(test_slab), without.normaliser.apply(bright.image))


def test_a_volume_that_was_not_prepared_is_refused_by_name(tiny_params):
    """per_volume has no range for a volume prepare_data was not given: a clear error, not a KeyError."""
    tiny_params["normalise"]["mode"] = "per_volume"
    data = prepare_data(tiny_params, load_labelled_volumes(tiny_params), "ni")
    stranger = _other_volume(tiny_params, "stranger")
    with pytest.raises(ValueError, match=r"volume 'stranger' was not prepared \(prepared: tiny\).*test_volumes"):
        data.slab_normaliser(Slab(stranger, (0, 10)))


def test_test_volumes_must_have_their_own_name_and_the_training_phases(tiny_params):
    volumes = load_labelled_volumes(tiny_params)
    with pytest.raises(ValueError, match="'tiny' given more than once"):
        prepare_data(tiny_params, volumes, "ni", test_volumes=[_other_volume(tiny_params, "tiny")])
    two_phases = _other_volume(tiny_params, "two")
    two_phases = Volume(two_phases.image, np.where(two_phases.labels == 128, 0, two_phases.labels).astype(np.uint8),
                        VolumeMeta("two", two_phases.image.shape, "uint16", {0: "pore", 255: "ni"}, has_labels=True))
    with pytest.raises(ValueError, match="test volume 'two' has phases"):
        prepare_data(tiny_params, volumes, "ni", test_volumes=[two_phases])


def test_prepare_data_refuses_a_gap_narrower_than_the_context(tiny_params):
    """Where the split meets the 2.5D context: tiny's gap of 2 cannot hold 3 context slices."""
    tiny_params["train"]["context_slices"] = 3
    with pytest.raises(ValueError, match="split gap 2 is smaller than train.context_slices 3"):
        prepare_data(tiny_params, load_labelled_volumes(tiny_params), "ni")
    tiny_params["train"]["context_slices"] = 2
    assert prepare_data(tiny_params, load_labelled_volumes(tiny_params), "ni").splits["tiny"].gap == 2
