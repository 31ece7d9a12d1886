"""benchmarks/fold_seam.py: the three arrangements of the first fold and the neighbour slice 0 reads."""

from __future__ import annotations


import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("fold_seam")


def test_the_old_copy_puts_the_last_slice_before_slice_0_and_the_others_do_not(bench):
    arrangements = bench.orders(40, 4, 3)
    assert set(arrangements) == set(bench.ARRANGEMENTS) == {"old_copy", "volume", "new_copy"}
    old, volume, now = (arrangements[k] for k in ("old_copy", "volume", "new_copy"))
    assert bench._neighbour(old, 0) == "39"
    assert bench._neighbour(volume, 0) == "none (mirror)"
    assert bench._neighbour(now, 0) == "none (mirror)"
    assert sorted(old[-10:]) == sorted(now[-10:]) == list(range(10))  # the copies end with the fold
    assert now[-11] == 10  # ... whose last slice reads its real neighbour there
