"""benchmarks/interface_errors.py: the faces it counts, the confusions it recovers from recorded
per-class IoU and volume errors (checked against a confusion matrix computed directly), and the
contrast-to-noise ratio of each interface."""

from __future__ import annotations


import numpy as np
import pytest
from scipy import ndimage as ndi

from socseg.model.metrics import confusion_matrix, segmentation_scores

NAMES = ["pore", "ysz", "ni"]


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("interface_errors")


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    rng = np.random.default_rng(0)
    fields = np.stack([ndi.gaussian_filter(rng.standard_normal((10, 40, 40)), 3.0) for _ in range(3)], -1)
    return np.argmax(fields, -1).astype(np.uint8)


def test_faces_are_counted_along_every_axis_for_each_pair(bench):
    labels = np.zeros((2, 2, 3), np.uint8)
    labels[:, :, 1] = 2           # a column of Ni between pore and YSZ along x
    labels[:, :, 2] = 1
    labels[1, 1, 2] = 2           # one more Ni voxel: an extra Ni/YSZ face along z and along y
    faces = bench.interface_faces(labels, 3)
    assert faces[0, 2] == 4                   # pore|Ni along x, in each of the 4 (z, y) rows
    assert faces[1, 2] == 3 + 1 + 1           # Ni|YSZ along x in 3 rows, along z and along y once each
    assert faces[0, 1] == 0 and faces.sum() == 9


def test_the_confusion_of_each_pair_is_recovered_from_iou_and_volume_errors(bench, truth):
    rng = np.random.default_rng(3)
    prediction = truth.copy()
    moved = ndi.binary_dilation(truth == 2) & (truth == 1) & (rng.random(truth.shape) < 0.6)
    prediction[moved] = 2                                  # Ni grown into YSZ (one-sided)
    lost = (truth == 0) & (rng.random(truth.shape) < 0.03)
    prediction[lost] = rng.integers(1, 3, int(lost.sum()))  # pore specks of YSZ and Ni
    matrix = confusion_matrix(truth, prediction, 3)
    scores = segmentation_scores(matrix, NAMES)
    voxels = {n: float((truth == i).sum()) for i, n in enumerate(NAMES)}
    volume_error = {n: float((prediction == i).sum()) / voxels[n] - 1.0 for i, n in enumerate(NAMES)}
    wrong = {n: bench.wrong_voxels(voxels[n], scores[f"iou_{n}"], volume_error[n]) for n in NAMES}
    recovered = bench.pair_confusions(wrong)
    for a, b in bench.PAIRS:
        i, j = NAMES.index(a), NAMES.index(b)
        assert recovered[(a, b)] == pytest.approx(matrix[i, j] + matrix[j, i], abs=1e-6)
    assert recovered[("ysz", "ni")] > recovered[("pore", "ysz")] > 0


def test_iou_from_wrong_voxels_holds_when_errors_balance(bench):
    # 100 label voxels, 5 false positives and 5 false negatives: IoU 95 / 105
    assert bench.iou_from_wrong(100.0, 10.0) == pytest.approx(95 / 105)


def test_analyse_divides_each_pair_by_its_faces_and_finds_the_cut_for_the_goal(bench, truth):
    prediction = truth.copy()
    prediction[ndi.binary_dilation(truth == 2) & (truth == 1)] = 2   # every YSZ voxel touching Ni becomes Ni
    scores = segmentation_scores(confusion_matrix(truth, prediction, 3), NAMES)
    voxels = {n: float((truth == i).sum()) for i, n in enumerate(NAMES)}
    row = {**{f"iou_{n}": scores[f"iou_{n}"] for n in NAMES},
           **{f"err.vf.{n}": float((prediction == i).sum()) / voxels[n] - 1.0 for i, n in enumerate(NAMES)}}
    rows, figures = bench.analyse("toy", {1: row}, {1: truth}, {"pore-ysz": 1.0, "pore-ni": 2.0, "ysz-ni": 3.0})
    faces = bench.interface_faces(truth, 3)
    ysz_ni = next(r for r in rows if r["kind"] == "interface" and r["name"] == "ysz-ni")
    assert ysz_ni["faces"] == faces[1, 2] and ysz_ni["cnr"] == 3.0
    assert ysz_ni["per_face"] == pytest.approx(((truth == 1) & (prediction == 2)).sum() / faces[1, 2])
    assert figures["per_face"]["pore-ysz"]["mean"] == pytest.approx(0.0, abs=1e-9)
    # no pore/YSZ error: Ni placed like pore/YSZ would be perfect
    assert figures["iou_ni_if_ni_faces_like_pore_ysz"]["mean"] == pytest.approx(1.0)
    assert figures["iou_ni"]["mean"] == pytest.approx(scores["iou_ni"])
    assert 0.0 < figures["ni_error_cut_for_goal"]["mean"] < 1.0


def test_contrast_to_noise_of_each_pair(bench):
    rng = np.random.default_rng(5)
    labels = np.zeros((12, 30, 30), np.uint8)
    labels[:, :, 10:20] = 1
    labels[:, :, 20:] = 2
    means = np.array([100.0, 200.0, 250.0])
    image = means[labels] + rng.normal(0.0, 10.0, labels.shape)
    grey = bench.contrast(image, labels, NAMES)
    assert grey["phases"]["ysz"]["mean"] == pytest.approx(200.0, abs=1.0)
    assert grey["cnr"]["pore-ysz"] == pytest.approx(10.0, rel=0.05)
    assert grey["cnr"]["ysz-ni"] == pytest.approx(5.0, rel=0.05)
    assert grey["cnr"]["pore-ni"] == pytest.approx(15.0, rel=0.05)


def test_the_fold_layout_is_read_from_the_record_and_a_silent_one_is_refused(bench):
    data = "SOCPristine, 5 of 5 contiguous z-folds, split [0.6, 0.1, 0.3, 8] (the CV run's fold copies)"
    assert bench.fold_layout({"settings": {"data": data}}) == (5, (0.6, 0.1, 0.3, 8.0))
    with pytest.raises(SystemExit, match="no fold count and split"):
        bench.fold_layout({"settings": {"data": "SOCPristine"}})
