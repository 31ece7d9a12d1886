"""benchmarks/cv_postprocess.py on a phantom: the fold rows it reads, the variants it applies (the
in-plane one is the predictor's own smoothing), its scores against the labels and its choice rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

NAMES = ["pore", "ysz", "ni"]


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("cv_postprocess")


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    rng = np.random.default_rng(0)
    fields = np.stack([ndi.gaussian_filter(rng.standard_normal((12, 48, 48)), 4.0) for _ in range(3)], -1)
    return np.argmax(fields, -1).astype(np.uint8)


def speckled(truth: np.ndarray, seed: int = 1) -> np.ndarray:
    """Probabilities that prefer the true class, with one pixel in 50 flipped to another class."""
    rng = np.random.default_rng(seed)
    probs = np.full((*truth.shape, 3), 0.1, np.float32)
    np.put_along_axis(probs, truth[..., None], 0.8, -1)
    flip = rng.random(truth.shape) < 0.02
    other = ((truth + 1 + rng.integers(0, 2, truth.shape)) % 3)[flip]
    probs[flip] = 0.1
    probs[flip, other] = 0.45
    probs[flip, truth[flip]] = 0.45 - 1e-3
    return probs


def test_fold_models_reads_the_phases_rows_of_the_method(bench, tmp_path):
    table = tmp_path / "accuracy.csv"
    table.write_text("task,method,split,model_uri\n"
                     "phases,global threshold(s),\"z-fold 1/5, gap 8\",\n"
                     "phases,U-Net (from scratch) pv,\"z-fold 2/5, gap 8\",models:/m-2\n"
                     "ni,U-Net (from scratch) pv,\"z-fold 1/5, gap 8\",models:/m-ni\n"
                     "phases,U-Net (from scratch) pv,\"z-fold 1/5, gap 8\",models:/m-1\n"
                     "phases,\"U-Net (from scratch), pv seed 42\",\"z-fold 1/5, gap 8\",models:/s-1\n"
                     "phases,\"U-Net (from scratch), pv ensemble of 2\",\"z-fold 1/5, gap 8\",\"models:/s-1,models:/s-2\"\n")
    # the method is the end of the label: pv is neither 'pv seed 42' nor the ensemble of the seeds
    assert bench.fold_models(table, "pv") == {0: (5, "models:/m-1"), 1: (5, "models:/m-2")}
    assert bench.fold_models(table, "pv seed 42") == {0: (5, "models:/s-1")}
    assert bench.fold_models(table, "pv ensemble of 2") == {0: (5, "models:/s-1,models:/s-2")}
    with pytest.raises(SystemExit, match="no phases rows of method 'other'"):
        bench.fold_models(table, "other")


def test_fold_models_joins_folds_trained_in_separate_runs_and_refuses_a_fold_twice(bench, tmp_path):
    header = "task,method,split,model_uri\n"
    first, second, other_k = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    first.write_text(header + "phases,U-Net pv,\"z-fold 2/5, gap 8\",models:/m-2\n")
    second.write_text(header + "phases,U-Net pv,\"z-fold 1/5, gap 8\",models:/m-1\n"
                      "phases,U-Net pv,\"z-fold 4/5, gap 8\",models:/m-4\n")
    other_k.write_text(header + "phases,U-Net pv,\"z-fold 3/4, gap 8\",models:/k-3\n")
    assert bench.fold_models([first, second], "pv") == {0: (5, "models:/m-1"), 1: (5, "models:/m-2"),
                                                       3: (5, "models:/m-4")}
    again = tmp_path / "again.csv"
    again.write_text(header + "phases,U-Net pv,\"z-fold 2/5, gap 8\",models:/m-2b\n")
    with pytest.raises(SystemExit, match="fold 2 of method 'pv' is in both"):
        bench.fold_models([first, second, again], "pv")
    with pytest.raises(SystemExit, match="different numbers of folds"):
        bench.fold_models([first, other_k], "pv")
    # the command line takes several CSVs for --models
    args = bench.parse_args(["--models", str(first), str(second)])
    assert args.models == [first, second]


def test_ensemble_averages_the_models_each_csv_holds_for_a_fold(bench, tmp_path):
    """--ensemble: one recipe trained twice (another loss, another length) in separate runs is
    scored as the ensemble of the two for each fold; unequal member counts are refused."""
    header = "task,method,split,model_uri\n"
    first, second, part = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    first.write_text(header + "phases,U-Net pv,\"z-fold 1/5, gap 8\",models:/a-1\n"
                     "phases,U-Net pv,\"z-fold 2/5, gap 8\",models:/a-2\n")
    second.write_text(header + "phases,U-Net pv,\"z-fold 2/5, gap 8\",models:/b-2\n")
    part.write_text(header + "phases,U-Net pv,\"z-fold 1/5, gap 8\",models:/b-1\n")
    assert bench.fold_models([first, second, part], "pv", ensemble=True) == {
        0: (5, "models:/a-1,models:/b-1"), 1: (5, "models:/a-2,models:/b-2")}
    with pytest.raises(SystemExit, match=r"same number of models for every fold .* found \{1: 1, 2: 2\}"):
        bench.fold_models([first, second], "pv", ensemble=True)
    twice = tmp_path / "twice.csv"
    twice.write_text(header + "phases,U-Net pv,\"z-fold 1/5, gap 8\",models:/t-1\n"
                     "phases,U-Net pv,\"z-fold 1/5, gap 8\",models:/t-1b\n")
    with pytest.raises(SystemExit, match="fold 1 of method 'pv' is in it twice"):
        bench.fold_models([twice], "pv", ensemble=True)
    assert bench.parse_args(["--models", str(first), "--ensemble"]).ensemble


def test_the_in_plane_variant_is_the_predictors_smoothing_and_removes_specks(bench, truth):
    from socseg.inference.window import smooth_probabilities

    probs = speckled(truth)
    plain = bench.apply_variant(probs, "plane", 0.0)
    np.testing.assert_array_equal(plain, probs.argmax(-1))
    smoothed = bench.apply_variant(probs, "plane", 1.0)
    np.testing.assert_array_equal(smoothed[3], smooth_probabilities(probs[3], 1.0).argmax(-1))
    assert np.count_nonzero(smoothed != truth) < np.count_nonzero(plain != truth) / 2
    islands = bench.apply_variant(probs, "islands", 8)
    assert np.count_nonzero(islands != truth) < np.count_nonzero(plain != truth) / 2
    assert bench.apply_variant(probs, "volume", 0.7).shape == truth.shape


def test_scores_are_zero_for_the_labels_and_the_choice_follows_the_tpb_error(bench, truth):
    reference = bench.microstructure(truth, NAMES)
    same = bench.scored(truth, truth, NAMES, reference)
    assert same["mean_iou"] == 1.0 and same["err.tpb.density"] == 0.0
    noisy = bench.scored(truth, bench.apply_variant(speckled(truth), "plane", 0.0), NAMES, reference)
    assert noisy["mean_iou"] < 0.99 and noisy["err.tpb.density"] > 0.1  # specks add triple-phase boundary
    rows = [{"fold": f, "method": "U-Net", "variant": f"in-plane sigma {s:g}", "mean_iou": iou,
             "err.tpb.density": err * (1 + 0.1 * f)}
            for f in (1, 2) for s, iou, err in [(0, 0.980, 0.06), (1, 0.9798, 0.01), (2, 0.970, 0.0)]]
    stats = bench.summary(rows)
    assert stats["U-Net | in-plane sigma 1"]["folds"] == 2
    assert stats["U-Net | in-plane sigma 1"]["mean_abs_err.tpb.density"] == pytest.approx(0.0115)
    # sigma 2 has no TPB error but loses 0.01 IoU: not eligible; sigma 1 is.
    assert bench.chosen_sigma(stats, "U-Net", [0, 1, 2], 0.0005) == 1.0
    assert bench.chosen_sigma(stats, "U-Net", [0, 1, 2], 0.1) == 2.0


def test_tortuosity_errors_are_zero_for_the_labels_and_move_with_the_prediction(bench, truth):
    """--tortuosity: each phase's factor per axis joins the compared metrics (and the summary)."""
    reference = bench.microstructure(truth, NAMES, tortuosity=True)
    solved = [key for key in bench.TORTUOSITY_METRICS if key in reference]
    assert solved and all(reference[key] >= 1.0 for key in solved)
    same = bench.scored(truth, truth, NAMES, reference, tortuosity=True)
    assert all(same[f"err.{key}"] == 0.0 for key in solved)
    grown = np.where(ndi.binary_dilation(truth == 0, iterations=1), 0, truth).astype(np.uint8)  # wider pores
    moved = bench.scored(truth, grown, NAMES, reference, tortuosity=True)
    pore = [key for key in solved if key.startswith("tau.pore.")]
    assert pore and all(moved[f"err.{key}"] < 0 for key in pore)  # wider pores conduct more directly
    plain = bench.scored(truth, grown, NAMES, reference)  # without --tortuosity: no factor solved
    assert "err.tau.pore.z" not in plain
    stats = bench.summary([{"fold": 1, "method": "U-Net", "variant": "in-plane sigma 0", **moved}])
    assert "err.tau.pore.z" in stats["U-Net | in-plane sigma 0"] or "tau.pore.z" not in reference


