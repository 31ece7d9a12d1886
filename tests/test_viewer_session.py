"""What the napari widget's child process runs: segmenting a layer's array or the file it came
from gives `socseg segment`'s labels; painted corrections become a sparse volume or a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import tiny_segmenter
from socseg.data.volumes import VolumeError

PHASES = {0: "pore", 128: "ysz", 255: "ni"}


def _finish(generator):
    done = []
    while True:
        try:
            done.append(next(generator))
        except StopIteration as finished:
            return finished.value, done


def test_an_array_and_its_file_segment_as_socseg_segment_does(tmp_path):
    from socseg.inference.predictor import Predictor
    from socseg.inference.segment import segment
    from socseg.viewer.session import segment_array

    grey = np.random.default_rng(8).integers(20000, 43000, (7, 40, 36)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "scan.tif", grey)
    model = tiny_segmenter(tmp_path, 1)
    segment(model, tmp_path / "scan.tif", tmp_path / "ref.tif", slice_batch=3, progress=False)
    expected = tifffile.imread(tmp_path / "ref.tif")
    predictor = Predictor.load(model)
    from_array, progress = _finish(segment_array(predictor, grey, slice_batch=3, model_uri=model))
    from_file, _ = _finish(segment_array(predictor, str(tmp_path / "scan.tif"), slice_batch=3, model_uri=model))
    assert progress == [3, 6, 7]
    for found in (from_array, from_file):
        np.testing.assert_array_equal(found.labels, expected)
        assert found.phase_map == PHASES and found.uncertainty.dtype == np.uint8
    np.testing.assert_array_equal(from_array.uncertainty, from_file.uncertainty)
    assert [s.z for s in from_array.suggested_slices(7)] == sorted(
        range(7), key=lambda z: (-float(np.mean(from_array.uncertainty[z] / 255.0)), z))
    with pytest.raises(VolumeError, match="image dtype int64 not allowed"):
        _finish(segment_array(predictor, grey.astype(np.int64)))
    with pytest.raises(VolumeError, match="NaN"):
        _finish(segment_array(predictor, np.full((2, 32, 32), np.nan, np.float32)))


def test_painted_corrections_become_a_sparse_volume_or_a_clear_error():
    from socseg.viewer.session import corrected_volume

    grey = np.zeros((4, 8, 8), np.uint16)
    painted = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(VolumeError, match="nothing is painted"):
        corrected_volume(grey, painted, PHASES, 1)
    with pytest.raises(VolumeError, match="the correction layer is"):
        corrected_volume(grey, painted[:2], PHASES, 1)
    painted[2, :3] = 2
    volume, slices = corrected_volume(grey, painted, PHASES, 1)
    assert slices == [2] and np.all(volume.labels[2, :3] == 128) and np.all(volume.labels[0] == 1)
