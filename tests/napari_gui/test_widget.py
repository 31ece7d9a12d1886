"""The napari dock widget in a real viewer: segment an image layer as `socseg segment` does,
cancel, jump to suggested slices, paint corrections and fine-tune a registered challenger in a
real MLflow store; and napari finding the plugin on its own.

Run by tests/test_viewer_widget.py in a pytest process of its own, under a display (Xvfb in CI):
this process never loads TensorFlow (it cannot share a process with the viewer's OpenGL, see
socseg.viewer.jobs), so the models these tests need are made in spawned children too.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

import numpy as np
import pytest
import tifffile

from conftest import register_parent, tiny_segmenter

WAIT_MS = 240_000


def in_child(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a spawned process (where TensorFlow may load), its result here."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def reference_labels(model: str, source: str, output: str) -> np.ndarray:
    from socseg.inference.segment import segment

    segment(model, source, output, slice_batch=4, progress=False)
    return tifffile.imread(output)


@pytest.fixture(autouse=True)
def no_tensorflow_here():
    yield
    assert "tensorflow" not in sys.modules, "the GUI test process loaded TensorFlow"


@pytest.fixture()
def viewer(make_napari_viewer):
    return make_napari_viewer(show=False)


def _widget(viewer, params, model_uri: str, tracking: str):
    from socseg.viewer.widget import SegmentWidget

    widget = SegmentWidget(viewer, params)
    widget.model.setText(model_uri)
    widget.tracking.setText(tracking)
    return widget


def _wait(qtbot, worker) -> None:
    with qtbot.waitSignal(worker.finished, timeout=WAIT_MS):
        pass


def test_napari_finds_the_plugin_and_opens_a_store_as_image_and_labels(viewer, tmp_path):
    from npe2 import PluginManager

    manifest = PluginManager.instance().get_manifest("socseg")
    assert {c.id for c in manifest.contributions.commands} >= {"socseg.get_reader", "socseg.write_labels",
                                                                "socseg.segment_widget"}
    from socseg.data.chunked import ChunkedLabels

    store = ChunkedLabels.create_or_resume(tmp_path / "s.zarr", (4, 16, 16), 2, {}, {"phase_map": {"0": "pore", "128": "ysz",
                                           "255": "ni"}}, n_classes=3, image_dtype=np.uint16)
    for index in range(2):
        store.write(index, np.full((2, 16, 16), 128, np.uint8), np.zeros((2, 16, 16, 3), np.uint8),
                    np.zeros((2, 16, 16), np.uint8), image=np.ones((2, 16, 16), np.uint16))
    layers = viewer.open(str(tmp_path / "s.zarr"), plugin="socseg")
    assert [type(layer).__name__ for layer in layers] == ["Image", "Labels", "Image", "Image", "Image", "Image"]
    labels = layers[1]
    assert labels.name == "s phases" and list(labels.features["phase"]) == ["pore", "ysz", "ni"]
    assert np.all(np.asarray(labels.data) == 128)
    # the generic OME-Zarr plugin shows the same store as the scan with a Labels layer over it
    generic = viewer.open(str(tmp_path / "s.zarr"), plugin="napari-ome-zarr")
    kinds = sorted(type(layer).__name__ for layer in generic)
    assert kinds == ["Image", "Labels"], kinds
    (phases,) = [layer for layer in generic if type(layer).__name__ == "Labels"]
    assert np.all(np.asarray(phases.data[0]) == 128)


def test_the_widget_segments_as_socseg_segment_does_and_lists_the_uncertain_slices(viewer, qtbot, params, tmp_path):
    grey = np.random.default_rng(3).integers(20000, 43000, (9, 40, 36)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "scan.tif", grey)
    model = in_child(tiny_segmenter, tmp_path, 1)
    expected = in_child(reference_labels, model, str(tmp_path / "scan.tif"), str(tmp_path / "ref.tif"))
    viewer.open(str(tmp_path / "scan.tif"))  # napari's own TIFF reader, as `napari scan.tif` does
    widget = _widget(viewer, params, model, "sqlite:///unused.db")
    assert widget.image_layer.currentText() == "scan"
    _wait(qtbot, widget.segment())
    np.testing.assert_array_equal(viewer.layers["scan phases"].data, expected)
    assert viewer.layers["scan uncertainty"].data.dtype == np.uint8
    assert widget.suggestions.count() == 5 and widget.progress.value() == 9
    widget._go_to_slice(widget.suggestions.item(0))
    assert viewer.dims.current_step[0] == widget.segmentation.suggested_slices(1)[0].z
    # a single 2-D image is segmented as a stack of one slice, and painted in 2-D
    tifffile.imwrite(tmp_path / "one.tif", grey[4])
    single = in_child(reference_labels, model, str(tmp_path / "one.tif"), str(tmp_path / "one_ref.tif"))
    viewer.layers.clear()
    viewer.add_image(grey[4], name="one")
    widget.image_layer.setCurrentText("one")
    _wait(qtbot, widget.segment())
    np.testing.assert_array_equal(viewer.layers["one phases"].data, single.reshape(grey.shape[1:]))
    assert widget.new_correction_layer().data.shape == grey.shape[1:]


def test_cancel_adds_nothing_and_writes_nothing(viewer, qtbot, params, tmp_path):
    params["inference"]["slice_batch"] = 1
    model = in_child(tiny_segmenter, tmp_path, 0)
    viewer.add_image(np.random.default_rng(5).integers(20000, 43000, (60, 64, 64)).astype(np.uint16), name="scan")
    widget = _widget(viewer, params, model, "sqlite:///unused.db")
    before = set(tmp_path.rglob("*"))
    worker = widget.segment()
    worker.yielded.connect(lambda update: update[0] == "segment" and widget.cancel())
    with qtbot.waitSignal(worker.aborted, timeout=WAIT_MS):
        pass
    assert [layer.name for layer in viewer.layers] == ["scan"]
    assert "cancelled" in widget.status.text() and widget.segment_button.isEnabled()
    assert set(tmp_path.rglob("*")) == before


def test_painting_two_slices_and_fine_tuning_registers_a_challenger_and_resegments(viewer, qtbot, tiny_params, mlflow_env):
    from mlflow.tracking import MlflowClient

    from socseg.data.synth import synth_from_params

    params = in_child(register_parent, tiny_params)
    scan = synth_from_params(params, "newscan", shape=(12, 64, 64), seed=7)
    viewer.add_image(scan.image, name="newscan")
    widget = _widget(viewer, params, "models:/socseg-ni@champion", mlflow_env)
    _wait(qtbot, widget.segment())
    assert widget.segmentation.phase_map == {0: "rest", 255: "ni"}
    correction = widget.new_correction_layer()
    truth = (scan.labels == 255).astype(np.uint8) + 1  # rest = 1, ni = 2
    for z in (3, 8):
        correction.data[z] = truth[z]
    _wait(qtbot, widget.finetune())
    qtbot.waitUntil(lambda: len([layer for layer in viewer.layers if layer.name.startswith("newscan phases")]) == 2,
                    timeout=WAIT_MS)
    qtbot.waitUntil(lambda: widget.segment_button.isEnabled(), timeout=WAIT_MS)
    result = widget.finetune_result
    assert result.train_slices == [3] and result.test_slices == [8]
    client = MlflowClient(mlflow_env)
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'socseg-ni'")) == [1, 2]
    assert set(client.get_model_version("socseg-ni", "2").aliases) & {"challenger", "champion"}
    assert "socseg-ni v2" in widget.scores.text() and "iou_ni" in widget.scores.text()
    assert widget.segmentation.model_uri == result.model_uri
