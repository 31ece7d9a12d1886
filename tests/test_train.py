"""One short training run against a real (temporary) MLflow SQLite store; then check what it logged."""

import copy
from pathlib import Path

import numpy as np
import pytest

import mlflow
from mlflow.tracking import MlflowClient


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """One 3-epoch training in a store of its own, shared by the tests that only read what it
    logged (training is the slow part of this file)."""
    from conftest import make_tiny_params, use_mlflow_store
    from socseg.params import load_params
    from socseg.training.train import train

    folder = tmp_path_factory.mktemp("trained")
    params = make_tiny_params(load_params(Path(__file__).resolve().parents[1] / "params.yaml"), folder)
    params["train"]["epochs"] = 3
    params["train"]["patience"] = 3
    params["train"]["eager_max_steps"] = 0  # a graph, as every real training (6 steps would run eagerly)
    with pytest.MonkeyPatch.context() as patch:
        use_mlflow_store(params["mlflow"]["tracking_uri"], patch)
        result = train(params, run_name="tiny")
        while mlflow.active_run():
            mlflow.end_run()
    mlflow.set_tracking_uri(None)
    return params, result


@pytest.fixture()
def trained(trained_once, monkeypatch):
    """(params, TrainResult) of the shared training, with MLflow pointed at its store for this test."""
    from conftest import use_mlflow_store

    params, result = trained_once
    use_mlflow_store(params["mlflow"]["tracking_uri"], monkeypatch)
    yield copy.deepcopy(params), result
    mlflow.set_tracking_uri(None)


def test_run_logs_params_tags_curves_and_final_scores(trained):
    params, result = trained
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.encoder"] == "unet"
    assert run.data.params["tiles.size"] == "32"
    assert run.data.params["split_tiny_train"] == "0-12"
    assert float(run.data.params["normalise.high"]) > float(run.data.params["normalise.low"])
    for tag in ("device", "keras_backend", "precision", "data_fingerprint", "git_commit", "data_md5_dvc"):
        assert run.data.tags.get(tag), tag
    assert run.data.tags["precision"] == "float32" and run.data.tags["execution"] == "graph"
    history = MlflowClient().get_metric_history(result.run_id, "val_iou_ni")
    assert [m.step for m in history] == [0, 1, 2]
    for name in ("test_iou_ni", "test_iou_rest", "test_dice_ni", "test_mean_iou", "test_accuracy", "final_val_mean_iou",
                 "test_ni_fraction_true", "test_ni_fraction_pred", "test_ni_fraction_error"):
        assert 0.0 <= run.data.metrics[name] <= 1.0, name
    assert run.data.params["train.max_minutes"] == "0.0"
    assert run.data.tags["stopped_by"] == "epochs" and run.data.tags["state"] == "COMPLETE"
    assert run.data.metrics["epochs_run"] == len(history) == len(result.history["loss"])


def test_early_stopping_restores_the_best_validation_epoch(trained):
    """The logged model holds the best epoch's weights: scored as each epoch was (VALIDATION_INFERENCE),
    it gets the best validation score of the curve again."""
    from socseg.data.prepare import load_labelled_volumes, prepare_data
    from socseg.inference.evaluate import score_slabs
    from socseg.inference.predictor import Predictor
    from socseg.training.train import VALIDATION_INFERENCE

    params, result = trained
    val_curve = result.history["val_mean_iou"]
    assert result.best_epoch == int(np.argmax(val_curve))
    slabs = prepare_data(params, load_labelled_volumes(params), "ni").slabs["val"]
    rescored = score_slabs(Predictor.load(result.model_uri), slabs, options=VALIDATION_INFERENCE).scores
    assert rescored["mean_iou"] == pytest.approx(max(val_curve), abs=1e-9)
    # The final validation score is measured with the served window (what `socseg evaluate` reports).
    served = score_slabs(Predictor.load(result.model_uri), slabs).scores
    assert result.metrics["val_mean_iou"] == pytest.approx(served["mean_iou"], abs=1e-9)


