"""Fine-tuning a registered model on sparse labels of a new scan (``socseg finetune``).

A model trained on one scan meets a new one (another cell, another beamtime): an annotator labels
a few slices, or a few regions of them (:mod:`socseg.data.sparse`), and the model is trained
further on those labels only. The result keeps everything the parent model fixed (task, classes,
tile size, 2.5D context, normalisation, inference settings): only the weights change. It is logged
like any training run (:class:`FinetuneRun` is a variant of :class:`socseg.training.trainer.TrainingRun`
with its own data source: crops around the labelled pixels), with the parent as lineage, registered
under the parent's registered name as ``challenger``, and the existing champion gate
(:func:`socseg.training.registry.register_and_promote`) decides on the new scan's held-out
labelled slices, where the champion is scored too.

Every check that can fail on the input (labels, phase map, task, grey scale) runs before a run is
started (:func:`check_source`): a refused fine-tune writes and registers nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import keras
import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from socseg.data.dataset import Augmentation
from socseg.data.formats import split_hdf5_path
from socseg.data.normalise import Normaliser
from socseg.data.prepare import Slab
from socseg.data.sparse import SparseVolume, sparse_volume
from socseg.data.stacks import labelled_volume
from socseg.data.tasks import get_task
from socseg.data.volumes import META_FILE, Volume, VolumeError, volume_dir
from socseg.inference.evaluate import score_slabs
from socseg.inference.request import InferenceOptions
from socseg.inference.predictor import ModelConfig, Predictor
from socseg.inference.pyfunc import model_config
from socseg.params import Params, typed
from socseg.training import tracking
from socseg.training.pipeline import registered_model_name
from socseg.training.promotion_lock import lock_for
from socseg.training.registry import register_and_promote
from socseg.training.trainer import Phase, RunData, Schedule, TrainingRun, TrainResult, set_encoder_trainable

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
    inner = [layer for layer in getattr(network, "layers", []) if isinstance(layer, keras.Model)]
    try:
        layer = network.get_layer("normalise")
    except (ValueError, AttributeError):
        layer = None
    if len(inner) != 1 or layer is None:
        raise FinetuneError("the model's network is not a socseg exported U-Net (normalisation layer + one inner model): "
                            "only models logged by socseg train/search/finetune can be fine-tuned")
    return inner[0], (float(layer.low), float(layer.high))




@dataclass
class FinetuneSource:
    """A fine-tune's inputs once every check has passed: the scan and its labelled slices (split
    into training and held-out ones), the parent model, and how the scan's grey values reach its
    network."""

    scan: SparseVolume
    train_slices: list[int]
    test_slices: list[int]
    model_uri: str
    parent: Parent
    config: ModelConfig
    predictor: Predictor  # the parent's exported model: fine-tuned in place (it shares the U-Net's layers)
    network: keras.Model  # the U-Net inside it, which is compiled and fitted
    layer_range: tuple[float, float]  # the exported normalisation layer's (low, high)
    grey: tuple[float, float] | None  # the scan's grey range mapped onto the layer (None: raw values)
    registered_name: str
    fingerprint: str  # scan_fingerprint: the data version


def check_source(p: Params, model_uri: str, scan: SparseVolume, task: str | None) -> FinetuneSource:
    """Everything that can refuse the fine-tune of ``model_uri`` on ``scan`` (:class:`FinetuneError`),
    checked before a run starts; ``task`` (None: the model's) must be the model's."""
    try:
        config = model_config(model_uri)  # the MLmodel only: the checks below load no network
    except ValueError as error:
        raise FinetuneError(str(error)) from None
    model_task = get_task(config.task)
    if task is not None and get_task(task) != model_task:
        raise FinetuneError(f"{model_uri} is a {model_task.name!r} model, not {task!r}: fine-tuning keeps the model's "
                            f"task (fine-tune a {task!r} model, or drop --task)")
    try:
        expected = model_task.class_names(scan.class_names)
    except ValueError as error:
        raise FinetuneError(f"{scan.meta.name!r} cannot train a {model_task.name!r} model: {error}") from None
    if expected != config.class_names:
        raise FinetuneError(f"{model_uri} segments {config.class_names} but the labels of {scan.meta.name!r} "
                            f"(phase map {scan.class_names}) give {expected}")
    slices = scan.slices_with_labels()
    train_slices, test_slices = split_labelled(slices, p.finetune.test_fraction)
    parent = resolve_parent(model_uri)
    # Trained in place, so its passes run on Keras and see the new weights; the fine-tuned model
    # keeps the parent's recorded runtime for serving.
    loaded = Predictor.load(model_uri, runtime="keras")
    predictor = Predictor(loaded.network, replace(loaded.config, runtime=config.runtime))
    network, layer_range = _inner_network(predictor.network)
    try:  # a scan on another grey scale than a fixed-mode model's would train on clipped values
        grey = config.normalisation.source_range(scan.image)  # per_volume: the scan's own range; fixed: None
        predictor.check_grey_range(np.asarray(scan.image[slices]), grey)
    except ValueError as error:
        raise FinetuneError(f"{scan.meta.name!r}: {error}") from None
    return FinetuneSource(
        scan, train_slices, test_slices, model_uri, parent, config, predictor, network, layer_range, grey,
        registered_name=parent.name or registered_model_name(p.registry.model_name, model_task.name),
        fingerprint=scan_fingerprint(scan),
    )


class FinetuneRun(TrainingRun):
    """The run of :func:`finetune`: crops around the labelled pixels of the training slices only,
    the parent's network, no per-epoch validation (every epoch runs, the last one is kept), test
    scores on the held-out labelled slices; :meth:`register` is the gate after the run."""

    def __init__(self, params: Params, source: FinetuneSource, run_name: str | None = None):
        super().__init__(params, finetune_schedule(params, source.config), run_name=run_name)
        self.source = source
        self.train_view = source.scan.with_labelled_slices(source.train_slices)
        self.test_view = source.scan.with_labelled_slices(source.test_slices)
        self.test_slabs = slabs_around(self.test_view, source.test_slices, 0) if source.test_slices else []

    def prepare(self) -> RunData:
        source, config = self.source, self.source.config
        train_slabs = slabs_around(self.train_view, source.train_slices, config.context_slices)
        network = source.network
        network.trainable = True
        if self.params.finetune.freeze_encoder:
            set_encoder_trainable(network, False)
        return RunData(
            network=network, predictor=source.predictor,
            images=[self.normalised(slab) for slab in train_slabs],
            targets=[slab.targets(config.task) for slab in train_slabs],
            task=config.task, n_classes=len(config.class_names), precision=network.dtype_policy.name,
            encoder=config.encoder or "unknown", fingerprint=source.fingerprint, volumes=source.scan.meta.name,
            data_md5_dvc="none",  # the scan is not part of the DVC-tracked data
        )

    def normalised(self, slab: Slab) -> np.ndarray:
        """A training slab as the inner U-Net sees it: the scan's grey values mapped as its scores
        map them (``grey``), then through the exported model's own normalisation layer."""
        source = self.source
        layer = Normaliser(*source.layer_range, 0.0, 100.0)  # the exported model's own normalisation layer, in NumPy
        start, stop = slab.z_range
        return layer.apply(source.predictor.map_grey(np.asarray(source.scan.image[start:stop]), source.grey))

    def run_tags(self) -> dict[str, str]:
        return {"socseg.kind": "finetune", **self.source.parent.tags()}

    def run_params(self, data: RunData) -> dict[str, Any]:
        p, source = self.params, self.source
        f, t = p.finetune, p.train
        return {
            **tracking.flat_params({
                "finetune": {**asdict(f), "ignore_value": source.scan.ignore_value},
                "train": {"loss": t.loss, "batch_size": t.batch_size, "seed": t.seed, "eager_max_steps": t.eager_max_steps},
                "tiles": {"size": source.config.tile_size, "augment": asdict(p.tiles.augment)},
            }),
            "finetune.train_slices": slice_ranges(source.train_slices),
            "finetune.test_slices": slice_ranges(source.test_slices) or "none",
            "finetune.volume": source.scan.meta.source or source.scan.meta.name,
            "parent.model_uri": source.model_uri,
        }

    def run_metrics(self) -> dict[str, float]:
        source = self.source
        return {"train_labelled_pixels": float(sum(self.train_view.labelled_pixels(z) for z in source.train_slices)),
                "test_labelled_pixels": float(sum(self.test_view.labelled_pixels(z) for z in source.test_slices))}

    def artifacts(self) -> dict[str, str]:
        source, (low, high), grey = self.source, self.source.layer_range, self.source.grey
        return {"finetune.json": json.dumps({
            "parent": source.parent.tags(), "train_slices": source.train_slices, "test_slices": source.test_slices,
            "ignore_value": source.scan.ignore_value,
            "normalisation": {"low": low, "high": high, "grey_range": list(grey) if grey else None}}, indent=2)}

    def final_scores(self, data: RunData) -> dict[str, float]:
        """Scores on the held-out labelled slices, mapped as training mapped the scan; none (and
        the run says why) with a single labelled slice."""
        if not self.test_slabs:
            mlflow.set_tag("socseg.gate", "none: a single labelled slice, no held-out test slice")
            return {}
        grey = self.source.grey
        scores = score_slabs(data.predictor.as_served(), self.test_slabs, options=InferenceOptions(grey_range=grey)).scores
        return {f"test_{k}": v for k, v in scores.items()}

    def register(self, result: TrainResult, metric: str) -> dict[str, Any]:
        """The logged model as ``challenger`` of the parent's registered name; the champion gate
        decides on the held-out slices, where the champion is scored too (none held out: ungated)."""
        source, test_slabs = self.source, self.test_slabs
        return register_and_promote(
            result.model_uri,
            source.registered_name,
            score=float(result.metrics.get(metric, float("nan"))),
            evaluate=lambda uri: score_slabs(Predictor.load(uri), test_slabs).scores[metric.removeprefix("test_")],
            lock=lock_for(self.params, mlflow.get_tracking_uri()),
            metric=metric,
            run_id=result.run_id,
            gate=bool(test_slabs),
            tags={
                **source.parent.tags(),
                "data_fingerprint": source.fingerprint,
                "git_commit": tracking.git_commit() or "none",
                "encoder": source.config.encoder or "unknown",
                "task": str(source.config.task),
                "run_id": result.run_id,
                "socseg.kind": "finetune",
                "finetune.test_slices": slice_ranges(source.test_slices) or "none",
                **{k: f"{v:.6f}" for k, v in result.metrics.items() if k.startswith("test_") and isinstance(v, float)},
            },
        ).to_dict()


def finetune_schedule(params: Params, config: ModelConfig) -> Schedule:
    """``finetune.*`` (loss, batch size, seed and eager_max_steps from ``train``, augmentation from
    ``tiles``) on the parent's tile size and context: one phase, no validation to stop on."""
    f, t = params.finetune, params.train
    return Schedule(seed=t.seed, loss=t.loss, tile_size=config.tile_size, batch_size=t.batch_size,
                    steps_per_epoch=f.steps_per_epoch, context_slices=config.context_slices,
                    augmentation=Augmentation.from_params(params.tiles.augment),
                    phases=(Phase(0, f.epochs, f.learning_rate),), eager_max_steps=t.eager_max_steps,
                    max_minutes=f.max_minutes)


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
    p = typed(params)
    ignore = p.finetune.ignore_value if ignore_value is None else int(ignore_value)
    mlflow.set_tracking_uri(tracking.tracking_uri(p))  # the experiment is set (created) once the checks pass
    metric = p.registry.metric
    if register and not metric.startswith("test_"):
        raise FinetuneError(f"registry.metric {metric!r} is not a test score (test_mean_iou, test_iou_ni, ...)")
    # every check first: a refused fine-tune leaves no run, no model, no registered version
    try:
        scan = sparse_volume(load_scan(volume, labels, phase_map, p), ignore, labelled)
    except VolumeError as error:
        raise FinetuneError(str(error)) from None
    source = check_source(p, model_uri, scan, task)
    run = FinetuneRun(p, source, run_name=run_name)
    result = run.run()
    promotion = run.register(result, metric) if register else None  # after the run: it gates the logged model
    return FinetuneResult(
        **vars(result), parent_model_uri=model_uri, lineage=source.parent.tags(),
        registered_name=source.registered_name if register else "", promotion=promotion,
        train_slices=source.train_slices, test_slices=source.test_slices,
    )


def promotion_verdict(result: FinetuneResult) -> str:
    """One line on what the registry made of a fine-tuned model ('' when nothing was registered)."""
    promotion = result.promotion
    if promotion is None:
        return ""
    if promotion["already_registered"]:
        verdict = "was already registered"
    elif promotion["promoted"]:
        verdict = "is the new champion"
    elif promotion["champion_score_before"] is None and not result.test_slices:
        verdict = "is challenger (one labelled slice: no held-out slice to gate on)"
    else:
        verdict = (f"stays challenger (champion v{promotion['champion_version_before']} scores "
                   f"{promotion['champion_score_before']:.4f} on the held-out slices)")
    return f"{promotion['name']} v{promotion['version']} {verdict}"
