"""One tracked training run: the sequence ``socseg train``, search trials and ``socseg finetune`` share.

:class:`TrainingRun` owns the order of a run: seed; the variant's network and training slabs;
crops; tags and params; compile and fit (phases, per-epoch validation, keeping the best epoch, the
time budget); curves and artifacts; final scores; the logged segmenter. A variant supplies only
what differs, as nnU-Net's trainer variants do:

* :class:`socseg.training.train.TrainRun` (``socseg train``, search trials): labelled volumes split
  into slabs, a new U-Net, validation every epoch, early stopping;
* :class:`socseg.training.finetune.FinetuneRun` (``socseg finetune``): crops around the labelled
  pixels of a new scan, a logged model's network, test scores on held-out labelled slices (the
  registry gate runs after the run).
"""

from __future__ import annotations

import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd

from socseg.analysis.plots import training_curves_figure
from socseg.data.dataset import Augmentation, RandomCrops
from socseg.data.tasks import Task
from socseg.inference import pyfunc
from socseg.inference.predictor import Predictor
from socseg.model.losses import get_loss
from socseg.model.metrics import ThresholdedIoU
from socseg.params import Params
from socseg.training import tracking
from socseg.training.runtime import runs_eagerly, runtime_tags, seed_everything


@dataclass
class TrainResult:
    run_id: str
    model_uri: str  # the segmenter (socseg segment, socseg evaluate, mlflow models serve); "" if none
    metrics: dict[str, float]
    history: dict[str, list[float]]
    best_epoch: int
    seconds: float
    pruned: bool = False


@dataclass(frozen=True)
class Phase:
    """Epochs ``first_epoch`` to ``last_epoch`` (exclusive) of a run at one learning rate.
    ``unfreeze_encoder``: the encoder trains from this phase on (the second phase of the
    frozen-encoder schedule: a pretrained encoder first adapts the decoder, then trains itself)."""

    first_epoch: int
    last_epoch: int
    learning_rate: float
    unfreeze_encoder: bool = False


@dataclass(frozen=True)
class Schedule:
    """How a run trains: its crops, loss, epochs (in phases) and what stops it early."""

    seed: int
    loss: str
    tile_size: int
    batch_size: int
    steps_per_epoch: int
    context_slices: int
    augmentation: Augmentation
    phases: tuple[Phase, ...]
    eager_max_steps: int
    max_minutes: float  # wall-clock budget (0: none)
    # Early stopping on validation, keeping the best epoch's weights. None: the run has no
    # per-epoch validation, so every epoch runs and the last epoch's weights are kept.
    patience: int | None = None
    reduce_lr_patience: int = 0  # learning-rate step-down on a validation plateau (0: none)
    reduce_lr_factor: float = 0.5

    @property
    def epochs(self) -> int:
        return self.phases[-1].last_epoch


@dataclass
class RunData:
    """What a variant hands the trainer once seeded: the network to fit, the served predictor that
    shares its layers (validated, scored and logged), the training slabs, and what the run's tags
    record about them."""

    network: keras.Model
    predictor: Predictor
    images: list[np.ndarray]  # the training slabs as the network sees them (normalised)
    targets: list[np.ndarray]  # their task class indices (IGNORE: unlabelled)
    task: str | Task
    n_classes: int
    precision: str
    encoder: str
    fingerprint: str  # the data version (tag data_fingerprint)
    volumes: str  # tag volumes
    data_md5_dvc: str  # "none" where the data is not DVC-tracked


