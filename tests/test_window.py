"""Sliding-window inference: blending arithmetic, padding, TTA, streaming, seams, 2.5D context,
multi-axis fusion; whole stacks through the :class:`Predictor`."""

import numpy as np
import pytest

from socseg.data.context import iter_chunks
from socseg.data.normalise import FixedRange
from socseg.inference.predictor import ModelConfig, Predictor
from socseg.inference.request import InferenceOptions, InferenceRequest
from socseg.inference.window import (
    SlidingWindow,
    WindowSettings,
    fixed_batch,
    gaussian_importance,
    iter_window_probabilities,
    smooth_probabilities,
)

PHASE_MAP = {0: "pore", 128: "ysz", 255: "ni"}


class Network:
    """A NumPy function as the Predictor's network (anything with ``predict_on_batch``); records each batch."""

    def __init__(self, fn):
        self.fn = fn
        self.batches = []

    def predict_on_batch(self, tiles):
        self.batches.append(tiles.shape)
        return self.fn(tiles)


def model_config(tile_size, step_fraction=0.5, tta=False, batch_size=8, context_slices=0, normalisation=None,
                 window="sliding", whole_slice_max_pixels=0, planes="z", fusion_depth=4, fusion_halo=2):
    return ModelConfig(
        task="phases",
        encoder="unet",
        class_names=["pore", "ysz", "ni"],
        phase_map=PHASE_MAP,
        tile_size=tile_size,
        context_slices=context_slices,
        normalisation=normalisation or FixedRange(low=0.0, high=1.0),
        window=window,
        whole_slice_max_pixels=whole_slice_max_pixels,
        step_fraction=step_fraction,
        tta=tta,
        batch_size=batch_size,
        max_slice_pixels=10**8,
        max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime="keras",
        planes=planes, fusion_depth=fusion_depth, fusion_halo=fusion_halo,
    )


def sliding(tile_size, step_fraction, tta, batch_size):
    return WindowSettings(tile_size, step_fraction, tta, batch_size, "sliding", 0)


def whole(tile_size, batch_size, max_pixels=10**8, tta=False):
    return WindowSettings(tile_size, 0.5, tta, batch_size, "whole_slice", max_pixels)


def predictor(fn, tile_size, **settings):
    return Predictor(Network(fn), model_config(tile_size, **settings))


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
    probs = predictor(pointwise, 32, step_fraction=step_fraction, batch_size=7).probabilities(images)
    assert probs.shape == (2, *shape, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs[..., 0], images, rtol=1e-5)
    np.testing.assert_allclose(probs[..., 1], 2 * images, rtol=1e-5)


def test_predictor_runs_an_exported_keras_model_with_its_normalisation():
    """Raw grey in: the exported model's first layer clips (x - low) / (high - low) into [0, 1]."""
    import keras

    from socseg.data.normalise import Normaliser
    from socseg.model.export import export_model

    inputs = keras.Input(shape=(None, None, 1))
    # Pointwise, so blending must reproduce it: channel 0 the normalised grey, channel 1 its complement.
    outputs = keras.layers.Concatenate()([inputs, keras.layers.Rescaling(-1.0, offset=1.0)(inputs)])
    network = export_model(keras.Model(inputs, outputs), Normaliser(100.0, 1100.0, 0.5, 99.5))
    config = model_config(32, step_fraction=0.5, batch_size=5, normalisation=FixedRange(low=100.0, high=1100.0))
    model = Predictor(network, config)
    images = np.random.default_rng(7).integers(0, 1300, (3, 45, 38)).astype(np.uint16)
    probs = model.probabilities(images)
    expected = np.clip((images.astype(np.float32) - 100.0) / 1000.0, 0.0, 1.0)
    assert probs.shape == (3, 45, 38, 2)
    np.testing.assert_allclose(probs[..., 0], expected, atol=1e-5)
    np.testing.assert_allclose(probs[..., 1], 1.0 - expected, atol=1e-5)
    # Classes are the argmax, labels the phase map's values of those classes.
    classes = model.classes(images)
    far = np.abs(expected - 0.5) > 1e-3  # away from the tie, the argmax is unambiguous
    np.testing.assert_array_equal(classes[far], (expected < 0.5)[far].astype(np.uint8))
    np.testing.assert_array_equal(model.to_labels(classes), np.where(classes == 1, 128, 0).astype(np.uint8))


