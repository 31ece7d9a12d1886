"""The input formats of grey and label volumes: one ordered table, one detection.

Every reader of a volume or a label stack (:class:`socseg.data.stacks.SliceReader`,
:func:`~socseg.data.stacks.read_stack`, :func:`~socseg.data.stacks.load_labels` and the commands
and services built on them) asks :func:`detect_format` what a path is, so that a path means the
same input everywhere. Each :class:`InputFormat` knows how to recognise a path of its kind and how
to open it: as a :class:`SliceSource` (a few slices at a time) or whole.

:data:`FORMATS` is tried in order and the first format that recognises a path wins, which settles
the ambiguous cases: a path naming an HDF5 file (``scan.h5``, ``scan.h5:/entry/data/data``) is
HDF5 whether or not it exists; a ``.zarr`` path, or a folder holding ``zarr.json`` / ``.zarray``,
is Zarr even when it also holds ``volume.json``; a folder with ``volume.json`` is a socseg volume
directory, any other folder a folder of slice TIFFs; a file is a multi-page TIFF when its name
(``.tif``/``.tiff``) or its first bytes say so. Anything else is refused, naming the path and the
accepted formats.

h5py and zarr are imported inside the functions that open such an input, not at module level:
importing them costs every CLI command start-up time, and most runs read TIFFs only.
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from socseg.data.volumes import (
    IMAGE_FILE,
    LABELS_FILE,
    META_FILE,
    VolumeError,
    VolumeMeta,
    check_not_colour,
    page_colour,
    read_slice_file,
    read_slices,
    read_stored_tiff,
    slices_by_index,
)

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")
ZARR_SUFFIXES = (".zarr",)
# The first four bytes of a classic (42) or BigTIFF (43) file, little- or big-endian.
_TIFF_HEADERS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def split_hdf5_path(text: str | os.PathLike[str]) -> tuple[Path, str] | None:
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


def on_disk(path: str | os.PathLike[str]) -> Path:
    """The file or folder that holds an input: ``scan.h5:/entry/data/data`` -> ``scan.h5``."""
    hdf5 = split_hdf5_path(path)
    return hdf5[0] if hdf5 is not None else Path(path)


def open_zarr_array(path: str | os.PathLike[str], mode: str = "r") -> Any:
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


def open_zarr_labels(path: str | os.PathLike[str]) -> Any:
    """The label array of a Zarr store: an OME-NGFF image's first label image (``labels/<name>``,
    as ``socseg segment`` writes the phases beside the grey image), else what
    :func:`open_zarr_array` opens (a bare label array, or a store of socseg's first layout)."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception:  # missing or corrupt: open_zarr_array says so
        return open_zarr_array(path)
    if isinstance(node, zarr.Group) and "labels" in {name for name, _ in node.groups()}:
        names = (dict(node["labels"].attrs).get("ome") or {}).get("labels") or dict(node["labels"].attrs).get("labels")
        if names:
            return open_zarr_array(Path(str(path)) / "labels" / names[0])
    return open_zarr_array(path)


# --------------------------------------------------------------------------- opened inputs


class SliceSource(ABC):
    """An opened input: its shape ``(Z, Y, X)`` and dtype, and its slices as stored, on demand
    (unchecked: :class:`socseg.data.stacks.SliceReader` checks grey values)."""

    where: Path  # what messages name
    shape: tuple[int, int, int]
    dtype: np.dtype

    @abstractmethod
    def read(self, start: int, stop: int) -> np.ndarray:
        """Slices ``[start, stop)`` as ``(n, Y, X)``."""

    def close(self) -> None:
        """Release open files (a TIFF or HDF5 file stays open while streaming)."""

    def __enter__(self) -> "SliceSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TiffPages(SliceSource):
    """The pages of a multi-page TIFF, decoded a few at a time (the file stays open)."""

    def __init__(self, source: Path):
        self.where = source
        self._tif: tifffile.TiffFile | None = None
        self._whole: np.ndarray | None = None
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
        if self._whole is not None:
            return self._whole[start:stop]
        try:
            return np.stack([series.asarray(key=k) for series, k in self._keys[start:stop]])
        except Exception as exc:  # tifffile raises many types for corrupt pages
            raise VolumeError(f"{self.where}: cannot read slices {start}-{stop - 1} ({exc})") from None

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None


class SliceFiles(SliceSource):
    """One 2-D TIFF per slice, ordered by slice number, read a few files at a time."""

    def __init__(self, folder: Path):
        self.where = folder
        self._files = _slice_files(folder)
        first, _ = read_slice_file(self._files[0])
        if first.ndim != 2:
            raise VolumeError(f"{self._files[0]}: expected one 2-D grey slice, got shape {first.shape}")
        self.shape = (len(self._files), *first.shape)
        self.dtype = first.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        arrays = []
        for path in self._files[start:stop]:
            array, _ = read_slice_file(path)
            if array.shape != self.shape[1:] or array.dtype != self.dtype:
                raise VolumeError(
                    f"{path}: slice is {array.shape} {array.dtype} but {self._files[0].name} is "
                    f"{self.shape[1:]} {self.dtype}"
                )
            arrays.append(array)
        return np.stack(arrays)


class ArraySlices(SliceSource):
    """A 3-D h5py dataset or zarr array, sliced on demand: chunk by chunk, never the whole volume."""

    def __init__(self, array: Any, where: Path, file: Any = None):
        self.where = where
        self._file = file  # an open h5py.File, closed with this source
        if len(array.shape) != 3:
            raise VolumeError(f"{where}: expected a 3-D (Z, Y, X) grey volume, got shape {tuple(array.shape)}")
        self._array = array
        self.shape = tuple(int(n) for n in array.shape)  # type: ignore[assignment]
        self.dtype = np.dtype(array.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._array[start:stop])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _slice_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES]
    if not files:
        raise VolumeError(f"{folder}: no .tif/.tiff files (accepted inputs: {accepted_formats()})")
    return [p for _, p in slices_by_index(files, "image")]


