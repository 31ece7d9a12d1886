"""Fine-tuning on sparse labels: unlabelled pixels and slices, crops around labels, scoring that
skips them, and `socseg finetune` end to end from a tiny registered parent."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from conftest import params_lock

from socseg.data.tasks import IGNORE

PHASES = {0: "pore", 128: "ysz", 255: "ni"}


def _volume(labels: np.ndarray, name: str = "scan"):
    from socseg.data.volumes import Volume, VolumeMeta

    image = np.random.default_rng(0).integers(20000, 40000, labels.shape).astype(np.uint16)
    meta = VolumeMeta(name=name, shape=labels.shape, image_dtype="uint16", phase_map=dict(PHASES), has_labels=True)
    return Volume(image, labels.astype(np.uint8), meta)


def _labels(shape=(6, 20, 20), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).choice([0, 128, 255], size=shape).astype(np.uint8)


# --------------------------------------------------------------------------- sparse volumes


def test_ignore_value_and_unlabelled_slices_become_IGNORE():
    from socseg.data.sparse import sparse_volume

    labels = _labels()
    labels[1, :5] = 1  # painted "unlabelled"
    sparse = sparse_volume(_volume(labels), ignore_value=1, labelled_slices=[1, 4])
    index = sparse.class_index()
    assert np.all(index[[0, 2, 3, 5]] == IGNORE)  # not in --labelled-slices
    assert np.all(index[1, :5] == IGNORE) and np.all(index[1, 5:] != IGNORE)
    assert np.array_equal(index[4], np.searchsorted([0, 128, 255], labels[4]))
    assert np.array_equal(sparse.class_index(slice(1, 3)), index[1:3])
    assert sparse.slices_with_labels() == [1, 4]
    assert sparse.labelled_pixels(1) == 15 * 20 and sparse.labelled_pixels(0) == 0
    # ni targets keep IGNORE instead of calling it "rest"
    from socseg.data.prepare import Slab

    targets = Slab(sparse, (0, 6)).targets("ni")
    assert np.all(targets[0] == IGNORE) and set(np.unique(targets[4])) <= {0, 1}
    assert sparse.with_labelled_slices([4]).slices_with_labels() == [4]


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        (lambda lab: lab.__setitem__((2, 0, 0), 7), {}, r"label values \[7\].*not in the phase map"),
        (lambda lab: lab.fill(1), {}, "no labelled pixel"),
        (lambda lab: None, {"ignore_value": 128}, "ignore value 128 is a phase"),
        (lambda lab: None, {"labelled_slices": [2, 9]}, r"labelled slices \[9\] outside"),
        (lambda lab: lab[3].fill(1), {"labelled_slices": [3]}, r"no labelled pixel in slices \[3\]"),
    ],
)
def test_bad_sparse_labels_are_refused_with_the_reason(change, kwargs, message):
    from socseg.data.sparse import sparse_volume
    from socseg.data.volumes import VolumeError

    labels = _labels()
    change(labels)
    with pytest.raises(VolumeError, match=message):
        sparse_volume(_volume(labels), **{"ignore_value": 1, **kwargs})


def test_values_outside_the_phase_map_in_unlabelled_slices_do_not_matter():
    from socseg.data.sparse import sparse_volume

    labels = _labels()
    labels[0] = 7
    assert sparse_volume(_volume(labels), 1, [2, 3]).slices_with_labels() == [2, 3]


def test_slice_lists_and_split():
    from socseg.data.sparse import parse_slice_list
    from socseg.data.volumes import VolumeError
    from socseg.training.finetune import slice_ranges, split_labelled

    assert parse_slice_list("3, 17,10-12") == [3, 10, 11, 12, 17]
    assert parse_slice_list("") is None
    with pytest.raises(VolumeError, match="bad slice list"):
        parse_slice_list("3,x")
    assert split_labelled([40, 3, 17], 0.25) == ([3, 17], [40])
    assert split_labelled([5, 6], 0.9) == ([5], [6])  # at least one of each
    assert split_labelled([8], 0.5) == ([8], [])  # nothing to hold out
    assert split_labelled(list(range(10)), 0.3) == (list(range(7)), [7, 8, 9])
    assert split_labelled([40, 3, 17], 0.0) == ([3, 17, 40], [])  # 0: every labelled slice trains
    assert slice_ranges([9, 3, 4, 5]) == "3-5,9"


def test_slab_confusion_counts_labelled_pixels_only():
    from socseg.data.prepare import Slab
    from socseg.data.sparse import sparse_volume
    from socseg.inference.evaluate import slab_confusion

    labels = _labels()
    labels[:, :, :10] = 1
    slab = Slab(sparse_volume(_volume(labels), 1), (1, 3))
    truth = np.searchsorted([0, 128, 255], labels[1:3]).astype(np.uint8)
    wrong_where_unlabelled = truth.copy()
    wrong_where_unlabelled[:, :, :10] = (truth[:, :, :10] + 1) % 3
    cm = slab_confusion(slab, wrong_where_unlabelled, "phases")
    assert cm.sum() == 2 * 20 * 10 and np.trace(cm) == cm.sum()  # every counted pixel right
    cm_ni = slab_confusion(slab, (wrong_where_unlabelled == 2).astype(np.uint8), "ni")
    assert cm_ni.sum() == 2 * 20 * 10 and np.trace(cm_ni) == cm_ni.sum()


def test_crops_of_sparse_targets_always_hold_a_label():
    from socseg.data.dataset import RandomCrops

    targets = np.full((4, 96, 96), IGNORE, np.uint8)
    targets[2, 70:74, 5:9] = 1  # one small labelled patch in one slice
    images = np.random.default_rng(0).random((4, 96, 96), dtype=np.float32)
    crops = RandomCrops([images, images[:2]], [targets, np.full((2, 96, 96), IGNORE, np.uint8)],
                        size=32, batch_size=8, steps=3, context_slices=1)
    assert crops.slab_probabilities.tolist() == [1.0, 0.0]  # slabs by labelled pixels
    for step in range(3):
        x, y = crops[step]
        assert x.shape == (8, 32, 32, 3)
        assert all((crop != IGNORE).any() for crop in y)
    dense = RandomCrops([images], [np.zeros((4, 96, 96), np.uint8)], size=32, batch_size=2, steps=1)
    assert dense.cells == [None]  # fully labelled: uniform crops as before
    with pytest.raises(ValueError, match="no labelled pixel"):
        RandomCrops([images], [np.full((4, 96, 96), IGNORE, np.uint8)], size=32, batch_size=2, steps=1)


# --------------------------------------------------------------------------- end to end


@pytest.fixture()
def new_scan(tiny_params, tmp_path):
    """Another phantom as a grey TIFF and a sparse label TIFF: labels in a few slices only, the
    rest of those slices and every other slice painted with the ignore value 1."""
    from socseg.data.synth import synth_from_params

    volume = synth_from_params(tiny_params, "newscan", shape=(16, 64, 64), seed=7)
    labels = np.full(volume.labels.shape, 1, np.uint8)
    for z in (2, 6, 10, 14):
        labels[z, 8:56, 8:56] = volume.labels[z, 8:56, 8:56]
    grey, sparse = tmp_path / "newscan.tif", tmp_path / "newscan_labels.tif"
    tifffile.imwrite(grey, volume.image)
    tifffile.imwrite(sparse, labels)
    return grey, sparse, labels


def _state(client):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    versions = client.search_model_versions("name = 'socseg-ni'")
    return len(runs), sorted(int(v.version) for v in versions)


def _invoke(params, tmp_path, *args):
    from click.testing import CliRunner

    from socseg.cli import main

    params_file = tmp_path / "params_finetune.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    return CliRunner().invoke(main, ["finetune", *map(str, args), "--params", str(params_file)])


def test_finetune_registers_a_gated_challenger_with_lineage(parent, new_scan, tmp_path):
    from mlflow.tracking import MlflowClient

    from socseg.inference.predictor import Predictor
    from socseg.training.finetune import LINEAGE_TAG, finetune

    client = MlflowClient()
    grey, labels_path, labels = new_scan
    before = _state(client)
    parent_model = Predictor.load("models:/socseg-ni/1")

    # Bad input: refused with the reason, nothing logged or registered.
    bad = labels.copy()
    bad[6, 0, 0] = 77
    tifffile.imwrite(tmp_path / "bad.tif", bad)
    tifffile.imwrite(tmp_path / "empty.tif", np.full_like(labels, 1))
    tifffile.imwrite(tmp_path / "grey8.tif", (tifffile.imread(grey) // 257).astype(np.uint8))  # another grey scale
    refused = [
        (("models:/socseg-ni@champion", grey, "--labels", tmp_path / "bad.tif"), r"label values \[77\]"),
        (("models:/socseg-ni@champion", grey, "--labels", tmp_path / "empty.tif"), "no labelled pixel"),
        (("models:/socseg-ni@champion", grey, "--labels", labels_path, "--task", "phases"), "is a 'ni' model, not 'phases'"),
        (("models:/socseg-ni@champion", grey, "--labels", labels_path, "--ignore-value", "255"), "ignore value 255 is a phase"),
        (("models:/socseg-ni@champion", grey), "not a socseg volume folder: give its label stack"),
        (("models:/socseg-ni@champion", tmp_path / "grey8.tif", "--labels", labels_path), "out of this model's range"),
    ]
    for args, message in refused:
        done = _invoke(parent, tmp_path, *args)
        assert done.exit_code == 2, done.output
        assert done.output.startswith("error: ") and len(done.output.strip().splitlines()) == 1, done.output
        assert re.search(message, done.output), (message, done.output)
    assert _state(client) == before

    # Four labelled slices: trained on 2, 6, 10; slice 14 held out, gate decides there.
    done = _invoke(parent, tmp_path, "models:/socseg-ni@champion", grey, "--labels", labels_path,
                   "--out", tmp_path / "finetune.json")
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "finetune.json").read_text())
    assert result["train_slices"] == [2, 6, 10] and result["test_slices"] == [14]
    promotion = result["promotion"]
    assert promotion["name"] == "socseg-ni" and promotion["version"] == "2"
    assert promotion["champion_version_before"] == "1" and promotion["champion_score_before"] is not None
    assert str(client.get_registered_model("socseg-ni").aliases["challenger"]) == "2"
    run = client.get_run(result["run_id"])
    assert run.data.tags[LINEAGE_TAG] == "models:/socseg-ni/1"
    assert run.data.tags["socseg.parent_model_uri"] == "models:/socseg-ni@champion"
    assert run.data.tags["socseg.parent_model_version"] == "1"
    assert run.data.params["finetune.test_slices"] == "14" and run.data.params["finetune.ignore_value"] == "1"
    assert 0.0 <= run.data.metrics["test_mean_iou"] <= 1.0
    assert run.data.metrics["test_labelled_pixels"] == 48 * 48  # the held-out slice's labelled pixels only
    # One trainer (socseg.training.trainer.TrainingRun) runs `socseg train` and `socseg finetune`:
    # the fine-tune's run has exactly the parent training run's tags besides its own socseg.* ones,
    # and the same time, epoch and history records.
    trained = client.get_run(client.get_model_version("socseg-ni", "1").run_id)
    own = {key for key in run.data.tags if not key.startswith(("mlflow.", "socseg."))}
    assert own == {key for key in trained.data.tags if not key.startswith("mlflow.")}
    assert {"device", "precision", "execution", "data_fingerprint", "git_commit", "stopped_by", "state"} <= own
    assert {"train_seconds", "epochs_run"} <= set(run.data.metrics) & set(trained.data.metrics)
    for run_id in (run.info.run_id, trained.info.run_id):
        logged = {a.path for folder in ("plots", "training") for a in client.list_artifacts(run_id, folder)}
        assert {"plots/training_curves.png", "training/history.csv"} <= logged, run_id
    version = client.get_model_version("socseg-ni", "2")
    # The gate's verdict, the version's tag and the champion alias say the same (which way it goes
    # here depends on training: test_the_gate_promotes_a_better_fine_tune_and_rejects_a_worse_one
    # checks both outcomes where they are known).
    assert version.tags[LINEAGE_TAG] == "models:/socseg-ni/1"
    assert version.tags["promotion"] == ("champion" if promotion["promoted"] else "rejected")
    assert str(client.get_registered_model("socseg-ni").aliases["champion"]) == ("2" if promotion["promoted"] else "1")
    assert version.run_id == result["run_id"]
    # The champion gate compared on the held-out slice: the score recorded is the run's.
    assert float(version.tags["test_mean_iou"]) == pytest.approx(run.data.metrics["test_mean_iou"], abs=1e-6)
    child = Predictor.load(result["model_uri"])
    assert dataclasses.asdict(child.config) == dataclasses.asdict(parent_model.config)  # task, classes, normalisation kept
    assert any(not np.array_equal(a, b) for a, b in zip(child.network.get_weights(), parent_model.network.get_weights()))

    # One labelled slice, through the library, of a volume folder named under data.dir (fully
    # labelled, so --labelled-slices marks the rest unlabelled): no held-out slice, challenger
    # only, champion untouched.
    champion = client.get_registered_model("socseg-ni").aliases["champion"]
    one = finetune(parent, "models:/socseg-ni/1", "tiny", labelled=[6])
    assert one.train_slices == [6] and one.test_slices == []
    assert one.promotion["version"] == "3" and not one.promotion["promoted"]
    aliases = client.get_registered_model("socseg-ni").aliases
    assert str(aliases["challenger"]) == "3" and aliases["champion"] == champion
    assert client.get_model_version("socseg-ni", "3").tags["promotion"] == "ungated"
    assert client.get_run(one.run_id).data.tags["socseg.gate"].startswith("none")
    assert not any(k.startswith("test_") and k != "test_labelled_pixels" for k in one.metrics)


def test_the_gate_promotes_a_better_fine_tune_and_rejects_a_worse_one(tiny_params, mlflow_env, new_scan, constant_segmenter):
    """Constant models on the held-out slice 14 (labels known): "all rest" scores mean IoU
    rest/2 (IoU rest = rest pixels / labelled pixels, IoU ni = 0), "all ni" scores ni/2. With an
    "all ni" champion, a fine-tuned "all rest" model wins and becomes champion; a fine-tuned
    "all ni" model then loses to it and is registered as a rejected challenger."""
    from mlflow.tracking import MlflowClient

    from socseg.training.finetune import finetune
    from socseg.training.registry import register_and_promote
    from socseg.training.tracking import configure_tracking

    grey, labels_path, labels = new_scan
    held_out = labels[14][labels[14] != 1]  # the labelled pixels of the held-out slice
    n, n_ni = held_out.size, int(np.sum(held_out == 255))
    all_rest, all_ni = (n - n_ni) / n / 2, n_ni / n / 2
    assert n == 48 * 48 and all_rest > all_ni + 0.05, (n, n_ni)  # the phantom has less Ni than the rest
    tiny_params["finetune"].update(epochs=1, steps_per_epoch=2)
    configure_tracking(tiny_params)  # this test's store and experiment, whatever an earlier test left active
    client = MlflowClient()

    ni_uri, ni_run = constant_segmenter("all-ni", ni=True)
    first = register_and_promote(ni_uri, "socseg-ni", 0.0, evaluate=lambda uri: 0.0, run_id=ni_run,
                                 lock=params_lock(tiny_params))
    assert first.version == "1" and first.promoted

    rest_uri, _ = constant_segmenter("all-rest", ni=False)
    better = finetune(tiny_params, rest_uri, grey, labels=labels_path)
    assert better.test_slices == [14] and better.metrics["test_mean_iou"] == pytest.approx(all_rest, abs=1e-9)
    assert better.promotion["champion_score_before"] == pytest.approx(all_ni, abs=1e-9)
    assert better.promotion["version"] == "2" and better.promotion["promoted"] is True
    assert client.get_model_version("socseg-ni", "2").tags["promotion"] == "champion"
    assert str(client.get_registered_model("socseg-ni").aliases["champion"]) == "2"

    worse = finetune(tiny_params, "models:/socseg-ni/1", grey, labels=labels_path)  # the "all ni" model again
    assert worse.metrics["test_mean_iou"] == pytest.approx(all_ni, abs=1e-9)
    assert worse.promotion["champion_score_before"] == pytest.approx(all_rest, abs=1e-9)
    assert worse.promotion["version"] == "3" and worse.promotion["promoted"] is False
    assert client.get_model_version("socseg-ni", "3").tags["promotion"] == "rejected"
    aliases = client.get_registered_model("socseg-ni").aliases
    assert str(aliases["champion"]) == "2" and str(aliases["challenger"]) == "3"


def test_finetune_entry_point_parameters_are_settings_or_inputs(repo_root):
    """Every `finetune` MLproject parameter is an input of the command or a params.yaml setting,
    and is passed to the command."""
    import typing

    from socseg.params import Params

    project = yaml.safe_load((repo_root / "MLproject").read_text())["entry_points"]["finetune"]
    inputs = {"model_uri", "volume", "labels", "phase_map", "labelled_slices"}
    elsewhere = {"batch_size": "train", "loss": "train", "seed": "train", "task": "train", "data_dir": "data.dir"}
    for name, spec in project["parameters"].items():
        assert f"{{{name}}}" in project["command"], name
        if name in inputs:
            continue
        assert spec["default"] == "", f"finetune.{name}: a default besides params.yaml's"
        section, _, field = elsewhere.get(name, "finetune").partition(".")
        cls = typing.get_type_hints(Params)[section]
        assert (field or name) in {f.name for f in dataclasses.fields(cls)}, name
    assert "default" not in project["parameters"]["model_uri"]  # required


@pytest.mark.slow
def test_mlflow_run_finetune_entry_point(repo_root, parent, new_scan, tmp_path):
    """`mlflow run . -e finetune` (as a user runs it): '' parameters fall back to params.yaml."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    grey, labels_path, _ = new_scan
    params_file = tmp_path / "params_run.yaml"
    params_file.write_text(yaml.safe_dump(parent, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env.update(SOCSEG_PARAMS=str(params_file), MLFLOW_EXPERIMENT_NAME="finetune-e2e",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [sys.executable, "-m", "mlflow", "run", str(repo_root), "-e", "finetune", "--env-manager", "local",
               "-P", "model_uri=models:/socseg-ni@champion", "-P", f"volume={grey}", "-P", f"labels={labels_path}",
               "-P", "labelled_slices=2,6,10", "-P", "epochs=1", "-P", "steps_per_epoch=1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("finetune-e2e")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["mlflow.project.entryPoint"] == "finetune"
    assert run.data.tags["socseg.lineage"] == "models:/socseg-ni/1"
    assert run.data.params["finetune.train_slices"] == "2,6" and run.data.params["finetune.test_slices"] == "10"
    assert run.data.params["finetune.ignore_value"] == str(parent["finetune"]["ignore_value"])
    assert str(client.get_registered_model("socseg-ni").aliases["challenger"]) == "2"

    # The same entry point again in the same store, with other parameters: a run of its own, with
    # its own settings and its parent as it is now, registered as the next version.
    champion = str(client.get_registered_model("socseg-ni").aliases["champion"])  # 1, or 2 if the gate promoted it
    again = [*command[:command.index("labelled_slices=2,6,10")], "labelled_slices=2,6,10,14", "-P", "epochs=1",
             "-P", "steps_per_epoch=1", "-P", "learning_rate=0.001"]
    done = subprocess.run(again, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.run_id for r in runs][0] == run.info.run_id and len(runs) == 2
    second = runs[1]
    assert second.data.params["finetune.train_slices"] == "2,6,10" and second.data.params["finetune.test_slices"] == "14"
    assert float(second.data.params["finetune.learning_rate"]) == 0.001
    assert float(run.data.params["finetune.learning_rate"]) == parent["finetune"]["learning_rate"]
    assert second.data.tags["socseg.lineage"] == f"models:/socseg-ni/{champion}"
    assert str(client.get_registered_model("socseg-ni").aliases["challenger"]) == "3"


def test_a_per_volume_model_is_fine_tuned_on_a_scan_of_another_grey_scale(tiny_params, mlflow_env, tmp_path):
    """per_volume (the default): a uint8 copy of the scan is mapped by its own whole-volume range
    for training crops and scores alike; the run records that range."""
    import keras
    from mlflow.tracking import MlflowClient

    from socseg.data.normalise import Normalisation, Normaliser
    from socseg.data.synth import synth_from_params
    from socseg.data.volumes import Volume
    from socseg.inference.predictor import ModelConfig, Predictor
    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import export_model
    from socseg.training.finetune import finetune

    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs)
    config = ModelConfig(task="ni", encoder="unet", class_names=["rest", "ni"], phase_map={0: "pore", 128: "ysz", 255: "ni"},
                         tile_size=32, context_slices=0, normalisation=Normalisation.from_dict({"low": 0.0, "high": 1.0, "low_percentile": 0.5,
                                                                        "high_percentile": 99.5}, "per_volume"),
                          window="whole_slice", whole_slice_max_pixels=10**6,
                         step_fraction=0.5, tta=False, batch_size=8, max_slice_pixels=10**6, max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime="keras", planes="z", fusion_depth=64, fusion_halo=16)
    uri = str(save_segmenter(export_model(keras.Model(inputs, outputs), Normaliser(0.0, 1.0, 0.5, 99.5)), config,
                             tmp_path / "per-volume-model"))
    phantom = synth_from_params(tiny_params, "scan8", shape=(12, 64, 64), seed=8)
    scan = Volume((phantom.image // 257).astype(np.uint8), phantom.labels,
                  dataclasses.replace(phantom.meta, image_dtype="uint8", checksums={}))
    tiny_params["finetune"].update(epochs=1, steps_per_epoch=2)
    result = finetune(tiny_params, uri, scan, labelled=[2, 9], register=False)
    record = json.loads(open(MlflowClient().download_artifacts(result.run_id, "training/finetune.json")).read())
    expected = Predictor.load(uri).config.normalisation.estimate_range(scan.image)
    assert record["normalisation"]["grey_range"] == pytest.approx(list(expected))
    assert 2.0 < expected[0] < expected[1] < 200.0  # the uint8 scan's own range, not the uint16 one
    assert 0.0 <= result.metrics["test_iou_ni"] <= 1.0  # the held-out slice 9, scored through the same mapping

