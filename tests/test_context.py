"""2.5D input: neighbouring slices as channels, edge-replicated, streamed with bounded memory."""

import numpy as np
import pytest

from socseg.data.context import halo, iter_with_context, n_channels, neighbour_indices


def context_stack(images, k):
    """Reference: every slice with its clamped neighbours as channels, from the whole stack at once."""
    z = len(images)
    return np.moveaxis(images[np.stack([neighbour_indices(i, k, 0, z) for i in range(z)])], 1, -1)


def test_channels_and_clamped_neighbours():
    assert [n_channels(k) for k in (0, 1, 3)] == [1, 3, 7]
    with pytest.raises(ValueError, match="context_slices"):
        n_channels(-1)
    assert neighbour_indices(5, 2, 0, 10).tolist() == [3, 4, 5, 6, 7]
    assert neighbour_indices(0, 2, 0, 10).tolist() == [0, 0, 0, 1, 2]
    assert neighbour_indices(11, 1, 10, 12).tolist() == [10, 11, 11]  # clamped into [start, stop)
    with pytest.raises(ValueError, match="outside"):
        neighbour_indices(12, 1, 10, 12)


def test_context_stack_puts_neighbours_in_channels():
    images = np.arange(4)[:, None, None] * np.ones((4, 2, 3))  # slice z is filled with z
    stacked = context_stack(images, 1)
    assert stacked.shape == (4, 2, 3, 3)
    assert [stacked[z, 0, 0].tolist() for z in range(4)] == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    np.testing.assert_array_equal(context_stack(images, 0)[..., 0], images)


@pytest.mark.parametrize("depth", [1, 2, 5, 9])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_streaming_equals_the_whole_stack_and_reads_at_most_k_ahead(depth, k):
    images = np.random.default_rng(depth).random((depth, 4, 5))
    consumed = []

    def source():
        for z, image in enumerate(images):
            consumed.append(z)
            yield image

    out = []
    for z, stacked in enumerate(iter_with_context(source(), k)):
        assert len(consumed) <= min(depth, z + k + 1)  # never reads further ahead than needed
        out.append(stacked)
    expected = context_stack(images, k) if k else images
    np.testing.assert_array_equal(np.stack(out), expected)


def test_streaming_refuses_slices_of_different_shapes():
    with pytest.raises(ValueError, match="one shape"):
        list(iter_with_context([np.zeros((4, 4)), np.zeros((4, 5))], 1))


def test_halo_is_cut_at_the_stack_ends():
    assert halo(0, 4, 10, 2) == (0, 2)
    assert halo(4, 8, 10, 2) == (2, 2)
    assert halo(8, 10, 10, 2) == (2, 0)
    assert halo(3, 5, 10, 0) == (0, 0)
