import numpy as np
import pytest

from socseg.data.tiling import Tiling, tile_starts


@pytest.mark.parametrize("length, size, step", [(501, 128, 128), (128, 128, 128), (200, 64, 32), (130, 128, 64)])
def test_tile_starts_cover_the_axis(length, size, step):
    starts = tile_starts(length, size, step)
    covered = np.zeros(length, bool)
    for s in starts:
        assert 0 <= s and s + size <= length
        covered[s : s + size] = True
    assert covered.all()


@pytest.mark.parametrize("shape, size, step", [((501, 501), 128, 128), ((192, 160), 64, 32), ((50, 70), 64, 64), ((128, 300), 128, 100)])
def test_ownership_partitions_every_pixel_exactly_once(shape, size, step):
    tiling = Tiling(*shape, size=size, step=step)
    count = np.zeros(tiling.padded_shape, int)
    for mask, (y, x) in zip(tiling.ownership_masks(), tiling.positions):
        count[y : y + size, x : x + size] += mask
    assert (count[: shape[0], : shape[1]] == 1).all()
    assert count[shape[0] :, :].sum() == 0 and count[:, shape[1] :].sum() == 0


@pytest.mark.parametrize("shape", [(501, 501), (50, 70), (128, 128)])
def test_extract_then_stitch_is_identity(shape):
    rng = np.random.default_rng(0)
    image = rng.random(shape).astype(np.float32)
    tiling = Tiling(*shape, size=64, step=48)
    tiles = tiling.extract(image)
    assert tiles.shape == (len(tiling), 64, 64)
    np.testing.assert_array_equal(tiling.stitch(tiles), image)


def test_stitch_keeps_channels():
    image = np.arange(100 * 90, dtype=np.float32).reshape(100, 90)
    tiling = Tiling(100, 90, size=64, step=64)
    tiles = np.stack([tiling.extract(image)] * 2, axis=-1)
    out = tiling.stitch(tiles)
    assert out.shape == (100, 90, 2)
    np.testing.assert_array_equal(out[..., 1], image)


def test_bad_tiling_arguments():
    with pytest.raises(ValueError):
        tile_starts(100, 64, 0)
    with pytest.raises(ValueError):
        tile_starts(100, 64, 65)
