import itertools

import pytest

from socseg.data.split import check_split_context, slab_split, split_from_params
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
    """The fractions and gap of params' split section really shape the slabs: the ``gap`` slices
    at each boundary are in no subset, and consecutive slabs are ``gap`` slices apart."""
    params["split"].update(train=0.5, val=0.25, test=0.25, gap=7)  # not the file's values: read, not assumed
    split = split_from_params(94, typed(params).split)
    train, val, test = (set(split.range(s)) for s in ("train", "val", "test"))
    gap_slices = set(range(split.train[1], split.val[0])) | set(range(split.val[1], split.test[0]))
    assert split.val[0] - split.train[1] == 7 and split.test[0] - split.val[1] == 7
    assert len(gap_slices) == 14 and not gap_slices & (train | val | test)
    assert train | val | test | gap_slices == set(range(94)) and split.gap == 7
    assert (len(train), len(val), len(test)) == (40, 20, 20)  # 94 - 2 x 7 = 80 usable slices, 0.5 / 0.25 / 0.25


@pytest.mark.parametrize("gap, context", [(0, 1), (1, 2), (3, 4)])
def test_a_gap_narrower_than_the_2_5d_context_is_refused(params, gap, context):
    """A 2.5D model reads ``context`` slices on each side from the whole volume: a narrower gap
    would give the first validation/test slices training slices as input."""
    with pytest.raises(ValueError, match=rf"split gap {gap} is smaller than train.context_slices {context}"):
        slab_split(100, 0.6, 0.2, 0.2, gap=gap, context_slices=context)
    params["split"].update(train=0.6, val=0.2, test=0.2, gap=gap)
    params_split = typed(params).split
    with pytest.raises(ValueError, match=rf"split gap {gap} .*context_slices {context}:"):
        split_from_params(100, params_split, context)
    with pytest.raises(ValueError, match=rf"set split.gap >= {context}"):
        check_split_context(params_split, context)


def test_a_gap_as_wide_as_the_context_or_a_single_slab_is_accepted():
    assert slab_split(100, 0.6, 0.2, 0.2, gap=2, context_slices=2).val[0] == 60  # 96 usable: train 58, then 2 gap slices
    whole = slab_split(100, 1.0, 0.0, 0.0, gap=0, context_slices=3)  # no boundary, nothing to read across
    assert whole.train == (0, 100) and whole.val == whole.test == (100, 100)
