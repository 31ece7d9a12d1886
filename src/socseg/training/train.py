"""One tracked training run: volumes -> slab split -> normalisation -> U-Net -> MLflow.

Used by ``socseg train`` and the ``train`` MLproject entry point, and (with a trial's params,
``nested=True`` and a pruning callback) by the hyperparameter search.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import keras
import mlflow
import numpy as np
import pandas as pd

from socseg.analysis.plots import slab_overlay_figure, training_curves_figure
from socseg.data.dataset import Augmentation, RandomCrops
from socseg.data.prepare import PreparedData, Slab, load_labelled_volumes, prepare_data
from socseg.data.split import check_split_context
from socseg.inference.evaluate import Evaluation, score_slabs
from socseg.inference.predictor import ModelConfig, Predictor
from socseg.model.export import export_model
from socseg.model.losses import get_loss
from socseg.model.metrics import ThresholdedIoU
from socseg.model.precision import resolve_precision
from socseg.model.unet import build_model
from socseg.params import Params, typed
from socseg.training import tracking
from socseg.training.runtime import runs_eagerly, runtime_tags, seed_everything, set_precision

# Validation after every epoch scores the whole validation slabs through the predictor users get,
# one pass per slice without TTA: the cheapest window, whatever the served settings, for the
# epoch-to-epoch comparison that early stopping and the search need. Final scores use the served
# settings.
VALIDATION_WINDOW = {"window": "whole_slice", "tta": False}


class SlabValidation(keras.callbacks.Callback):
    """Adds ``val_<score>`` for the whole validation slabs to the epoch logs.

    The scores come from :func:`socseg.inference.evaluate.score_slabs` with the predictor of the
    exported model (which shares the training network's weights), so early stopping optimises
    what the evaluate stage reports, with :data:`VALIDATION_WINDOW`. A per_volume model's volume
    grey ranges do not change between epochs: ``grey_ranges`` (volume name -> range, what
    :meth:`PreparedData.grey_ranges` estimated once) are used every epoch.
    """

    def __init__(self, predictor: Predictor, slabs: Sequence[Slab],
                 grey_ranges: Mapping[str, tuple[float, float]] | None = None):
        super().__init__()
        self.predictor, self.slabs, self.grey_ranges = predictor, slabs, grey_ranges

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        scores = score_slabs(self.predictor, self.slabs, grey_ranges=self.grey_ranges, **VALIDATION_WINDOW).scores
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in scores.items() if k.startswith(("iou", "mean_iou", "mean_dice"))})


class TimeBudget(keras.callbacks.Callback):
    """Stops training within ``train.max_minutes`` of wall-clock time (0: no budget).

    Training stops after the epoch that reaches the budget, or earlier when the next epoch,
    judged by the last one, would overrun it; never by the first epoch alone, which includes
    compilation (36-67 s for VGG16/ResNet50 under JAX on an H100, against 2 s epochs). Benchmarks
    compare models at equal training time this way; the best epoch so far is kept (:class:`KeepBest`).
    """

    def __init__(self, minutes: float):
        super().__init__()
        self.seconds = 60.0 * float(minutes)
        self.started: float | None = None  # the first fit; the fine-tune schedule calls fit twice
        self.exhausted = False

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.started is None:
            self.started = time.perf_counter()
        self.last = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        elapsed, epoch_seconds, self.last = now - self.started, now - self.last, now
        if self.seconds > 0 and (elapsed >= self.seconds or (epoch >= 1 and elapsed + epoch_seconds > self.seconds)):
            self.exhausted = True
            self.model.stop_training = True


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs every epoch's logs (loss, train metrics, validation IoU per class) as MLflow metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[float]] = {}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        values = {k: float(v) for k, v in (logs or {}).items() if np.isscalar(v) or np.ndim(v) == 0}
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)
        mlflow.log_metrics(values, step=epoch)


@dataclass
class TrainResult:
    run_id: str
    model_uri: str  # the segmenter (socseg segment, socseg evaluate, mlflow models serve); "" if none
    metrics: dict[str, float]
    history: dict[str, list[float]]
    best_epoch: int
    seconds: float
    pruned: bool = False


class KeepBest(keras.callbacks.Callback):
    """Early stopping on ``val_mean_iou`` that keeps the best weights across several ``fit`` calls.

    Keras' EarlyStopping resets at every ``fit``; the fine-tune schedule (frozen encoder first,
    then unfrozen) trains in two calls, and the best epoch may lie in either.
    """

    def __init__(self, patience: int, monitor: str = "val_mean_iou"):
        super().__init__()
        self.patience, self.monitor = patience, monitor
        self.best, self.best_epoch, self.best_weights, self.wait = -np.inf, -1, None, 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        if value > self.best:
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
            self.best_weights = self.model.get_weights()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.model.stop_training = True

    def restore(self) -> None:
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


def _plateau_schedule(patience: int, factor: float) -> list[keras.callbacks.Callback]:
    """Lower the learning rate when validation mean IoU stalls (none when ``patience`` is 0).

    A step-down late in training is what turns a plateau of noisy updates into the last few
    thousandths of IoU; the new rate is logged per epoch as ``learning_rate``.
    """
    if patience <= 0:
        return []
    if not 0.0 < factor < 1.0:
        raise ValueError(f"reduce_lr_factor must be in (0, 1), got {factor}")
    return [keras.callbacks.ReduceLROnPlateau(
        monitor="val_mean_iou", mode="max", factor=factor, patience=patience, min_delta=1e-4, verbose=1,
    )]


def _set_encoder_trainable(model: keras.Model, trainable: bool) -> None:
    try:
        model.get_layer("encoder").trainable = trainable
    except ValueError:  # models without a separate encoder block
        pass


def train(
    params: Mapping | Params,
    volume_names: Sequence[str] | None = None,
    run_name: str | None = None,
    nested: bool = False,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    log_model: bool = True,
    evaluate_test: bool = True,
    tags: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train one U-Net with ``params`` and track everything in one MLflow run.

    ``evaluate_test=False`` is for search trials: the test slab must not influence selection, so
    trials never even compute it. A callback in ``extra_callbacks`` with ``pruned = True`` after
    fitting (the Optuna pruner) marks the run pruned: no final evaluation, no model.
    """
    p = typed(params)
    t = p.train
    check_split_context(p.split, t.context_slices)  # before anything is loaded, trained or logged
    precision = resolve_precision(t.precision)
    names = list(volume_names or p.data.volumes)
    tracking.configure_tracking(p)
    set_precision(precision)
    seed_everything(t.seed)
    try:
        data = prepare_data(p, load_labelled_volumes(p, names), t.task)
        n_classes = len(data.class_names)
        model = build_model(
            t.encoder,
            t.task,
            n_classes=n_classes,
            dropout=t.dropout,
            encoder_weights=t.encoder_weights,
            freeze_encoder=t.freeze_encoder,
            base_filters=t.base_filters,
            encoder_batchnorm=t.encoder_batchnorm,
            bn_momentum=t.bn_momentum,
            context_slices=t.context_slices,
        )
        # The served model from the start: it shares the network's layers, so validation and the
        # final scores see exactly what will be logged.
        predictor = Predictor(export_model(model, data.normaliser), model_config(data, p))

        eager = runs_eagerly(t.epochs, p.tiles.steps_per_epoch, t.eager_max_steps)

        def compile_model(learning_rate: float) -> None:
            model.compile(
                optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
                loss=get_loss(t.loss, t.task),
                metrics=[ThresholdedIoU(task=t.task, n_classes=n_classes, name="mean_iou")],
                run_eagerly=eager,
            )

        crops = RandomCrops(
            [data.normalised(slab) for slab in data.slabs["train"]],
            [slab.targets(t.task) for slab in data.slabs["train"]],
            size=p.tiles.size,
            batch_size=t.batch_size,
            steps=p.tiles.steps_per_epoch,
            augmentation=Augmentation.from_params(p.tiles.augment),
            seed=t.seed,
            context_slices=t.context_slices,
        )
        val_slabs = data.slabs["val"] or data.slabs["train"]
        logger = MlflowEpochLogger()
        keep_best = KeepBest(patience=t.patience)
        budget = TimeBudget(t.max_minutes)
        callbacks = [
            SlabValidation(predictor, val_slabs, data.grey_ranges()),
            keep_best,
            *_plateau_schedule(t.reduce_lr_patience, t.reduce_lr_factor),
            budget,
            logger,
            *extra_callbacks,
        ]
        # Fine-tune schedule: a frozen (pretrained) encoder first, then everything at a lower rate.
        unfreeze_after = t.unfreeze_after if t.freeze_encoder else 0
        phases = [(0, t.epochs, t.learning_rate)]
        if 0 < unfreeze_after < t.epochs:
            phases = [(0, unfreeze_after, t.learning_rate),
                      (unfreeze_after, t.epochs, t.learning_rate * t.fine_tune_lr_factor)]
        with mlflow.start_run(run_name=run_name, nested=nested) as run:
            mlflow.set_tags(
                {
                    **runtime_tags(precision, eager),
                    "encoder": t.encoder,
                    "task": t.task,
                    "data_fingerprint": data.fingerprint,
                    "data_md5_dvc": tracking.dvc_data_md5() or "none",
                    "git_commit": tracking.git_commit() or "none",
                    "volumes": ",".join(names),
                    **dict(tags or {}),
                }
            )
            # Section-prefixed names ("train.epochs"): `mlflow run` already logs its own entry-point
            # parameters under the bare names, and MLflow params cannot be logged twice.
            mlflow.log_params(tracking.flat_params(
                {"train": {**asdict(t), "precision": precision}, "tiles": asdict(p.tiles),
                 "split": asdict(p.split), "normalise": asdict(p.normalise)}))
            mlflow.log_param("data.volumes", ",".join(names))
            mlflow.log_params(
                {f"split_{name}_{subset}": f"{a}-{b}" for name, sp in data.splits.items()
                 for subset, (a, b) in (("train", sp.train), ("val", sp.val), ("test", sp.test))}
            )
            mlflow.log_params({"normalise.low": data.normaliser.low, "normalise.high": data.normaliser.high})
            started = time.perf_counter()
            for number, (first, last, learning_rate) in enumerate(phases):
                if number == 1:
                    _set_encoder_trainable(model, True)
                compile_model(learning_rate)
                model.fit(crops, initial_epoch=first, epochs=last, callbacks=callbacks, verbose=2)
                if model.stop_training:
                    break
            keep_best.restore()
            seconds = time.perf_counter() - started
            history = logger.history
            best_epoch = keep_best.best_epoch
            metrics: dict[str, float] = {"train_seconds": seconds, "best_epoch": float(best_epoch),
                                         "epochs_run": float(len(history.get("loss", [])))}
            mlflow.set_tag("stopped_by", "time_budget" if budget.exhausted else
                           "early_stopping" if model.stop_training else "epochs")
            pruned = any(getattr(callback, "pruned", False) for callback in extra_callbacks)
            mlflow.set_tag("state", "PRUNED" if pruned else "COMPLETE")
            _log_artifacts(data, history)
            if pruned:
                return TrainResult(run.info.run_id, "", metrics, history, best_epoch, seconds, pruned=True)
            subsets = ("val", "test") if evaluate_test else ("val",)
            for subset in subsets:
                if data.slabs[subset]:
                    evaluation = score_slabs(predictor, data.slabs[subset], keep_predictions=subset == "test",
                                             grey_ranges=data.grey_ranges())
                    metrics.update({f"{subset}_{k}": v for k, v in evaluation.scores.items()})
                    if subset == "test":
                        _log_overlays(data, evaluation)
            mlflow.log_metrics({f"final_{k}" if k.startswith("val_") else k: v for k, v in metrics.items()})
            model_uri = log_segmenter(predictor).model_uri if log_model else ""
            return TrainResult(run.info.run_id, model_uri, metrics, history, best_epoch, seconds)
    finally:
        set_precision("float32")


