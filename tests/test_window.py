"""Sliding-window inference: blending arithmetic, padding, TTA, streaming, seams, multi-axis fusion."""

import numpy as np
import pytest

from socseg.inference.window import (
    SlidingWindow,
    WindowSettings,
    fixed_batch,
    gaussian_importance,
    iter_window_probabilities,
    multi_axis_probabilities,
    predict_probabilities,
    sliding_window_probabilities,
)


def pointwise(tiles):
    """A 'network' whose output at a pixel depends on that pixel only: blending must reproduce it."""
    return np.concatenate([tiles, 2 * tiles], axis=-1)


def test_gaussian_importance_peaks_in_the_centre_and_never_vanishes():
    w = gaussian_importance(64)
    assert w.shape == (64, 64) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0, abs=1e-3) and w.min() > 0
    assert w[31:33, 31:33].min() > 0.99 and w[0, 0] < 1e-3
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1])


@pytest.mark.parametrize("shape", [(100, 70), (64, 64), (10, 7), (1, 200), (501, 501)])
@pytest.mark.parametrize("step_fraction", [0.5, 0.25, 1.0])
def test_blending_reproduces_a_pointwise_model_exactly(shape, step_fraction):
    rng = np.random.default_rng(0)
    images = rng.random((2, *shape), dtype=np.float32) * 1000
    probs = sliding_window_probabilities(pointwise, images, WindowSettings(32, step_fraction, batch_size=7))
    assert probs.shape == (2, *shape, 2)
    np.testing.assert_allclose(probs[..., 0], images, rtol=1e-5)
    np.testing.assert_allclose(probs[..., 1], 2 * images, rtol=1e-5)


def test_window_geometry_mirror_pads_and_covers_small_slices():
    settings = WindowSettings(64, 0.5)
    assert settings.step == 32 and settings.margin == 16
    window = SlidingWindow(501, 501, settings)
    assert window.pads == ((16, 16), (16, 16))
    # The border gets as much context as the interior: every pixel within step / 2 of a tile centre.
    centres = np.array(sorted({y for y, _ in window.positions})) + 32 - 0.5 - 16
    assert np.abs(np.arange(501)[:, None] - centres[None]).min(axis=1).max() <= 16
    small = SlidingWindow(10, 7, settings)
    assert small.padded_shape == (64, 64) and len(small.positions) == 1
    image = np.arange(70, dtype=np.float32).reshape(10, 7)
    padded = small.pad(image)
    np.testing.assert_array_equal(small.crop(padded), image)
    (top, _), (left, _) = small.pads
    assert padded[top - 1, left] == image[0, 0]  # symmetric mirror at the border
    assert WindowSettings(64, 1.0).margin == 0


def test_tta_averages_the_eight_flips_and_rotations_and_undoes_them():
    """A 'network' that adds a left-to-right ramp: the 8 transforms cancel it into a constant."""
    size = 16
    ramp = np.arange(size, dtype=np.float32)[None, None, :, None]
    calls = []

    def ramped(tiles):
        calls.append(len(tiles))
        return tiles + ramp

    image = np.random.default_rng(1).random((1, 40, 40), dtype=np.float32)
    with_tta = sliding_window_probabilities(ramped, image, WindowSettings(size, 0.5, tta=True, batch_size=100))
    np.testing.assert_allclose(with_tta[0, ..., 0], image[0] + (size - 1) / 2, atol=1e-5)
    assert len(calls) == 8
    without = sliding_window_probabilities(ramped, image, WindowSettings(size, 0.5, tta=False, batch_size=100))
    assert np.abs(without[0, ..., 0] - image[0] - (size - 1) / 2).max() > 1


def test_slices_stream_through_with_few_in_flight():
    consumed = []

    def slices():
        for k in range(30):
            consumed.append(k)
            yield np.full((40, 40), k, np.float32)

    settings = WindowSettings(32, 0.5, batch_size=8)  # 9 tiles per 40x40 slice
    for k, probs in enumerate(iter_window_probabilities(pointwise, slices(), settings)):
        assert probs[0, 0, 0] == pytest.approx(k)
        assert len(consumed) <= k + 2  # a batch of 8 tiles never spans more than two slices


