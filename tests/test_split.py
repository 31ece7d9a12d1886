import itertools

import pytest

from socseg.data.split import slab_split, split_from_params
from socseg.params import typed


@pytest.mark.parametrize(
    "n_slices, fractions, gap",
    [(200, (0.6, 0.2, 0.2), 5), (48, (0.6, 0.2, 0.2), 4), (30, (0.7, 0.15, 0.15), 2), (9, (1, 1, 1), 1), (100, (0.8, 0.0, 0.2), 10)],
)
def test_no_test_or_val_slice_within_gap_of_a_training_slice(n_slices, fractions, gap):
    split = slab_split(n_slices, *fractions, gap=gap)
    train = list(split.range("train"))
    for other in ("val", "test"):
        for a, b in itertools.product(train, split.range(other)):
            assert abs(a - b) > gap, (other, a, b)
    for a, b in itertools.product(split.range("val"), split.range("test")):
        assert abs(a - b) > gap


def test_slabs_are_contiguous_disjoint_and_in_bounds():
    split = slab_split(200, 0.6, 0.2, 0.2, gap=5)
    ranges = [split.range(s) for s in ("train", "val", "test")]
    assert all(r.step == 1 for r in ranges)
    assert ranges[0].start == 0 and ranges[2].stop <= 200
    assert ranges[0].stop + 5 == ranges[1].start and ranges[1].stop + 5 == ranges[2].start
    # All slices except the two gaps are used, in the requested proportions.
    assert sum(len(r) for r in ranges) == 190
    assert [len(r) for r in ranges] == [114, 38, 38]


def test_zero_fraction_subset_is_empty_and_needs_no_gap():
    split = slab_split(50, 0.8, 0.0, 0.2, gap=5)
    assert len(split.range("val")) == 0
    assert len(split.range("train")) + len(split.range("test")) == 45


@pytest.mark.parametrize("args", [(5, 0.6, 0.2, 0.2, 3), (10, -1, 0.5, 0.5, 1), (10, 0, 0, 0, 1), (10, 0.5, 0.5, 0, -1)])
def test_impossible_splits_raise(args):
    with pytest.raises(ValueError):
        slab_split(*args)


def test_split_from_params_reads_the_split_section(params):
    split = split_from_params(100, typed(params).split)
    assert split.gap == params["split"]["gap"]
