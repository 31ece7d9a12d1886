"""benchmarks/accuracy.py with a separate test volume (--train-volume A --test-volume B), in both
normalisation modes: B is scored whole, with its own grey range (per_volume) or the training one (fixed)."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow(seconds=60)  # each test: two accuracy.py runs, one U-Net trained

# B saved as a float32 phase-like reconstruction: the same data as B on another grey scale.
SCALE, OFFSET = 2.5e-5, -0.4


def _accuracy_module(repo_root: Path):
    spec = importlib.util.spec_from_file_location("socseg_accuracy_benchmark", repo_root / "benchmarks/accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def volumes(tiny_params, tmp_path) -> dict[str, Path]:
    """A (tiny, the training volume), B (another phantom on A's grey scale) and B rescaled (float32)."""
    from socseg.data.synth import synth_from_params
    from socseg.data.volumes import Volume, VolumeMeta, save_volume

    data = Path(tiny_params["data"]["dir"])
    b = synth_from_params(tiny_params, "b", shape=(16, 64, 64), seed=2)
    save_volume(b, data / "b")
    image = b.image.astype(np.float32) * np.float32(SCALE) + np.float32(OFFSET)
    meta = VolumeMeta("b-float", image.shape, "float32", dict(b.meta.phase_map), has_labels=True)
    save_volume(Volume(image, b.labels, meta), data / "b-float")
    return {"a": data / "tiny", "b": data / "b", "b-float": data / "b-float"}


def _run(accuracy, tiny_params, tmp_path: Path, mode: str, test: Path, methods: str) -> dict[str, dict]:
    """accuracy.py's main with --train-volume A --test-volume ``test``: method -> its CSV row."""
    tiny_params["normalise"]["mode"] = mode
    tiny_params["train"]["learning_rate"] = 0.01  # 4 steps that find some Ni: the range then visibly matters
    params_file = tmp_path / f"params-{mode}.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params))
    out = tmp_path / f"out-{mode}-{test.name}-{methods.replace(',', '-')}"
    accuracy.main(["--params", str(params_file), "--train-volume", f"{tiny_params['data']['dir']}/tiny",
                   "--test-volume", str(test), "--split", "0.6,0.2,0.2,2", "--tasks", "ni", "--methods", methods,
                   "--leakage", "none", "--epochs", "1", "--steps-per-epoch", "4", "--out", str(out)])
    rows = {row["method"]: row for row in csv.DictReader((out / "accuracy.csv").open())}
    for row in rows.values():
        assert row["split"] == f"other volume ({test.name})" and int(row["n_test_slices"]) == 16  # B whole
    return rows


def _unet_scored_on(accuracy, model_uri: str, test: Path, grey_ranges=None):
    """The logged U-Net on the whole of another test volume, as accuracy.py scores it (score_model),
    or with the given per_volume ``grey_ranges``."""
    from socseg.inference.evaluate import score_slabs
    from socseg.inference.predictor import Predictor

    setting = accuracy.Setting("other", test.parent, [], {}, [(test, None)])
    if grey_ranges is None:
        return accuracy.score_model(model_uri, setting, "ni")
    return score_slabs(Predictor.load(model_uri), accuracy.test_slabs(setting), "ni", grey_ranges=grey_ranges)


def test_per_volume_scores_a_separate_test_volume_with_its_own_range(repo_root, tiny_params, volumes, mlflow_env, tmp_path):
    """per_volume (the default): B and B rescaled to float32 get the same scores, from the
    threshold baseline (which crashed with a KeyError) and from the U-Net, because each is mapped
    by its own whole-volume grey range; with A's range the rescaled copy would score otherwise."""
    from socseg.data.normalise import grey_range
    from socseg.data.volumes import load_volume

    accuracy = _accuracy_module(repo_root)
    rows = _run(accuracy, tiny_params, tmp_path, "per_volume", volumes["b"], "threshold,unet")
    threshold, unet = rows["global threshold(s)"], rows["U-Net (from scratch)"]
    assert float(threshold["mean_iou"]) > 0.8  # a phantom a global threshold segments well
    assert "of each volume's own grey range" in threshold["settings"]
    moved = _run(accuracy, tiny_params, tmp_path, "per_volume", volumes["b-float"], "threshold")["global threshold(s)"]
    for key in ("mean_iou", "iou_ni", "accuracy"):
        assert float(moved[key]) == pytest.approx(float(threshold[key]), abs=2e-3), key

    assert float(unet["iou_ni"]) > 0.0  # the U-Net finds Ni on B
    on_float = _unet_scored_on(accuracy, unet["model_uri"], volumes["b-float"])
    assert on_float.scores["mean_iou"] == pytest.approx(float(unet["mean_iou"]), abs=2e-3)
    assert on_float.scores["iou_ni"] == pytest.approx(float(unet["iou_ni"]), abs=2e-3)
    own_range = grey_range(load_volume(volumes["b-float"]).image, 0.5, 99.5)  # as socseg segment estimates it
    own = _unet_scored_on(accuracy, unet["model_uri"], volumes["b-float"], {"b-float": (own_range.low, own_range.high)})
    np.testing.assert_array_equal(own.confusion, on_float.confusion)  # the range scoring used: grey_range's
    a_range = grey_range(load_volume(volumes["a"]).image, 0.5, 99.5)
    wrong = _unet_scored_on(accuracy, unet["model_uri"], volumes["b-float"], {"b-float": (a_range.low, a_range.high)})
    assert not np.array_equal(wrong.confusion, on_float.confusion)  # the network does depend on the range


def test_fixed_scores_a_separate_test_volume_with_the_training_range(repo_root, tiny_params, volumes, mlflow_env, tmp_path):
    """fixed: B (on the training data's grey scale) scores as well as per_volume; B rescaled to
    float32 is mapped by the training range too, so every voxel clips to one class (no Ni found)."""
    accuracy = _accuracy_module(repo_root)
    rows = _run(accuracy, tiny_params, tmp_path, "fixed", volumes["b"], "threshold,unet")
    threshold, unet = rows["global threshold(s)"], rows["U-Net (from scratch)"]
    assert float(threshold["mean_iou"]) > 0.8 and threshold["settings"].startswith("raw grey thresholds ")
    assert 0.0 <= float(unet["mean_iou"]) <= 1.0
    moved = _run(accuracy, tiny_params, tmp_path, "fixed", volumes["b-float"], "threshold")["global threshold(s)"]
    assert float(moved["iou_ni"]) == 0.0 and float(moved["mean_iou"]) < float(threshold["mean_iou"]) - 0.3
    on_float = _unet_scored_on(accuracy, unet["model_uri"], volumes["b-float"])
    assert on_float.scores["iou_ni"] < float(unet["iou_ni"])  # no longer what it found on B's own scale
    assert on_float.scores["mean_iou"] != pytest.approx(float(unet["mean_iou"]), abs=1e-3)


@pytest.mark.parametrize("fold", range(4))
def test_fold_copies_hold_each_fold_out_with_a_gap_on_both_sides(repo_root, fold):
    from socseg.data.split import slab_split

    accuracy = _accuracy_module(repo_root)
    n, folds, gap = 40, 4, 3
    start, stop = accuracy.fold_bounds(n, folds, fold)
    assert stop - start == 10
    order, used = accuracy.fold_order(n, folds, fold, gap)
    held_out = order[-10:]
    assert sorted(held_out) == list(range(start, stop)) and len(set(order)) == len(order)
    assert all(abs(a - b) == 1 for a, b in zip(held_out, held_out[1:]))  # contiguous, either direction
    # the slices right before the fold in the copy are its real neighbours (its 2.5D context)
    before = order[-10 - gap:-10]
    assert all(abs(a - b) == 1 for a, b in zip(before + held_out[:1], before[1:] + held_out[:1]))
    rest = used - 2 * gap
    split = slab_split(len(order), (rest - 4) / (rest + 10), 4 / (rest + 10), 10 / (rest + 10), gap)
    assert split.test == (len(order) - 10, len(order))
    seen = [order[i] for subset in ("train", "val") for i in split.range(subset)]
    assert seen and all(z < start - gap or z >= stop + gap for z in seen)  # nothing within gap of the fold
    assert len(seen) == rest


def test_cross_validation_scores_every_fold_and_pairs_the_u_net_with_the_forest(repo_root, tiny_params, mlflow_env, tmp_path):
    accuracy = _accuracy_module(repo_root)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params))
    out = tmp_path / "cv"
    accuracy.main(["--params", str(params_file), "--train-volume", f"{tiny_params['data']['dir']}/tiny",
                   "--split", "0.6,0.2,0.2,2", "--folds", "3", "--tasks", "ni", "--methods", "rf,unet",
                   "--rf-trees", "5", "--rf-samples", "2000", "--rf-jobs", "1", "--epochs", "1",
                   "--steps-per-epoch", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    rows = list(csv.DictReader((out / "accuracy.csv").open()))
    assert sorted(r["split"] for r in rows) == sorted([f"z-fold {f}/3, gap 2" for f in (1, 2, 3)] * 2)
    record = __import__("json").loads((out / "cv.json").read_text())
    by_method = {r["method"]: r for r in record["rows"]}
    unet, forest = by_method["U-Net (from scratch)"], by_method["random forest (ilastik features)"]
    assert unet["folds"] == forest["folds"] == 3
    unet_folds = {r["split"]: float(r["iou_ni"]) for r in rows if r["method"] == "U-Net (from scratch)"}
    forest_folds = {r["split"]: float(r["iou_ni"]) for r in rows if r["method"].startswith("random forest")}
    diffs = [unet_folds[k] - forest_folds[k] for k in unet_folds]
    assert unet["iou_ni_minus_forest_mean"] == pytest.approx(np.mean(diffs), abs=1e-5)
    assert unet["iou_ni_minus_forest_min"] == pytest.approx(min(diffs), abs=1e-5)
    assert forest["iou_ni_mean"] == pytest.approx(np.mean(list(forest_folds.values())), abs=1e-5)
    assert "iou_ni_minus_forest_mean" not in forest


def test_seeds_train_each_u_net_again_and_score_their_ensemble(repo_root, tiny_params, volumes, mlflow_env, tmp_path):
    """--seeds 2: one U-Net per seed (train.seed, seed + 1), then the ensemble of both, scored
    through the same predictor path: its row names both members and its scores are those of
    the averaged probabilities (socseg.inference.predictor.Ensemble), not of either member."""
    from socseg.inference.predictor import Ensemble, Predictor

    accuracy = _accuracy_module(repo_root)
    tiny_params["train"]["learning_rate"] = 0.01
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params))
    out = tmp_path / "seeds"
    accuracy.main(["--params", str(params_file), "--train-volume", str(volumes["a"]), "--test-volume", str(volumes["b"]),
                   "--split", "0.6,0.2,0.2,2", "--tasks", "ni", "--methods", "unet", "--leakage", "none",
                   "--epochs", "1", "--steps-per-epoch", "3", "--seeds", "2", "--out", str(out)])
    rows = {row["method"]: row for row in csv.DictReader((out / "accuracy.csv").open())}
    seed = int(tiny_params["train"]["seed"])
    first, second = rows[f"U-Net (from scratch) seed {seed}"], rows[f"U-Net (from scratch) seed {seed + 1}"]
    ensemble = rows["U-Net (from scratch) ensemble of 2"]
    assert first["model_uri"] != second["model_uri"]
    assert ensemble["model_uri"] == f"{first['model_uri']},{second['model_uri']}"
    # accuracy.csv keeps 6 significant digits, so the three printed values each carry up to half a unit of the last
    assert float(ensemble["train_s"]) == pytest.approx(float(first["train_s"]) + float(second["train_s"]), rel=2e-5)
    members = [Predictor.load(first["model_uri"]), Predictor.load(second["model_uri"])]
    image = np.asarray(accuracy.test_slabs(accuracy.Setting("other", volumes["b"].parent, [], {}, [(volumes["b"], None)]))[0]
                       .volume.image[:4])
    weights = [m.network.get_weights()[-1] for m in members]
    assert not np.allclose(weights[0], weights[1])  # two seeds, two networks
    averaged = (members[0].probabilities(image) + members[1].probabilities(image)) / 2
    np.testing.assert_allclose(Ensemble(members).probabilities(image), averaged, atol=1e-5)
    rescored = accuracy.score_model(ensemble["model_uri"], accuracy.Setting("other", volumes["b"].parent, [], {},
                                                                            [(volumes["b"], None)]), "ni")
    assert float(ensemble["iou_ni"]) == pytest.approx(rescored.scores["iou_ni"], abs=1e-4)


