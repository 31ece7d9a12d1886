"""benchmarks/inference_bench.py end to end on a small phantom in the SOCPristine layout: every
window setting and the forest in one result file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _ni_segmenter(folder: Path) -> str:
    """A one-convolution 'ni' network saved as a pyfunc segmenter (whole-slice passes by default).

    The convolution computes in mixed bf16 and the probabilities in float32, as a U-Net trained with
    ``train.precision: auto`` on a bf16 CPU: the policy travels with the saved model."""
    import keras

    from socseg.data.normalise import Normalisation

    from socseg.inference.predictor import ModelConfig
    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import IntensityNormalisation

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1))
    x = IntensityNormalisation(20000.0, 43000.0)(inputs)
    x = keras.layers.Conv2D(1, 3, padding="same", bias_initializer=keras.initializers.Constant(-0.5),
                            dtype="mixed_bfloat16")(x)
    outputs = keras.layers.Activation("sigmoid", dtype="float32")(x)
    config = ModelConfig(task="ni", encoder="unet", class_names=["rest", "ni"], phase_map={0: "pore", 128: "ysz", 255: "ni"},
                         tile_size=32, context_slices=0, normalisation=Normalisation.from_dict({"low": 20000.0, "high": 43000.0}, "fixed"), 
                         window="whole_slice", whole_slice_max_pixels=10**6, step_fraction=0.5, tta=False, batch_size=8,
                         max_slice_pixels=10**6, max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime="keras", planes="z", fusion_depth=64, fusion_halo=16)
    return str(save_segmenter(keras.Model(inputs, outputs), config, folder / "model"))


def _phantom_source(tmp_path: Path, params, write_slices) -> Path:
    """A small phantom in the SOCPristine layout (data/ and labels/ slice files)."""
    from socseg.data.synth import synth_from_params

    phantom = synth_from_params(params, "bench", shape=(24, 64, 64), seed=5)
    source = tmp_path / "source"
    write_slices(source / "data", "SOCprist", phantom.image, width=4, ext=".tiff")
    write_slices(source / "labels", "slice__", phantom.labels, width=4)
    return source


def test_inference_bench_scores_every_window_and_the_forest(tmp_path, params, write_slices):
    source = _phantom_source(tmp_path, params, write_slices)
    models = tmp_path / "accuracy.csv"
    models.write_text(f"task,method,model_uri\nni,tiny conv,{_ni_segmenter(tmp_path)}\nni,global threshold(s),\n")
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/inference_bench.py"), "--models", str(models), "--source", str(source),
         "--cache-dir", str(tmp_path / "cache"), "--split", "0.5,0.2,0.3,1", "--windows", "sliding:0.5,sliding:1.0,whole_slice",
         "--precisions", "as_trained,float32", "--planes", "model,zyx", "--volume", "--rf-trees", "5", "--rf-samples", "2000", "--rf-jobs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads((out / "inference.json").read_text())
    rows = record["rows"]
    # Each window with the model's own planes (z, saved with it) and fused over z, y and x.
    windows = [f"{w}, planes {p}" for w in ("sliding, step 0.5", "sliding, step 1", "whole_slice") for p in ("z", "zyx")]
    assert [r["window"] for r in rows] == ["-", *windows, *windows]
    assert [r["planes"] for r in rows[1:7]] == ["z", "zyx"] * 3
    # Every window first as the model loads (its saved bf16 policy where bf16 is native and faster
    # here, else its float32 copy: socseg.model.precision), then with the same weights in float32.
    from socseg.model.precision import native_bf16

    loaded = "mixed_bfloat16" if native_bf16() else "float32"
    assert [r["compute_dtype"].split()[0] for r in rows[1:]] == [loaded] * 6 + ["float32"] * 6
    assert "as_trained, float32" in record["settings"]["precisions"]
    assert rows[0]["model"].startswith("random forest") and rows[0]["x_forest"] == 1.0
    for row in rows:
        assert 0.0 <= row["iou_ni"] <= 1.0 and row["slices_per_s"] > 0
    # A one-convolution network: every window gives (nearly) the same labels, so the same IoU.
    assert np.ptp([r["iou_ni"] for r in rows[1:]]) < 0.02
    assert "test slab" in record["settings"]["data"] and record["git_commit"]
    assert "| whole_slice, planes zyx |" in (out / "inference.md").read_text()
    # --volume: socseg segment of the whole phantom with the first model, as saved (planes z only)
    (timing,) = record["figures"]["volume_timing"]
    assert timing["planes"] == "z" and timing["slices"] == 24 and timing["model"] == "tiny conv"
    assert timing["slices_per_s"] > 0 and timing["x_forest"] == pytest.approx(timing["slices_per_s"] / rows[0]["slices_per_s"])


def test_float32_network_computes_in_float32_with_the_same_weights():
    """The float32 copy of a mixed-bf16 model: float32 layers and output, same weights, and
    probabilities within bf16 rounding of the original's."""
    import keras

    sys.path.insert(0, str(REPO / "benchmarks"))
    from inference_bench import compute_dtypes, float32_network, parse_precisions

    keras.utils.set_random_seed(1)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", dtype="mixed_bfloat16")(inputs)
    inner = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid", dtype="mixed_bfloat16")(x), name="unet")
    outer_in = keras.Input((None, None, 3))
    network = keras.Model(outer_in, inner(outer_in))
    copy, cast = float32_network(network)
    assert cast
    assert compute_dtypes(network) == "mixed_bfloat16" and compute_dtypes(copy) == "float32"
    for a, b in zip(network.get_weights(), copy.get_weights()):
        np.testing.assert_array_equal(a, b)
    batch = np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32)
    original, converted = network.predict_on_batch(batch), copy.predict_on_batch(batch)
    assert str(original.dtype) == "bfloat16" and converted.dtype == np.float32
    np.testing.assert_allclose(converted, np.asarray(original, np.float32), atol=0.02)
    assert parse_precisions("float32,as_trained") == ["float32", "as_trained"]
    with pytest.raises(Exception, match="unknown precision"):
        parse_precisions("bf16")


