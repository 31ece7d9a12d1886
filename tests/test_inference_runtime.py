"""The inference runtime: OpenVINO on a CPU (inference.runtime auto), Keras elsewhere or on request."""

from __future__ import annotations

import json
import warnings

import mlflow
import numpy as np
import pytest
import tifffile

from conftest import tiny_segmenter
from socseg.cache import CACHE_ENV
from socseg.inference import runtime as rt
from socseg.inference.predictor import Predictor
from socseg.inference.request import InferenceOptions


@pytest.fixture(scope="module")
def auto_model(tmp_path_factory) -> str:
    """A small 2.5D U-Net segmenter whose config says inference.runtime: auto."""
    return tiny_segmenter(tmp_path_factory.mktemp("auto"), 1, runtime="auto")


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    return np.random.default_rng(0).integers(20000, 43000, (5, 40, 36)).astype(np.uint16)


def test_auto_takes_openvino_on_a_cpu_and_keras_on_a_gpu():
    assert rt.openvino_version() is not None  # the test extra installs it: the default CPU path is tested
    assert rt.resolve_runtime("auto", gpu=False) == "openvino"
    assert rt.resolve_runtime("auto", gpu=True) == "keras"
    assert rt.resolve_runtime("keras", gpu=False) == "keras"
    assert rt.resolve_runtime("openvino", gpu=True) == "openvino"  # asked for: done
    with pytest.raises(ValueError, match="unknown inference runtime 'onnx'.*auto, keras, openvino"):
        rt.resolve_runtime("onnx")


def test_auto_is_keras_without_openvino(monkeypatch):
    monkeypatch.setattr(rt, "openvino_version", lambda: None)
    assert rt.resolve_runtime("auto", gpu=False) == "keras"


