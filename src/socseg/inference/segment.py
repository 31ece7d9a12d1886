"""Batch segmentation of whole volumes: stream slices in, label slices out, atomically.

``socseg segment MODEL_URI INPUT OUTPUT`` (the model's predictor, in this process) and
``serving/client.py`` (a running ``mlflow models serve``) share :func:`segment_stream`; only the
function that turns a chunk of grey slices into label slices differs. Guarantees:

* Memory does not grow with depth: INPUT is read ``slice_batch`` slices at a time (with multi-axis
  fusion, ``inference.planes: zyx``, ``fusion_depth`` slices and ``fusion_halo`` more on either side;
  a multi-page TIFF page by page, a folder file by file) and each label slice is written as soon
  as it exists.
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
from dataclasses import dataclass, replace
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
from socseg.inference.predictor import Predictor, load_predictor
from socseg.inference.request import InferenceOptions, InferenceRequest

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
    runtime: str = ""  # what ran the forward passes (socseg.inference.runtime)

    @property
    def slices_per_second(self) -> float:
        return self.shape[0] / self.seconds if self.seconds > 0 else float("nan")


def progress_bar(total: int, desc: str, progress: bool, unit: str = "slice") -> tqdm:
    """A progress bar on a terminal only (``disable=None``), so logs and tests stay clean."""
    return tqdm(total=total, desc=desc, unit=unit, disable=None if progress else True)


@dataclass(frozen=True)
class SegmentOutputs:
    """OUTPUT (the label stack) and, where asked, its probability and uncertainty ``.tif`` files;
    made by :meth:`check` before any slow work."""

    labels: Path
    probabilities: Path | None = None
    uncertainty: Path | None = None
    overwrite: bool = False

    @property
    def wants_probabilities(self) -> bool:
        return self.probabilities is not None or self.uncertainty is not None

    @classmethod
    def check(
        cls, source: str | os.PathLike, output: "str | os.PathLike | SegmentOutputs",
        probabilities: str | os.PathLike | None = None, uncertainty: str | os.PathLike | None = None,
        overwrite: bool = False,
    ) -> "SegmentOutputs":
        """The outputs of segmenting ``source``, refused when one would lose data or could not be
        written: INPUT (or inside an INPUT folder) as an output, an existing file without
        ``overwrite``, a side output that is not a ``.tif``/``.tiff`` or is another output.
        ``output`` may already be a :class:`SegmentOutputs` (checked again against ``source``)."""
        if isinstance(output, SegmentOutputs):
            output, probabilities, uncertainty, overwrite = (output.labels, output.probabilities, output.uncertainty,
                                                             output.overwrite)
        _, labels = check_paths(source, output, overwrite)
        taken = {Path(labels).resolve(): "OUTPUT"}
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
        return cls(Path(labels), checked[0], checked[1], overwrite)


class OutputWriters:
    """The label stack and, where asked, the probability and uncertainty stacks of one run,
    written chunk by chunk. Each goes through its own partial file; the labels are renamed into
    place last, so an OUTPUT that exists has its probabilities and uncertainty complete beside it.
    """

    def __init__(
        self,
        outputs: SegmentOutputs,
        shape: tuple[int, int, int],
        metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None,
        class_names: list[str] | None = None,
    ):
        if outputs.probabilities is not None and not class_names:
            raise ValueError("writing probabilities needs the model's class names (one channel each)")
        self.output, self.shape, self.metadata = outputs.labels, shape, metadata
        self.probabilities, self.uncertainty, self.class_names = outputs.probabilities, outputs.uncertainty, class_names
        self.wants_probabilities = outputs.wants_probabilities
        self._stack = contextlib.ExitStack()

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
    outputs: SegmentOutputs,
    *,
    context: int,
    slice_batch: int,
    metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    class_names: list[str] | None = None,
    progress: bool = True,
) -> SegmentResult:
    """Segment ``source`` chunk by chunk with ``predict_chunk`` and write ``outputs`` atomically.

    Each chunk of ``slice_batch`` slices is read with up to ``context`` neighbouring slices on
    either side (:func:`socseg.data.context.iter_chunks`; what the request needs:
    :meth:`~socseg.inference.request.InferenceRequest.context`), and ``predict_chunk(slices, before, after)`` returns the labels of the
    slices between the ``before`` and ``after`` context slices; when ``outputs`` want
    probabilities or uncertainty (see the module doc) it returns ``(labels, probabilities)``,
    and ``class_names`` names the probability channels.
    """
    outputs = SegmentOutputs.check(source, outputs)
    if slice_batch < 1:
        raise ValueError(f"slice_batch must be >= 1, got {slice_batch}")
    started = time.perf_counter()
    with SliceReader(source) as reader:  # source as given: an HDF5 path names its dataset
        writers = OutputWriters(outputs, reader.shape, metadata, class_names)
        with writers, progress_bar(reader.shape[0], "segment", progress) as bar:
            for chunk in iter_chunks(reader.shape[0], slice_batch, context):
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
    return SegmentResult(outputs.labels, shape, time.perf_counter() - started, outputs.probabilities,
                         outputs.uncertainty)


def segment(
    model_uri: str,
    source: str | os.PathLike,
    outputs: str | os.PathLike | SegmentOutputs,
    options: InferenceOptions = InferenceOptions(),
    *,
    slice_batch: int,
    progress: bool = True,
    runtime: str | None = None,
) -> SegmentResult:
    """Segment a volume with the model at ``model_uri`` in this process (no server); several
    URIs, comma-separated: their :class:`~socseg.inference.predictor.Ensemble` (probabilities averaged).

    ``outputs``: the label stack's path, or a :class:`SegmentOutputs` that also names probability
    and uncertainty ``.tif`` files (see the module doc) and whether existing files are replaced.
    ``options``: the per-call settings (None fields: the model's), the planes fused
    (``options.planes``) among them: chunks are then ``fusion_depth`` slices instead of
    ``slice_batch``, read with ``fusion_halo`` slices on either side. The request is resolved once,
    on the whole input: a per_volume model without ``options.grey_range`` estimates the input's
    range first (one streamed pass over a sample of slices; a constant or all-NaN input is
    refused before anything is written). Each chunk whose grey values mostly lie outside the
    model's normalisation range is refused (:meth:`~socseg.inference.predictor.Predictor.check_grey_range`)
    unless ``options.allow_out_of_range``. ``runtime`` (auto, keras, openvino) overrides the
    model's ``inference.runtime``; the runtime used is recorded in the outputs' metadata.
    """
    outputs = SegmentOutputs.check(source, outputs)  # fail fast, before loading the model
    predictor = load_predictor(model_uri, runtime)
    config = predictor.config
    with SliceReader(source) as reader:
        request = predictor.request(options, source=reader)
    metadata = {
        "phase_map": {str(k): v for k, v in config.label_phase_map.items()},
        "task": config.task.name,
        "model_uri": model_uri,
        "source": str(source),
        **request.record(),
        "normalisation_mode": config.normalisation.mode,
        "runtime": predictor.runtime,
    }
    sides = {"class_names": list(config.class_names)}

    def labels(stack: np.ndarray, before: int, after: int) -> Any:
        probs = predictor.probabilities(stack, before, after, request)
        values = predictor.to_labels(predictor.to_classes(probs))
        return (values, probs) if outputs.wants_probabilities else values

    return replace(segment_stream(labels, source, outputs, context=request.context(predictor.context_slices),
                                  slice_batch=request.chunk_slices(slice_batch), metadata=metadata, progress=progress,
                                  **sides),
                   runtime=predictor.runtime)