def test_the_result_file_holds_the_folds_scored_so_far(bench, tmp_path):
    """Rewritten after each fold, so a run stopped half-way keeps its folds; two methods (one
    seed's model and the ensemble) each get their figures, the choice follows the first."""
    import argparse
    import json

    rows = [{"fold": 1, "method": f"U-Net {name}", "variant": f"in-plane sigma {s:g}", "mean_iou": 0.98,
             "err.tpb.density": err}
            for name, shift in (("pv seed 42", 0.0), ("pv ensemble of 2", -0.02)) for s, err in [(0, 0.05 + shift), (1, 0.01)]]
    args = argparse.Namespace(sigmas=[0.0, 1.0], iou_tolerance=0.0005, models=[tmp_path / "accuracy.csv"], inference=["plain"],
                              score_on="train", tortuosity=False, split=[0.6, 0.1, 0.3, 8], note="", out=tmp_path / "out",
                              ensemble=False)
    labels = {"pv seed 42": "U-Net pv seed 42", "pv ensemble of 2": "U-Net pv ensemble of 2"}
    metadata = {"command": "test", "date": "now", "git_commit": "abc", "git_dirty": False, "hardware": {}, "cpu_class": "x",
                "load_start": None}
    json_path, _, figures = bench.write_outputs(args, metadata, {0: (5, "a"), 1: (5, "b")}, list(labels), labels, rows)
    record = json.loads(json_path.read_text())
    assert "folds scored: 1" in record["settings"]["data"]
    assert record["settings"]["models"].endswith("one per fold each)")
    assert record["settings"]["scored on"].startswith("a window of each fold's own training slices")
    assert figures["U-Net pv ensemble of 2 | in-plane sigma 0"]["err.tpb.density"]["mean"] == pytest.approx(0.03)
    assert figures["chosen_sigma"] == 1.0 and "(U-Net pv seed 42)" in record["settings"]["rule"]


