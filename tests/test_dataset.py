import numpy as np
import pytest

from socseg.data.dataset import Augmentation, RandomCrops


def _slabs():
    rng = np.random.default_rng(0)
    image = rng.random((5, 40, 50)).astype(np.float32)
    target = (image > 0.5).astype(np.uint8)
    return image, target


def test_crops_have_the_right_shapes_and_match_their_targets():
    image, target = _slabs()
    crops = RandomCrops([image], [target], size=32, batch_size=4, steps=3, augmentation=Augmentation(True, True, 0.0))
    assert len(crops) == 3
    x, y = crops[0]
    assert x.shape == (4, 32, 32, 1) and x.dtype == np.float32
    assert y.shape == (4, 32, 32) and y.dtype == np.uint8
    # Geometric augmentation moves image and target together.
    np.testing.assert_array_equal((x[..., 0] > 0.5).astype(np.uint8), y)


def test_batches_are_reproducible_and_change_between_epochs():
    image, target = _slabs()
    a = RandomCrops([image], [target], size=32, batch_size=2, steps=2, seed=3)
    b = RandomCrops([image], [target], size=32, batch_size=2, steps=2, seed=3)
    np.testing.assert_array_equal(a[1][0], b[1][0])
    first = a[1][0].copy()
    a.on_epoch_end()
    assert not np.array_equal(a[1][0], first)


def test_intensity_jitter_changes_grey_values_only():
    image, target = _slabs()
    plain = RandomCrops([image], [target], size=32, batch_size=2, steps=1, augmentation=Augmentation(False, False, 0.0), seed=1)
    jitter = RandomCrops([image], [target], size=32, batch_size=2, steps=1, augmentation=Augmentation(False, False, 0.2), seed=1)
    (x0, y0), (x1, y1) = plain[0], jitter[0]
    np.testing.assert_array_equal(y0, y1)
    assert not np.allclose(x0, x1)
    assert np.abs(x0 - x1).max() < 0.45


def test_slices_smaller_than_the_crop_are_mirror_padded():
    """A 20x20 slice padded to a 32x32 crop: the 12 extra rows (columns) are rows 19, 18, ..., 8
    (the edge pixel repeated, then inward), in the image and its target alike."""
    image, target = _slabs()
    image, target = image[:1, :20, :20], target[:1, :20, :20]  # one slice: the crop is all of it, padded
    crops = RandomCrops([image], [target], size=32, batch_size=1, steps=1)
    x, y = crops[0]
    assert x.shape == (1, 32, 32, 1)
    x, y = x[0, ..., 0], y[0]
    np.testing.assert_array_equal(x[:20, :20], image[0])  # the slice itself, top left
    np.testing.assert_array_equal(x[20], image[0, 19, list(range(20)) + list(range(19, 7, -1))])
    np.testing.assert_array_equal(x[20:, :20], image[0, [19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8], :])
    np.testing.assert_array_equal(x[:20, 20:], image[0, :, [19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8]].T)
    np.testing.assert_array_equal(x[31, 31], image[0, 8, 8])  # the corner: mirrored both ways
    np.testing.assert_array_equal(x[20:, 20:], image[0, 19:7:-1, 19:7:-1])
    np.testing.assert_array_equal(y[20:, :20], target[0, 19:7:-1, :])  # the target mirrored the same way
    np.testing.assert_array_equal(y[:20, 20:], target[0, :, 19:7:-1])


def test_mismatched_slabs_are_rejected():
    image, target = _slabs()
    with pytest.raises(ValueError, match="bad training slab"):
        RandomCrops([image], [target[:, :10]], size=8, batch_size=1, steps=1)


def test_2p5d_crops_carry_neighbours_from_the_same_slab_only():
    depth = 4
    image = np.broadcast_to(np.arange(depth, dtype=np.float32)[:, None, None], (depth, 40, 40)).copy()  # slice z = z
    target = np.broadcast_to(np.arange(depth, dtype=np.uint8)[:, None, None], (depth, 40, 40)).copy()
    crops = RandomCrops([image], [target], size=32, batch_size=16, steps=1, context_slices=1,
                        augmentation=Augmentation(True, True, 0.0))
    x, y = crops[0]
    assert x.shape == (16, 32, 32, 3)
    for crop, label in zip(x, y):
        z = int(label[0, 0])
        assert crop[0, 0].tolist() == [max(z - 1, 0), z, min(z + 1, depth - 1)]  # clamped at the slab's ends
        assert np.ptp(crop, axis=(0, 1)).max() == 0  # geometric augmentation moves all channels together


def test_augmentation_from_the_params_section(params):
    from socseg.params import typed

    params["tiles"]["augment"].update(flips=False, rot90=True, intensity_jitter=0.03)
    assert Augmentation.from_params(typed(params).tiles.augment) == Augmentation(False, True, 0.03)