def test_mixed_slice_shapes_and_bad_settings():
    out = list(iter_window_probabilities(pointwise, [np.ones((50, 60)), np.ones((33, 20))], WindowSettings(32)))
    assert [o.shape for o in out] == [(50, 60, 2), (33, 20, 2)]
    with pytest.raises(ValueError, match="step_fraction"):
        WindowSettings(32, 0.0)
    for bad in (np.ones((2, 3, 4, 5)), np.ones(7), np.ones((0, 4))):
        with pytest.raises(ValueError, match="slice, got shape"):
            list(iter_window_probabilities(pointwise, [bad], WindowSettings(32)))


def test_fixed_batch_pads_short_batches_and_drops_the_padding():
    shapes = []

    def recording(tiles):
        shapes.append(tiles.shape)
        return pointwise(tiles)

    images = np.random.default_rng(4).random((3, 40, 50), dtype=np.float32)
    probs = sliding_window_probabilities(fixed_batch(recording, 8), images, WindowSettings(32, 0.5, batch_size=8))
    np.testing.assert_allclose(probs[..., 0], images, rtol=1e-6)
    assert set(shapes) == {(8, 32, 32, 1)}


def test_settings_from_params_section_and_overrides():
    settings = WindowSettings.from_params(128, {"step_fraction": 0.25, "tta": "true", "batch_size": 4, "other": 1})
    assert settings == WindowSettings(128, 0.25, True, 4)
    assert WindowSettings.from_params(128, {"tta": True}, tta=False, step_fraction=None).tta is False


def test_fixed_tiling_for_validation_still_counts_each_pixel_once():
    images = np.random.default_rng(2).random((2, 70, 90), dtype=np.float32)
    np.testing.assert_allclose(predict_probabilities(pointwise, images, 32, 4)[..., 0], images)


def test_multi_axis_fusion_places_each_axis_back_where_it_came_from():
    volume = np.random.default_rng(3).random((6, 9, 11), dtype=np.float32)
    planes_seen = []

    def planes(batch):
        planes_seen.append(batch.shape[1:])
        return batch[..., None] * 3

    fused = multi_axis_probabilities(planes, volume, chunk=4)
    np.testing.assert_allclose(fused[..., 0], volume * 3, rtol=1e-6)
    assert {(9, 11), (6, 11), (6, 9)} == set(planes_seen)

    def by_plane_height(batch):  # z planes say 9, y and x planes say 6: mean (9 + 6 + 6) / 3
        return np.full((*batch.shape, 1), batch.shape[1], np.float32)

    np.testing.assert_allclose(multi_axis_probabilities(by_plane_height, volume), 7.0)
    only_z = multi_axis_probabilities(by_plane_height, volume, axes=["z"])
    np.testing.assert_allclose(only_z, 9.0)
    with pytest.raises(ValueError, match="axes"):
        multi_axis_probabilities(planes, volume, axes=["q"])


@pytest.fixture(scope="module")
def unet_slice():
    """A small random-weight U-Net (raw grey in) and a 256x256 phantom slice."""
    import keras

    from socseg.params import load_params
    from socseg.model.unet import build_model
    from socseg.data.normalise import Normaliser
    from socseg.data.synth import synth_from_params
    from socseg.model.export import export_model

    keras.utils.set_random_seed(0)
    image = synth_from_params(load_params(), "seams", shape=(1, 256, 256), seed=3).image[0].astype(np.float32)
    low, high = np.percentile(image, [0.5, 99.5])
    network = build_model("unet", "phases", n_classes=3, base_filters=4, encoder_weights="none")
    model = export_model(network, Normaliser(float(low), float(high), 0.5, 99.5))
    return model.predict_on_batch, image


def _seam_ratio(probs, reference, seams):
    """Mean error on the seam columns and rows over the median error elsewhere (1 = no pattern)."""
    err = np.abs(probs - reference).mean(axis=-1)[16:-16, 16:-16]  # skip the image borders
    ratios = []
    for profile in (err.mean(axis=0), err.mean(axis=1)):
        index = np.arange(16, 240)
        at_seam = np.isin(index, seams)
        away = np.array([min(abs(i - s) for s in seams) > 2 for i in index])
        ratios.append(profile[at_seam].mean() / np.median(profile[away]))
    return max(ratios)


