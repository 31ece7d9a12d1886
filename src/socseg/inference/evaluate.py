"""Score any logged socseg model on any labelled volume with the training code's own metrics.

The numbers are the ones training reports (same tiling, thresholding and confusion-matrix code in
:mod:`socseg.model.metrics`), plus the Ni volume fraction error: what a microstructure study derived
from the segmentation would get wrong, whatever the pixel IoU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from socseg.data.context import n_channels
from socseg.inference.window import Predict, predict_probabilities, with_tta
from socseg.model.metrics import confusion_matrix, probabilities_to_classes, scores_from_confusion
from socseg.data.tasks import NI_PHASE, check_task, task_class_names, task_targets
from socseg.data.volumes import Volume, load_volume

# Slices predicted per chunk: bounds the (Z, H, W, C) float32 probabilities held at once.
_CHUNK_SLICES = 8


def ni_fraction_error(y_true: np.ndarray, y_pred: np.ndarray, ni_class: int) -> float:
    """|predicted - true| fraction of pixels in class ``ni_class`` (0.01 = one percentage point)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"need two non-empty arrays of one shape, got {y_true.shape} and {y_pred.shape}")
    return abs(float(np.mean(y_pred == ni_class)) - float(np.mean(y_true == ni_class)))


def segmentation_scores(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """:func:`~socseg.model.metrics.scores_from_confusion` plus true/predicted Ni fraction and their error.

    Fractions come from the confusion matrix (row sums are the truth, column sums the prediction),
    so they cover exactly the pixels that were scored.
    """
    names = list(class_names)
    cm = np.asarray(cm, dtype=np.int64)
    scores = scores_from_confusion(cm, names)
    if NI_PHASE in names and cm.sum() > 0:
        k = names.index(NI_PHASE)
        true, pred = cm[k].sum() / cm.sum(), cm[:, k].sum() / cm.sum()
        scores.update(ni_fraction_true=float(true), ni_fraction_pred=float(pred), ni_fraction_error=float(abs(pred - true)))
    return scores


@dataclass
class Segmenter:
    """A loaded model: ``predict`` maps raw grey tiles ``(B, s, s, 2k + 1)`` float32 to probabilities."""

    predict: Predict
    task: str
    class_names: list[str]
    phase_map: dict[int, str]
    tile_size: int
    context_slices: int = 0  # k: 2.5D models see k neighbouring slices on each side


def load_segmenter(model_uri: str) -> Segmenter:
    """Load a model logged by ``socseg.training.train``: the Keras network (``runs:/.../model``) or the pyfunc
    segmenter that the registry holds (``models:/socseg-ni@champion``). Either way the network is
    scored tile by tile with the fixed tiling, as during training.
    """
    import mlflow

    import socseg.model.losses  # noqa: F401  (registers the custom objects the saved model names)
    import socseg.model.metrics  # noqa: F401
    import socseg.model.unet  # noqa: F401
    import socseg.data.normalise  # noqa: F401

    info = mlflow.models.get_model_info(model_uri)
    meta = (info.metadata or {}).get("socseg")
    if not meta:
        raise ValueError(f"{model_uri} is not a model logged by socseg train (no 'socseg' metadata)")
    if "keras" in info.flavors:
        model = mlflow.keras.load_model(model_uri)
    else:
        wrapped = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
        model = getattr(wrapped, "model", None)
        if model is None:
            raise ValueError(f"{model_uri} is neither socseg's Keras model nor its pyfunc segmenter")
    return Segmenter(
        predict=model.predict_on_batch,
        task=check_task(str(meta["task"])),
        class_names=list(meta["class_names"]),
        phase_map={int(k): str(v) for k, v in meta["phase_map"].items()},
        tile_size=int(meta["tile_size"]),
        context_slices=int(meta.get("context_slices", 0)),
    )


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


def evaluate_segmenter(
    segmenter: Segmenter,
    volume: Volume,
    task: str | None = None,
    z_range: tuple[int, int] | None = None,
    batch_size: int = 8,
    tta: bool = False,
) -> dict[str, Any]:
    """Scores of an already loaded model on ``volume[z_range]`` (see :func:`evaluate_model`)."""
    task = check_task(task or segmenter.task)
    if volume.labels is None:
        raise ValueError(f"volume {volume.meta.name!r} has no labels: nothing to evaluate against")
    if task != segmenter.task and not (task == "ni" and segmenter.task == "phases"):
        raise ValueError(f"a {segmenter.task!r} model cannot be scored on task {task!r}")
    phase_names = volume.class_names
    class_names = task_class_names(task, phase_names)
    expected = task_class_names(segmenter.task, phase_names)
    if expected != segmenter.class_names:
        raise ValueError(
            f"model classes {segmenter.class_names} do not match volume {volume.meta.name!r} "
            f"(phases {phase_names} give {expected})"
        )
    start, stop = z_range or (0, volume.image.shape[0])
    if not 0 <= start < stop <= volume.image.shape[0]:
        raise ValueError(f"slices {start}:{stop} outside volume {volume.meta.name!r} with {volume.image.shape[0]} slices")
    predict = with_tta(segmenter.predict) if tta else segmenter.predict
    ni_index = segmenter.class_names.index(NI_PHASE)
    # Warm-up: the first calls trace the graph; keep that out of the time per slice.
    channels = n_channels(segmenter.context_slices)
    for n in {1, batch_size}:
        predict(np.zeros((n, segmenter.tile_size, segmenter.tile_size, channels), np.float32))
    cm = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    seconds = 0.0
    for a in range(start, stop, _CHUNK_SLICES):
        b = min(a + _CHUNK_SLICES, stop)
        began = time.perf_counter()
        # 2.5D context comes from the whole volume: the slices around the scored range are real.
        probs = predict_probabilities(
            predict, volume.image, segmenter.tile_size, batch_size,
            context_slices=segmenter.context_slices, slices=range(a, b),
        )
        classes = probabilities_to_classes(probs, segmenter.task)
        seconds += time.perf_counter() - began
        if task != segmenter.task:  # a phases model scored on Ni vs rest
            classes = (classes == ni_index).astype(np.uint8)
        targets = task_targets(volume.class_index(slice(a, b)), task, phase_names)
        cm += confusion_matrix(targets, classes, len(class_names))
    return {
        "volume": volume.meta.name,
        "z_range": [int(start), int(stop)],
        "n_slices": int(stop - start),
        "slice_shape": [int(s) for s in volume.image.shape[1:]],
        "task": task,
        "class_names": class_names,
        "tta": bool(tta),
        **segmentation_scores(cm, class_names),
        "seconds_per_slice": seconds / (stop - start),
        "confusion": cm.tolist(),
    }



def evaluate_model(
    model_uri: str,
    volume: Volume | str | os.PathLike,
    task: str | None = None,
    z_range: tuple[int, int] | None = None,
    batch_size: int = 8,
    tta: bool = False,
) -> dict[str, Any]:
    """Per-class IoU/Dice, mean IoU, accuracy and Ni fraction error of a logged model on a volume.

    ``volume`` is a :class:`Volume` or a socseg volume directory; ``z_range`` [start, stop) limits
    the slices (default: all). ``task`` defaults to the model's; a ``phases`` model can also be
    scored on ``ni``. The model sees raw grey values (it carries its normalisation).
    ``seconds_per_slice`` is prediction time only (no loading, no scoring).
    """
    if not isinstance(volume, Volume):
        volume = load_volume(Path(volume))
    result = evaluate_segmenter(load_segmenter(model_uri), volume, task, z_range, batch_size, tta)
    return {"model_uri": model_uri, **result}