# --------------------------------------------------------------------------- the formats


class InputFormat(ABC):
    """One kind of input: how to recognise a path of it, and how to open or read it."""

    name: str  # what messages call it, e.g. "a multi-page TIFF"
    example: str  # a path of this kind, e.g. "scan.tif"

    def __str__(self) -> str:
        return f"{self.name} ({self.example})"

    @abstractmethod
    def recognises(self, path: str) -> bool:
        """Whether ``path`` is of this format (called in :data:`FORMATS` order; the first one wins)."""

    @abstractmethod
    def open(self, path: str) -> SliceSource:
        """The input, opened to be read a few slices at a time (close it, or use it in ``with``)."""

    def read(self, path: str) -> np.ndarray:
        """The whole stack ``(Z, Y, X)`` in memory, as stored: checking its grey values is the
        caller's (decoding a TIFF refuses a colour image, as opening one does)."""
        with self.open(path) as source:
            return source.read(0, source.shape[0])

    def read_labels(self, path: str) -> np.ndarray:
        """The label stack ``path`` holds, whole, as stored (label values unchecked)."""
        return self.read(path)

    def volume_meta(self, path: str) -> VolumeMeta | None:
        """What a socseg volume directory records about the volume (name, phase map, voxel
        size); None for the formats that record none."""
        return None

    def socseg_record(self, path: str) -> dict[str, Any]:
        """What ``socseg segment`` recorded with the labels it wrote (e.g. the phase map): a
        TIFF's first-page JSON description or a Zarr store's ``socseg`` attributes; empty where
        the format records nothing. Raises when the file cannot be read."""
        return {}


class Hdf5Dataset(InputFormat):
    name = "an HDF5 dataset"
    example = "scan.h5:/entry/data/data"

    def recognises(self, path: str) -> bool:
        return split_hdf5_path(path) is not None

    def open(self, path: str) -> SliceSource:
        import h5py

        file, dataset = split_hdf5_path(path)  # type: ignore[misc]
        if not file.is_file():
            raise VolumeError(f"{file}: no such HDF5 file")
        try:
            handle = h5py.File(file, "r")
        except OSError as exc:
            raise VolumeError(f"{file}: not a readable HDF5 file ({exc})") from None
        try:
            return ArraySlices(_hdf5_dataset(handle, file, dataset), Path(f"{file}:{dataset}"), handle)
        except BaseException:
            handle.close()
            raise


def _hdf5_dataset(handle: Any, file: Path, dataset: str) -> Any:
    """The dataset ``dataset`` of an open HDF5 file; without one named, the error lists the 3-D ones."""
    import h5py

    if not dataset:
        found: list[str] = []
        handle.visititems(lambda name, node: found.append(name) if isinstance(node, h5py.Dataset) and node.ndim == 3 else None)
        raise VolumeError(f"{file}: name the dataset, e.g. {file}:/{found[0] if found else 'entry/data/data'}"
                          + (f" (3-D datasets: {', '.join(found)})" if found else " (it holds no 3-D dataset)"))
    node = handle.get(dataset)
    if not isinstance(node, h5py.Dataset):
        raise VolumeError(f"{file}: no dataset {dataset!r}" + (" (that is a group)" if node is not None else ""))
    return node


class ZarrArray(InputFormat):
    name = "a Zarr / OME-Zarr array"
    example = "scan.zarr"

    def recognises(self, path: str) -> bool:
        source = Path(path)
        return source.suffix.lower() in ZARR_SUFFIXES or (source / "zarr.json").is_file() or (source / ".zarray").is_file()

    def open(self, path: str) -> SliceSource:
        return ArraySlices(open_zarr_array(path), Path(path))

    def read_labels(self, path: str) -> np.ndarray:
        """An OME-NGFF store's label image (``labels/...``), not its grey image."""
        return np.asarray(open_zarr_labels(path)[:])

    def socseg_record(self, path: str) -> dict[str, Any]:
        import zarr

        return dict(dict(zarr.open_group(str(path), mode="r").attrs).get("socseg", {}))


