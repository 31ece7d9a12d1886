"""2.5D input: neighbouring slices as channels, edge-replicated, streamed with bounded memory."""

import numpy as np
import pytest

from socseg.data.context import Chunk, iter_chunks, iter_with_context, n_channels, neighbour_indices


def context_stack(images, k):
    """Reference written without socseg: slice z with slices z-k .. z+k as channels, a neighbour
    past either end of the stack replaced by the end slice, from the whole stack at once."""
    depth = len(images)
    return np.stack([np.stack([images[min(max(z + d, 0), depth - 1)] for d in range(-k, k + 1)], axis=-1)
                     for z in range(depth)])


def test_channels_and_clamped_neighbours():
    assert [n_channels(k) for k in (0, 1, 3)] == [1, 3, 7]
    with pytest.raises(ValueError, match="context_slices"):
        n_channels(-1)
    assert neighbour_indices(5, 2, 0, 10).tolist() == [3, 4, 5, 6, 7]
    assert neighbour_indices(0, 2, 0, 10).tolist() == [0, 0, 0, 1, 2]
    assert neighbour_indices(11, 1, 10, 12).tolist() == [10, 11, 11]  # clamped into [start, stop)
    with pytest.raises(ValueError, match="outside"):
        neighbour_indices(12, 1, 10, 12)


def test_iter_with_context_puts_neighbours_in_channels():
    """socseg's streaming 2.5D stacks against arrays written out by hand (slice z is filled with z)."""
    images = np.arange(4)[:, None, None] * np.ones((4, 2, 3))
    stacked = np.stack(list(iter_with_context(images, 1)))
    assert stacked.shape == (4, 2, 3, 3)
    expected = np.array([[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]], float)  # ends replicated
    np.testing.assert_array_equal(stacked, np.broadcast_to(expected[:, None, None, :], (4, 2, 3, 3)))
    wide = np.stack(list(iter_with_context(images[:3], 2)))  # more context than slices on each side
    expected = np.array([[0, 0, 0, 1, 2], [0, 0, 1, 2, 2], [0, 1, 2, 2, 2]], float)
    np.testing.assert_array_equal(wide, np.broadcast_to(expected[:, None, None, :], (3, 2, 3, 5)))
    np.testing.assert_array_equal(np.stack(list(iter_with_context(images, 0))), images)  # k = 0: 2-D, unchanged
    # the index form of the same rule (what training crops use)
    assert [neighbour_indices(z, 1, 0, 4).tolist() for z in range(4)] == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]


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


CHUNK_CASES = [
    # total, size, k, start, stop
    (10, 4, 2, 0, None),
    (10, 3, 1, 2, 9),
    (10, 100, 3, 0, None),
    (10, 1, 2, 4, 6),
    (7, 2, 0, 0, 7),
    (5, 2, 4, 1, 4),  # more context than the stack holds: cut at both ends
    (6, 4, 1, 3, 3),  # an empty range: no chunks
]


@pytest.mark.parametrize("total, size, k, start, stop", CHUNK_CASES)
def test_chunks_cover_the_range_once_with_real_context_cut_at_the_stack_ends(total, size, k, start, stop):
    chunks = list(iter_chunks(total, size, k, start, stop))
    stop = total if stop is None else stop
    covered = [z for c in chunks for z in range(c.start, c.stop)]
    assert covered == list(range(start, stop))  # every slice once, in order
    assert all(1 <= c.size <= size for c in chunks) and all(c.size == size for c in chunks[:-1])
    for c in chunks:
        assert isinstance(c, Chunk) and c.size == c.stop - c.start
        assert (c.before, c.after) == (min(k, c.start), min(k, total - c.stop))
        assert c.read == slice(c.start - c.before, c.stop + c.after)
        assert 0 <= c.read.start and c.read.stop <= total
    # Real context: each chunk read with its neighbours gives what the whole stack gives.
    images = np.random.default_rng(total + size).random((total, 3, 4))
    whole = context_stack(images, k)
    for c in chunks:
        piece = context_stack(images[c.read], k)[c.before : c.before + c.size]
        np.testing.assert_array_equal(piece, whole[c.start : c.stop])


def test_chunk_context_examples():
    assert list(iter_chunks(10, 4, 2)) == [Chunk(0, 4, 0, 2), Chunk(4, 8, 2, 2), Chunk(8, 10, 2, 0)]
    assert list(iter_chunks(10, 4, 0, 3, 5)) == [Chunk(3, 5, 0, 0)]
    assert list(iter_chunks(10, 2, 3, 1, 5)) == [Chunk(1, 3, 1, 3), Chunk(3, 5, 3, 3)]


@pytest.mark.parametrize(
    "args, message",
    [
        ((10, 0, 1), "chunk size must be >= 1"),
        ((10, -2, 1), "chunk size must be >= 1"),
        ((10, 4, 1, -1, 5), "outside a stack of 10"),
        ((10, 4, 1, 0, 11), "outside a stack of 10"),
        ((10, 4, 1, 6, 5), "outside a stack of 10"),
        ((10, 4, 1, 11, None), "outside a stack of 10"),
        ((10, 4, -1), "context_slices must be >= 0"),
    ],
)
def test_chunks_refuse_bad_sizes_and_ranges(args, message):
    with pytest.raises(ValueError, match=message):
        list(iter_chunks(*args))
