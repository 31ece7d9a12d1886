"""One short training run against a real (temporary) MLflow SQLite store; then check what it logged."""

import numpy as np
import pytest

import mlflow
from mlflow.tracking import MlflowClient


@pytest.fixture()
def trained(tiny_params, mlflow_env):
    from socseg.training.train import train

    tiny_params["train"]["epochs"] = 3
    tiny_params["train"]["patience"] = 3
    return tiny_params, train(tiny_params, run_name="tiny")


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
    assert run.data.tags["precision"] == "float32"
    history = MlflowClient().get_metric_history(result.run_id, "val_iou_ni")
    assert [m.step for m in history] == [0, 1, 2]
    for name in ("test_iou_ni", "test_iou_rest", "test_dice_ni", "test_mean_iou", "test_accuracy", "final_val_mean_iou"):
        assert 0.0 <= run.data.metrics[name] <= 1.0, name


def test_early_stopping_restores_the_best_validation_epoch(trained):
    _, result = trained
    val_curve = result.history["val_mean_iou"]
    assert result.best_epoch == int(np.argmax(val_curve))
    assert result.metrics["val_mean_iou"] == pytest.approx(max(val_curve), abs=1e-9)


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


def test_logged_model_takes_raw_grey_values_and_reproduces_the_test_score(trained):
    """The exported model carries the normalisation: raw uint16 in, same test IoU as logged."""
    import socseg.model.unet  # noqa: F401  (registers the custom layers)
    from socseg.inference.window import predict_probabilities
    from socseg.model.metrics import confusion_matrix, probabilities_to_classes, segmentation_scores
    from socseg.data.volumes import load_volume

    params, result = trained
    model = mlflow.keras.load_model(result.model_uri)
    assert model.get_layer("normalise") is not None
    volume = load_volume(f"{params['data']['dir']}/tiny")
    split = MlflowClient().get_run(result.run_id).data.params["split_tiny_test"]
    start, stop = map(int, split.split("-"))
    test = slice(start, stop)
    raw = volume.image[test].astype(np.float32)
    probs = predict_probabilities(model.predict_on_batch, raw, tile_size=32, batch_size=4)
    truth = (volume.labels[test] == 255).astype(np.uint8)
    scores = segmentation_scores(confusion_matrix(truth, probabilities_to_classes(probs, "ni"), 2), ["rest", "ni"])
    assert scores["iou_ni"] == pytest.approx(result.metrics["test_iou_ni"], abs=1e-4)
    signature = mlflow.models.get_model_info(result.model_uri).signature
    assert signature is not None and signature.inputs.to_dict()[0]["tensor-spec"]["shape"][-1] == 1


def test_vgg16_phases_with_bfloat16_trains_and_tags_precision(tiny_params, mlflow_env):
    from socseg.training.train import train

    tiny_params["train"].update(encoder="vgg16", task="phases", precision="mixed_bfloat16", epochs=1)
    result = train(tiny_params, log_model=False)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["precision"] == "mixed_bfloat16"
    assert {"test_iou_pore", "test_iou_ysz", "test_iou_ni"} <= set(run.data.metrics)
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


def test_learning_rate_is_halved_when_validation_stalls(tiny_params, mlflow_env):
    from socseg.training.train import train

    # A rate this small cannot move validation IoU by min_delta, so every epoch is a stall.
    tiny_params["train"].update(epochs=3, patience=5, learning_rate=1e-9, reduce_lr_patience=1, reduce_lr_factor=0.5)
    result = train(tiny_params, log_model=False, evaluate_test=False)
    rates = [m.value for m in MlflowClient().get_metric_history(result.run_id, "learning_rate")]
    # Logged per epoch: the rate that epoch trained with. Epoch 0 sets the best, epoch 1 stalls.
    assert rates == pytest.approx([1e-9, 1e-9, 0.5e-9], rel=1e-3)


def test_bad_plateau_factor_is_refused(tiny_params, mlflow_env):
    from socseg.training.train import train

    tiny_params["train"].update(epochs=1, reduce_lr_patience=1, reduce_lr_factor=1.5)
    with pytest.raises(ValueError, match="reduce_lr_factor"):
        train(tiny_params, log_model=False, evaluate_test=False)
