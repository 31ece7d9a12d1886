import numpy as np
import pytest

from socseg.data.tiling import tile_starts


@pytest.mark.parametrize("length, size, step", [(501, 128, 128), (128, 128, 128), (200, 64, 32), (130, 128, 64)])
def test_tile_starts_cover_the_axis(length, size, step):
    starts = tile_starts(length, size, step)
    covered = np.zeros(length, bool)
    for s in starts:
        assert 0 <= s and s + size <= length
        covered[s : s + size] = True
    assert covered.all()


def test_bad_tiling_arguments():
    with pytest.raises(ValueError):
        tile_starts(100, 64, 0)
    with pytest.raises(ValueError):
        tile_starts(100, 64, 65)