def test_only_folds_runs_the_folds_named_and_refuses_others(repo_root, tiny_params, mlflow_env, tmp_path):
    """--only-folds 3 of --folds 3: one fold's rows, the same held-out slab as in the full run."""
    accuracy = _accuracy_module(repo_root)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params))
    out = tmp_path / "cv"
    common = ["--params", str(params_file), "--train-volume", f"{tiny_params['data']['dir']}/tiny", "--split",
              "0.6,0.2,0.2,2", "--folds", "3", "--tasks", "ni", "--methods", "threshold",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    accuracy.main([*common, "--only-folds", "3"])
    rows = list(csv.DictReader((out / "accuracy.csv").open()))
    assert [r["split"] for r in rows] == ["z-fold 3/3, gap 2"]
    with pytest.raises(SystemExit):
        accuracy.main([*common, "--only-folds", "4"])


def test_the_cv_summary_records_the_commit_the_run_started_from(repo_root, tmp_path):
    """cv.json is rewritten after each fold; a commit made meanwhile is not the code that ran."""
    import argparse
    import json

    accuracy = _accuracy_module(repo_root)
    rows = [{"task": "ni", "method": method, "split": f"z-fold {k}/2, gap 2", "iou_ni": iou, "mean_iou": iou,
             "git_commit": "abc1234", "git_dirty": True}
            for k in (1, 2) for method, iou in ((accuracy.METHOD_LABELS["rf"], 0.97), ("U-Net (from scratch)", 0.98 + k / 1000))]
    args = argparse.Namespace(folds=2, out=tmp_path)
    accuracy.write_cv_summary(rows, args, {"command": "`python benchmarks/accuracy.py --folds 2`", "data": "phantom"})
    record = json.loads((tmp_path / "cv.json").read_text())
    assert record["git_commit"] == "abc1234" and record["git_dirty"] is True
    unet = next(r for r in record["rows"] if r["method"] == "U-Net (from scratch)")
    assert unet["iou_ni_minus_forest_mean"] == pytest.approx(0.0115)
