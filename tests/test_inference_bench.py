"""benchmarks/inference_bench.py end to end on a small phantom in the SOCPristine layout: every
window setting and the forest in one result file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

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
