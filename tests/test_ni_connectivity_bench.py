"""benchmarks/ni_connectivity.py: each isolated component with what another segmentation does with
it, the contact that segmentation adds located against the fold seams, and the share summaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("ni_connectivity")


@pytest.fixture
def volume():
    """Labels with a bar of Ni from face to face and a cube 3 voxels from it, an image where a bright
    bridge (grey 190: Ni 200, YSZ 100) joins them, and a prediction that draws that bridge."""
    labels = np.zeros((12, 30, 30), dtype=bool)
    labels[4:8, 4:8, :] = True
    labels[4:8, 11:15, 12:16] = True
    image = np.where(labels, 200.0, 100.0)
    image[6, 8:11, 13] = 190.0
    predicted = labels.copy()
    predicted[6, 8:11, 13] = True
    return labels, image, predicted


def test_each_isolated_component_with_its_bridge_and_the_contact_the_method_adds(bench, volume):
    labels, image, predicted = volume
    rows = bench.component_rows("labels", labels, {"unet": predicted}, image, (100.0, 200.0), reach=6, seams=[5])
    (row,) = rows
    assert (row["voxels"], row["share"], row["z"], row["distance"]) == (64, 1.0, "4-7", 4.0)
    assert row["bridge_scale"] == pytest.approx(0.9)          # (190 - 100) / (200 - 100)
    assert (row["kept.unet"], row["joined.unet"]) == (1.0, True)
    assert (row["added_voxels"], row["added_z"], row["added_near_seam"]) == (3, "6-6", True)
    far = bench.component_rows("labels", labels, {"unet": predicted}, image, (100.0, 200.0), reach=6, seams=[10])
    assert far[0]["added_near_seam"] is False
    # the other way round: the prediction has no isolated component, the labels none to join
    assert bench.component_rows("unet", predicted, {"labels": labels}, image, (100.0, 200.0), 6, [5]) == []
    summary = bench.summary(rows, "labels", "unet")
    assert summary == {"components": 1, "joined_components": 1, "joined_share": 1.0, "joined_bright_share": 1.0}
    assert bench.isolated_share(rows, labels) == pytest.approx(64 / labels.sum())


def test_a_join_through_grey_at_the_neighbour_phase_level_is_not_counted_as_bright(bench, volume):
    labels, image, predicted = volume
    image[6, 8:11, 13] = 120.0
    rows = bench.component_rows("labels", labels, {"unet": predicted}, image, (100.0, 200.0), reach=6, seams=[])
    assert rows[0]["bridge_scale"] == pytest.approx(0.2)
    assert bench.summary(rows, "labels", "unet")["joined_bright_share"] == 0.0


def test_seams_are_the_first_slices_of_folds_two_to_k(bench):
    assert bench.seam_planes(200, 5) == [40, 80, 120, 160]
    assert bench.grey_scale(np.array([1.0, 2.0, 3.0, 9.0]), np.array([0, 0, 1, 1]), 0, 1) == (1.5, 6.0)


def test_it_reads_the_fold_models_as_cv_out_of_fold_does(bench):
    args = bench.parse_args(["--models", "a.csv", "b.csv", "--reach", "5", "--with-forest"])
    assert (args.models, args.reach, args.with_forest, args.phase, args.method) == \
        ([Path("a.csv"), Path("b.csv")], 5, True, "ni", "pv")
    assert args.out.name == "ni_connectivity" and args.rf_trees == 100
