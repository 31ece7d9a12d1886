"""benchmarks/microstructure_accuracy.py's measuring and comparing, on a phantom: the labels' own
probabilities give zero errors and covered intervals, a noisy prediction does not, and a phase
percolating in one volume only is shown as infinite, not dropped."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

NAMES = ["pore", "ysz", "ni"]


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("microstructure_accuracy")


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    rng = np.random.default_rng(0)
    fields = np.stack([ndi.gaussian_filter(rng.standard_normal((16, 40, 40)), 2.5) for _ in range(3)], -1)
    return np.argmax(fields, -1).astype(np.uint8)


def test_the_labels_own_probabilities_have_no_error_and_covered_intervals(bench, truth):
    crop = bench.centre_crop(truth.shape, 24)
    assert crop[1] == slice(8, 32) and crop[0] == slice(None)
    reference = bench.measured(truth, None, NAMES, crop, 0)["value"]
    assert any(k.startswith("tau.") for k in reference) and "tpb.density" in reference and "size.ni.d50" in reference
    one_hot = np.eye(3, dtype=np.float32)[truth]
    rows = bench.comparison_rows("exact", bench.measured(None, one_hot, NAMES, crop, 6), reference)
    assert {r["metric"] for r in rows} == set(reference)
    assert all(r["rel_error"] == pytest.approx(0.0, abs=1e-12) for r in rows if r["rel_error"] is not None)
    assert all(r["covers"] for r in rows)
    figures = bench.figures_of(rows)
    assert figures["exact"]["covered"] == f"{len(rows)}/{len(rows)}"
    assert figures["exact"]["goals_met"].startswith("tpb.density yes")
    assert figures["exact"]["tpb_density"] == {"rel_error": 0.0, "covered": True}


def test_a_whole_volume_crop_is_measured_in_one_pass_with_the_same_values(bench, truth, monkeypatch):
    """Crop = whole volume: one sweep gives every metric and interval that the two passes give."""
    probabilities = np.clip(np.eye(3, dtype=np.float32)[truth] * 0.8 + 0.1
                            + np.random.default_rng(2).normal(0, 0.05, (*truth.shape, 3)).astype(np.float32), 0, 1)
    whole = bench.centre_crop(truth.shape, 0)
    calls = []
    import socseg.analysis.intervals as intervals  # measured() imports it at call time: the patch counts the sweeps

    counted = intervals.measure_with_intervals

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return counted(*args, **kwargs)

    monkeypatch.setattr(intervals, "measure_with_intervals", counting)
    one_pass = bench.measured(None, probabilities, NAMES, whole, 6)
    assert len(calls) == 1 and calls[0]["tortuosity"] and calls[0]["size_phases"] == ["ni"]
    two_pass = bench.measured(None, probabilities, NAMES, (slice(None), slice(0, None), slice(None)), 6)
    assert len(calls) == 3  # a crop given as another slice object of the same extent still takes two passes
    assert one_pass["value"].keys() == two_pass["value"].keys() and any(k.startswith("tau.") for k in one_pass["value"])
    for part in ("value", "low", "high"):
        for key, value in two_pass[part].items():
            assert one_pass[part][key] == pytest.approx(value, rel=1e-9), (part, key)


def test_a_noisy_prediction_has_tpb_errors_and_missing_percolation_is_infinite(bench, truth):
    crop = bench.centre_crop(truth.shape, 0)
    reference = bench.measured(truth, None, NAMES, crop, 0)["value"]
    noisy = truth.copy()
    flip = np.random.default_rng(1).random(truth.shape) < 0.05  # isolated wrong voxels: extra boundaries and TPB
    noisy[flip] = (noisy[flip] + 1) % 3
    rows = bench.comparison_rows("noisy", bench.measured(noisy, None, NAMES, crop, 0), reference)
    tpb = next(r for r in rows if r["metric"] == "tpb.density")
    assert tpb["rel_error"] > 0.2 and tpb["covers"] is None
    found = {"value": {"tau.ni.x": 2.0}, "low": {}, "high": {}}
    row = bench.comparison_rows("m", found, {"vf.ni": 0.3})
    assert [(r["metric"], r["labels"], r["rel_error"]) for r in row] == [("vf.ni", 0.3, None), ("tau.ni.x", math.inf, None)]
    assert row[0]["value"] == math.inf  # a metric the method lacks is shown, not dropped


def test_errors_are_split_by_distance_to_the_boundary_and_islands_removed(bench, truth):
    distance = bench.boundary_distance(truth)
    assert distance.min() == 0 and distance.max() > 2
    pred = truth.copy()
    pred[distance > 3] = (pred[distance > 3] + 1) % 3  # errors in the interior only
    rows = bench.band_rows("m", truth, pred, distance, NAMES)
    assert [r["error_share"] for r in rows] == [0.0, 0.0, 1.0]
    assert rows[0]["mean_iou"] == 1.0 and rows[2]["mean_iou"] < 0.5
    assert sum(r["pixels"] for r in rows) == pytest.approx(1.0)
    ceiling = bench.shifted_label_ceiling(truth, NAMES)
    assert 0.5 < ceiling["one_pixel_shift_x.mean_iou"] < 1.0
    speckled = truth.copy()
    speckled[8, 20, 20] = (truth[8, 20, 20] + 1) % 3  # a one-voxel island (or a dent)
    cleaned = bench.without_islands(speckled, 8)
    assert cleaned[8, 20, 20] == truth[8, 20, 20] and np.array_equal(bench.without_islands(truth, 1), truth)