class TrainingRun(ABC):
    """One training run tracked in one MLflow run; :meth:`run` is the shared sequence, the other
    methods are what a variant supplies. ``extra_callbacks`` run after the trainer's own; one
    with ``pruned = True`` after fitting (the Optuna pruner) marks the run pruned: no final
    scores, no model."""

    def __init__(self, params: Params, schedule: Schedule, run_name: str | None = None, nested: bool = False,
                 extra_callbacks: Sequence[keras.callbacks.Callback] = (), log_model: bool = True):
        self.params, self.schedule = params, schedule
        self.run_name, self.nested = run_name, nested
        self.extra_callbacks, self.log_model = list(extra_callbacks), log_model

    # ---- what a variant supplies

    @abstractmethod
    def prepare(self) -> RunData:
        """The network and the training slabs, made after seeding (so weights and crops follow the seed)."""

    @abstractmethod
    def run_params(self, data: RunData) -> dict[str, Any]:
        """The run's MLflow params (section-prefixed names)."""

    def run_tags(self) -> dict[str, str]:
        """Tags of this variant, set after (and over) the shared ones."""
        return {}

    def validation(self, data: RunData) -> list[keras.callbacks.Callback]:
        """Callbacks adding ``val_*`` scores to each epoch's logs, for keep-best and the schedule."""
        return []

    def run_metrics(self) -> dict[str, float]:
        """Metrics of the run besides its time, epochs and scores."""
        return {}

    @abstractmethod
    def artifacts(self) -> dict[str, str]:
        """Files (name -> text) logged under ``training/`` beside the history."""

    @abstractmethod
    def final_scores(self, data: RunData) -> dict[str, float]:
        """Scores of the kept weights, as logged at the end of the run (a pruned run has none)."""

    # ---- the shared sequence

    def run(self) -> TrainResult:
        """Seed, prepare, fit and log; the result's ``model_uri`` is "" without a logged model."""
        schedule = self.schedule
        seed_everything(schedule.seed)
        data = self.prepare()
        eager = runs_eagerly(schedule.epochs, schedule.steps_per_epoch, schedule.eager_max_steps)
        crops = RandomCrops(data.images, data.targets, size=schedule.tile_size, batch_size=schedule.batch_size,
                            steps=schedule.steps_per_epoch, augmentation=schedule.augmentation, seed=schedule.seed,
                            context_slices=schedule.context_slices)
        keep_best = KeepBest(patience=schedule.patience) if schedule.patience is not None else None
        budget, logger = TimeBudget(schedule.max_minutes), MlflowEpochLogger()
        callbacks = [*self.validation(data), *([keep_best] if keep_best else []),
                     *plateau_schedule(schedule.reduce_lr_patience, schedule.reduce_lr_factor),
                     budget, logger, *self.extra_callbacks]
        tracking.configure_tracking(self.params)
        with mlflow.start_run(run_name=self.run_name, nested=self.nested) as run:
            mlflow.set_tags(self._tags(data, eager))
            mlflow.log_params(self.run_params(data))
            started = time.perf_counter()
            self._fit(data, crops, eager, callbacks)
            if keep_best is not None:
                keep_best.restore()
            seconds = time.perf_counter() - started
            history = logger.history
            epochs_run = len(history.get("loss", []))
            best_epoch = keep_best.best_epoch if keep_best is not None else epochs_run - 1
            metrics: dict[str, float] = {"train_seconds": seconds, "epochs_run": float(epochs_run),
                                         **({"best_epoch": float(best_epoch)} if keep_best is not None else {}),
                                         **self.run_metrics()}
            mlflow.set_tag("stopped_by", "time_budget" if budget.exhausted else
                           "early_stopping" if data.network.stop_training else "epochs")
            pruned = any(getattr(callback, "pruned", False) for callback in self.extra_callbacks)
            mlflow.set_tag("state", "PRUNED" if pruned else "COMPLETE")
            log_history(history, self.artifacts())
            if pruned:
                return TrainResult(run.info.run_id, "", metrics, history, best_epoch, seconds, pruned=True)
            metrics.update(self.final_scores(data))
            mlflow.log_metrics({f"final_{k}" if k.startswith("val_") else k: v for k, v in metrics.items()})
            model_uri = log_segmenter(data.predictor).model_uri if self.log_model else ""
            return TrainResult(run.info.run_id, model_uri, metrics, history, best_epoch, seconds)

    def _tags(self, data: RunData, eager: bool) -> dict[str, str]:
        """What every training run is tagged with (hardware, code, data), then the variant's own."""
        return {
            **runtime_tags(data.precision, eager),
            "encoder": data.encoder,
            "task": str(data.task),
            "data_fingerprint": data.fingerprint,
            "data_md5_dvc": data.data_md5_dvc,
            "git_commit": tracking.git_commit() or "none",
            "volumes": data.volumes,
            **self.run_tags(),
        }

    def _fit(self, data: RunData, crops: RandomCrops, eager: bool, callbacks: list[keras.callbacks.Callback]) -> None:
        """Compile and fit phase by phase (compiled again per phase: a new learning rate, and the
        unfrozen encoder's weights become trainable); stops where a callback stopped training."""
        network = data.network
        for phase in self.schedule.phases:
            if phase.unfreeze_encoder:
                set_encoder_trainable(network, True)
            compile_network(network, learning_rate=phase.learning_rate, loss=self.schedule.loss, task=data.task,
                            n_classes=data.n_classes, eager=eager)
            network.fit(crops, initial_epoch=phase.first_epoch, epochs=phase.last_epoch, callbacks=callbacks, verbose=2)
            if network.stop_training:
                break


