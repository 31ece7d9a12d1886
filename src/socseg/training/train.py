"""One tracked training run: volumes -> slab split -> normalisation -> U-Net -> MLflow.

Used by ``socseg train`` and the ``train`` MLproject entry point, and (with a trial's params,
``nested=True`` and a pruning callback) by the hyperparameter search.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature

from socseg.training import tracking
from socseg.params import parse_bool
from socseg.data.context import n_channels, neighbour_indices
from socseg.data.dataset import Augmentation, RandomCrops
from socseg.inference.window import predict_probabilities
from socseg.model.losses import get_loss
from socseg.model.metrics import ThresholdedIoU, confusion_matrix, probabilities_to_classes, scores_from_confusion
from socseg.model.unet import build_model
from socseg.data.normalise import IntensityNormalisation, Normaliser
from socseg.analysis.plots import overlay_figure, training_curves_figure
from socseg.training.runtime import resolve_precision, runtime_tags, seed_everything, set_precision
from socseg.data.split import SlabSplit, split_from_params
from socseg.data.tasks import check_task, task_class_names, task_targets
from socseg.data.volumes import Volume, load_volume, volume_dir


@dataclass
class Slab:
    """One subset of one volume, ready for the network."""

    volume: str
    z_range: tuple[int, int]
    images: np.ndarray  # normalised float32 (Z, H, W)
    targets: np.ndarray  # task class indices uint8 (Z, H, W)


@dataclass
class PreparedData:
    task: str
    class_names: list[str]
    phase_map: dict[int, str]
    normaliser: Normaliser
    splits: dict[str, SlabSplit]
    slabs: dict[str, list[Slab]]  # subset -> slabs (one per volume with a non-empty subset)
    checksums: list[dict[str, str]] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return tracking.volumes_fingerprint(self.checksums)


def load_labelled_volumes(params: Mapping, names: Sequence[str]) -> list[Volume]:
    """The configured labelled volumes; the built-in sample is made on first use (fresh clone)."""
    from socseg.data.synth import BUILTIN_SAMPLE, materialise_sample

    data_dir = params["data"]["dir"]
    volumes = []
    for name in names:
        directory = volume_dir(name, data_dir)
        if name == BUILTIN_SAMPLE and not directory.exists():
            print(f"socseg: {directory} is missing: generating the built-in sample", flush=True)
            materialise_sample(params, directory)
        volume = load_volume(directory)
        if volume.labels is None:
            raise ValueError(f"volume {name!r} has no labels: training needs labelled volumes")
        volumes.append(volume)
    phase_names = {tuple(v.class_names) for v in volumes}
    if len(phase_names) > 1:
        raise ValueError(f"volumes disagree on their phases: {sorted(phase_names)}")
    return volumes


def data_fingerprint(params: Mapping) -> str:
    """Fingerprint of the configured labelled volumes (their stored files' sha256): what a study,
    a run and a registered version record as "the data"."""
    volumes = load_labelled_volumes(params, params["data"]["volumes"])
    return tracking.volumes_fingerprint([dict(v.meta.checksums) for v in volumes])


def prepare_data(params: Mapping, volumes: Sequence[Volume], task: str) -> PreparedData:
    """Split every volume into slabs, fit the normaliser on the training slabs only, build targets."""
    check_task(task)
    phase_names = volumes[0].class_names
    class_names = task_class_names(task, phase_names)
    splits = {v.meta.name: split_from_params(v.image.shape[0], params["split"]) for v in volumes}
    norm = params["normalise"]
    normaliser = Normaliser.fit(
        [v.image[splits[v.meta.name].range("train")] for v in volumes],
        norm["low_percentile"],
        norm["high_percentile"],
    )
    slabs: dict[str, list[Slab]] = {"train": [], "val": [], "test": []}
    for volume in volumes:
        split = splits[volume.meta.name]
        class_index = volume.class_index()
        for subset in slabs:
            start, stop = getattr(split, subset)
            if stop > start:
                slabs[subset].append(
                    Slab(
                        volume=volume.meta.name,
                        z_range=(start, stop),
                        images=normaliser.apply(volume.image[start:stop]),
                        targets=task_targets(class_index[start:stop], task, phase_names),
                    )
                )
    if not slabs["train"]:
        raise ValueError("the split leaves no training slices")
    return PreparedData(
        task=task,
        class_names=class_names,
        phase_map=dict(volumes[0].meta.phase_map),
        normaliser=normaliser,
        splits=splits,
        slabs=slabs,
        checksums=[dict(v.meta.checksums) for v in volumes],
    )


def evaluate_slabs(
    model: keras.Model,
    slabs: Sequence[Slab],
    task: str,
    class_names: list[str],
    tile_size: int,
    batch_size: int,
    context_slices: int = 0,
) -> tuple[dict[str, float], list[np.ndarray]]:
    """Scores over all slabs (each pixel counted once) and the predicted class maps.

    A 2.5D model takes its context from the slab itself, as in training.
    """
    cm = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    predictions = []
    for slab in slabs:
        probs = predict_probabilities(
            model.predict_on_batch, slab.images, tile_size, batch_size, context_slices=context_slices
        )
        classes = probabilities_to_classes(probs, task)
        cm += confusion_matrix(slab.targets, classes, len(class_names))
        predictions.append(classes)
    return scores_from_confusion(cm, class_names), predictions


class SlabValidation(keras.callbacks.Callback):
    """Adds ``val_<score>`` for the whole validation slabs to the epoch logs.

    Scores come from the fixed tiling, thresholded, each pixel once: the same code as the final
    evaluation, so early stopping optimises exactly what is reported.
    """

    def __init__(self, slabs: Sequence[Slab], **scoring: Any):
        """``scoring``: the keyword arguments of :func:`evaluate_slabs` after the slabs."""
        super().__init__()
        self.slabs, self.scoring = slabs, scoring

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        scores, _ = evaluate_slabs(self.model, self.slabs, **self.scoring)
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in scores.items() if k.startswith(("iou", "mean_iou", "mean_dice"))})


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
    model_uri: str
    metrics: dict[str, float]
    history: dict[str, list[float]]
    best_epoch: int
    seconds: float
    pruned: bool = False
    segmenter_uri: str = ""  # the pyfunc that segments whole slices (socseg segment, mlflow models serve)


def _settings(params: Mapping) -> dict[str, Any]:
    t = params["train"]
    return {
        "encoder": str(t["encoder"]),
        "task": check_task(str(t["task"])),
        "epochs": int(t["epochs"]),
        "batch_size": int(t["batch_size"]),
        "learning_rate": float(t["learning_rate"]),
        "dropout": float(t["dropout"]),
        "loss": str(t["loss"]),
        "precision": resolve_precision(str(t["precision"])),
        "encoder_weights": str(t["encoder_weights"]),
        "encoder_batchnorm": str(t.get("encoder_batchnorm", "auto")),
        "bn_momentum": float(t.get("bn_momentum", 0.9)),
        "freeze_encoder": parse_bool(t["freeze_encoder"]),
        "base_filters": int(t["base_filters"]),
        "patience": int(t["patience"]),
        "reduce_lr_patience": int(t.get("reduce_lr_patience", 0)),
        "reduce_lr_factor": float(t.get("reduce_lr_factor", 0.5)),
        "unfreeze_after": int(t.get("unfreeze_after", 0)),
        "fine_tune_lr_factor": float(t.get("fine_tune_lr_factor", 0.1)),
        "seed": int(t["seed"]),
        "context_slices": int(t.get("context_slices", 0)),
        "tile_size": int(params["tiles"]["size"]),
        "steps_per_epoch": int(params["tiles"]["steps_per_epoch"]),
    }


def export_model(model: keras.Model, normaliser: Normaliser) -> keras.Model:
    """The model users get: raw grey slices (B, H, W, 2k + 1) in, class probabilities out."""
    inputs = keras.Input(shape=(None, None, model.input_shape[-1]), dtype="float32", name="grey")
    normalised = IntensityNormalisation(normaliser.low, normaliser.high, name="normalise")(inputs)
    return keras.Model(inputs, model(normalised), name=f"socseg_{model.name}")


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
    params: Mapping,
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
    s = _settings(params)
    names = list(volume_names or params["data"]["volumes"])
    tracking.configure_tracking(params)
    set_precision(s["precision"])
    seed_everything(s["seed"])
    try:
        volumes = load_labelled_volumes(params, names)
        data = prepare_data(params, volumes, s["task"])
        n_classes = len(data.class_names)
        model = build_model(
            s["encoder"],
            s["task"],
            n_classes=n_classes,
            dropout=s["dropout"],
            encoder_weights=s["encoder_weights"],
            freeze_encoder=s["freeze_encoder"],
            base_filters=s["base_filters"],
            encoder_batchnorm=s["encoder_batchnorm"],
            bn_momentum=s["bn_momentum"],
            in_channels=n_channels(s["context_slices"]),
        )

        def compile_model(learning_rate: float) -> None:
            model.compile(
                optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
                loss=get_loss(s["loss"], s["task"]),
                metrics=[ThresholdedIoU(task=s["task"], n_classes=n_classes, name="mean_iou")],
            )

        crops = RandomCrops(
            [slab.images for slab in data.slabs["train"]],
            [slab.targets for slab in data.slabs["train"]],
            size=s["tile_size"],
            batch_size=s["batch_size"],
            steps=s["steps_per_epoch"],
            augmentation=Augmentation.from_params(params["tiles"].get("augment")),
            seed=s["seed"],
            context_slices=s["context_slices"],
        )
        val_slabs = data.slabs["val"] or data.slabs["train"]
        scoring = dict(task=s["task"], class_names=data.class_names, tile_size=s["tile_size"],
                       batch_size=s["batch_size"], context_slices=s["context_slices"])
        logger = MlflowEpochLogger()
        keep_best = KeepBest(patience=s["patience"])
        callbacks = [
            SlabValidation(val_slabs, **scoring),
            keep_best,
            *_plateau_schedule(s["reduce_lr_patience"], s["reduce_lr_factor"]),
            logger,
            *extra_callbacks,
        ]
        # Fine-tune schedule: a frozen (pretrained) encoder first, then everything at a lower rate.
        unfreeze_after = s["unfreeze_after"] if s["freeze_encoder"] else 0
        phases = [(0, s["epochs"], s["learning_rate"])]
        if 0 < unfreeze_after < s["epochs"]:
            phases = [(0, unfreeze_after, s["learning_rate"]),
                      (unfreeze_after, s["epochs"], s["learning_rate"] * s["fine_tune_lr_factor"])]
        with mlflow.start_run(run_name=run_name, nested=nested) as run:
            mlflow.set_tags(
                {
                    **runtime_tags(s["precision"]),
                    "encoder": s["encoder"],
                    "task": s["task"],
                    "data_fingerprint": data.fingerprint,
                    "data_md5_dvc": tracking.dvc_data_md5() or "none",
                    "git_commit": tracking.git_commit() or "none",
                    "volumes": ",".join(names),
                    **dict(tags or {}),
                }
            )
            # Section-prefixed names ("train.epochs"): `mlflow run` already logs its own entry-point
            # parameters under the bare names, and MLflow params cannot be logged twice.
            effective = {**params, "train": {**params["train"], **{k: s[k] for k in params["train"] if k in s}}}
            mlflow.log_params(tracking.flat_params({k: effective[k] for k in ("train", "tiles", "split", "normalise")}))
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
            metrics: dict[str, float] = {"train_seconds": seconds, "best_epoch": float(best_epoch)}
            pruned = any(getattr(callback, "pruned", False) for callback in extra_callbacks)
            mlflow.set_tag("state", "PRUNED" if pruned else "COMPLETE")
            _log_artifacts(data, history)
            if pruned:
                return TrainResult(run.info.run_id, "", metrics, history, best_epoch, seconds, pruned=True)
            subsets = ("val", "test") if evaluate_test else ("val",)
            for subset in subsets:
                if data.slabs[subset]:
                    scores, predictions = evaluate_slabs(model, data.slabs[subset], **scoring)
                    metrics.update({f"{subset}_{k}": v for k, v in scores.items()})
                    if subset == "test":
                        _log_overlays(data.slabs["test"], predictions, data.class_names)
            mlflow.log_metrics({f"final_{k}" if k.startswith("val_") else k: v for k, v in metrics.items()})
            model_uri = segmenter_uri = ""
            if log_model:
                model_uri, segmenter_uri = _log_model(
                    model, data, s["tile_size"], params.get("inference") or {}, s["context_slices"], s["encoder"]
                )
            return TrainResult(
                run.info.run_id, model_uri, metrics, history, best_epoch, seconds, segmenter_uri=segmenter_uri
            )
    finally:
        set_precision("float32")


def _log_overlays(slabs: Sequence[Slab], predictions: Sequence[np.ndarray], class_names: list[str]) -> None:
    """Test-slab overlays (first, middle and last slice of the first test slab)."""
    slab, pred = slabs[0], predictions[0]
    picks = sorted({0, len(slab.images) // 2, len(slab.images) - 1})
    fig = overlay_figure(
        [slab.images[k] for k in picks],
        [slab.targets[k] for k in picks],
        [pred[k] for k in picks],
        class_names,
        titles=[f"{slab.volume} z={slab.z_range[0] + k}" for k in picks],
    )
    mlflow.log_figure(fig, "plots/test_overlays.png")
    import matplotlib.pyplot as plt

    plt.close(fig)


def _log_artifacts(data: PreparedData, history: dict[str, list[float]]) -> None:
    import matplotlib.pyplot as plt

    fig = training_curves_figure(history)
    mlflow.log_figure(fig, "plots/training_curves.png")
    plt.close(fig)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        frame = pd.DataFrame(history)
        frame.insert(0, "epoch", np.arange(len(frame)))
        frame.to_csv(tmp_path / "history.csv", index=False)
        (tmp_path / "split.json").write_text(json.dumps({k: v.to_dict() for k, v in data.splits.items()}, indent=2))
        data.normaliser.save(tmp_path / "normalisation.json")
        mlflow.log_artifacts(tmp, "training")


def _log_model(
    model: keras.Model,
    data: PreparedData,
    tile_size: int,
    inference: Mapping[str, Any] | None = None,
    context_slices: int = 0,
    encoder: str = "",
) -> tuple[str, str]:
    """Log the Keras model and, next to it, the pyfunc segmenter; returns both model URIs."""
    from socseg.inference.pyfunc import log_segmenter, segmenter_config

    exported = export_model(model, data.normaliser)
    images = data.slabs["train"][0].images
    planes = neighbour_indices(0, context_slices, 0, len(images))
    example = np.moveaxis(images[planes, :tile_size, :tile_size], 0, -1)[None]  # (1, s, s, 2k + 1)
    raw_example = example * (data.normaliser.high - data.normaliser.low) + data.normaliser.low
    raw_example = raw_example.astype(np.float32)
    signature = infer_signature(raw_example, np.asarray(exported.predict_on_batch(raw_example)))
    socseg_meta = {
        "task": data.task,
        "class_names": data.class_names,
        "phase_map": {str(k): v for k, v in data.phase_map.items()},
        "normalisation": data.normaliser.to_dict(),
        "tile_size": tile_size,
        "context_slices": int(context_slices),
        "encoder": encoder,
    }
    info = tracking.log_keras_model(exported, signature, raw_example, metadata={"socseg": socseg_meta})
    # The served model: the same network as a pyfunc that segments whole slices of any size.
    segmenter = log_segmenter(exported, segmenter_config(socseg_meta, inference))
    return info.model_uri, segmenter.model_uri