class VolumeDirectory(InputFormat):
    name = "a socseg volume directory"
    example = f"data/NAME/ holding {META_FILE}"

    def recognises(self, path: str) -> bool:
        return Path(path).is_dir() and (Path(path) / META_FILE).is_file()

    def open(self, path: str) -> SliceSource:
        return TiffPages(Path(path) / IMAGE_FILE)

    def read(self, path: str) -> np.ndarray:
        return read_stored_tiff(Path(path) / IMAGE_FILE, mmap=False)

    def read_labels(self, path: str) -> np.ndarray:
        """Its ``labels.tif``, checked against the shape ``volume.json`` records."""
        root = Path(path)
        meta = self.volume_meta(path)
        assert meta is not None
        if not meta.has_labels:
            raise VolumeError(f"{root}: no {LABELS_FILE} (an unlabelled volume: segment it first)")
        try:
            labels = tifffile.imread(root / LABELS_FILE)
        except Exception as exc:  # tifffile raises many types for missing/corrupt files
            raise VolumeError(f"cannot read {root / LABELS_FILE}: {exc}") from None
        labels = labels[np.newaxis] if labels.ndim == 2 else labels
        if labels.shape != tuple(meta.shape):
            raise VolumeError(f"{root / LABELS_FILE}: shape {labels.shape} but {META_FILE} says {tuple(meta.shape)}")
        return labels

    def volume_meta(self, path: str) -> VolumeMeta | None:
        meta_path = Path(path) / META_FILE
        return VolumeMeta.from_json(meta_path.read_text(), str(meta_path))


class SliceFolder(InputFormat):
    name = "a folder of slice TIFFs"
    example = "slices/, ordered by the number in each file name"

    def recognises(self, path: str) -> bool:
        return Path(path).is_dir()

    def open(self, path: str) -> SliceSource:
        return SliceFiles(Path(path))

    def read(self, path: str) -> np.ndarray:
        """All slices, each checked as it is read (one file may also hold the whole 3-D stack)."""
        stack, _ = read_slices(_slice_files(Path(path)), "images")
        return stack


class MultiPageTiff(InputFormat):
    name = "a multi-page TIFF"
    example = "scan.tif"

    def recognises(self, path: str) -> bool:
        source = Path(path)
        if not source.is_file():
            return False
        if source.suffix.lower() in TIFF_SUFFIXES:
            return True
        try:
            with open(source, "rb") as handle:
                return handle.read(4) in _TIFF_HEADERS
        except OSError:  # unreadable: opening it as a TIFF says why
            return True

    def open(self, path: str) -> SliceSource:
        return TiffPages(Path(path))

    def read(self, path: str) -> np.ndarray:
        """Decoded whole; one 2-D image is a stack of one slice."""
        source = Path(path)
        stack, _ = read_slice_file(source)
        if stack.ndim == 2:
            stack = stack[np.newaxis]
        if stack.ndim != 3:
            raise VolumeError(f"{source}: expected a 3-D grey stack, got shape {stack.shape}")
        return stack

    def socseg_record(self, path: str) -> dict[str, Any]:
        with tifffile.TiffFile(path) as tif:
            text = tif.pages[0].description or "{}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return record if isinstance(record, dict) else {}


HDF5_DATASET = Hdf5Dataset()
ZARR_ARRAY = ZarrArray()
VOLUME_DIRECTORY = VolumeDirectory()
SLICE_FOLDER = SliceFolder()
MULTIPAGE_TIFF = MultiPageTiff()

# Detection order (the first that recognises a path wins): named formats before folders, a
# volume directory before a plain folder, a file last (see the module docstring).
FORMATS: tuple[InputFormat, ...] = (HDF5_DATASET, ZARR_ARRAY, VOLUME_DIRECTORY, SLICE_FOLDER, MULTIPAGE_TIFF)


def accepted_formats() -> str:
    """The accepted input formats, for messages (the common ones first)."""
    listed = [str(f) for f in reversed(FORMATS)]
    return ", ".join(listed[:-1]) + f" or {listed[-1]}"


def detect_format(path: str | os.PathLike[str]) -> InputFormat:
    """The format of ``path`` (see :data:`FORMATS`); a :class:`VolumeError` naming the path and
    the accepted formats when none recognises it."""
    text = str(path)
    for input_format in FORMATS:
        if input_format.recognises(text):
            return input_format
    if not Path(text).exists():
        raise VolumeError(f"{text}: no such file or directory (accepted inputs: {accepted_formats()})")
    raise VolumeError(f"{text}: not an input socseg reads (accepted inputs: {accepted_formats()})")