def test_window_geometry_mirror_pads_and_covers_small_slices():
    settings = sliding(64, 0.5, False, 8)
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
    assert sliding(64, 1.0, False, 8).margin == 0


def test_tta_averages_the_eight_flips_and_rotations_and_undoes_them():
    """A 'network' that adds a left-to-right ramp: the 8 transforms cancel it into a constant."""
    size = 16
    ramp = np.arange(size, dtype=np.float32)[None, None, :, None]

    model = predictor(lambda tiles: tiles + ramp, size, step_fraction=0.5, tta=True, batch_size=100)
    image = np.random.default_rng(1).random((1, 40, 40), dtype=np.float32)
    with_tta = model.probabilities(image)  # the model's own setting: TTA on
    np.testing.assert_allclose(with_tta[0, ..., 0], image[0] + (size - 1) / 2, atol=1e-5)
    assert len(model.network.batches) == 8  # one batch of tiles, eight transforms
    without = model.probabilities(image, request=model.request(InferenceOptions(tta=False), source=image))  # per-call override
    assert len(model.network.batches) == 9
    assert np.abs(without[0, ..., 0] - image[0] - (size - 1) / 2).max() > 1
    # The step can be overridden per call too: a quarter-tile step needs more tiles than half a tile.
    (n_half,) = {shape[0] for shape in model.network.batches}
    model.probabilities(image, request=model.request(InferenceOptions(tta=False, step_fraction=0.25), source=image))
    assert model.network.batches[-1][0] > n_half


def test_slices_stream_through_with_few_in_flight():
    consumed = []

    def slices():
        for k in range(30):
            consumed.append(k)
            yield np.full((40, 40), k, np.float32)

    settings = sliding(32, 0.5, False, 8)  # 9 tiles per 40x40 slice
    for k, probs in enumerate(iter_window_probabilities(pointwise, slices(), settings)):
        assert probs[0, 0, 0] == pytest.approx(k)
        assert len(consumed) <= k + 2  # a batch of 8 tiles never spans more than two slices


def test_mixed_slice_shapes_and_bad_settings():
    settings = sliding(32, 0.5, False, 8)
    out = list(iter_window_probabilities(pointwise, [np.ones((50, 60)), np.ones((33, 20))], settings))
    assert [o.shape for o in out] == [(50, 60, 2), (33, 20, 2)]
    with pytest.raises(ValueError, match="step_fraction"):
        sliding(32, 0.0, False, 8)
    with pytest.raises(ValueError, match="tile size"):
        sliding(0, 0.5, False, 8)
    with pytest.raises(ValueError, match="batch size"):
        sliding(32, 0.5, False, 0)
    for bad in (np.ones((2, 3, 4, 5)), np.ones(7), np.ones((0, 4))):
        with pytest.raises(ValueError, match="slice, got shape"):
            list(iter_window_probabilities(pointwise, [bad], settings))
    with pytest.raises(ValueError, match=r"\(N, H, W\) stack"):
        predictor(pointwise, 32).probabilities(np.ones((40, 40)))


