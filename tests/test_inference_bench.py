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
    """A one-convolution 'ni' network saved as a pyfunc segmenter (whole-slice passes by default)."""
    import keras

    from socseg.inference.predictor import ModelConfig
    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import IntensityNormalisation

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1))
    x = IntensityNormalisation(20000.0, 43000.0)(inputs)
    outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid",
                                  bias_initializer=keras.initializers.Constant(-0.5))(x)
    config = ModelConfig(task="ni", encoder="unet", class_names=["rest", "ni"], phase_map={0: "pore", 128: "ysz", 255: "ni"},
                         tile_size=32, context_slices=0, normalisation={"low": 20000.0, "high": 43000.0}, normalisation_mode="fixed",
                         window="whole_slice", whole_slice_max_pixels=10**6, step_fraction=0.5, tta=False, batch_size=8,
                         max_slice_pixels=10**6, max_clipped_fraction=0.5)
    return str(save_segmenter(keras.Model(inputs, outputs), config, folder / "model"))


def test_inference_bench_scores_every_window_and_the_forest(tmp_path, params, write_slices):
    from socseg.data.synth import synth_from_params

    phantom = synth_from_params(params, "bench", shape=(24, 64, 64), seed=5)
    source = tmp_path / "source"
    write_slices(source / "data", "SOCprist", phantom.image, width=4, ext=".tiff")
    write_slices(source / "labels", "slice__", phantom.labels, width=4)
    models = tmp_path / "accuracy.csv"
    models.write_text(f"task,method,model_uri\nni,tiny conv,{_ni_segmenter(tmp_path)}\nni,global threshold(s),\n")
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/inference_bench.py"), "--models", str(models), "--source", str(source),
         "--cache-dir", str(tmp_path / "cache"), "--split", "0.5,0.2,0.3,1", "--windows", "sliding:0.5,sliding:1.0,whole_slice",
         "--rf-trees", "5", "--rf-samples", "2000", "--rf-jobs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads((out / "inference.json").read_text())
    rows = record["rows"]
    assert [r["window"] for r in rows] == ["-", "sliding, step 0.5", "sliding, step 1", "whole_slice"]
    assert rows[0]["model"].startswith("random forest") and rows[0]["x_forest"] == 1.0
    for row in rows:
        assert 0.0 <= row["iou_ni"] <= 1.0 and row["slices_per_s"] > 0
    # A one-convolution network: every window gives (nearly) the same labels, so the same IoU.
    assert np.ptp([r["iou_ni"] for r in rows[1:]]) < 0.02
    assert "test slab" in record["settings"]["data"] and record["git_commit"]
    assert "| whole_slice |" in (out / "inference.md").read_text()


def test_normalisation_bench_scores_fixed_and_per_volume_models_on_every_transform(tmp_path, params, write_slices):
    """benchmarks/normalisation_bench.py: a fixed and a per_volume model (one convolution each) on
    the five transformed copies; the fixed one is also scored with the range mapped at inference."""
    import keras

    from socseg.data.synth import synth_from_params
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
                             normalisation={"low": low, "high": high, "low_percentile": 0.5, "high_percentile": 99.5},
                             normalisation_mode=mode, window="whole_slice", whole_slice_max_pixels=10**6, step_fraction=0.5,
                             tta=False, batch_size=8, max_slice_pixels=10**6, max_clipped_fraction=0.5)
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