@pytest.fixture(scope="module")
def smoothing_model(tmp_path_factory) -> str:
    """A tiny logged 3-phase segmenter whose config smooths by default (sigma 1.3)."""
    import keras

    from socseg.data.normalise import FixedRange
    from socseg.inference.config import ModelConfig
    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import IntensityNormalisation

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1))
    x = IntensityNormalisation(0.0, 1.0)(inputs)
    outputs = keras.layers.Conv2D(3, 3, padding="same", activation="softmax")(x)
    config = ModelConfig(task="phases", encoder="unet", class_names=["pore", "ysz", "ni"],
                         phase_map={0: "pore", 128: "ysz", 255: "ni"}, tile_size=32, context_slices=0,
                         normalisation=FixedRange(low=0.0, high=1.0), window="whole_slice",
                         whole_slice_max_pixels=10**8, step_fraction=0.5, tta=False, batch_size=4,
                         max_slice_pixels=10**8, max_clipped_fraction=1.0, smoothing_sigma=1.3, runtime="keras", planes="z", fusion_depth=64, fusion_halo=16)
    return str(save_segmenter(keras.Model(inputs, outputs), config, tmp_path_factory.mktemp("cvpp") / "model"))


def fake_slab(image: np.ndarray, z_range: tuple[int, int]):
    return type("Slab", (), {"volume": type("Volume", (), {"image": image})(), "z_range": z_range})()