def test_openvino_and_keras_give_the_same_probabilities(auto_model, grey):
    """Same weights, same f32 precision: the two runtimes agree to rounding, so the labels agree
    wherever the classes are not tied to within that rounding."""
    on_cpu = Predictor.load(auto_model)
    plain = Predictor.load(auto_model, runtime="keras")
    assert on_cpu.runtime.startswith("openvino ") and "f32" in on_cpu.runtime
    assert plain.runtime.startswith("keras ")
    assert type(on_cpu.network) is type(plain.network)  # the Keras model stays (fine-tuning, re-logging)
    a, b = on_cpu.probabilities(grey), plain.probabilities(grey)
    assert a.shape == b.shape == (5, 40, 36, 3)
    assert np.abs(a - b).max() < 1e-4
    top2 = np.sort(b, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-3
    assert clear.mean() > 0.5  # an untrained network: many near-ties
    np.testing.assert_array_equal(a.argmax(-1)[clear], b.argmax(-1)[clear])


def test_the_ir_is_cached_by_the_model_file(auto_model, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    exports = []
    real_export = rt.export_ir
    monkeypatch.setattr(rt, "export_ir", lambda network, folder: exports.append(folder) or real_export(network, folder))
    first = Predictor.load(auto_model)
    second = Predictor.load(auto_model)
    assert len(exports) == 1  # the second load compiled the cached IR
    cached = list((tmp_path / "openvino").iterdir())
    assert len(cached) == 1 and (cached[0] / rt.IR_NAME).is_file() and (cached[0] / "segmenter.bin").is_file()
    assert not [p for p in (tmp_path / "openvino").iterdir() if p.name.startswith(".staging")]
    image = np.full((1, 32, 32), 30000, np.uint16)
    np.testing.assert_array_equal(first.probabilities(image), second.probabilities(image))


def test_a_failed_conversion_falls_back_to_keras_unless_openvino_was_asked_for(auto_model, monkeypatch):
    def broken(network, source_file=None):
        raise ValueError("unsupported operation Foo")

    monkeypatch.setattr(rt, "openvino_network", broken)
    with pytest.warns(RuntimeWarning, match="OpenVINO could not convert the network .*Foo.*using Keras"):
        predictor = Predictor.load(auto_model)
    assert predictor.runtime.startswith("keras ")
    with pytest.raises(RuntimeError, match="inference.runtime openvino: the network could not be converted"):
        Predictor.load(auto_model, runtime="openvino")


def test_a_server_chooses_the_runtime_through_mlflows_inference_config(auto_model, monkeypatch):
    """``mlflow models serve`` has no model_config option: MLflow's MLFLOW_PYFUNC_INFERENCE_CONFIG
    overrides the model's inference.runtime, and describe reports what runs."""
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", json.dumps({"runtime": "keras"}))
    answer = mlflow.pyfunc.load_model(auto_model).predict(np.zeros((1, 8, 8), np.uint16), params={"describe": True})
    assert answer["runtime"][0].startswith("keras ")
    monkeypatch.delenv("MLFLOW_PYFUNC_INFERENCE_CONFIG")
    answer = mlflow.pyfunc.load_model(auto_model).predict(np.zeros((1, 8, 8), np.uint16), params={"describe": True})
    assert answer["runtime"][0].startswith("openvino ")


def test_segment_records_the_runtime_in_its_output(auto_model, grey, tmp_path):
    from socseg.inference.segment import SegmentOutputs, segment
    from socseg.data.stacks import read_label_metadata

    source = tmp_path / "scan.tif"
    tifffile.imwrite(source, grey)
    runs = {}
    for runtime in (None, "keras"):
        out = tmp_path / f"labels-{runtime}.tif"
        result = segment(auto_model, source, SegmentOutputs.check(source, out), InferenceOptions(), slice_batch=2,
                         progress=False, runtime=runtime)
        runs[runtime] = (result, read_label_metadata(out), tifffile.imread(out))
    (ov_result, ov_meta, ov_labels), (k_result, k_meta, k_labels) = runs[None], runs["keras"]
    assert ov_meta["runtime"] == ov_result.runtime and ov_result.runtime.startswith("openvino ")
    assert k_meta["runtime"] == k_result.runtime and k_result.runtime.startswith("keras ")
    assert (ov_labels == k_labels).mean() > 0.99  # an untrained network: near-ties may flip


def test_a_zarr_run_records_each_workers_runtime(auto_model, grey, tmp_path):
    from socseg.data.chunked import ChunkedLabels
    from socseg.inference.distributed import ZarrTarget, describe, segment_to_zarr

    source = tmp_path / "scan.tif"
    tifffile.imwrite(source, grey)
    result = segment_to_zarr(auto_model, str(source), ZarrTarget(str(tmp_path / "out.zarr"), 2, False),
                             tracking_uri=mlflow.get_tracking_uri(), progress=False, runtime="keras")
    attrs = ChunkedLabels.open(tmp_path / "out.zarr").attrs
    assert len(attrs["runtimes"]) == 1 and attrs["runtimes"][0].startswith("keras ")
    assert "keras " in describe(result)


def test_unknown_runtime_is_refused_before_loading(auto_model):
    with pytest.raises(ValueError, match="unknown inference runtime 'gpu'"):
        Predictor.load(auto_model, runtime="gpu")


def test_converting_a_model_sends_no_telemetry(monkeypatch):
    """OpenVINO's converter reports usage to Google Analytics unless told not to: socseg's
    conversion of a user's model must not."""
    import keras
    import openvino_telemetry

    sent = []
    monkeypatch.setattr(openvino_telemetry.Telemetry, "send_event", lambda self, *a, **k: sent.append(a))
    monkeypatch.setattr(openvino_telemetry.Telemetry, "start_session", lambda self, *a, **k: sent.append(a))
    inputs = keras.Input((None, None, 1))
    network = keras.Model(inputs, keras.layers.Conv2D(2, 3, padding="same", activation="softmax")(inputs))
    compiled = rt.openvino_network(network)
    image = np.random.default_rng(1).random((2, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(compiled.predict_on_batch(image), network.predict_on_batch(image), atol=1e-5)
    assert sent == []


def test_a_model_logged_before_runtimes_runs_on_keras_unless_told(tmp_path):
    """Models logged before inference.runtime existed keep Keras (what they behaved with); asked
    for OpenVINO, they get it, although MLflow only overrides keys a model's config has."""
    import yaml

    folder = tiny_segmenter(tmp_path, 0, runtime="auto")
    mlmodel = tmp_path / folder / "MLmodel"
    record = yaml.safe_load(mlmodel.read_text())
    del record["flavors"]["python_function"]["config"]["runtime"]
    mlmodel.write_text(yaml.safe_dump(record))
    assert Predictor.load(folder).runtime.startswith("keras ")
    asked = Predictor.load(folder, runtime="openvino")
    assert asked.runtime.startswith("openvino ") and asked.config.runtime == "openvino"