def test_fixed_batch_pads_short_batches_and_drops_the_padding():
    shapes = []

    def recording(tiles):
        shapes.append(tiles.shape)
        return pointwise(tiles)

    images = np.random.default_rng(4).random((3, 40, 50), dtype=np.float32)
    settings = sliding(32, 0.5, False, 8)
    probs = np.stack(list(iter_window_probabilities(fixed_batch(recording), images, settings)))
    np.testing.assert_allclose(probs[..., 0], images, rtol=1e-6)
    assert set(shapes) == {(8, 32, 32, 1)}
    n_tiles = 3 * len(SlidingWindow(40, 50, settings).positions)
    assert n_tiles % 8 and len(shapes) == -(-n_tiles // 8)  # full batches and one padded short batch


def test_a_request_gives_the_model_window_settings_and_per_call_overrides():
    config = model_config(128, step_fraction=0.25, tta=True, batch_size=4)

    def settings(**options):
        return InferenceRequest.resolve(config, InferenceOptions(**options)).window

    assert settings() == sliding(128, 0.25, True, 4)
    assert settings(tta=False) == sliding(128, 0.25, False, 4)
    assert settings(step_fraction=0.5) == sliding(128, 0.5, True, 4)
    assert settings(tta=None, step_fraction=None, window=None) == settings()
    assert settings(window="whole_slice").window == "whole_slice"
    with pytest.raises(ValueError, match="step_fraction"):
        InferenceOptions(step_fraction=1.5)  # refused when the options are made, before any model
    with pytest.raises(ValueError, match="unknown window 'tiles': use one of whole_slice, sliding"):
        InferenceOptions(window="tiles")


def test_multi_axis_fusion_places_each_axis_back_where_it_came_from():
    """A 2.5D 'network' (k = 1) answering the following plane: along each axis that is a different
    neighbour, so the mean of the three axes shows where each went and that its context came from
    the axis being sliced."""
    volume = np.random.default_rng(3).random((6, 9, 11), dtype=np.float32)
    model = predictor(lambda tiles: tiles[..., 2:], 16, batch_size=6, context_slices=1, planes="zyx")

    def following(axis):
        index = np.minimum(np.arange(volume.shape[axis]) + 1, volume.shape[axis] - 1)
        return np.take(volume, index, axis=axis)

    fused = model.probabilities(volume)  # the model's own planes
    assert fused.shape == (6, 9, 11, 1)
    np.testing.assert_allclose(fused[..., 0], (following(0) + following(1) + following(2)) / 3, rtol=1e-5)

    def along(planes):
        return model.probabilities(volume, request=model.request(InferenceOptions(planes=planes), source=volume))[..., 0]

    np.testing.assert_allclose(along("z"), following(0), rtol=1e-6)
    np.testing.assert_allclose(along("x"), following(2), rtol=1e-6)
    np.testing.assert_allclose(along("yz"), (following(0) + following(1)) / 2, rtol=1e-5)  # any order, zyx kept
    for bad in ("q", "", "zz", "zyxw"):
        with pytest.raises(ValueError, match="planes must be distinct letters of 'zyx'"):
            InferenceOptions(planes=bad)


def test_a_fused_chunk_read_with_its_halo_is_predicted_as_in_the_whole_volume():
    """Multi-axis fusion streams: a chunk's y and x planes reach into the ``fusion_halo`` slices
    read around it, so chunks give the whole volume's probabilities wherever the network's reach
    along z (here one row of the plane) stays within the halo; without the halo they differ at
    chunk borders. Every chunked path reads what the request says (iter_volume here)."""
    volume = np.random.default_rng(5).random((13, 9, 11), dtype=np.float32)

    def next_row(tiles):  # each output row is the input row below it, as three class scores
        below = np.roll(tiles[..., :1], -1, axis=1)
        return np.concatenate([below, 1.0 - below, np.full_like(below, 0.4)], axis=-1)

    model = predictor(next_row, 16, window="whole_slice", whole_slice_max_pixels=10**8, planes="zyx",
                      fusion_depth=4, fusion_halo=2)
    whole = model.probabilities(volume)
    request = model.request(source=volume)
    assert request.fuses and request.context(0) == 2 and request.chunk_slices(8) == 4
    chunks = list(iter_chunks(13, request.chunk_slices(8), request.context(model.context_slices)))
    assert [(c.start, c.before, c.after) for c in chunks] == [(0, 0, 2), (4, 2, 2), (8, 2, 1), (12, 2, 0)]
    pieces = [model.probabilities(volume[c.read], c.before, c.after, request) for c in chunks]
    np.testing.assert_allclose(np.concatenate(pieces), whole, rtol=1e-6)
    bare = [model.probabilities(volume[c.read], c.before, c.after, request) for c in iter_chunks(13, 4, 0)]
    assert not np.allclose(np.concatenate(bare), whole)  # the halo is what makes them equal
    streamed = np.concatenate([classes for _, classes in model.iter_volume(volume, request=request)])
    np.testing.assert_array_equal(streamed, model.to_classes(whole))
    slice_by_slice = model.request(InferenceOptions(planes="z"), source=volume)
    assert not slice_by_slice.fuses and slice_by_slice.context(1) == 1 and slice_by_slice.chunk_slices(8) == 8


@pytest.fixture(scope="module")
def unet_slice():
    """A small random-weight U-Net (raw grey in) as a Predictor with 64-pixel tiles, and a 256x256 phantom slice."""
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
    config = model_config(64, step_fraction=0.5, batch_size=16, normalisation=FixedRange(low=float(low), high=float(high)))
    return Predictor(model, config), image


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
    model, image = unet_slice
    predict = model.network.predict_on_batch
    tiled = model.probabilities(image[None])[0]
    # A U-Net is fully convolutional: the whole 256x256 slice in one pass is the seam-free reference.
    reference = np.asarray(predict(image[None, ..., None]))[0]

    # 1. In each tile's centre, the blend is that tile's own prediction (neighbours weigh ~exp(-6)).
    window = SlidingWindow(256, 256, model.request(source=image[None]).window)
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
    naive = np.zeros_like(reference)
    for y in range(0, 256, 64):
        for x in range(0, 256, 64):
            naive[y : y + 64, x : x + 64] = np.asarray(predict(image[None, y : y + 64, x : x + 64, None]))[0]
    # Step 1.0 is that stitch: no overlap, no padding, every pixel from one tile.
    np.testing.assert_allclose(model.probabilities(image[None], request=model.request(InferenceOptions(step_fraction=1.0), source=image[None]))[0], naive, atol=1e-5)
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


def test_2p5d_context_slices_are_context_only():
    images = np.random.default_rng(5).random((7, 40, 33), dtype=np.float32)
    model = predictor(first_and_last_channel, 32, batch_size=5, context_slices=2)
    whole = model.probabilities(images)
    assert whole.shape == (7, 40, 33, 2)
    np.testing.assert_allclose(whole[3, ..., 0], images[1], rtol=1e-6)
    np.testing.assert_allclose(whole[3, ..., 1], images[5], rtol=1e-6)
    np.testing.assert_allclose(whole[0, ..., 0], images[0], rtol=1e-6)  # replicated before slice 0
    np.testing.assert_allclose(whole[6, ..., 1], images[6], rtol=1e-6)  # and after the last
    part = model.probabilities(images, context_before=2, context_after=1)
    np.testing.assert_allclose(part, whole[2:6])
    for before, after in ((4, 4), (-1, 0), (0, -1)):
        with pytest.raises(ValueError, match="does not fit"):
            model.probabilities(images, context_before=before, context_after=after)


def test_iter_volume_takes_context_from_the_whole_stack():
    """Chunks of a z range, each with its true neighbours: as if the whole stack were predicted at once."""
    images = np.random.default_rng(6).random((9, 40, 50), dtype=np.float32)
    model = predictor(first_and_last_channel, 32, batch_size=4, context_slices=1)
    expected = model.classes(images)  # class 1 where the slice after is brighter than the one before
    np.testing.assert_array_equal(expected[4], (images[5] > images[3]).astype(np.uint8))
    pieces = list(model.iter_volume(images, z_range=(2, 7), chunk=2))
    assert [(c.start, c.stop, c.before, c.after) for c, _ in pieces] == [(2, 4, 1, 1), (4, 6, 1, 1), (6, 7, 1, 1)]
    np.testing.assert_array_equal(np.concatenate([classes for _, classes in pieces]), expected[2:7])
    edge = list(model.iter_volume(images, z_range=(0, 1)))
    assert edge[0][0].before == 0
    np.testing.assert_array_equal(edge[0][1][0], (images[1] > images[0]).astype(np.uint8))  # replicated before slice 0


# ----------------------------------------------------------------------------- whole-slice passes


@pytest.mark.parametrize("shape", [(501, 501), (100, 70), (10, 7), (1, 200)])
def test_whole_slice_pass_reproduces_a_pointwise_model_in_one_pass_per_slice(shape):
    images = np.random.default_rng(7).random((3, *shape), dtype=np.float32)
    calls = []

    def recording(batch):
        calls.append(batch.shape)
        return pointwise(batch)

    settings = whole(32, batch_size=1)  # 1 tile of 32^2 per pass: one slice per pass, whatever its size
    probs = np.stack(list(iter_window_probabilities(recording, images, settings)))
    np.testing.assert_allclose(probs[..., 0], images, rtol=1e-6)
    np.testing.assert_allclose(probs[..., 1], 2 * images, rtol=1e-6)
    assert len(calls) == 3
    (_, h, w, _), = set(calls)
    assert h % 32 == 0 and w % 32 == 0 and h >= shape[0] + 32 and w >= shape[1] + 32  # margin, then a multiple of 32


def test_whole_slice_passes_batch_slices_by_pixels_and_keep_order_across_shapes():
    calls = []

    def recording(batch):
        calls.append(batch.shape)
        return pointwise(batch)

    images = [np.full((40, 40), k, np.float32) for k in range(5)] + [np.full((70, 20), 9, np.float32)]
    # 40 + 2 x 16 margin -> 96^2 padded slices; 18 tiles of 32^2 = 2 slices per pass; the odd shape flushes.
    out = list(iter_window_probabilities(recording, images, whole(32, batch_size=18)))
    assert [o[0, 0, 0] for o in out] == [0, 1, 2, 3, 4, 9]
    assert [o.shape for o in out] == [(40, 40, 2)] * 5 + [(70, 20, 2)]
    assert [c[0] for c in calls] == [2, 2, 1, 1]


def test_slices_over_the_whole_slice_bound_take_the_sliding_window():
    calls = []

    def recording(batch):
        calls.append(batch.shape)
        return pointwise(batch)

    images = [np.full((40, 40), 1, np.float32), np.full((200, 200), 2, np.float32), np.full((40, 40), 3, np.float32)]
    out = list(iter_window_probabilities(recording, images, whole(32, batch_size=8, max_pixels=100 * 100)))
    assert [o[5, 5, 0] for o in out] == [1, 2, 3] and out[1].shape == (200, 200, 2)
    assert {c[1:3] for c in calls} == {(96, 96), (32, 32)}  # whole passes for the small ones, 32-tiles for the big
    with pytest.raises(ValueError, match="whole_slice_max_pixels"):
        WindowSettings(32, 0.5, False, 8, "whole_slice", -1)


def test_tta_on_whole_non_square_slices_cancels_a_ramp():
    ramp_model = predictor(lambda x: x + np.arange(x.shape[2], dtype=np.float32)[None, None, :, None], 32,
                           tta=True, window="whole_slice", whole_slice_max_pixels=10**6)
    image = np.zeros((1, 30, 50), np.float32)
    out = ramp_model.probabilities(image)[0, ..., 0]
    # Each transform adds a ramp along the padded slice's x or y; undone and averaged, the result
    # varies far less across x than the raw ramp (0..width) would.
    assert out.shape == (30, 50) and np.ptp(out) < 0.6 * 50


def test_fixed_batch_keeps_one_batch_size_per_shape():
    seen = []

    def recording(batch):
        seen.append(batch.shape)
        return pointwise(batch)

    padded = fixed_batch(recording)
    for n, size in [(4, 32), (1, 32), (1, 64), (3, 32)]:
        out = padded(np.ones((n, size, size, 1), np.float32))
        assert out.shape == (n, size, size, 2)
    assert seen == [(4, 32, 32, 1), (4, 32, 32, 1), (1, 64, 64, 1), (4, 32, 32, 1)]


def test_whole_slice_pass_is_the_network_on_the_padded_slice_and_close_to_the_sliding_window(unet_slice):
    model, image = unet_slice
    whole_probs = model.probabilities(image[None], request=model.request(InferenceOptions(window="whole_slice"), source=image[None]))[0]
    reference = np.asarray(model.network.predict_on_batch(
        np.pad(image, 16, mode="symmetric")[None, ..., None]))[0, 16:-16, 16:-16]  # 256 + 32 = 288 = 9 x 32
    np.testing.assert_allclose(whole_probs, reference, atol=2e-4)  # float32 kernels differ per shape
    tiled = model.probabilities(image[None], request=model.request(InferenceOptions(window="sliding"), source=image[None]))[0]
    assert np.mean(np.argmax(tiled, -1) == np.argmax(whole_probs, -1)) > 0.9


def test_smoothing_removes_a_one_pixel_speck_and_keeps_probabilities_normalised():
    """A pixel that only just prefers another class, alone in a field of one class, is outvoted by its
    neighbourhood; a feature much wider than sigma keeps its class; each pixel still sums to one."""
    probs = np.zeros((40, 40, 3), np.float32)
    probs[..., 0] = 0.8
    probs[..., 1] = 0.2
    probs[10, 10] = (0.3, 0.7, 0.0)  # the speck
    probs[20:36, 20:36] = (0.1, 0.0, 0.9)  # a 16-pixel square of Ni
    assert smooth_probabilities(probs, 0.0) is probs
    smoothed = smooth_probabilities(probs, 1.0)
    assert smoothed.dtype == np.float32 and smoothed.shape == probs.shape
    np.testing.assert_allclose(smoothed.sum(-1), 1.0, atol=1e-5)
    assert probs.argmax(-1)[10, 10] == 1 and smoothed.argmax(-1)[10, 10] == 0
    assert (smoothed.argmax(-1)[22:34, 22:34] == 2).all()


def test_the_predictor_smooths_with_the_models_sigma_unless_the_request_overrides_it():
    speckled = np.random.default_rng(1).random((2, 48, 48)).astype(np.float32)
    plain = predictor(pointwise_softmax, 32, window="whole_slice", whole_slice_max_pixels=10**6)
    config = plain.config
    smoothing = Predictor(Network(pointwise_softmax), type(config)(**{**vars(config), "smoothing_sigma": 1.0}))
    raw = plain.probabilities(speckled)
    np.testing.assert_allclose(smoothing.probabilities(speckled), np.stack([smooth_probabilities(p, 1.0) for p in raw]),
                               atol=1e-6)
    override = smoothing.request(InferenceOptions(smoothing_sigma=0.0), source=speckled)
    np.testing.assert_array_equal(smoothing.probabilities(speckled, request=override), raw)
    assert np.count_nonzero(smoothing.classes(speckled) != plain.classes(speckled)) > 0


def pointwise_softmax(tiles):
    """Three class scores from each pixel's grey value alone: a speckled input gives speckled classes."""
    grey = tiles[..., :1]
    scores = np.concatenate([1 - grey, 0.5 * np.ones_like(grey), grey], axis=-1) * 6.0
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return (scores / scores.sum(-1, keepdims=True)).astype(np.float32)


def test_an_ensemble_averages_its_members_probabilities_and_labels_by_the_mean():
    """Two 'networks' that disagree on a pixel: the ensemble returns the mean of their
    probabilities (what nnU-Net averages), so its classes follow the more confident member."""
    from socseg.inference.predictor import Ensemble

    def confident_ni(tiles):
        return np.concatenate([0.05 + 0 * tiles, 0.05 + 0 * tiles, 0.9 + 0 * tiles], axis=-1)

    def unsure_pore(tiles):
        return np.concatenate([0.4 + 0 * tiles, 0.3 + 0 * tiles, 0.3 + 0 * tiles], axis=-1)

    images = np.random.default_rng(0).random((3, 40, 40)).astype(np.float32)
    a, b = predictor(confident_ni, 32, window="whole_slice"), predictor(unsure_pore, 32, window="whole_slice")
    ensemble = Ensemble([a, b])
    expected = (a.probabilities(images) + b.probabilities(images)) / 2
    np.testing.assert_allclose(ensemble.probabilities(images), expected, atol=1e-6)
    assert set(np.unique(b.classes(images))) == {0}
    assert set(np.unique(ensemble.classes(images))) == {2}  # mean Ni 0.6 > pore 0.225
    assert ensemble.runtime.startswith("ensemble of 2")
    # an ensemble is a predictor everywhere: iter_volume streams its classes
    chunks = list(ensemble.iter_volume(images, chunk=2))
    assert sum(c.size for c, _ in chunks) == 3 and all((classes == 2).all() for _, classes in chunks)


@pytest.mark.parametrize("change, named", [
    ({"context_slices": 1}, "context_slices"),
    ({"normalisation": FixedRange(low=0.0, high=1.0, low_percentile=1.0, high_percentile=99.0)}, "normalisation percentiles"),
])
def test_an_ensemble_refuses_members_that_see_other_inputs(change, named):
    from socseg.inference.predictor import Ensemble

    first = predictor(pointwise, 32)
    other = Predictor(Network(pointwise), model_config(32, **change))
    with pytest.raises(ValueError, match=f"member 2 differs from member 1 in {named}"):
        Ensemble([first, other])
    with pytest.raises(ValueError, match="at least 2 models"):
        Ensemble([first])
