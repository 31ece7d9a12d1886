"""Fine-tuning a registered model on sparse labels of a new scan (``socseg finetune``).

A model trained on one scan meets a new one (another cell, another beamtime): an annotator labels
a few slices, or a few regions of them (:mod:`socseg.data.sparse`), and the model is trained
further on those labels only. The result keeps everything the parent model fixed (task, classes,
tile size, 2.5D context, normalisation, inference settings): only the weights change. It is logged
like any training run, with the parent as lineage, registered under the parent's registered name
as ``challenger``, and the existing champion gate (:func:`socseg.training.registry.register_and_promote`)
decides on the new scan's held-out labelled slices, where the champion is scored too.

Every check that can fail on the input (labels, phase map, task, grey scale) runs before a run is
started: a refused fine-tune writes and registers nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from socseg.data.normalise import Normaliser
from socseg.data.prepare import Slab
from socseg.data.sparse import SparseVolume, sparse_volume
from socseg.data.tasks import check_task, task_class_names
from socseg.data.volumes import META_FILE, Volume, VolumeError, volume_dir
from socseg.params import Params, typed
from socseg.training.train import TrainResult

LINEAGE_TAG = "socseg.lineage"  # the parent as an immutable reference: models:/NAME/VERSION, else its URI


class FinetuneError(ValueError):
    """A fine-tune refused before anything was trained, logged or registered; the message says why."""


@dataclass
class FinetuneResult(TrainResult):
    parent_model_uri: str = ""
    lineage: dict[str, str] = field(default_factory=dict)  # the run's parent tags
    registered_name: str = ""
    promotion: dict[str, Any] | None = None  # registry.Promotion.to_dict(); None when not registered
    train_slices: list[int] = field(default_factory=list)
    test_slices: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Parent:
    """Where the model to fine-tune comes from: its URI and, when registered, name and version."""

    uri: str
    name: str | None
    version: str | None
    run_id: str | None

    def tags(self) -> dict[str, str]:
        reference = f"models:/{self.name}/{self.version}" if self.name and self.version else self.uri
        return {
            LINEAGE_TAG: reference,
            "socseg.parent_model_uri": self.uri,
            "socseg.parent_model_name": self.name or "none",
            "socseg.parent_model_version": self.version or "none",
            "socseg.parent_run_id": self.run_id or "none",
        }


def resolve_parent(model_uri: str) -> Parent:
    """Name and version of a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI (the alias
    resolved now, so the lineage stays true after it moves), or of the registered version logged
    from a ``runs:/`` model's run; a model never registered has neither."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = version = None
    if model_uri.startswith("models:/"):
        rest = model_uri[len("models:/"):].strip("/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            try:
                version = str(client.get_model_version_by_alias(name, alias).version)
            except MlflowException as error:
                raise FinetuneError(f"{model_uri}: no version of {name!r} has the alias {alias!r} ({error.message})") from None
        elif "/" in rest:
            name, _, ref = rest.partition("/")
            version = ref if ref.isdigit() else None
    try:
        run_id = mlflow.models.get_model_info(model_uri).run_id
    except MlflowException:
        run_id = None
    if name is None and run_id:
        versions = client.search_model_versions(f"run_id = '{run_id}'")
        if versions:
            first = min(versions, key=lambda v: int(v.version))
            name, version = first.name, str(first.version)
    if name is not None and version is not None and not run_id:
        run_id = client.get_model_version(name, version).run_id
    return Parent(model_uri, name, version, run_id or None)


def load_scan(volume: Volume | str | Path, labels: str | Path | None, phase_map: Mapping[int, str] | None,
              params: Params) -> Volume:
    """The new scan with its (sparse) labels, in memory, without checking label values against the
    phase map (an ignore value is not a phase): a :class:`Volume`, a socseg volume folder or the
    name of one under ``data.dir``, or any grey stack with ``labels`` (a label stack)."""
    from socseg.data.stacks import labelled_volume, split_hdf5_path

    if isinstance(volume, Volume):
        return volume
    source = Path(volume)
    if not source.exists() and split_hdf5_path(volume) is None:
        candidate = volume_dir(str(volume), params.data.dir)
        if not candidate.exists():
            raise FinetuneError(f"{volume}: no such file, folder or volume under {params.data.dir}")
        source = candidate
    if labels is None:
        if not (source / META_FILE).is_file():
            raise FinetuneError(f"{volume} is not a socseg volume folder: give its label stack with --labels")
        labels = source
    return labelled_volume(source, labels, dict(phase_map) if phase_map else None, params.data.phase_map)


def split_labelled(slices: Sequence[int], test_fraction: float) -> tuple[list[int], list[int]]:
    """(train, test) labelled slices: the last ``round(test_fraction * n)`` along z are held out,
    at least one of each when there are two or more; a single labelled slice trains, none is
    held out (nothing to gate on). ``test_fraction`` 0 holds none out: every labelled slice
    trains (the user scores the result elsewhere; registered as challenger, no gate)."""
    slices = sorted(int(z) for z in slices)
    if len(slices) < 2 or test_fraction == 0:
        return slices, []
    held_out = min(max(1, int(round(test_fraction * len(slices)))), len(slices) - 1)
    return slices[:-held_out], slices[-held_out:]


def slabs_around(volume: Volume, slices: Sequence[int], context: int) -> list[Slab]:
    """Slabs covering ``slices`` and their ``context`` neighbours each side (2.5D input), overlapping
    ones merged: training reads real neighbours, and only labelled slices hold targets."""
    depth = volume.image.shape[0]
    merged: list[list[int]] = []
    for z in sorted(slices):
        start, stop = max(0, z - context), min(depth, z + context + 1)
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [Slab(volume, (a, b)) for a, b in merged]


def slice_ranges(slices: Sequence[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5,9"`` (MLflow params have a length limit; scans have many slices)."""
    parts, slices = [], sorted(slices)
    for z in slices:
        if parts and z == parts[-1][1] + 1:
            parts[-1][1] = z
        else:
            parts.append([z, z])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def scan_fingerprint(volume: SparseVolume) -> str:
    """sha256 of the scan's grey values, labels and which pixels count as labelled: its data version."""
    digest = hashlib.sha256()
    for array in (volume.image, volume.labels):
        for z in range(array.shape[0]):  # slice by slice: a memory-mapped scan is not copied whole
            digest.update(np.ascontiguousarray(array[z]).tobytes())
    digest.update(json.dumps({"ignore_value": volume.ignore_value, "labelled_slices": volume.labelled_slices,
                              "phase_map": {str(k): v for k, v in sorted(volume.meta.phase_map.items())},
                              "shape": list(volume.image.shape)}).encode())
    return digest.hexdigest()


def _inner_network(network: Any):
    """The U-Net inside an exported model (the layer after ``normalise``) and the exported layer's
    (low, high): fine-tuning trains the U-Net on normalised crops, as training did, and the
    exported model, which shares its layers, is what gets logged."""
    import keras

    inner = [layer for layer in getattr(network, "layers", []) if isinstance(layer, keras.Model)]
    try:
        layer = network.get_layer("normalise")
    except (ValueError, AttributeError):
        layer = None
    if len(inner) != 1 or layer is None:
        raise FinetuneError("the model's network is not a socseg exported U-Net (normalisation layer + one inner model): "
                            "only models logged by socseg train/search/finetune can be fine-tuned")
    return inner[0], (float(layer.low), float(layer.high))


def finetune(
    params: Mapping | Params,
    model_uri: str,
    volume: Volume | str | Path,
    labelled: Sequence[int] | None = None,
    labels: str | Path | None = None,
    ignore_value: int | None = None,
    phase_map: Mapping[int, str] | None = None,
    task: str | None = None,
    register: bool = True,
    run_name: str | None = None,
) -> FinetuneResult:
    """Fine-tune ``model_uri`` on the labelled pixels of ``volume``; log, register and gate the result.

    ``labelled``: the labelled slices (None: every slice with a labelled pixel); ``ignore_value``
    (None: ``finetune.ignore_value``) marks unlabelled pixels; ``labels`` and ``phase_map`` as in
    :func:`load_scan`; ``task`` (None: the model's) is checked against the model's. With
    ``register``, the result becomes ``challenger`` of the parent's registered name (else
    ``registry.model_name``) and the champion gate decides on the held-out labelled slices.
    Settings: ``finetune.*``; loss, batch size, seed and eager_max_steps from ``train``, augmentation
    from ``tiles``.
    """
    import keras
    import mlflow

    from socseg.data.dataset import Augmentation, RandomCrops
    from socseg.inference.evaluate import score_slabs
    from socseg.inference.predictor import Predictor
    from socseg.inference.pyfunc import model_config
    from socseg.model.losses import get_loss
    from socseg.model.metrics import ThresholdedIoU
    from socseg.training import tracking
    from socseg.training.pipeline import registered_model_name
    from socseg.training.registry import register_and_promote
    from socseg.training.runtime import runs_eagerly, runtime_tags, seed_everything
    from socseg.training.train import MlflowEpochLogger, TimeBudget, _set_encoder_trainable, log_history, log_segmenter

    p = typed(params)
    f, t = p.finetune, p.train
    ignore = f.ignore_value if ignore_value is None else int(ignore_value)
    mlflow.set_tracking_uri(tracking.tracking_uri(p))  # the experiment is set (created) once the checks pass
    metric = p.registry.metric
    if register and not metric.startswith("test_"):
        raise FinetuneError(f"registry.metric {metric!r} is not a test score (test_mean_iou, test_iou_ni, ...)")

    # ---- every check first: a refused fine-tune leaves no run, no model, no registered version
    try:
        scan = sparse_volume(load_scan(volume, labels, phase_map, p), ignore, labelled)
    except VolumeError as error:
        raise FinetuneError(str(error)) from None
    try:
        config = model_config(model_uri)  # the MLmodel only: the checks below load no network
    except ValueError as error:
        raise FinetuneError(str(error)) from None
    if task is not None and check_task(task) != config.task:
        raise FinetuneError(f"{model_uri} is a {config.task!r} model, not {task!r}: fine-tuning keeps the model's task "
                            f"(fine-tune a {task!r} model, or drop --task)")
    try:
        expected = task_class_names(config.task, scan.class_names)
    except ValueError as error:
        raise FinetuneError(f"{scan.meta.name!r} cannot train a {config.task!r} model: {error}") from None
    if expected != config.class_names:
        raise FinetuneError(f"{model_uri} segments {config.class_names} but the labels of {scan.meta.name!r} "
                            f"(phase map {scan.class_names}) give {expected}")
    slices = scan.slices_with_labels()
    train_slices, test_slices = split_labelled(slices, f.test_fraction)
    parent = resolve_parent(model_uri)
    predictor = Predictor.load(model_uri)
    inner, (low, high) = _inner_network(predictor.network)
    try:  # a scan on another grey scale than a fixed-mode model's would train on clipped values
        grey = predictor.volume_grey_range(scan.image) if predictor.per_volume else None
        predictor.check_grey_range(np.asarray(scan.image[slices]), grey)
    except ValueError as error:
        raise FinetuneError(f"{scan.meta.name!r}: {error}") from None
    name = parent.name or registered_model_name(p.registry.model_name, config.task)

    # ---- training data: crops around the labelled pixels of the training slices only
    train_view, test_view = scan.with_labelled_slices(train_slices), scan.with_labelled_slices(test_slices)
    context = config.context_slices
    train_slabs = slabs_around(train_view, train_slices, context)
    layer = Normaliser(low, high, 0.0, 100.0)  # the exported model's own normalisation layer, in NumPy

    def normalised(slab: Slab) -> np.ndarray:
        start, stop = slab.z_range
        return layer.apply(predictor.map_grey(np.asarray(scan.image[start:stop]), grey))

    seed_everything(t.seed)
    crops = RandomCrops(
        [normalised(slab) for slab in train_slabs],
        [slab.targets(config.task) for slab in train_slabs],
        size=config.tile_size,
        batch_size=t.batch_size,
        steps=f.steps_per_epoch,
        augmentation=Augmentation.from_params(p.tiles.augment),
        seed=t.seed,
        context_slices=context,
    )
    test_slabs = slabs_around(test_view, test_slices, 0) if test_slices else []
    inner.trainable = True
    if f.freeze_encoder:
        _set_encoder_trainable(inner, False)
    eager = runs_eagerly(f.epochs, f.steps_per_epoch, t.eager_max_steps)
    inner.compile(
        optimizer=keras.optimizers.Adam(learning_rate=f.learning_rate),
        loss=get_loss(t.loss, config.task),
        metrics=[ThresholdedIoU(task=config.task, n_classes=len(config.class_names), name="mean_iou")],
        run_eagerly=eager,
    )
    precision = inner.dtype_policy.name
    fingerprint = scan_fingerprint(scan)
    lineage = parent.tags()
    test_pixels = sum(test_view.labelled_pixels(z) for z in test_slices)
    tracking.configure_tracking(p)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({
            **runtime_tags(precision, eager),
            "encoder": config.encoder or "unknown",
            "task": config.task,
            "data_fingerprint": fingerprint,
            "data_md5_dvc": "none",  # the scan is not part of the DVC-tracked data
            "git_commit": tracking.git_commit() or "none",
            "volumes": scan.meta.name,
            "socseg.kind": "finetune",
            **lineage,
        })
        mlflow.log_params(tracking.flat_params({
            "finetune": {**asdict(f), "ignore_value": ignore},
            "train": {"loss": t.loss, "batch_size": t.batch_size, "seed": t.seed, "eager_max_steps": t.eager_max_steps},
            "tiles": {"size": config.tile_size, "augment": asdict(p.tiles.augment)},
        }))
        mlflow.log_params({"finetune.train_slices": slice_ranges(train_slices),
                           "finetune.test_slices": slice_ranges(test_slices) or "none",
                           "finetune.volume": scan.meta.source or scan.meta.name,
                           "parent.model_uri": model_uri})
        logger, budget = MlflowEpochLogger(), TimeBudget(f.max_minutes)
        started = time.perf_counter()
        inner.fit(crops, epochs=f.epochs, callbacks=[budget, logger], verbose=2)
        seconds = time.perf_counter() - started
        history = logger.history
        metrics: dict[str, float] = {
            "train_seconds": seconds,
            "epochs_run": float(len(history.get("loss", []))),
            "train_labelled_pixels": float(sum(train_view.labelled_pixels(z) for z in train_slices)),
            "test_labelled_pixels": float(test_pixels),
        }
        mlflow.set_tag("stopped_by", "time_budget" if budget.exhausted else "epochs")
        mlflow.set_tag("state", "COMPLETE")
        if test_slabs:
            window = {"grey_range": grey} if grey is not None else {}
            scores = score_slabs(predictor, test_slabs, **window).scores
            metrics.update({f"test_{k}": v for k, v in scores.items()})
        else:
            mlflow.set_tag("socseg.gate", "none: a single labelled slice, no held-out test slice")
        log_history(history, {"finetune.json": json.dumps({
            "parent": lineage, "train_slices": train_slices, "test_slices": test_slices, "ignore_value": ignore,
            "normalisation": {"low": low, "high": high, "grey_range": list(grey) if grey else None}}, indent=2)})
        mlflow.log_metrics(metrics)
        new_uri = log_segmenter(predictor).model_uri
        run_id = run.info.run_id
    promotion = None
    if register:
        gated = bool(test_slabs)
        promotion = register_and_promote(
            new_uri,
            name,
            score=float(metrics.get(metric, float("nan"))),
            evaluate=lambda uri: score_slabs(Predictor.load(uri), test_slabs).scores[metric.removeprefix("test_")],
            metric=metric,
            run_id=run_id,
            gate=gated,
            tags={
                **lineage,
                "data_fingerprint": fingerprint,
                "git_commit": tracking.git_commit() or "none",
                "encoder": config.encoder or "unknown",
                "task": config.task,
                "run_id": run_id,
                "socseg.kind": "finetune",
                "finetune.test_slices": slice_ranges(test_slices) or "none",
                **{k: f"{v:.6f}" for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)},
            },
        ).to_dict()
    return FinetuneResult(
        run_id, new_uri, metrics, history, len(history.get("loss", [])) - 1, seconds,
        parent_model_uri=model_uri, lineage=lineage, registered_name=name if register else "",
        promotion=promotion, train_slices=train_slices, test_slices=test_slices,
    )
