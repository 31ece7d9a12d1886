"""Batch segmentation of whole volumes: stream slices in, label slices out, atomically.

``socseg segment MODEL_URI INPUT OUTPUT`` (local pyfunc) and ``serving/client.py`` (a running
``mlflow models serve``) share this module; only the function that turns a batch of grey slices
into label slices differs. Guarantees:

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

import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import tifffile
from tqdm import tqdm

from socseg import __version__
from socseg.data.context import halo as context_halo
from socseg.data.volumes import (
    IMAGE_FILE,
    META_FILE,
    VolumeError,
    _by_index,
    _check_image_array,
    _decode,
    check_not_colour,
    page_colour,
)

PredictBatch = Callable[[np.ndarray], np.ndarray]
TIFF_SUFFIXES = (".tif", ".tiff")


# --------------------------------------------------------------------------- reading


class SliceReader:
    """Grey slices of a multi-page TIFF, a folder of slice TIFFs or a socseg volume directory,
    read a few at a time. Use as a context manager (a TIFF file stays open while streaming)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tif: tifffile.TiffFile | None = None
        self._files: list[Path] = []
        self._whole: np.ndarray | None = None
        source = self.path
        if source.is_dir() and (source / META_FILE).is_file():
            source = source / IMAGE_FILE
        if source.is_dir():
            files = [p for p in source.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES]
            if not files:
                raise VolumeError(f"{source}: no .tif/.tiff files")
            self._files = [p for _, p in _by_index(files, "image")]
            first, _ = _decode(self._files[0])
            if first.ndim != 2:
                raise VolumeError(f"{self._files[0]}: expected one 2-D grey slice, got shape {first.shape}")
            self.shape = (len(self._files), *first.shape)
            self.dtype = first.dtype
        elif source.is_file():
            self._open_tiff(source)
        else:
            raise VolumeError(f"{source}: no such file or directory")
        if self.dtype.name not in ("uint8", "uint16", "float32"):
            raise VolumeError(f"{source}: image dtype {self.dtype} not allowed (allowed: uint8, uint16, float32)")

    def _open_tiff(self, source: Path) -> None:
        try:
            self._tif = tifffile.TiffFile(source)
            all_series = list(self._tif.series)
            series = all_series[0]
        except Exception as exc:  # tifffile raises many types for corrupt files
            self.close()
            raise VolumeError(f"{source}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
        shape, axes = tuple(series.shape), series.axes
        try:
            check_not_colour(source, shape, *page_colour(series.pages[0] if series.pages else self._tif.pages[0]))
        except VolumeError:
            self.close()
            raise
        if len(shape) < 2 or axes[-2:] != "YX":
            self.close()
            raise VolumeError(f"{source}: not a stack of grey slices (axes {axes}, shape {shape})")
        # Pages written one by one, each with its own shape description, read as one series per
        # page: all series of the same slice shape and dtype are the stack, in file order.
        stack = [s for s in all_series if s.shape[-2:] == shape[-2:] and s.dtype == series.dtype and s.axes[-2:] == "YX"]
        self._keys = [(s, k) for s in stack for k in range(math.prod(s.shape[:-2]))]
        self.shape = (len(self._keys), *shape[-2:])
        self.dtype = np.dtype(series.dtype)
        if any(len(s.pages) != math.prod(s.shape[:-2]) for s in stack):  # e.g. a 3-D block in one page
            self._whole = np.concatenate([s.asarray().reshape(-1, *shape[-2:]) for s in stack])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Slices ``[start, stop)`` as ``(n, H, W)``, checked (dtype, shape, NaN/inf)."""
        if self._whole is not None:
            batch = self._whole[start:stop]
        elif self._tif is not None:
            try:
                batch = np.stack([series.asarray(key=k) for series, k in self._keys[start:stop]])
            except Exception as exc:
                raise VolumeError(f"{self.path}: cannot read slices {start}-{stop - 1} ({exc})") from None
        else:
            arrays = []
            for path in self._files[start:stop]:
                array, _ = _decode(path)
                if array.shape != self.shape[1:] or array.dtype != self.dtype:
                    raise VolumeError(
                        f"{path}: slice is {array.shape} {array.dtype} but {self._files[0].name} is "
                        f"{self.shape[1:]} {self.dtype}"
                    )
                arrays.append(array)
            batch = np.stack(arrays)
        _check_image_array(batch, self.path)
        return batch

    def halo_batches(self, size: int, halo: int) -> Iterator[tuple[int, np.ndarray, int, int]]:
        """``(start, slices, before, after)``: batches of ``size`` slices with up to ``halo``
        neighbouring slices on each side (fewer at the volume's ends), for 2.5D models."""
        z = self.shape[0]
        for start in range(0, z, size):
            stop = min(start + size, z)
            before, after = context_halo(start, stop, z, halo)
            yield start, self.read(start - before, stop + after), before, after

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self) -> "SliceReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- writing


def check_paths(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Refuse what would lose data, before any slow work: OUTPUT must be a new ``.tif`` (or
    ``overwrite``), never INPUT itself nor inside an INPUT folder."""
    source, output = Path(source), Path(output)
    if output.suffix.lower() not in TIFF_SUFFIXES:
        raise VolumeError(f"{output}: OUTPUT must be a .tif/.tiff file (a label stack)")
    if not source.exists():
        raise VolumeError(f"{source}: no such file or directory")
    src, out = source.resolve(), output.resolve()
    if out == src or (output.exists() and os.path.samefile(source, output)):
        raise VolumeError(f"{output} is the INPUT: refusing to overwrite the grey volume")
    if source.is_dir() and out.is_relative_to(src):
        raise VolumeError(f"{output} lies inside the INPUT folder {source}: write it elsewhere")
    if output.is_dir():
        raise VolumeError(f"{output} is a directory")
    if output.exists() and not overwrite:
        raise VolumeError(f"{output} already exists (use --overwrite to replace it)")
    return source, output


class LabelStackWriter:
    """Label slices -> ``OUTPUT`` via a hidden partial file renamed at the end (see module doc).

    ``metadata`` (a mapping or a callable returning one, asked at the first slice, e.g. once a
    server has said its phase map) goes into the first page's JSON description.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        shape: tuple[int, int, int],
        metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    ):
        self.output = Path(output)
        self.shape = tuple(int(s) for s in shape)
        self.metadata = metadata
        self.partial = self.output.parent / f".{self.output.name}.partial-{uuid.uuid4().hex[:8]}{self.output.suffix}"
        self.written = 0
        self._tif: tifffile.TiffWriter | None = None

    def __enter__(self) -> "LabelStackWriter":
        self.output.parent.mkdir(parents=True, exist_ok=True)
        bigtiff = math.prod(self.shape) > 2**31  # classic TIFF offsets stop at 4 GiB
        self._tif = tifffile.TiffWriter(self.partial, bigtiff=bigtiff)
        return self

    def write(self, labels: np.ndarray) -> None:
        assert self._tif is not None, "use LabelStackWriter as a context manager"
        for page in np.asarray(labels, dtype=np.uint8):
            if page.shape != self.shape[1:]:
                raise VolumeError(f"label slice {self.written} is {page.shape}, expected {self.shape[1:]}")
            description = None
            if self.written == 0:
                extra = self.metadata() if callable(self.metadata) else dict(self.metadata or {})
                record = {"shape": list(self.shape), "axes": "ZYX", **dict(extra), "socseg_version": __version__}
                description = json.dumps(record, default=str)
            self._tif.write(
                page, photometric="minisblack", compression="zlib", description=description, metadata=None
            )
            self.written += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._tif is not None:
                self._tif.close()
            if exc_type is None and self.written != self.shape[0]:
                raise VolumeError(f"wrote {self.written} label slices, expected {self.shape[0]}")
            if exc_type is None:
                os.replace(self.partial, self.output)
        finally:
            if self.partial.exists():
                self.partial.unlink()


def read_label_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON description :class:`LabelStackWriter` put on a label stack's first page."""
    with tifffile.TiffFile(path) as tif:
        text = tif.pages[0].description or "{}"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


# --------------------------------------------------------------------------- segmenting


@dataclass
class SegmentResult:
    output: Path
    shape: tuple[int, int, int]
    seconds: float

    @property
    def slices_per_second(self) -> float:
        return self.shape[0] / self.seconds if self.seconds > 0 else float("nan")


def _progress(total: int, desc: str, progress: bool) -> tqdm:
    # disable=None: a bar on a terminal only, so logs and tests stay clean.
    return tqdm(total=total, desc=desc, unit="slice", disable=None if progress else True)


def segment_stream(
    predict_batch: PredictBatch,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    slice_batch: int = 8,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    progress: bool = True,
    halo: int = 0,
) -> SegmentResult:
    """Segment ``source`` slice batch by slice batch with ``predict_batch`` ((N, H, W) grey ->
    (N, H, W) labels) and write the label stack ``output`` atomically.

    ``halo`` > 0 (a 2.5D model's ``context_slices``): each batch comes with up to ``halo``
    neighbouring slices on either side and ``predict_batch(slices, before, after)`` returns labels
    for the slices between the ``before`` and ``after`` halo slices only.
    """
    source, output = check_paths(source, output, overwrite)
    if slice_batch < 1:
        raise ValueError(f"slice_batch must be >= 1, got {slice_batch}")
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    started = time.perf_counter()
    with SliceReader(source) as reader:
        with LabelStackWriter(output, reader.shape, metadata) as writer, _progress(reader.shape[0], "segment", progress) as bar:
            for _, batch, before, after in reader.halo_batches(slice_batch, halo):
                labels = np.asarray(predict_batch(batch, before, after) if halo else predict_batch(batch))
                expected = (len(batch) - before - after, *batch.shape[1:])
                if labels.shape != expected:
                    raise VolumeError(f"the model returned labels of shape {labels.shape} for slices {expected}")
                writer.write(labels)
                bar.update(expected[0])
        shape = reader.shape
    return SegmentResult(output, shape, time.perf_counter() - started)


def segment_multi_axis(
    predict_probabilities: PredictBatch,
    to_labels: Callable[[np.ndarray], np.ndarray],
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    slice_batch: int = 8,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
    halo: int = 0,
) -> SegmentResult:
    """Like :func:`segment_stream`, but the probabilities of z, y and x planes are averaged
    (:func:`socseg.inference.window.multi_axis_probabilities`); holds the whole volume in memory."""
    from socseg.inference.window import multi_axis_probabilities

    source, output = check_paths(source, output, overwrite)
    started = time.perf_counter()
    with SliceReader(source) as reader:
        volume = reader.read(0, reader.shape[0])
    z, y, x = volume.shape
    with _progress(z + y + x, "segment (3 axes)", progress) as bar:
        probs = multi_axis_probabilities(
            predict_probabilities, volume, chunk=slice_batch, progress=bar.update, halo=halo
        )
    del volume
    with LabelStackWriter(output, probs.shape[:3], metadata) as writer:
        for start in range(0, z, slice_batch):
            writer.write(to_labels(probs[start : start + slice_batch]))
    return SegmentResult(output, (z, y, x), time.perf_counter() - started)


def segment(
    model_uri: str,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    slice_batch: int | None = None,
    tta: bool | None = None,
    step_fraction: float | None = None,
    multi_axis: bool = False,
    progress: bool = True,
    allow_out_of_range: bool = False,
) -> SegmentResult:
    """Segment a volume with the pyfunc segmenter at ``model_uri``, in this process (no server).

    ``None`` settings come from the model (tta, step) or params.yaml ``inference.slice_batch``.
    Each chunk whose grey values mostly lie outside the model's normalisation range is refused
    (:func:`socseg.inference.pyfunc.check_grey_range`, a ``RequestError``) unless ``allow_out_of_range``.
    """
    import mlflow

    from socseg.params import load_params
    from socseg.model.metrics import probabilities_to_classes
    from socseg.inference.pyfunc import segmenter_metadata
    from socseg.data.tasks import classes_to_label_values

    check_paths(source, output, overwrite)  # fail fast, before loading the model
    if slice_batch is None:
        slice_batch = int((load_params().get("inference") or {}).get("slice_batch", 8))
    model = mlflow.pyfunc.load_model(model_uri)
    config = segmenter_metadata(model)
    params: dict[str, Any] = {}
    if tta is not None:
        params["tta"] = bool(tta)
    if step_fraction is not None:
        params["step_fraction"] = float(step_fraction)
    if allow_out_of_range:
        params["allow_out_of_range"] = True
    metadata = {
        "phase_map": {str(k): v for k, v in config.label_phase_map.items()},
        "task": config.task,
        "model_uri": model_uri,
        "source": str(source),
        "tta": params.get("tta", config.tta),
        "step_fraction": params.get("step_fraction", config.step_fraction),
        "multi_axis": multi_axis,
        "allow_out_of_range": bool(allow_out_of_range),
    }
    halo = config.context_slices  # a 2.5D model gets each chunk's neighbouring slices as context

    def labels(batch: np.ndarray, before: int = 0, after: int = 0, **more: Any) -> Any:
        extra = {"halo_before": before, "halo_after": after} if halo else {}
        return model.predict(batch, params={**params, **extra, **more})

    if not multi_axis:
        return segment_stream(
            labels, source, output, slice_batch=slice_batch, overwrite=overwrite, metadata=metadata,
            progress=progress, halo=halo,
        )

    def planes(batch: np.ndarray, before: int = 0, after: int = 0) -> np.ndarray:
        return labels(batch, before, after, return_probabilities=True)["probabilities"]

    def to_labels(probs: np.ndarray) -> np.ndarray:
        return classes_to_label_values(probabilities_to_classes(probs, config.task), config.task, config.phase_map)

    return segment_multi_axis(
        planes, to_labels, source, output, slice_batch=slice_batch, overwrite=overwrite, metadata=metadata,
        progress=progress, halo=halo,
    )
