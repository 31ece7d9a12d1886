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

Beside a ``.tif`` OUTPUT, ``probabilities`` / ``uncertainty`` (``--probabilities PATH.tif``,
``--uncertainty PATH.tif``) are written the same way, chunk by chunk, with the same guarantees:

* probabilities: an ImageJ hyperstack (axes ZCYX, one channel per class in the model's class
  order, uint8 = P x 255; :class:`~socseg.data.stacks.ProbabilityStackWriter`): Fiji opens it as
  a multi-channel stack, ``tifffile.imread`` / napari give ``(Z, C, H, W)``;
* uncertainty: a compressed multi-page TIFF (axes ZYX) of the normalised entropy of the class
  probabilities x 255 (0 = sure, 255 = every class equally likely;
  :mod:`socseg.analysis.uncertainty`), whose description records ``"content": "uncertainty"``:
  ``socseg suggest-slices`` ranks its slices.

All outputs are renamed into place only after the last slice, labels last.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from tqdm import tqdm

from socseg.analysis.uncertainty import (
    PROBABILITIES_CONTENT,
    UNCERTAINTY_CONTENT,
    class_probabilities,
    normalised_entropy,
    quantise,
)
from socseg.data.context import iter_chunks
from socseg.data.stacks import TIFF_SUFFIXES, LabelStackWriter, ProbabilityStackWriter, SliceReader, check_paths
from socseg.data.volumes import VolumeError

# (slices with context, context before, context after) -> label values of the slices between; with
# probability or uncertainty outputs, (labels, the predictor's probabilities (n, H, W, C)) instead
PredictChunk = Callable[[np.ndarray, int, int], Any]


@dataclass
class SegmentResult:
    output: Path
    shape: tuple[int, int, int]
    seconds: float
    probabilities: Path | None = None
    uncertainty: Path | None = None

    @property
    def slices_per_second(self) -> float:
        return self.shape[0] / self.seconds if self.seconds > 0 else float("nan")


def progress_bar(total: int, desc: str, progress: bool, unit: str = "slice") -> tqdm:
    """A progress bar on a terminal only (``disable=None``), so logs and tests stay clean."""
    return tqdm(total=total, desc=desc, unit=unit, disable=None if progress else True)


