"""Batch segmentation of whole volumes: stream slices in, label slices out, atomically.

``socseg segment MODEL_URI INPUT OUTPUT`` (the model's predictor, in this process) and
``serving/client.py`` (a running ``mlflow models serve``) share :func:`segment_stream`; only the
function that turns a chunk of grey slices into label slices differs. Guarantees:

* Memory does not grow with depth: INPUT is read ``slice_batch`` slices at a time (a multi-page
  TIFF page by page, a folder file by file) and each label slice is written as soon as it exists.
  Only ``--multi-axis`` needs the whole volume (and its probabilities) in memory.
* OUTPUT appears complete or not at all: labels go to a hidden ``.OUTPUT.partial-*`` file next to
  it, renamed over OUTPUT at the end; any error or Ctrl-C removes it.
* INPUT is never overwritten, and an existing OUTPUT only with ``overwrite``.

OUTPUT is a compressed multi-page TIFF (axes ZYX, uint8 label values) whose first page's JSON
description records the phase map (label value -> class), the model and the input, so
``socseg microstructure OUTPUT.tif`` reads it directly. A socseg volume directory is not written:
it would need the grey image again and could not be streamed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from tqdm import tqdm

from socseg.data.context import iter_chunks
from socseg.data.stacks import LabelStackWriter, SliceReader, check_paths
from socseg.data.volumes import VolumeError

# (slices with context, context before, context after) -> label values of the slices between
PredictChunk = Callable[[np.ndarray, int, int], np.ndarray]


@dataclass
class SegmentResult:
    output: Path
    shape: tuple[int, int, int]
    seconds: float

    @property
    def slices_per_second(self) -> float:
        return self.shape[0] / self.seconds if self.seconds > 0 else float("nan")


def progress_bar(total: int, desc: str, progress: bool, unit: str = "slice") -> tqdm:
    """A progress bar on a terminal only (``disable=None``), so logs and tests stay clean."""
    return tqdm(total=total, desc=desc, unit=unit, disable=None if progress else True)


def segment_stream(
    predict_chunk: PredictChunk,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    context_slices: int,
    slice_batch: int,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> SegmentResult:
    """Segment ``source`` chunk by chunk with ``predict_chunk`` and write the label stack
    ``output`` atomically.

    Each chunk of ``slice_batch`` slices is read with up to ``context_slices`` neighbouring
    slices on either side (:func:`socseg.data.context.iter_chunks`; the model's own
    ``context_slices``), and ``predict_chunk(slices, before, after)`` returns the labels of the
    slices between the ``before`` and ``after`` context slices.
    """
    _, output = check_paths(source, output, overwrite)
    if slice_batch < 1:
        raise ValueError(f"slice_batch must be >= 1, got {slice_batch}")
    started = time.perf_counter()
    with SliceReader(source) as reader:  # source as given: an HDF5 path names its dataset
        with LabelStackWriter(output, reader.shape, metadata) as writer, progress_bar(reader.shape[0], "segment", progress) as bar:
            for chunk in iter_chunks(reader.shape[0], slice_batch, context_slices):
                stack = reader.read(chunk.read.start, chunk.read.stop)
                labels = np.asarray(predict_chunk(stack, chunk.before, chunk.after))
                expected = (chunk.size, *stack.shape[1:])
                if labels.shape != expected:
                    raise VolumeError(f"the model returned labels of shape {labels.shape} for slices {expected}")
                writer.write(labels)
                bar.update(chunk.size)
        shape = reader.shape
    return SegmentResult(output, shape, time.perf_counter() - started)


def segment(
    model_uri: str,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    slice_batch: int,
    overwrite: bool = False,
    tta: bool | None = None,
    step_fraction: float | None = None,
    multi_axis: bool = False,
    progress: bool = True,
    allow_out_of_range: bool = False,
) -> SegmentResult:
    """Segment a volume with the model at ``model_uri`` in this process (no server).

    ``tta`` / ``step_fraction`` None: the model's settings. Each chunk whose grey values mostly
    lie outside the model's normalisation range is refused
    (:meth:`~socseg.inference.predictor.Predictor.check_grey_range`) unless ``allow_out_of_range``.
    """
    from socseg.inference.predictor import Predictor

    check_paths(source, output, overwrite)  # fail fast, before loading the model
    predictor = Predictor.load(model_uri)
    config = predictor.config
    window = {"tta": tta, "step_fraction": step_fraction}
    metadata = {
        "phase_map": {str(k): v for k, v in config.label_phase_map.items()},
        "task": config.task,
        "model_uri": model_uri,
        "source": str(source),
        "tta": config.tta if tta is None else bool(tta),
        "step_fraction": config.step_fraction if step_fraction is None else float(step_fraction),
        "multi_axis": multi_axis,
        "allow_out_of_range": bool(allow_out_of_range),
    }

    def checked(images: np.ndarray) -> np.ndarray:
        if not allow_out_of_range:
            predictor.check_grey_range(images)
        return images

    if not multi_axis:
        def labels(stack: np.ndarray, before: int, after: int) -> np.ndarray:
            return predictor.to_labels(predictor.classes(checked(stack), before, after, **window))

        return segment_stream(labels, source, output, context_slices=predictor.context_slices,
                              slice_batch=slice_batch, overwrite=overwrite, metadata=metadata, progress=progress)

    # Multi-axis: z, y and x planes averaged (volume-segmantics); holds the volume in memory.
    _, output = check_paths(source, output, overwrite)
    started = time.perf_counter()
    with SliceReader(source) as reader:
        # Checked chunk by chunk, as without --multi-axis: a few slices on another grey scale are
        # refused even when the rest of the volume would dilute them below the limit.
        volume = np.empty(reader.shape, reader.dtype)
        for start in range(0, reader.shape[0], slice_batch):
            stop = min(start + slice_batch, reader.shape[0])
            volume[start:stop] = checked(reader.read(start, stop))
    z, y, x = volume.shape
    with progress_bar(z + y + x, "segment (3 axes)", progress) as bar:
        probs = predictor.multi_axis_probabilities(volume, chunk=slice_batch, progress=bar.update, **window)
    del volume
    with LabelStackWriter(output, probs.shape[:3], metadata) as writer:
        for start in range(0, z, slice_batch):
            writer.write(predictor.to_labels(predictor.to_classes(probs[start : start + slice_batch])))
    return SegmentResult(output, (z, y, x), time.perf_counter() - started)
