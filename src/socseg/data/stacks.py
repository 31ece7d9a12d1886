"""Grey and label stacks as files: streamed reading of grey slices, atomic writing of label stacks.

:class:`SliceReader` reads a multi-page TIFF, a folder of slice TIFFs or a socseg volume
directory a few slices at a time; :class:`LabelStackWriter` writes a label stack so that it
appears complete or not at all; :func:`load_labels` reads any label stack back with its phase
map (the one ``socseg segment`` recorded, or the one given).

A label stack is a compressed multi-page TIFF (axes ZYX, uint8 label values) whose first page's
JSON description records the phase map (label value -> class), the model and the input.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import tifffile

from socseg import __version__
from socseg.data.volumes import (
    IMAGE_FILE,
    LABELS_FILE,
    META_FILE,
    VolumeError,
    VolumeMeta,
    check_image_array,
    check_not_colour,
    format_phase_map,
    normalise_phase_map,
    page_colour,
    read_slice_file,
    read_stack,
    slices_by_index,
)

TIFF_SUFFIXES = (".tif", ".tiff")


HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")
ZARR_SUFFIXES = (".zarr",)


def split_hdf5_path(text: str | os.PathLike) -> tuple[Path, str] | None:
    """``"scan.h5:/entry/data/data"`` -> (file, dataset path); None for anything that is not HDF5.

    The NeXus / synchrotron convention: a file and the path of the 3-D dataset inside it.
    """
    text = str(text)
    for suffix in HDF5_SUFFIXES:
        marker = text.lower().find(suffix + ":")
        if marker >= 0:
            cut = marker + len(suffix)
            return Path(text[:cut]), text[cut + 1 :] or "/"
        if text.lower().endswith(suffix):
            return Path(text), ""
    return None


def open_zarr_array(path: str | os.PathLike, mode: str = "r") -> Any:
    """The 3-D array of a Zarr store: the array itself, or an (OME-)Zarr group's full-resolution
    level (its first multiscales dataset, else its only array)."""
    import zarr

    try:
        node = zarr.open(str(path), mode=mode)
    except Exception as exc:  # zarr raises many types for missing or corrupt stores
        raise VolumeError(f"{path}: not a readable Zarr store ({type(exc).__name__}: {exc})") from None
    if isinstance(node, zarr.Array):
        return node
    attrs = dict(node.attrs)
    multiscales = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    if multiscales:
        return node[multiscales[0]["datasets"][0]["path"]]
    arrays = [name for name, _ in node.arrays()]
    if len(arrays) == 1:
        return node[arrays[0]]
    raise VolumeError(f"{path}: a Zarr group without OME multiscales metadata and with {len(arrays)} arrays "
                      f"({', '.join(sorted(arrays)) or 'none'}): name the array, e.g. {path}/<array>")


class SliceReader:
    """Grey slices of a multi-page TIFF, a folder of slice TIFFs, a socseg volume directory, an
    HDF5 dataset (``scan.h5:/entry/data/data``) or a Zarr / OME-Zarr array, read a few at a time
    (HDF5 and Zarr lazily, chunk by chunk: never the whole volume). Use as a context manager (a
    TIFF or HDF5 file stays open while streaming)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tif: tifffile.TiffFile | None = None
        self._h5: Any = None
        self._lazy: Any = None  # an h5py dataset or a zarr array: sliced on demand
        self._files: list[Path] = []
        self._whole: np.ndarray | None = None
        source = self.path
        hdf5 = split_hdf5_path(path)
        if hdf5 is not None:
            self._open_hdf5(*hdf5)
            source = hdf5[0]
        elif source.suffix.lower() in ZARR_SUFFIXES or (source / "zarr.json").is_file() or (source / ".zarray").is_file():
            self._open_lazy(open_zarr_array(source), source)
        else:
            if source.is_dir() and (source / META_FILE).is_file():
                source = source / IMAGE_FILE
            if source.is_dir():
                files = [p for p in source.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES]
                if not files:
                    raise VolumeError(f"{source}: no .tif/.tiff files")
                self._files = [p for _, p in slices_by_index(files, "image")]
                first, _ = read_slice_file(self._files[0])
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

    def _open_hdf5(self, file: Path, dataset: str) -> None:
        import h5py

        if not file.is_file():
            raise VolumeError(f"{file}: no such HDF5 file")
        try:
            self._h5 = h5py.File(file, "r")
        except OSError as exc:
            raise VolumeError(f"{file}: not a readable HDF5 file ({exc})") from None
        if not dataset:
            found: list[str] = []
            self._h5.visititems(lambda name, node: found.append(name) if isinstance(node, h5py.Dataset) and node.ndim == 3 else None)
            self.close()
            raise VolumeError(f"{file}: name the dataset, e.g. {file}:/{found[0] if found else 'entry/data/data'}"
                              + (f" (3-D datasets: {', '.join(found)})" if found else " (it holds no 3-D dataset)"))
        node = self._h5.get(dataset)
        if not isinstance(node, h5py.Dataset):
            self.close()
            raise VolumeError(f"{file}: no dataset {dataset!r}" + (" (that is a group)" if node is not None else ""))
        try:
            self._open_lazy(node, Path(f"{file}:{dataset}"))
        except VolumeError:
            self.close()
            raise

    def _open_lazy(self, array: Any, where: Path) -> None:
        if len(array.shape) != 3:
            raise VolumeError(f"{where}: expected a 3-D (Z, Y, X) grey volume, got shape {tuple(array.shape)}")
        self._lazy = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)

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
        elif self._lazy is not None:
            batch = np.asarray(self._lazy[start:stop])
        elif self._tif is not None:
            try:
                batch = np.stack([series.asarray(key=k) for series, k in self._keys[start:stop]])
            except Exception as exc:
                raise VolumeError(f"{self.path}: cannot read slices {start}-{stop - 1} ({exc})") from None
        else:
            arrays = []
            for path in self._files[start:stop]:
                array, _ = read_slice_file(path)
                if array.shape != self.shape[1:] or array.dtype != self.dtype:
                    raise VolumeError(
                        f"{path}: slice is {array.shape} {array.dtype} but {self._files[0].name} is "
                        f"{self.shape[1:]} {self.dtype}"
                    )
                arrays.append(array)
            batch = np.stack(arrays)
        check_image_array(batch, self.path)
        return batch

    def read_all_labels(self) -> np.ndarray:
        """The whole stack, unchecked as grey values (a label volume from HDF5 or Zarr)."""
        if self._lazy is None:
            raise VolumeError(f"{self.path}: not an HDF5 dataset or a Zarr array")
        return np.asarray(self._lazy[:])

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> "SliceReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- writing