def check_side_outputs(
    source: str | os.PathLike,
    output: str | os.PathLike,
    probabilities: str | os.PathLike | None = None,
    uncertainty: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> tuple[Path | None, Path | None]:
    """The probability and uncertainty paths of a ``.tif`` OUTPUT, refused before any slow work
    when one would lose data or could not be written: not a ``.tif``/``.tiff``, INPUT (or inside
    an INPUT folder), OUTPUT or the other one, or an existing file without ``overwrite``."""
    taken = {Path(output).resolve(): "OUTPUT"}
    checked: list[Path | None] = []
    for option, path in (("--probabilities", probabilities), ("--uncertainty", uncertainty)):
        if path is None:
            checked.append(None)
            continue
        path = Path(path)
        if path.suffix.lower() not in TIFF_SUFFIXES:
            raise VolumeError(f"{option} {path}: must be a .tif/.tiff file")
        if path.resolve() in taken:
            raise VolumeError(f"{option} {path} is also the {taken[path.resolve()]}: give each output its own file")
        try:
            check_paths(source, path, overwrite)
        except VolumeError as exc:
            raise VolumeError(f"{option} {exc}") from None
        taken[path.resolve()] = option
        checked.append(path)
    return checked[0], checked[1]


class OutputWriters:
    """The label stack and, where asked, the probability and uncertainty stacks of one run,
    written chunk by chunk. Each goes through its own partial file; the labels are renamed into
    place last, so an OUTPUT that exists has its probabilities and uncertainty complete beside it.
    """

    def __init__(
        self,
        output: Path,
        shape: tuple[int, int, int],
        metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None,
        probabilities: Path | None = None,
        uncertainty: Path | None = None,
        class_names: list[str] | None = None,
    ):
        if probabilities is not None and not class_names:
            raise ValueError("writing probabilities needs the model's class names (one channel each)")
        self.output, self.shape, self.metadata = output, shape, metadata
        self.probabilities, self.uncertainty, self.class_names = probabilities, uncertainty, class_names
        self._stack = contextlib.ExitStack()

    @property
    def wants_probabilities(self) -> bool:
        return self.probabilities is not None or self.uncertainty is not None

    def _side_metadata(self, content: str, values: str) -> Callable[[], dict[str, Any]]:
        """The run's metadata without the phase map (these are not label stacks), plus what the values mean."""

        def record() -> dict[str, Any]:
            base = self.metadata() if callable(self.metadata) else dict(self.metadata or {})
            return {**{k: v for k, v in base.items() if k != "phase_map"}, "content": content, "values": values}

        return record

    def __enter__(self) -> "OutputWriters":
        with self._stack as stack:  # entered first, left last: the labels are renamed last
            self.labels = stack.enter_context(LabelStackWriter(self.output, self.shape, self.metadata))
            self.probability_writer = self.uncertainty_writer = None
            if self.probabilities is not None:
                self.probability_writer = stack.enter_context(ProbabilityStackWriter(
                    self.probabilities, self.shape, list(self.class_names or []),
                    self._side_metadata(PROBABILITIES_CONTENT, "class probability x 255")))
            if self.uncertainty is not None:
                self.uncertainty_writer = stack.enter_context(LabelStackWriter(
                    self.uncertainty, self.shape,
                    self._side_metadata(UNCERTAINTY_CONTENT, "normalised entropy x 255: 0 sure, 255 every class equally likely")))
            self._stack = stack.pop_all()
        return self

    def write(self, labels: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        """One chunk: label values ``(n, H, W)`` and, where asked, the predictor's probabilities ``(n, H, W, C)``."""
        labels = np.asarray(labels)
        if self.wants_probabilities:
            if probabilities is None or np.shape(probabilities)[:3] != labels.shape:
                raise VolumeError(f"probabilities of shape {np.shape(probabilities)} for labels of shape {labels.shape}")
            classes = class_probabilities(probabilities)
            if self.probability_writer is not None:
                self.probability_writer.write(quantise(classes))
            if self.uncertainty_writer is not None:
                self.uncertainty_writer.write(quantise(normalised_entropy(classes)))
        self.labels.write(labels)

    def __exit__(self, *exc: Any) -> bool:
        return self._stack.__exit__(*exc)


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
    probabilities: str | os.PathLike | None = None,
    uncertainty: str | os.PathLike | None = None,
    class_names: list[str] | None = None,
) -> SegmentResult:
    """Segment ``source`` chunk by chunk with ``predict_chunk`` and write the label stack
    ``output`` atomically.

    Each chunk of ``slice_batch`` slices is read with up to ``context_slices`` neighbouring
    slices on either side (:func:`socseg.data.context.iter_chunks`; the model's own
    ``context_slices``), and ``predict_chunk(slices, before, after)`` returns the labels of the
    slices between the ``before`` and ``after`` context slices; with ``probabilities`` and/or
    ``uncertainty`` (paths of ``.tif`` files, see the module doc) it returns ``(labels,
    probabilities)``, and ``class_names`` names the probability channels.
    """
    _, output = check_paths(source, output, overwrite)
    probabilities, uncertainty = check_side_outputs(source, output, probabilities, uncertainty, overwrite)
    if slice_batch < 1:
        raise ValueError(f"slice_batch must be >= 1, got {slice_batch}")
    started = time.perf_counter()
    with SliceReader(source) as reader:  # source as given: an HDF5 path names its dataset
        writers = OutputWriters(output, reader.shape, metadata, probabilities, uncertainty, class_names)
        with writers, progress_bar(reader.shape[0], "segment", progress) as bar:
            for chunk in iter_chunks(reader.shape[0], slice_batch, context_slices):
                stack = reader.read(chunk.read.start, chunk.read.stop)
                predicted = predict_chunk(stack, chunk.before, chunk.after)
                labels, probs = predicted if writers.wants_probabilities else (predicted, None)
                labels = np.asarray(labels)
                expected = (chunk.size, *stack.shape[1:])
                if labels.shape != expected:
                    raise VolumeError(f"the model returned labels of shape {labels.shape} for slices {expected}")
                writers.write(labels, probs)
                bar.update(chunk.size)
        shape = reader.shape
    return SegmentResult(output, shape, time.perf_counter() - started, probabilities, uncertainty)


def segment(
    model_uri: str,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    slice_batch: int,
    overwrite: bool = False,
    tta: bool | None = None,
    step_fraction: float | None = None,
    window: str | None = None,
    multi_axis: bool = False,
    progress: bool = True,
    allow_out_of_range: bool = False,
    probabilities: str | os.PathLike | None = None,
    uncertainty: str | os.PathLike | None = None,
    grey_range: tuple[float, float] | None = None,
) -> SegmentResult:
    """Segment a volume with the model at ``model_uri`` in this process (no server).

    ``grey_range`` (low, high): the input's grey values mapped onto the model's normalisation
    range, for every chunk alike. None: a per_volume model estimates it on the whole input first
    (:meth:`~socseg.inference.predictor.Predictor.volume_grey_range`, one streamed pass over a
    sample of slices; a constant or all-NaN input is refused before anything is written); a
    fixed model takes raw values.

    ``probabilities`` / ``uncertainty``: also write the class probabilities / their normalised
    entropy to these ``.tif`` files (see the module doc), from the probabilities the labels come from.

    ``tta`` / ``step_fraction`` / ``window`` None: the model's settings. Each chunk whose grey values mostly
    lie outside the model's normalisation range is refused
    (:meth:`~socseg.inference.predictor.Predictor.check_grey_range`) unless ``allow_out_of_range``.
    """
    from socseg.inference.predictor import Predictor

    check_paths(source, output, overwrite)  # fail fast, before loading the model
    probabilities, uncertainty = check_side_outputs(source, output, probabilities, uncertainty, overwrite)
    predictor = Predictor.load(model_uri)
    config = predictor.config
    if grey_range is None and predictor.per_volume:
        with SliceReader(source) as reader:
            grey_range = predictor.volume_grey_range(reader)
    overrides = {"tta": tta, "step_fraction": step_fraction, "window": window, "grey_range": grey_range}
    metadata = {
        "phase_map": {str(k): v for k, v in config.label_phase_map.items()},
        "task": config.task,
        "model_uri": model_uri,
        "source": str(source),
        "tta": config.tta if tta is None else bool(tta),
        "step_fraction": config.step_fraction if step_fraction is None else float(step_fraction),
        "window": config.window if window is None else window,
        "multi_axis": multi_axis,
        "allow_out_of_range": bool(allow_out_of_range),
        "normalisation_mode": config.normalisation_mode,
        "grey_range": None if grey_range is None else [float(v) for v in grey_range],
    }

    sides = {"probabilities": probabilities, "uncertainty": uncertainty, "class_names": list(config.class_names)}
    if not multi_axis:
        def labels(stack: np.ndarray, before: int, after: int) -> Any:
            probs = predictor.probabilities(stack, before, after, check_range=not allow_out_of_range, **overrides)
            values = predictor.to_labels(predictor.to_classes(probs))
            return (values, probs) if probabilities is not None or uncertainty is not None else values

        return segment_stream(labels, source, output, context_slices=predictor.context_slices,
                              slice_batch=slice_batch, overwrite=overwrite, metadata=metadata, progress=progress, **sides)

    # Multi-axis: z, y and x planes averaged (volume-segmantics); holds the volume in memory.
    _, output = check_paths(source, output, overwrite)
    started = time.perf_counter()
    with SliceReader(source) as reader:
        # Checked chunk by chunk, as without --multi-axis: a few slices on another grey scale are
        # refused even when the rest of the volume would dilute them below the limit.
        volume = np.empty(reader.shape, reader.dtype)
        for start in range(0, reader.shape[0], slice_batch):
            stop = min(start + slice_batch, reader.shape[0])
            volume[start:stop] = reader.read(start, stop)
            if not allow_out_of_range:
                predictor.check_grey_range(volume[start:stop], grey_range)
    z, y, x = volume.shape
    with progress_bar(z + y + x, "segment (3 axes)", progress) as bar:
        probs = predictor.multi_axis_probabilities(volume, chunk=slice_batch, progress=bar.update, **overrides)
    del volume
    with OutputWriters(output, probs.shape[:3], metadata, **sides) as writers:
        for start in range(0, z, slice_batch):
            chunk = probs[start : start + slice_batch]
            writers.write(predictor.to_labels(predictor.to_classes(chunk)), chunk)
    return SegmentResult(output, (z, y, x), time.perf_counter() - started, probabilities, uncertainty)
