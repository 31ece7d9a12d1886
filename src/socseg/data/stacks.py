"""Grey and label stacks as files: streamed reading of grey slices, atomic writing of label stacks.

:class:`SliceReader` reads any input format (see :mod:`socseg.data.formats`: a multi-page TIFF, a
folder of slice TIFFs, a socseg volume directory, an HDF5 dataset or a Zarr / OME-Zarr array) a
few slices at a time and :func:`read_stack` whole; :class:`LabelStackWriter` writes a label stack
so that it appears complete or not at all; :func:`load_labels` reads any label stack back with
its phase map (the one ``socseg segment`` recorded, or the one given).

A label stack is a compressed multi-page TIFF (axes ZYX, uint8 label values) whose first page's
JSON description records the phase map (label value -> class), the model and the input.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import tifffile

from socseg import __version__
from socseg.data.formats import (
    MULTIPAGE_TIFF,
    TIFF_SUFFIXES,
    ZARR_SUFFIXES,
    InputFormat,
    detect_format,
    on_disk,
)
from socseg.data.volumes import (
    IMAGE_DTYPES,
    Volume,
    VolumeError,
    VolumeMeta,
    check_image_array,
    format_phase_map,
    normalise_phase_map,
)

# A bare label stack holds label values 0-255 (or a 16-bit image of them), as a grey stack would.
LABEL_DTYPES = ("uint8", "uint16")


class SliceReader:
    """Grey slices of any input format (:func:`~socseg.data.formats.detect_format`), read a few at
    a time (HDF5 and Zarr lazily, chunk by chunk: never the whole volume) and checked as grey
    values. Use as a context manager (a TIFF or HDF5 file stays open while streaming)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.format: InputFormat = detect_format(path)
        self._source = self.format.open(str(path))
        self.shape: tuple[int, int, int] = self._source.shape
        self.dtype: np.dtype = self._source.dtype
        if self.dtype.name not in IMAGE_DTYPES:
            self.close()
            raise VolumeError(f"{self._source.where}: image dtype {self.dtype} not allowed "
                              f"(allowed: {', '.join(IMAGE_DTYPES)})")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Slices ``[start, stop)`` as ``(n, H, W)``, checked (dtype, shape, NaN/inf)."""
        batch = self._source.read(start, stop)
        check_image_array(batch, self.path)
        return batch

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> "SliceReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_stack(path: str | os.PathLike[str]) -> np.ndarray:
    """The whole grey stack ``(Z, Y, X)`` of any input format, in memory, checked as grey values."""
    stack = detect_format(path).read(str(path))
    check_image_array(stack, Path(path))
    return stack


# --------------------------------------------------------------------------- writing


def check_paths(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Refuse what would lose data, before any slow work: OUTPUT must be a new ``.tif`` (or
    ``overwrite``), or a ``.zarr`` store (an existing one is resumed, see
    :class:`socseg.data.chunked.ChunkedLabels`), never INPUT itself nor inside an INPUT folder."""
    source, output = on_disk(source), Path(output)
    zarr_output = output.suffix.lower() in ZARR_SUFFIXES
    if output.suffix.lower() not in TIFF_SUFFIXES and not zarr_output:
        raise VolumeError(f"{output}: OUTPUT must be a .tif/.tiff file (a label stack) or a .zarr store (chunked labels)")
    if not source.exists():
        raise VolumeError(f"{source}: no such file or directory")
    src, out = source.resolve(), output.resolve()
    if out == src or (output.exists() and os.path.samefile(source, output)):
        raise VolumeError(f"{output} is the INPUT: refusing to overwrite the grey volume")
    if source.is_dir() and out.is_relative_to(src):
        raise VolumeError(f"{output} lies inside the INPUT folder {source}: write it elsewhere")
    if zarr_output:
        if output.exists() and not output.is_dir():
            raise VolumeError(f"{output} exists and is not a Zarr store")
        return source, output
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


class ProbabilityStackWriter(LabelStackWriter):
    """Class probabilities, uint8 ``(n, H, W, C)`` per :meth:`write` (P x 255), -> an ImageJ
    hyperstack ``OUTPUT`` (axes ZCYX), streamed and renamed into place like the labels.

    ImageJ's own layout (one uncompressed page per class per slice, contiguous) because it is what
    Fiji opens as a multi-channel stack without Bio-Formats, and napari / tifffile read as an array
    ``(Z, C, H, W)``. Each page's label is its class; ``metadata`` goes into the ImageJ ``Info``
    property as JSON (Fiji: Image > Show Info). Uncompressed, it takes Z*C*H*W bytes; past 4 GiB
    it is a BigTIFF, which Fiji opens through Bio-Formats only.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        shape: tuple[int, int, int],
        class_names: list[str],
        metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    ):
        super().__init__(output, shape, metadata)
        self.class_names = [str(name) for name in class_names]

    def __enter__(self) -> "ProbabilityStackWriter":
        self.output.parent.mkdir(parents=True, exist_ok=True)
        bigtiff = math.prod(self.shape) * len(self.class_names) > 2**32 - 2**25  # data + page headers < 4 GiB
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nonconformant BigTIFF ImageJ")
            self._tif = tifffile.TiffWriter(self.partial, bigtiff=bigtiff, imagej=True)
        return self

    def write(self, probabilities: np.ndarray) -> None:
        assert self._tif is not None, "use ProbabilityStackWriter as a context manager"
        expected = (*self.shape[1:], len(self.class_names))
        for plane in np.asarray(probabilities, dtype=np.uint8):
            if plane.shape != expected:
                raise VolumeError(f"probability slice {self.written} is {plane.shape}, expected {expected}")
            metadata = None
            if self.written == 0:  # ImageJ keeps the first page's metadata for the whole hyperstack
                extra = self.metadata() if callable(self.metadata) else dict(self.metadata or {})
                record = {"shape": [self.shape[0], len(self.class_names), *self.shape[1:]], "axes": "ZCYX",
                          "classes": self.class_names, **dict(extra), "socseg_version": __version__}
                metadata = {"Info": json.dumps(record, default=str), "Labels": self.class_names * self.shape[0]}
            self._tif.write(np.moveaxis(plane, -1, 0), contiguous=True, photometric="minisblack", metadata=metadata)
            self.written += 1


def read_probability_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON record :class:`ProbabilityStackWriter` put in a probability stack's ImageJ ``Info``."""
    with tifffile.TiffFile(path) as tif:
        text = (tif.imagej_metadata or {}).get("Info") or "{}"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


