import numpy as np
import pytest

from socseg.analysis.connectivity import compare_isolated, isolated_components, labelled_isolated


@pytest.fixture
def electrode():
    """A bar of the phase from face to face along x, a cube 3 voxels from it joined in the image by a
    bridge of grey 170 (the phase is 200, the rest 100) and a dimmer detour of grey 150, and a lone
    speck far from everything."""
    mask = np.zeros((12, 30, 30), dtype=bool)
    image = np.full(mask.shape, 100.0)
    mask[4:8, 4:8, :] = True                      # the network: touches both x faces
    mask[4:8, 11:15, 12:16] = True                # the cube, rows 8-10 between them are not the phase
    mask[5, 25, 25] = True                        # a speck, 17 rows from the bar
    image[mask] = 200.0
    image[6, 8:11, 13] = 170.0                    # the bright bridge
    image[5, 8:11, 15] = 150.0                    # a dimmer one
    return mask, image


def test_isolated_components_lists_each_with_its_distance_and_bridge_level(electrode):
    mask, image = electrode
    cube, speck = isolated_components(mask, image, reach=6)
    assert (cube.voxels, cube.z_range) == (64, (4, 7))
    assert cube.distance == pytest.approx(4.0)    # rows 7 and 11: three voxels apart
    assert cube.bridge_level == 170.0             # the brightest path, not the dimmer one
    assert (speck.voxels, speck.distance, speck.bridge_level) == (1, None, None)  # nothing within reach
    # a wider reach finds the bar from the speck, but no path brighter than the background
    assert isolated_components(mask, image, reach=20)[1].bridge_level == 100.0
    # without an image, no bridge level
    assert isolated_components(mask)[0].bridge_level is None


def test_compare_isolated_says_what_the_other_segmentation_keeps_and_joins(electrode):
    mask, image = electrode
    bridged = mask.copy()
    bridged[6, 8:11, 13] = True
    joined, speck = compare_isolated(mask, bridged, image, reach=6)
    assert (joined.kept, joined.joined) == (1.0, True)
    assert (speck.kept, speck.joined) == (1.0, False)
    without = mask.copy()
    without[4:8, 11:15, 12:16] = False
    missing = compare_isolated(mask, without)[0]
    assert (missing.component.voxels, missing.kept, missing.joined) == (64, 0.0, False)
    same = compare_isolated(mask, mask)[0]
    assert (same.kept, same.joined) == (1.0, False)
    # the reference labelled once serves several comparisons with the same answers
    once = labelled_isolated(mask, image, reach=6)
    assert compare_isolated(mask, bridged, image, 6, once) == [joined, speck]


def test_bad_input_is_refused_with_the_problem_named(electrode):
    mask, image = electrode
    with pytest.raises(ValueError, match="differs from the mask"):
        isolated_components(mask, image[:-1])
    with pytest.raises(ValueError, match=r"needs a \(Z, Y, X\) mask"):
        isolated_components(mask[0])
    with pytest.raises(ValueError, match="reach must be at least 1"):
        isolated_components(mask, reach=0)
    with pytest.raises(ValueError, match="differ in shape"):
        compare_isolated(mask, mask[:-1])