def test_the_u_net_probabilities_are_unsmoothed_whatever_the_models_default(bench, smoothing_model):
    """A model logged with a smoothing default (inference.smoothing_sigma > 0) must reach the
    variants raw: sigma 0 is then no smoothing, and sigma 1.3 is not applied twice."""
    from microstructure_accuracy import unet_probabilities

    image = np.random.default_rng(0).random((6, 40, 40)).astype(np.float32)
    slab = fake_slab(image, (1, 5))
    raw = unet_probabilities(smoothing_model, slab, smoothing_sigma=0.0)
    as_served = unet_probabilities(smoothing_model, slab)
    assert raw.shape == (4, 40, 40, 3)
    assert not np.allclose(raw, as_served, atol=1e-4)  # the model's own default smooths
    np.testing.assert_allclose(bench.apply_variant(raw, "plane", 1.3), bench.apply_variant(as_served, "plane", 0.0))
    np.testing.assert_allclose(bench.fold_probabilities(smoothing_model, slab, "plain"), raw)


def test_tta_and_multi_axis_are_the_predictors_own_and_unsmoothed(bench, smoothing_model):
    """--inference tta is the predictor's flip/rotation TTA, multi-axis its fusion (the fold read with
    the model's fusion halo around it, as segment reads a chunk); neither carries the model's default
    smoothing, and plain and TTA stay slice by slice."""
    from socseg.inference.predictor import load_predictor
    from socseg.inference.request import InferenceOptions

    image = np.random.default_rng(1).random((10, 40, 40)).astype(np.float32)
    slab = fake_slab(image, (3, 7))
    plain = bench.fold_probabilities(smoothing_model, slab, "plain")
    tta = bench.fold_probabilities(smoothing_model, slab, "tta")
    fused = bench.fold_probabilities(smoothing_model, slab, "multi-axis")
    assert tta.shape == fused.shape == plain.shape == (4, 40, 40, 3)
    assert not np.allclose(tta, plain, atol=1e-4) and not np.allclose(fused, plain, atol=1e-4)
    predictor = load_predictor(smoothing_model)
    request = predictor.request(InferenceOptions(tta=True, smoothing_sigma=0.0), source=image, check_range=False)
    np.testing.assert_allclose(tta, predictor.probabilities(image[3:7], request=request), atol=1e-6)
    request = predictor.request(InferenceOptions(tta=False, smoothing_sigma=0.0, planes="zyx"), source=image,
                                check_range=False)
    halo = request.context(predictor.context_slices)
    assert halo == 16  # the model's fusion_halo: the fold reads slices 0..9 around 3..6
    np.testing.assert_allclose(fused, predictor.probabilities(image, 3, 3, request), atol=1e-6)


def test_inference_modes_are_parsed_and_unknown_ones_refused(bench):
    assert bench.parse_args(["--models", "a.csv", "--inference", "plain, tta,multi-axis"]).inference == [
        "plain", "tta", "multi-axis"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "a.csv", "--inference", "plain,mirror"])


@pytest.mark.parametrize("fold", range(4))
def test_the_training_window_is_trained_slices_that_are_neighbours_in_the_volume(bench, tiny_params, tmp_path, fold):
    """--score-on train: a window as long as the fold, inside the copy's training slab, whose
    slices are neighbours in the original volume and keep their own labels."""
    import accuracy
    from socseg.data.split import slab_split
    from socseg.data.volumes import load_volume

    source = Path(tiny_params["data"]["dir"]) / "tiny"
    gap = 1
    setting = accuracy.fold_setting(source, tmp_path / "cache", 4, fold, [0.6, 0.1, 0.3, gap], tmp_path / "setting")
    held_out = accuracy.test_slabs(setting)[0]
    length = held_out.z_range[1] - held_out.z_range[0]
    window = bench.training_window(setting, length)
    start, stop = window.z_range
    order = window.volume.meta.extra["order"]
    split = setting.split
    train = slab_split(len(order), split["train"], split["val"], split["test"], gap).train
    assert stop - start == length and train[0] <= start and stop <= train[1]
    original = order[start:stop]
    assert all(abs(a - b) == 1 for a, b in zip(original, original[1:]))
    fold_start, fold_stop = accuracy.fold_bounds(24, 4, fold)
    assert all(z < fold_start - gap or z >= fold_stop + gap for z in original)
    labels = load_volume(source).class_index(slice(0, 24))
    assert np.array_equal(window.volume.class_index(slice(start, stop)), labels[original])
    with pytest.raises(SystemExit, match="no 40 neighbouring training slices"):
        bench.training_window(setting, 40)