def test_pictures_tables_and_model_are_artifacts(trained):
    _, result = trained
    client = MlflowClient()
    names = {a.path for folder in ("plots", "training") for a in client.list_artifacts(result.run_id, folder)}
    assert {
        "plots/training_curves.png",
        "plots/test_overlays.png",
        "training/history.csv",
        "training/split.json",
        "training/normalisation.json",
    } <= names
    png = client.download_artifacts(result.run_id, "plots/test_overlays.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_logged_model_the_segmenter_takes_raw_grey_values(trained):
    """The run logs one model, the pyfunc segmenter; its network carries the normalisation."""
    from socseg.inference.predictor import Predictor
    from socseg.inference.pyfunc import model_config

    params, result = trained
    assert result.model_uri.startswith("models:/")
    info = mlflow.models.get_model_info(result.model_uri)
    assert info.run_id == result.run_id and "python_function" in info.flavors
    assert "keras" not in info.flavors
    logged = mlflow.search_logged_models(filter_string=f"source_run_id = '{result.run_id}'", output_format="list")
    assert [m.model_id for m in logged] == [result.model_uri.removeprefix("models:/")]
    config = model_config(result.model_uri)
    run = MlflowClient().get_run(result.run_id)
    assert (config.task, config.encoder, config.tile_size, config.context_slices) == ("ni", "unet", 32, 0)
    assert config.class_names == ["rest", "ni"]
    assert config.normalisation.layer.low == pytest.approx(float(run.data.params["normalise.low"]))
    assert config.normalisation.layer.high == pytest.approx(float(run.data.params["normalise.high"]))
    assert config.tta == params["inference"]["tta"] and config.step_fraction == params["inference"]["step_fraction"]
    predictor = Predictor.load(result.model_uri)
    assert predictor.network.get_layer("normalise") is not None
    raw = np.random.default_rng(0).integers(20000, 42000, (2, 40, 48)).astype(np.uint16)
    classes = predictor.classes(raw)
    assert classes.shape == (2, 40, 48) and classes.dtype == np.uint8 and set(np.unique(classes)) <= {0, 1}


def test_logged_test_metrics_equal_socseg_evaluate_on_the_test_slab(trained):
    """test_iou_* of the run are what `socseg evaluate` measures for the logged model on the same slices."""
    import json

    from socseg.data.volumes import load_volume
    from socseg.inference.evaluate import evaluate_model

    params, result = trained
    client = MlflowClient()
    split = json.loads(open(client.download_artifacts(result.run_id, "training/split.json")).read())
    start, stop = split["tiny"]["test"]
    assert stop - start > 0
    volume = load_volume(f"{params['data']['dir']}/tiny")
    evaluated = evaluate_model(result.model_uri, volume, z_range=(start, stop))
    assert evaluated["class_names"] == ["rest", "ni"]
    logged = client.get_run(result.run_id).data.metrics
    for name in ("rest", "ni"):
        assert evaluated[f"iou_{name}"] == logged[f"test_iou_{name}"] == result.metrics[f"test_iou_{name}"], name
    assert evaluated["mean_iou"] == logged["test_mean_iou"]
    assert evaluated["ni_fraction_error"] == logged["test_ni_fraction_error"]


def test_vgg16_phases_with_bfloat16_trains_and_tags_precision(tiny_params, mlflow_env):
    from socseg.training.train import train

    tiny_params["train"].update(encoder="vgg16", task="phases", precision="mixed_bfloat16", epochs=1)
    result = train(tiny_params, log_model=False)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["precision"] == "mixed_bfloat16"
    assert run.data.tags["execution"] == "eager"  # 1 epoch x 2 steps <= train.eager_max_steps
    assert {"test_iou_pore", "test_iou_ysz", "test_iou_ni"} <= set(run.data.metrics)
    # a 3-phase run logs its TPB density error beside IoU, on validation and test
    assert {"final_val_micro_relerr.tpb.density", "test_micro_relerr.tpb.density"} <= set(run.data.metrics)
    assert run.data.metrics["test_micro_relerr.tpb.density"] == pytest.approx(result.metrics["test_micro_relerr.tpb.density"], nan_ok=True)
    import keras

    assert keras.config.dtype_policy().name == "float32"  # restored after the run


def test_training_refuses_unlabelled_volumes(tiny_params, mlflow_env):
    from socseg.training.train import train
    from socseg.data.volumes import load_volume, save_volume

    volume = load_volume(f"{tiny_params['data']['dir']}/tiny")
    volume.labels = None
    volume.meta.has_labels = False
    volume.meta.name = "nolabels"
    save_volume(volume, f"{tiny_params['data']['dir']}/nolabels")
    with pytest.raises(ValueError, match="no labels"):
        train(tiny_params, volume_names=["nolabels"])


def test_training_refuses_a_gap_narrower_than_the_context_before_anything_runs(tiny_params, tmp_path, monkeypatch):
    """``socseg train --context-slices 3`` on tiny's gap of 2: refused first, naming both values:
    no volume is read (the named one does not exist) and no MLflow store is made."""
    import yaml
    from click.testing import CliRunner

    from socseg.cli import main
    from socseg.training.train import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tiny_params["data"]["volumes"] = ["missing"]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params))
    result = CliRunner().invoke(main, ["train", "--params", str(params_file), "--context-slices", "3"])
    assert result.exit_code == 2 and "split gap 2 is smaller than train.context_slices 3" in result.output
    tiny_params["train"]["context_slices"] = 3
    with pytest.raises(ValueError, match="split gap 2 is smaller than train.context_slices 3"):
        train(tiny_params)
    assert not (tmp_path / "mlflow.db").exists() and mlflow.active_run() is None