def read_label_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON description :class:`LabelStackWriter` put on a label stack's first page."""
    return MULTIPAGE_TIFF.socseg_record(str(path))


@dataclass
class LabelVolume:
    """Labels plus what the metrics need from ``volume.json`` (phase map, voxel size)."""

    name: str
    labels: np.ndarray
    phase_map: dict[int, str]
    voxel_size_nm: float | None


def load_labels(path: str | Path, phase_map: dict[int, str] | None, default_phase_map: Mapping[int, str]) -> LabelVolume:
    """Read a volume directory's ``labels.tif`` or a bare label stack of any input format (TIFF,
    folder of TIFFs, a Zarr store ``socseg segment`` wrote, an HDF5 dataset ``file.h5:/path``).

    ``phase_map`` overrides the recorded one; a bare stack with none recorded (a TIFF written by
    something else) is read with ``default_phase_map`` (``data.phase_map`` of params.yaml).
    """
    input_format = detect_format(path)
    labels = input_format.read_labels(str(path))
    meta = input_format.volume_meta(str(path))
    if meta is not None:  # a volume directory records its own phase map and voxel size
        return LabelVolume(meta.name, labels, phase_map or meta.phase_map, meta.voxel_size_nm)
    file = on_disk(path)
    return _with_phase_map(path, file.stem or file.name, labels, phase_map, default_phase_map)


def _with_phase_map(source: str | Path, name: str, labels: np.ndarray, phase_map: dict[int, str] | None,
                    default_phase_map: Mapping[int, str]) -> LabelVolume:
    if labels.dtype.kind not in "ui":
        raise VolumeError(f"{source}: label stack must hold integer label values, got {labels.dtype}")
    if labels.dtype.name not in LABEL_DTYPES:
        raise VolumeError(f"{source}: label dtype {labels.dtype} not allowed (allowed: {', '.join(LABEL_DTYPES)})")
    recorded = recorded_phase_map(source)
    if recorded is not None and phase_map is not None and dict(sorted(phase_map.items())) != recorded:
        raise VolumeError(
            f"{source}: --phase-map {format_phase_map(phase_map)} contradicts the phase map recorded in the file "
            f"{format_phase_map(recorded)} (by socseg segment): drop --phase-map to use the recorded one"
        )
    mapping = phase_map or recorded or normalise_phase_map(default_phase_map)
    return LabelVolume(name, labels, mapping, None)


def recorded_phase_map(path: str | Path) -> dict[int, str] | None:
    """The phase map ``socseg segment`` recorded in a label stack's first page or a Zarr store's
    attributes (e.g. {0: rest, 255: ni} for an ``ni`` model), or None (a folder, an HDF5 dataset,
    or a file written by something else)."""
    source = Path(path)
    try:
        recorded = detect_format(path).socseg_record(str(path)).get("phase_map")
    except Exception:  # not written by socseg (a bare array, another TIFF description): nothing recorded
        return None
    if not recorded:
        return None
    if not isinstance(recorded, dict):
        raise VolumeError(f"{source}: the recorded phase_map {recorded!r} is not a mapping of label value -> phase")
    try:
        return normalise_phase_map(recorded)
    except VolumeError as exc:
        raise VolumeError(f"{source}: bad recorded phase_map ({exc})") from None


def labelled_volume(image: str | Path, labels: str | Path, phase_map: dict[int, str] | None,
                    default_phase_map: Mapping[int, str]) -> Volume:
    """A grey stack and a label stack from separate inputs (any :class:`SliceReader` input and
    any :func:`load_labels` input: TIFF, folders, HDF5, Zarr) as one labelled volume, in memory."""
    with SliceReader(image) as reader:
        grey = reader.read(0, reader.shape[0])
    truth = load_labels(labels, phase_map, default_phase_map)
    if truth.labels.shape != grey.shape:
        raise VolumeError(f"{labels}: labels of shape {truth.labels.shape} for an image of shape {grey.shape}")
    meta = VolumeMeta(name=truth.name, shape=grey.shape, image_dtype=grey.dtype.name, phase_map=dict(truth.phase_map),
                      source=f"{image} + {labels}", has_labels=True)
    return Volume(grey, np.asarray(truth.labels, dtype=np.uint8), meta)
