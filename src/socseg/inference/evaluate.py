"""Scores of a predictor on labelled slices: the one scoring path of socseg.

Validation during training, a run's test metrics, ``socseg evaluate``, the evaluate stage, the
registry gate and the benchmarks all call :func:`score_slabs` with a
:class:`~socseg.inference.predictor.Predictor`, so they agree on the same model and slices: the
prediction users get (sliding window, blend, TTA as configured, 2.5D context from the whole
volume), one confusion matrix, :func:`socseg.model.metrics.segmentation_scores`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from socseg.analysis.microstructure import TPB_PHASES, MicrostructureResult, flatten_metrics, measure, relative_errors
from socseg.data.prepare import Slab
from socseg.data.tasks import IGNORE, Task, get_task
from socseg.data.volumes import Volume, load_volume
from socseg.data.normalise import GreyRange
from socseg.inference.predictor import Predictor, load_predictor
from socseg.inference.request import InferenceOptions
from socseg.model.metrics import confusion_matrix, segmentation_scores

# Slices predicted per chunk: bounds the (Z, H, W, C) float32 probabilities held at once. Every
# scoring path uses it, so floating-point batch effects are the same for all of them. A model that
# fuses planes scores in its fusion_depth chunks instead (InferenceRequest.chunk_slices), as
# `socseg segment` streams it.
SCORING_CHUNK = 8


@dataclass
class Evaluation:
    class_names: list[str]
    confusion: np.ndarray
    seconds: float  # prediction time only
    n_slices: int
    predictions: list[np.ndarray] = field(default_factory=list)  # per slab, with keep_predictions

    @property
    def scores(self) -> dict[str, float]:
        return segmentation_scores(self.confusion, self.class_names)


# The metric name of the TPB density's relative error against the labels: metrics.json
# (``micro_relerr.tpb.density``), a training run's ``val_`` / ``test_`` metrics, a trial's attributes.
TPB_ERROR = "micro_relerr.tpb.density"


def slab_microstructure(evaluation: Evaluation, slabs: Sequence[Slab], task: str | Task) -> tuple[MicrostructureResult, MicrostructureResult]:
    """(predicted, true) microstructure of the first slab (voxel units), from an evaluation that
    kept its predictions."""
    phase_map = dict(enumerate(evaluation.class_names))
    return measure(evaluation.predictions[0], phase_map), measure(slabs[0].targets(task), phase_map)


def has_tpb(class_names: Sequence[str]) -> bool:
    """Whether labels of these classes have a triple-phase boundary (the 3-phase task)."""
    return set(TPB_PHASES) <= {name.lower() for name in class_names}


def tpb_error(evaluation: Evaluation, slabs: Sequence[Slab], task: str | Task) -> float:
    """Relative error of the first slab's predicted TPB density against its labels' (NaN where
    the labels hold none)."""
    predicted, true = (flatten_metrics(r) for r in slab_microstructure(evaluation, slabs, task))
    return float(relative_errors(predicted, true).get("tpb.density", np.nan))


def slab_confusion(slab: Slab, classes: np.ndarray, task: str | Task, start: int | None = None) -> np.ndarray:
    """Confusion matrix of predicted task ``classes`` for slices ``start..`` of ``slab`` (default:
    the slab's first) against the slab's labels: how every socseg score, and the benchmarks'
    baselines, count pixels. Unlabelled pixels (sparse labels: class :data:`IGNORE`) are not counted."""
    start = slab.z_range[0] if start is None else start
    stop = start + len(classes)
    if not slab.z_range[0] <= start < stop <= slab.z_range[1]:
        raise ValueError(f"slices {start}:{stop} are not in slab {slab.name} {slab.z_range}")
    volume, task = slab.volume, get_task(task)
    truth = task.targets(volume.class_index(slice(start, stop)), volume.class_names)
    labelled = truth != IGNORE
    return confusion_matrix(truth, classes, len(task.class_names(volume.class_names)),
                            mask=None if labelled.all() else labelled)


def score_slabs(
    predictor: Predictor,
    slabs: Sequence[Slab],
    task: str | Task | None = None,
    keep_predictions: bool = False,
    grey_ranges: Mapping[str, GreyRange] | None = None,
    options: InferenceOptions = InferenceOptions(),
) -> Evaluation:
    """Score ``predictor`` on ``slabs`` (one confusion matrix over all of them).

    ``task`` defaults to the model's; a ``phases`` model can also be scored on ``ni``
    (:meth:`Task.model_class_lut` maps its classes).
    ``options`` override the model's ``tta`` / ``step_fraction`` / ``window`` (validation during
    training uses whole-slice passes without TTA, whatever the served settings).

    Each slab is scored with one request resolved on its whole volume: a per_volume model maps
    the volume's grey range (the function and the volume training normalised it with, and what
    ``socseg segment`` estimates on a whole input), so the scores are what users get.
    ``grey_ranges`` (volume name -> range) gives ranges already estimated (validation, every epoch).
    """
    config = predictor.config
    model_task = get_task(config.task)
    task = get_task(task or model_task)
    model_to_task = task.model_class_lut(model_task, config.class_names)  # None: the model's own task
    if not slabs:
        raise ValueError("no slices to score")
    class_names = task.class_names(slabs[0].volume.class_names)
    cm = np.zeros((len(class_names),) * 2, dtype=np.int64)
    seconds, n_slices, predictions = 0.0, 0, []
    for slab in slabs:
        volume = slab.volume
        if volume.labels is None:
            raise ValueError(f"volume {slab.name!r} has no labels: nothing to score against")
        expected = model_task.class_names(volume.class_names)
        if expected != config.class_names:
            raise ValueError(f"model classes {config.class_names} do not match volume {slab.name!r} "
                             f"(phases {volume.class_names} give {expected})")
        start, stop = slab.z_range
        if not 0 <= start < stop <= volume.image.shape[0]:
            raise ValueError(f"slices {start}:{stop} outside volume {slab.name!r} with {volume.image.shape[0]} slices")
        kept = np.empty((stop - start, *volume.image.shape[1:]), np.uint8) if keep_predictions else None
        began = time.perf_counter()
        known = (grey_ranges or {}).get(slab.name, options.grey_range)  # the options' own range unless given here
        request = predictor.request(replace(options, grey_range=known), source=volume.image, check_range=False)
        for chunk, classes in predictor.iter_volume(volume.image, slab.z_range, SCORING_CHUNK, request):
            seconds += time.perf_counter() - began
            if model_to_task is not None:  # e.g. a phases model scored on Ni vs rest
                classes = model_to_task[classes]
            cm += slab_confusion(slab, classes, task, chunk.start)
            if kept is not None:
                kept[chunk.start - start : chunk.stop - start] = classes
            began = time.perf_counter()
        n_slices += stop - start
        if kept is not None:
            predictions.append(kept)
    return Evaluation(class_names, cm, seconds, n_slices, predictions)


def parse_slices(text: str | None, n_slices: int) -> tuple[int, int]:
    """``"START:STOP"`` (either may be empty, negatives count from the end) -> [start, stop)."""
    if text is None or not str(text).strip():
        return 0, n_slices
    start, sep, stop = str(text).partition(":")
    if not sep:
        raise ValueError(f"bad slice range {text!r}: expected START:STOP, e.g. 160:200")
    try:
        rng = range(n_slices)[slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)]
    except ValueError:
        raise ValueError(f"bad slice range {text!r}: expected integers START:STOP") from None
    if rng.step != 1 or len(rng) == 0:
        raise ValueError(f"slice range {text!r} selects no slices of a volume with {n_slices}")
    return rng.start, rng.stop


def evaluate_model(
    model_uri: str,
    volume: Volume | str | os.PathLike,
    task: str | Task | None = None,
    z_range: tuple[int, int] | None = None,
    tta: bool | None = None,
) -> dict[str, Any]:
    """Per-class IoU/Dice, mean IoU, accuracy and Ni fraction error of a logged model on a volume
    (``socseg evaluate``).

    ``volume`` is a :class:`Volume` or a socseg volume directory; ``z_range`` [start, stop) limits
    the slices (default: all). ``tta`` None: the model's setting. ``seconds_per_slice`` is
    prediction time only (no loading, no scoring, no first-call tracing).
    """
    if not isinstance(volume, Volume):
        volume = load_volume(Path(volume))
    predictor = load_predictor(model_uri)  # several URIs, comma-separated: their ensemble
    z_range = z_range or (0, volume.image.shape[0])
    tile = predictor.config.tile_size
    warm_up = np.zeros((1, tile, tile), np.float32)  # any grey scale: only the first call's tracing matters
    predictor.probabilities(warm_up, request=predictor.request(InferenceOptions(grey_range=(0.0, 1.0)), check_range=False))
    evaluation = score_slabs(predictor, [Slab(volume, tuple(z_range))], task, options=InferenceOptions(tta=tta))
    start, stop = z_range
    return {
        "model_uri": model_uri,
        "volume": volume.meta.name,
        "z_range": [int(start), int(stop)],
        "n_slices": int(stop - start),
        "slice_shape": [int(s) for s in volume.image.shape[1:]],
        "task": get_task(task or predictor.config.task).name,
        "class_names": evaluation.class_names,
        "tta": predictor.config.tta if tta is None else bool(tta),
        **evaluation.scores,
        "seconds_per_slice": evaluation.seconds / evaluation.n_slices,
        "confusion": evaluation.confusion.tolist(),
    }