def test_a_setting_that_fails_is_recorded_and_the_others_still_run(params):
    """A network that raises (as a bf16 model does under ONEDNN_MAX_CPU_ISA=AVX2) gives a row with its
    error and no figures; the float32 setting after it is measured."""
    from socseg.data.prepare import Slab
    from socseg.data.synth import synth_from_params
    from socseg.data.normalise import Normalisation
    from socseg.inference.predictor import ModelConfig, Predictor

    sys.path.insert(0, str(REPO / "benchmarks"))
    from inference_bench import parse_windows, window_rows

    class Refusing:
        def predict_on_batch(self, batch):
            raise RuntimeError("Graph execution error:\n\nDetected at node conv defined at ...\n"
                               "Operation received an exception:Status: 3, message: could not create a primitive descriptor")

    class Half:
        def predict_on_batch(self, batch):
            return np.full((*batch.shape[:3], 1), 0.5, np.float32)

    config = ModelConfig(task="ni", encoder="unet", class_names=["rest", "ni"], phase_map={0: "pore", 128: "ysz", 255: "ni"},
                         tile_size=32, context_slices=0, normalisation=Normalisation.from_dict({"low": 20000.0, "high": 43000.0}, "fixed"),
                          window="whole_slice", whole_slice_max_pixels=10**6, step_fraction=0.5,
                         tta=False, batch_size=8, max_slice_pixels=10**6, max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime="keras", planes="z", fusion_depth=64, fusion_halo=16)
    slab = Slab(synth_from_params(params, "bench", shape=(6, 32, 32), seed=5), (2, 6))
    windows = parse_windows("whole_slice")
    failed = window_rows("m", "uri", Predictor(Refusing(), config), slab, windows, "mixed_bfloat16 (as trained)")
    measured = window_rows("m", "uri", Predictor(Half(), config), slab, windows, "float32")
    assert failed[0]["slices_per_s"] is None and failed[0]["error"].startswith("RuntimeError: Operation received an exception")
    assert "did not run" in failed[0]["settings"]
    assert measured[0]["slices_per_s"] > 0 and "error" not in measured[0]