def test_no_seams_tiled_matches_each_tile_and_has_no_grid_pattern(unet_slice):
    predict, image = unet_slice
    settings = WindowSettings(64, 0.5, batch_size=16)
    tiled = sliding_window_probabilities(predict, image[None], settings)[0]
    # A U-Net is fully convolutional: the whole 256x256 slice in one pass is the seam-free reference.
    reference = np.asarray(predict(image[None, ..., None]))[0]

    # 1. In each tile's centre, the blend is that tile's own prediction (neighbours weigh ~exp(-6)).
    window = SlidingWindow(256, 256, settings)
    padded = window.pad(image)
    (top, _), (left, _) = window.pads
    worst = 0.0
    for y, x in window.positions:
        own = np.asarray(predict(padded[None, y : y + 64, x : x + 64, None]))[0, 28:36, 28:36]
        iy, ix = y - top + 28, x - left + 28  # that centre in image coordinates
        if 0 <= iy and iy + 8 <= 256 and 0 <= ix and ix + 8 <= 256:
            worst = max(worst, float(np.abs(tiled[iy : iy + 8, ix : ix + 8] - own).max()))
    assert worst <= 0.02 * np.ptp(reference)

    # 2. No error concentrated on the tile grid; the naive non-overlapping stitch shows its seams.
    seams = [63, 64, 127, 128, 191, 192]
    naive = predict_probabilities(predict, image[None], 64)[0]
    assert _seam_ratio(naive, reference, seams) > 3.0  # the check can see seams
    assert _seam_ratio(tiled, reference, seams) < 2.0
    assert np.abs(tiled - reference).mean() < np.abs(naive - reference).mean()


def test_tta_undoes_rotations_exactly():
    """An orientation-dependent 'network' (keeps the top-left quadrant): its TTA output is the mean
    of the four quadrant masks, each mapped back where it came from."""
    from socseg.inference.window import with_tta

    def top_left(tiles):
        out = np.zeros_like(tiles)
        out[:, :4, :4] = tiles[:, :4, :4]
        return out

    tiles = np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)
    expected = np.zeros_like(tiles)
    for corner in (np.s_[:, :4, :4], np.s_[:, :4, 4:], np.s_[:, 4:, :4], np.s_[:, 4:, 4:]):
        expected[corner] = tiles[corner] / 4  # each quadrant is the kept corner under 2 of the 8 transforms
    np.testing.assert_allclose(with_tta(top_left)(tiles), expected, atol=1e-6)


def first_and_last_channel(tiles):
    """A 2.5D 'network' reporting the slice before and after (channel 0 and 2)."""
    return np.stack([tiles[..., 0], tiles[..., -1]], axis=-1)


def test_fixed_tiling_2p5d_takes_context_from_the_whole_stack():
    images = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 40, 50), np.float32)
    probs = predict_probabilities(first_and_last_channel, images, 32, 4, context_slices=1, slices=range(2, 5))
    assert probs.shape == (3, 40, 50, 2)
    assert [(p[..., 0].max(), p[..., 1].max()) for p in probs] == [(1, 3), (2, 4), (3, 5)]
    edge = predict_probabilities(first_and_last_channel, images, 32, 4, context_slices=1, slices=range(0, 1))
    assert (edge[0, ..., 0].max(), edge[0, ..., 1].max()) == (0, 1)  # replicated before slice 0


def test_sliding_window_2p5d_halo_slices_are_context_only():
    images = np.random.default_rng(5).random((7, 40, 33), dtype=np.float32)
    settings = WindowSettings(32, 0.5, batch_size=5)
    whole = sliding_window_probabilities(first_and_last_channel, images, settings, context_slices=2)
    np.testing.assert_allclose(whole[3, ..., 0], images[1], rtol=1e-6)
    np.testing.assert_allclose(whole[3, ..., 1], images[5], rtol=1e-6)
    part = sliding_window_probabilities(first_and_last_channel, images, settings, 2, halo_before=2, halo_after=1)
    np.testing.assert_allclose(part, whole[2:6])
    with pytest.raises(ValueError, match="halo"):
        sliding_window_probabilities(first_and_last_channel, images, settings, 2, halo_before=4, halo_after=4)


def test_multi_axis_halo_gives_every_chunk_its_true_neighbours():
    volume = np.random.default_rng(6).random((7, 9, 10), dtype=np.float32)

    def next_plane(batch, before, after):  # a 2.5D model with k = 1 looking at the following plane
        following = np.concatenate([batch[1:], batch[-1:]])
        return following[before : len(batch) - after, ..., None]

    chunked = multi_axis_probabilities(next_plane, volume, axes=["z"], chunk=2, halo=1)
    whole = multi_axis_probabilities(next_plane, volume, axes=["z"], chunk=100, halo=1)
    np.testing.assert_allclose(chunked, whole)
    np.testing.assert_allclose(whole[:-1, ..., 0], volume[1:])