def check_paths(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Refuse what would lose data, before any slow work: OUTPUT must be a new ``.tif`` (or
    ``overwrite``), or a ``.zarr`` store (an existing one is resumed, see
    :class:`socseg.data.chunked.ChunkedLabels`), never INPUT itself nor inside an INPUT folder."""
    hdf5 = split_hdf5_path(source)
    source, output = (hdf5[0] if hdf5 else Path(source)), Path(output)
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
        import warnings

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
    with tifffile.TiffFile(path) as tif:
        text = tif.pages[0].description or "{}"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}




@dataclass
class LabelVolume:
    """Labels plus what the metrics need from ``volume.json`` (phase map, voxel size)."""

    name: str
    labels: np.ndarray
    phase_map: dict[int, str]
    voxel_size_nm: float | None


def load_labels(path: str | Path, phase_map: dict[int, str] | None, default_phase_map: Mapping[int, str]) -> LabelVolume:
    """Read a volume directory's ``labels.tif`` or a bare label stack (TIFF, folder of TIFFs, a
    Zarr store ``socseg segment`` wrote, an HDF5 dataset ``file.h5:/path``).

    ``phase_map`` overrides the recorded one; a bare stack with none recorded (a TIFF written by
    something else) is read with ``default_phase_map`` (``data.phase_map`` of params.yaml).
    """
    source = Path(path)
    hdf5 = split_hdf5_path(path)
    if hdf5 is not None or _is_zarr(source):
        with SliceReader(path) as reader:  # lazily opened; the metrics need the whole volume
            labels = np.asarray(reader.read_all_labels())
        name = (hdf5[0] if hdf5 else source).stem
        return _with_phase_map(path, name, labels, phase_map, default_phase_map)
    if source.is_dir() and (source / META_FILE).is_file():
        meta = VolumeMeta.from_json((source / META_FILE).read_text(), str(source / META_FILE))
        if not meta.has_labels:
            raise VolumeError(f"{source}: no {LABELS_FILE} (an unlabelled volume: segment it first)")
        try:
            labels = tifffile.imread(source / LABELS_FILE)
        except Exception as exc:  # tifffile raises many types for missing/corrupt files
            raise VolumeError(f"cannot read {source / LABELS_FILE}: {exc}") from None
        labels = labels[np.newaxis] if labels.ndim == 2 else labels
        if labels.shape != tuple(meta.shape):
            raise VolumeError(f"{source / LABELS_FILE}: shape {labels.shape} but {META_FILE} says {tuple(meta.shape)}")
        return LabelVolume(meta.name, labels, phase_map or meta.phase_map, meta.voxel_size_nm)
    return _with_phase_map(source, source.stem or source.name, read_stack(source), phase_map, default_phase_map)


def _is_zarr(path: Path) -> bool:
    return path.suffix.lower() in ZARR_SUFFIXES or (path / "zarr.json").is_file() or (path / ".zarray").is_file()


def _with_phase_map(source: str | Path, name: str, labels: np.ndarray, phase_map: dict[int, str] | None,
                    default_phase_map: Mapping[int, str]) -> LabelVolume:
    if labels.dtype.kind not in "ui":
        raise VolumeError(f"{source}: label stack must hold integer label values, got {labels.dtype}")
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
        if _is_zarr(source):
            import zarr

            recorded = dict(zarr.open_group(str(source), mode="r").attrs).get("socseg", {}).get("phase_map")
        elif source.is_file():
            recorded = read_label_metadata(source).get("phase_map")
        else:
            return None
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
                    default_phase_map: Mapping[int, str]) -> "Volume":
    """A grey stack and a label stack from separate inputs (any :class:`SliceReader` input and
    any :func:`load_labels` input: TIFF, folders, HDF5, Zarr) as one labelled volume, in memory."""
    from socseg.data.volumes import Volume

    with SliceReader(image) as reader:
        grey = reader.read(0, reader.shape[0])
    truth = load_labels(labels, phase_map, default_phase_map)
    if truth.labels.shape != grey.shape:
        raise VolumeError(f"{labels}: labels of shape {truth.labels.shape} for an image of shape {grey.shape}")
    meta = VolumeMeta(name=truth.name, shape=grey.shape, image_dtype=grey.dtype.name, phase_map=dict(truth.phase_map),
                      source=f"{image} + {labels}", has_labels=True)
    return Volume(grey, np.asarray(truth.labels, dtype=np.uint8), meta)