def test_normalisation_bench_scores_fixed_and_per_volume_models_on_every_transform(tmp_path, params, write_slices):
    """benchmarks/normalisation_bench.py: a fixed and a per_volume model (one convolution each) on
    the five transformed copies; the fixed one is also scored with the range mapped at inference."""
    import keras

    from socseg.data.synth import synth_from_params
    from socseg.data.normalise import Normalisation
    from socseg.inference.predictor import ModelConfig
    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import IntensityNormalisation

    phantom = synth_from_params(params, "bench", shape=(24, 64, 64), seed=6)
    source = tmp_path / "source"
    write_slices(source / "data", "SOCprist", phantom.image, width=4, ext=".tiff")
    write_slices(source / "labels", "slice__", phantom.labels, width=4)
    uris = {}
    for mode, (low, high) in {"fixed": (20000.0, 43000.0), "per_volume": (0.0, 1.0)}.items():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((None, None, 1))
        x = IntensityNormalisation(low, high)(inputs)
        outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(20.0),
                                      bias_initializer=keras.initializers.Constant(-14.0))(x)  # Ni: brightest 30 %
        config = ModelConfig(task="ni", encoder="unet", class_names=["rest", "ni"], phase_map={0: "pore", 128: "ysz", 255: "ni"},
                             tile_size=32, context_slices=0,
                             normalisation=Normalisation.from_dict({"low": low, "high": high, "low_percentile": 0.5, "high_percentile": 99.5}, mode),
                              window="whole_slice", whole_slice_max_pixels=10**6, step_fraction=0.5,
                             tta=False, batch_size=8, max_slice_pixels=10**6, max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime="keras", planes="z", fusion_depth=64, fusion_halo=16)
        uris[mode] = save_segmenter(keras.Model(inputs, outputs), config, tmp_path / mode)
    models = tmp_path / "accuracy.csv"
    models.write_text("task,method,model_uri\n" + "".join(f"ni,{mode},{uri}\n" for mode, uri in uris.items()))
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/normalisation_bench.py"), "--models", str(models), "--source", str(source),
         "--cache-dir", str(tmp_path / "cache"), "--split", "0.5,0.2,0.3,1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((out / "normalisation.json").read_text())["rows"]
    assert len(rows) == 5 * 3
    by = {(r["transform"], r["model"]): r["iou_ni"] for r in rows}
    linear = "linear float32 (2.5e-5 x - 0.55)"
    # On the float32 copy the fixed model clips everything to one class; per-volume (and the mapped
    # range) give what they gave on the original.
    assert by[(linear, "fixed")] < 0.5 * by[("original (uint16)", "fixed")]
    assert by[(linear, "per_volume")] == pytest.approx(by[("original (uint16)", "per_volume")], abs=0.01)
    mapped = "fixed, range mapped at inference"
    assert by[(linear, mapped)] == pytest.approx(by[("original (uint16)", mapped)], abs=0.01)


def test_inference_bench_compares_runtimes_with_keras(tmp_path, params, write_slices):
    """--runtimes: each runtime's row scores the same slab and records its labels' agreement with
    the Keras row; OpenVINO (f32) and ONNX Runtime give Keras' labels, int8 is calibrated and run."""
    source = _phantom_source(tmp_path, params, write_slices)
    models = tmp_path / "accuracy.csv"
    models.write_text(f"task,method,model_uri\nni,tiny conv,{_ni_segmenter(tmp_path)}\n")
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/inference_bench.py"), "--models", str(models), "--source", str(source),
         "--cache-dir", str(tmp_path / "cache"), "--split", "0.5,0.2,0.3,1", "--windows", "whole_slice",
         "--precisions", "float32", "--runtimes", "openvino,openvino-int8,onnxruntime", "--calibration-slices", "4",
         "--rf-trees", "5", "--rf-samples", "2000", "--rf-jobs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=400, cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads((out / "inference.json").read_text())
    rows = {r["runtime"].split(" (")[0].split()[0] + (" int8" if "int8" in r["runtime"] else ""): r
            for r in record["rows"][1:]}
    assert set(rows) == {"keras", "openvino", "openvino int8", "onnxruntime"}, list(rows)
    assert rows["keras"]["agreement"] == 100.0 and rows["keras"]["conv_kernels"] == ""
    assert rows["openvino"]["agreement"] >= 99.9 and "f32" in rows["openvino"]["conv_kernels"]
    assert rows["onnxruntime"]["agreement"] >= 99.9
    assert "calibrated on" in rows["openvino int8"]["runtime"] and 0 < rows["openvino int8"]["agreement"] <= 100.0
    for row in rows.values():
        assert row["slices_per_s"] > 0 and 0.0 <= row["iou_ni"] <= 1.0
    assert "labels = Keras" in record["settings"]["runtimes"]
    assert "labels = Keras (%)" in (out / "inference.md").read_text()


def test_planes_are_the_models_own_or_checked():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from inference_bench import parse_planes

    assert parse_planes("model,z,zyx") == [None, "z", "zyx"]
    with pytest.raises(Exception, match="planes 'q'"):
        parse_planes("model,q")