def test_fine_tune_schedule_freezes_the_encoder_then_trains_it(tiny_params, mlflow_env):
    import keras

    from socseg.training.train import train

    class EncoderWatch(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.snapshots = []

        def on_train_begin(self, logs=None):
            if not self.snapshots:
                self.snapshots.append(np.array(self.model.get_layer("encoder").weights[0]))

        def on_epoch_end(self, epoch, logs=None):
            self.snapshots.append(np.array(self.model.get_layer("encoder").weights[0]))

    tiny_params["train"].update(epochs=2, patience=5, freeze_encoder=True, unfreeze_after=1)
    watch = EncoderWatch()
    result = train(tiny_params, extra_callbacks=[watch], log_model=False, evaluate_test=False)
    initial, after_frozen, after_unfrozen = watch.snapshots
    np.testing.assert_array_equal(initial, after_frozen)
    assert not np.array_equal(after_frozen, after_unfrozen)
    assert "test_mean_iou" not in result.metrics and "val_mean_iou" in result.metrics


def test_learning_rate_is_halved_when_validation_stalls(tiny_params, mlflow_env, monkeypatch):
    import socseg.training.train as train_module
    from socseg.training.train import train

    # Validation stalls: every epoch scores what the first one did. (A tiny learning rate is not
    # enough: near a random init, a whole-slice pass flips enough pixels at a near-tie per epoch to
    # move the IoU by more than min_delta.)
    first = []

    def stalled(*args, **kwargs):
        first.append(first[0] if first else real_score_slabs(*args, **kwargs))
        return first[-1]

    real_score_slabs = train_module.score_slabs
    monkeypatch.setattr(train_module, "score_slabs", stalled)
    tiny_params["train"].update(epochs=3, patience=5, learning_rate=1e-3, reduce_lr_patience=1, reduce_lr_factor=0.5)
    result = train(tiny_params, log_model=False, evaluate_test=False)
    assert len(first) >= 3  # every epoch validated through the patched scorer (and the final val scores)
    rates = [m.value for m in MlflowClient().get_metric_history(result.run_id, "learning_rate")]
    # Logged per epoch: the rate that epoch trained with. Epoch 0 sets the best, epoch 1 stalls.
    assert rates == pytest.approx([1e-3, 1e-3, 0.5e-3], rel=1e-3)


def test_bad_plateau_factor_is_refused(tiny_params, mlflow_env):
    from socseg.training.train import train

    tiny_params["train"].update(epochs=1, reduce_lr_patience=1, reduce_lr_factor=1.5)
    with pytest.raises(ValueError, match="reduce_lr_factor"):
        train(tiny_params, log_model=False, evaluate_test=False)


def test_time_budget_stops_after_the_first_epoch(tiny_params, mlflow_env):
    from socseg.training.train import train

    tiny_params["train"].update(epochs=5, patience=10, max_minutes=0.0001)
    result = train(tiny_params, log_model=False, evaluate_test=False)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["stopped_by"] == "time_budget"
    assert len(result.history["val_mean_iou"]) == 1 and result.best_epoch == 0
    assert result.metrics["epochs_run"] == 1 == run.data.metrics["epochs_run"]
    assert [m.step for m in MlflowClient().get_metric_history(result.run_id, "val_mean_iou")] == [0]
    assert run.data.params["train.max_minutes"] == "0.0001"


def test_no_time_budget_runs_every_epoch(tiny_params, mlflow_env):
    from socseg.training.train import train

    tiny_params["train"].update(epochs=5, patience=10, max_minutes=0)
    result = train(tiny_params, log_model=False, evaluate_test=False)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["stopped_by"] == "epochs"
    assert len(result.history["val_mean_iou"]) == 5 and result.metrics["epochs_run"] == 5


def test_validation_estimates_a_per_volume_range_once_not_every_epoch(tiny_params, monkeypatch):
    """per_volume: each volume's grey range is estimated once, when the data is prepared (the
    range training maps it with), and every epoch scores with it, as score_slabs would with its
    own estimate."""
    import keras

    from socseg.data.normalise import Normalisation, Normaliser, PerVolume
    from socseg.data.prepare import Slab, load_labelled_volumes, prepare_data
    from socseg.data.volumes import load_volume
    from socseg.inference.evaluate import score_slabs
    from socseg.inference.predictor import ModelConfig, Predictor
    from socseg.model.export import export_model
    from socseg.training.train import SlabValidation

    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(20.0),
                                  bias_initializer=keras.initializers.Constant(-14.0))(inputs)
    network = export_model(keras.Model(inputs, outputs), Normaliser(0.0, 1.0, 0.5, 99.5))
    config = ModelConfig(task="ni", encoder="unet", class_names=["rest", "ni"], phase_map={0: "pore", 128: "ysz", 255: "ni"},
                         tile_size=32, context_slices=0, normalisation=Normalisation.from_dict({"low": 0.0, "high": 1.0, "low_percentile": 0.5,
                                                                        "high_percentile": 99.5}, "per_volume"),
                          window="whole_slice", whole_slice_max_pixels=10**6,
                         step_fraction=0.5, tta=False, batch_size=8, max_slice_pixels=10**6, max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime="keras", planes="z", fusion_depth=64, fusion_halo=16)
    predictor = Predictor(network, config)
    volume = load_volume(f"{tiny_params['data']['dir']}/tiny")
    slabs = [Slab(volume, (0, 6)), Slab(volume, (18, 24))]
    expected = score_slabs(predictor, slabs).scores
    tiny_params["normalise"]["mode"] = "per_volume"
    ranges = prepare_data(tiny_params, load_labelled_volumes(tiny_params), "ni").grey_ranges()
    assert ranges == {"tiny": pytest.approx(config.normalisation.estimate_range(volume.image))}  # what scoring would estimate
    estimates = []
    original = PerVolume.estimate_range
    monkeypatch.setattr(PerVolume, "estimate_range", lambda self, source: estimates.append(1) or original(self, source))
    validation = SlabValidation(predictor, slabs, ranges)
    for epoch in range(3):
        logs: dict = {}
        validation.on_epoch_end(epoch, logs)
        assert logs["val_iou_ni"] == pytest.approx(expected["iou_ni"], abs=1e-9)
    assert estimates == []  # none per epoch: prepare's ranges are used