def compile_network(network: keras.Model, *, learning_rate: float, loss: str, task: str | Task, n_classes: int,
                    eager: bool = False) -> None:
    """Compile ``network`` as every training run does: Adam, the task's ``loss``, the thresholded
    mean IoU as the training metric; ``eager`` runs it step by step (:func:`runs_eagerly`). The
    training-throughput benchmark compiles through here too, so it times the step users run."""
    network.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=get_loss(loss, task),
        metrics=[ThresholdedIoU(task=task, n_classes=n_classes, name="mean_iou")],
        run_eagerly=eager,
    )


def set_encoder_trainable(model: keras.Model, trainable: bool) -> None:
    """Freeze or unfreeze the ``encoder`` block of a U-Net (nothing for models without one)."""
    try:
        model.get_layer("encoder").trainable = trainable
    except ValueError:  # models without a separate encoder block
        pass


class TimeBudget(keras.callbacks.Callback):
    """Stops training within ``minutes`` of wall-clock time (0: no budget).

    Training stops after the epoch that reaches the budget, or earlier when the next epoch,
    judged by the last one, would overrun it; never by the first epoch alone, which includes
    compilation (36-67 s for VGG16/ResNet50 under JAX on an H100, against 2 s epochs). Benchmarks
    compare models at equal training time this way; the best epoch so far is kept (:class:`KeepBest`).
    """

    def __init__(self, minutes: float):
        super().__init__()
        self.seconds = 60.0 * float(minutes)
        self.started: float | None = None  # the first fit; the frozen-encoder schedule calls fit twice
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


class KeepBest(keras.callbacks.Callback):
    """Early stopping on ``val_mean_iou`` that keeps the best weights across several ``fit`` calls.

    Keras' EarlyStopping resets at every ``fit``; the frozen-encoder schedule (frozen encoder
    first, then unfrozen) trains in two calls, and the best epoch may lie in either.
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


def plateau_schedule(patience: int, factor: float) -> list[keras.callbacks.Callback]:
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


def log_segmenter(predictor: Predictor):
    """Log the predictor's network and config as the pyfunc segmenter of the active run."""
    return pyfunc.log_segmenter(predictor.network, predictor.config)


def log_history(history: dict[str, list[float]], files: Mapping[str, str] | None = None) -> None:
    """The training curves (``plots/training_curves.png``) and ``training/history.csv`` of the active
    run, plus ``files`` (name -> text) under ``training/``: what every training run logs
    (``socseg train``, search trials, ``socseg finetune``)."""
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