def model_config(data: PreparedData, params: Params) -> ModelConfig:
    """What the logged model records about its training (and the ``inference:`` settings it serves with)."""
    t = params.train
    return ModelConfig.from_training(
        {
            "task": data.task,
            "encoder": t.encoder,
            "class_names": data.class_names,
            "phase_map": data.phase_map,
            "normalisation": data.normalisation_record(),  # mode, and the layer's low/high (0/1 per_volume)
            "tile_size": params.tiles.size,
            "context_slices": t.context_slices,
        },
        params.inference,
    )


def log_segmenter(predictor: Predictor):
    """Log the predictor's network and config as the pyfunc segmenter of the active run."""
    from socseg.inference import pyfunc

    return pyfunc.log_segmenter(predictor.network, predictor.config)


def _log_overlays(data: PreparedData, evaluation: Evaluation) -> None:
    """Test-slab overlays (first, middle and last slice of the first test slab)."""
    import matplotlib.pyplot as plt

    slab = data.slabs["test"][0]
    fig = slab_overlay_figure(slab, slab.targets(data.task), evaluation.predictions[0], data.class_names)
    mlflow.log_figure(fig, "plots/test_overlays.png")
    plt.close(fig)


def _log_artifacts(data: PreparedData, history: dict[str, list[float]]) -> None:
    log_history(history, {"split.json": json.dumps({k: v.to_dict() for k, v in data.splits.items()}, indent=2),
                          "normalisation.json": json.dumps(data.normaliser.to_dict(), indent=2)})


def log_history(history: dict[str, list[float]], files: Mapping[str, str] | None = None) -> None:
    """The training curves (``plots/training_curves.png``) and ``training/history.csv`` of the active
    run, plus ``files`` (name -> text) under ``training/``: what every training run logs
    (``socseg train``, search trials, ``socseg finetune``)."""
    import matplotlib.pyplot as plt

    fig = training_curves_figure(history)
    mlflow.log_figure(fig, "plots/training_curves.png")
    plt.close(fig)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        frame = pd.DataFrame(history)
        frame.insert(0, "epoch", np.arange(len(frame)))
        frame.to_csv(tmp_path / "history.csv", index=False)
        for name, text in (files or {}).items():
            (tmp_path / name).write_text(text)
        mlflow.log_artifacts(tmp, "training")
