"""benchmarks/cv_out_of_fold.py: the held-out folds, put back where their slices came from, make the
whole volume once; a slice held out twice or by no fold is refused."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("cv_out_of_fold")


def fold_slab(order: list[int], used: int) -> SimpleNamespace:
    """A fold copy's test slab as accuracy.fold_setting makes it: the slices after ``used``."""
    meta = SimpleNamespace(name="copy", extra={"order": order})
    return SimpleNamespace(volume=SimpleNamespace(meta=meta), z_range=(used, len(order)))


def test_five_held_out_folds_fill_the_volume_once_in_their_place(bench, load_benchmark):
    accuracy = load_benchmark("accuracy")
    volume = np.arange(200)[:, None, None] * np.ones((1, 3, 4), int)  # each slice holds its own z
    filled = np.zeros(200, bool)
    assembled = None
    for fold in range(5):
        order, used = accuracy.fold_order(200, 5, fold, 8)
        positions = bench.held_out_positions(fold_slab(order, used))
        # one contiguous fold of the volume (the first is reversed, its real neighbour before it)
        assert len(positions) == 40 and np.all(np.abs(np.diff(positions)) == 1)
        copy = volume[np.asarray(order)]  # the fold copy's slices, as fold_copy writes them
        assembled = bench.place(assembled, (200, 3, 4), positions, copy[used:], filled)
        filled[positions] = True
    assert filled.all()
    np.testing.assert_array_equal(assembled, volume)


def test_a_slice_held_out_twice_is_refused(bench):
    filled = np.zeros(10, bool)
    volume = bench.place(None, (10, 2, 2), np.arange(0, 4), np.ones((4, 2, 2, 3), np.float32), filled)
    assert volume.shape == (10, 2, 2, 3)  # the class axis follows the block's
    filled[0:4] = True
    with pytest.raises(SystemExit, match=r"slices \[3\] are held out by two folds"):
        bench.place(volume, (10, 2, 2), np.arange(3, 7), np.ones((4, 2, 2, 3), np.float32), filled)


def test_a_slab_that_is_not_a_fold_copy_is_refused(bench):
    slab = SimpleNamespace(volume=SimpleNamespace(meta=SimpleNamespace(name="plain", extra={})), z_range=(0, 4))
    with pytest.raises(SystemExit, match="plain: not a fold copy"):
        bench.held_out_positions(slab)


def test_tortuosity_summary_counts_factors_within_the_goal_and_a_lost_path_as_missed(bench):
    inf = float("inf")
    rows = [{"metric": "tau.ni.z", "labels": 2.0, "value": 2.08, "rel_error": 0.04},
            {"metric": "tau.ni.y", "labels": 2.0, "value": 1.8, "rel_error": -0.1},
            {"metric": "tau.pore.z", "labels": 3.0, "value": inf, "rel_error": None},  # the path is lost
            {"metric": "tau.ysz.x", "labels": inf, "value": inf, "rel_error": None},  # neither percolates
            {"metric": "tpb.density", "labels": 1.0, "value": 1.5, "rel_error": 0.5}]
    summary = bench.tortuosity_summary(rows)
    assert summary["tau_within_5pct"] == "2/4"
    assert summary["tau_max_abs_rel_error"] == inf
    assert bench.tortuosity_summary(rows[:2])["tau_max_abs_rel_error"] == pytest.approx(0.1)
