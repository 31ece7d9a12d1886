"""benchmarks/finetune_bench.py and benchmarks/uncertainty_bench.py end to end on a phantom laid
out as the SOCPristine slices, with a one-convolution socseg model (no training)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def phantom_source(tmp_path, params, write_slices):
    """40 slices of 64x64 as microscope TIFFs + label TIFFs (the layout import_socpristine reads)."""
    from socseg.data.synth import synth_from_params

    phantom = synth_from_params(params, "bench", shape=(40, 64, 64), seed=6)
    source = tmp_path / "source"
    write_slices(source / "data", "SOCprist", phantom.image, width=4, ext=".tiff")
    write_slices(source / "labels", "slice__", phantom.labels, width=4)
    return source


def _threshold_model(folder: Path, context_slices: int = 0) -> str:
    """A socseg-exported ni model (normalisation layer + one inner 1x1 convolution: Ni = the brightest
    ~30 % of the phantom's grey range), saved as a local segmenter folder: fine-tunable, scoreable.
    With ``context_slices`` c it is a 2.5D model (2c + 1 input channels) that looks at the centre one."""
    import keras

    from socseg.data.normalise import Normaliser
    from socseg.data.normalise import Normalisation
    from socseg.inference.predictor import ModelConfig
    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import export_model

    keras.utils.set_random_seed(0)
    channels = 2 * context_slices + 1
    inputs = keras.Input((None, None, channels))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    outputs = conv(inputs)
    kernel = np.zeros((1, 1, channels, 1), np.float32)
    kernel[0, 0, context_slices, 0] = 20.0
    conv.set_weights([kernel, np.array([-14.0], np.float32)])
    low, high = 20000.0, 43000.0
    network = export_model(keras.Model(inputs, outputs, name="unet"), Normaliser(low, high, 0.5, 99.5))
    config = ModelConfig(task="ni", encoder="unet", class_names=["rest", "ni"], phase_map={0: "pore", 128: "ysz", 255: "ni"},
                         tile_size=32, context_slices=context_slices,
                         normalisation=Normalisation.from_dict({"low": low, "high": high, "low_percentile": 0.5, "high_percentile": 99.5}, "fixed"),
                          window="whole_slice", whole_slice_max_pixels=10**6, step_fraction=0.5,
                         tta=False, batch_size=8, max_slice_pixels=10**6, max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime="keras", planes="z", fusion_depth=64, fusion_halo=16)
    return str(save_segmenter(network, config, folder / f"threshold-model-{context_slices}"))


@pytest.fixture()
def threshold_model(tmp_path):
    return _threshold_model(tmp_path)


def _run(script: str, args: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'bench.db'}"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_finetune_bench_scores_base_finetuned_and_forest_for_each_labelled_set(tmp_path, phantom_source):
    """A 2.5D base model (context 1): the scored slices keep their distance from every labelled one,
    and fine-tuning on the new scan's labelled slices beats the base model there."""
    from mlflow.tracking import MlflowClient

    from socseg.data.split import slab_split

    threshold_model = _threshold_model(tmp_path, context_slices=1)
    out = tmp_path / "out"
    _run("finetune_bench.py", [
        "--model-uri", threshold_model, "--source", str(phantom_source), "--cache-dir", str(tmp_path / "cache"),
        "--split", "0.3,0.1,0.6,1", "--set", "finetune.epochs=1", "--set", "finetune.steps_per_epoch=10",
        "--set", "finetune.learning_rate=0.08", "--set", "train.batch_size=2", "--forest-trees", "5", "--out", str(out)],
        tmp_path)
    record = json.loads((out / "finetune.json").read_text())
    rows = record["rows"]

    # No adjacency leak: with 1 context slice per side, max(1 + 2, 2) = 3 unused slices lie between the
    # labelled and the scored slices (distance 4); the pool is the test slab's first 10 slices.
    start, stop = slab_split(40, 0.3, 0.1, 0.6, 1).test
    first, last = record["settings"]["scored_z_range"]
    labelled = {z for r in rows for z in r["labelled_z"]}
    assert labelled == set(range(start, start + 10)) and last == stop - 1 and last >= first
    assert min(abs(s - z) for s in range(first, last + 1) for z in labelled) == 4
    assert f"{start}-{start + 9}" in record["settings"]["labelled pool"] and "3 unused slices" in record["settings"]["gap"]
    # Fine-tuning must have learnt the new scan: every fine-tune beats the base model there (a float32
    # model and fixed seeds, so the same figures on every CPU: base 0.35, fine-tunes 0.45-0.46).
    base = rows[0]["iou_ni"]
    assert all(r["iou_ni"] > base + 0.05 for r in rows if r["method"] == "fine-tuned U-Net"), rows
    assert [r["method"] for r in rows] == ["base model", "base model, grey range mapped"] + ["fine-tuned U-Net", "random forest"] * 4
    rows = rows[1:]  # from here on: rows[1::2] fine-tunes, rows[2::2] forests
    assert [r["labelled_slices"] for r in rows[1::2]] == [1, 3, 10, 3]
    whole_slice = 64 * 64
    assert [r["labelled_pixels"] for r in rows[1:7:2]] == [whole_slice, 3 * whole_slice, 10 * whole_slice]
    partial = rows[-1]["labelled_pixels"]
    assert partial == rows[-2]["labelled_pixels"] and 0.1 * 3 * whole_slice <= partial < 0.25 * 3 * whole_slice
    # The phantom's phases are easy for a forest trained on one whole slice.
    assert rows[2]["iou_ni"] > 0.8
    assert "finetune.test_fraction=0" in record["settings"]["overrides"]
    assert (out / "finetune.md").read_text().count("| fine-tuned U-Net |") == 4
    assert (out / "finetune.png").stat().st_size > 5000

    client = MlflowClient(f"sqlite:///{tmp_path / 'bench.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    tuned = [r for r in runs if r.data.tags.get("socseg.kind") == "finetune"]
    assert len(tuned) == 4 and all(r.data.tags["socseg.parent_model_uri"] == threshold_model for r in tuned)
    assert {r.data.params["finetune.test_slices"] for r in tuned} == {"none"}  # test_fraction 0: all labelled slices train
    bench = [r for r in runs if r.info.run_name.startswith("finetune-bench gamma")]
    assert len(bench) == 1 and bench[0].data.metrics["base_mapped_iou_ni"] == pytest.approx(rows[0]["iou_ni"])
    artifacts = {a.path for a in client.list_artifacts(bench[0].info.run_id, "finetune_bench")}
    assert artifacts == {"finetune_bench/finetune.json", "finetune_bench/finetune.md", "finetune_bench/finetune.png"}


def test_uncertainty_bench_correlates_slice_uncertainty_with_errors(tmp_path, phantom_source, threshold_model):
    out = tmp_path / "out"
    _run("uncertainty_bench.py", ["--model-uri", threshold_model, "--source", str(phantom_source),
                                  "--cache-dir", str(tmp_path / "cache"), "--split", "0.3,0.1,0.6,1", "--top", "3",
                                  "--out", str(out)], tmp_path)
    from socseg.data.split import slab_split

    start, stop = slab_split(40, 0.3, 0.1, 0.6, 1).test
    rows = json.loads((out / "uncertainty.json").read_text())["rows"]
    assert [r["copy"].split(" ")[0] for r in rows] == ["original", "new"]
    for row in rows:
        assert row["slices"] == stop - start and -1.0 <= row["pearson_r"] <= 1.0 and 0 <= row["top_overlap"] <= 3
        assert 0.0 <= row["pixel_roc_auc"] <= 1.0 and 0.0 <= row["pixel_error_rate"] <= 1.0
    # On the original, a threshold's uncertainty sits at grey values near its cut, where its errors
    # are (on the new scan the fixed threshold is wrong on about half the pixels, sure or not).
    original = rows[0]
    assert original["pixel_error_rate_top5pct_uncertain"] > 2 * original["pixel_error_rate"]
    assert original["pixel_roc_auc"] > 0.7
    assert (out / "uncertainty.png").stat().st_size > 5000


def test_new_scan_chains_the_normalisation_transforms():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from finetune_bench import new_scan, painted_mask

    image = np.random.default_rng(0).integers(20000, 43000, (6, 32, 32)).astype(np.uint16)
    scan = new_scan(image, "gamma 0.5 + blur 2 + noise 4x")
    assert scan.dtype == np.uint16 and scan.shape == image.shape and not np.array_equal(scan, image)
    mask = painted_mask((64, 64), 0.1, np.random.default_rng(1))
    assert 0.1 <= mask.mean() < 0.25


@pytest.mark.parametrize("context", [0, 1, 2, 3])
def test_pool_and_scored_keeps_the_scored_slices_clear_of_the_pool(context):
    """At least context + 2 unused slices lie between the labelled and the scored slices, and no
    scored slice's context window (context slices per side) shares a slice with a labelled one's."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from finetune_bench import pool_and_scored

    pool, gap, scored = pool_and_scored(145, 200, 10, context)
    assert pool == list(range(145, 155)) and scored[-1] == 199
    closest = min(s - z for s in scored for z in pool)
    assert closest - 1 >= context + 2  # unused slices in between
    windows = lambda zs: {n for z in zs for n in range(z - context, z + context + 1)}  # noqa: E731
    assert not windows(pool) & windows(scored)
    assert gap == scored[0] - pool[-1] - 1 and closest - 1 == gap  # no more slices dropped than needed


def test_pool_and_scored_refuses_a_test_slab_with_nothing_left_to_score():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from finetune_bench import pool_and_scored

    with pytest.raises(ValueError, match="no slice left to score.*lower --pool"):
        pool_and_scored(0, 13, 10, 1)  # 10 pool slices + a gap of 3 fill the 13-slice slab
    assert pool_and_scored(0, 14, 10, 1)[2] == [13]
    with pytest.raises(ValueError, match="at least 3"):
        pool_and_scored(0, 30, 2, 0)
