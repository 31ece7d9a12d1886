"""A label volume in a Zarr store, written z-chunk by z-chunk and resumable.

The output of ``socseg segment ... OUTPUT.zarr`` (one process or a Dask cluster), laid out as
OME-NGFF 0.5 (Zarr format 3) expects a segmented image, so that OME-Zarr viewers (napari-ome-zarr,
the socseg napari plugin, webKnossos, Neuroglancer) show the grey image with the phases over it,
named and coloured::

    OUTPUT.zarr/            image group: ``ome.multiscales`` -> ``0`` (the grey input, as read)
        0                   grey image (z, y, x), the input's dtype
        labels/             ``ome.labels = ["phases"]``
            phases/         label image: ``ome.multiscales`` -> ``0`` and ``ome.image-label``
                0           label values (uint8), e.g. 0 / 128 / 255 = pore / YSZ / Ni
        complete            one flag per z-chunk (see below)
        probabilities       optional: class probabilities x 255, uint8 (z, y, x, class)
        uncertainty         optional: normalised entropy x 255, uint8 (z, y, x)

``image-label`` gives each label value its phase's colour (:mod:`socseg.data.phases`) and its
phase name; the root's ``socseg`` attributes hold the phase map, the model, the input, the run's
settings and ``layout`` (:data:`LAYOUT`). Stores of socseg 0.1 before this layout (no ``layout``
attribute: the labels were the root image ``0``, no grey image) still open, and an interrupted
one still resumes in its own layout.

Resumable and idempotent: an array ``complete`` holds one flag per z-chunk, each in a Zarr chunk
of its own, set only after that z-chunk's labels (and grey slices) are written. A rerun writes only
the chunks not flagged; a chunk whose writer died half-way is not flagged, so it is written again.
Tasks write disjoint Zarr chunks, so any number of processes can write one store at once.

zarr is imported inside the methods that open a store, not at module level: importing it costs
every CLI command start-up time, and only ``.zarr`` outputs need it.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from socseg import __version__
from socseg.data.phases import phase_colours, rgba
from socseg.data.volumes import VolumeError

LAYOUT = 2  # the ``socseg.layout`` of stores with the OME-NGFF labels group; absent: the first layout
IMAGE = "0"  # the grey image (layout 2); in the first layout this path held the labels
LABEL_NAME = "phases"  # the label image's name under ``labels/``
LABELS = f"labels/{LABEL_NAME}/0"
OLD_LABELS = "0"
OME_VERSION = "0.5"
COMPLETE = "complete"
PROBABILITIES = "probabilities"  # optional: class probabilities x 255, uint8 (z, y, x, class)
UNCERTAINTY = "uncertainty"  # optional: normalised entropy of the probabilities x 255, uint8 (z, y, x)
# Zarr chunks split each z-chunk in y and x too, so a reader of a small region reads little.
PLANE_CHUNK = 1024


class ChunkedLabels:
    """Open with :meth:`create_or_resume` (the client) or :meth:`open` (a worker)."""

    def __init__(self, group: Any):
        self.group = group
        self.layout = int(dict(group.attrs.get("socseg", {})).get("layout", 1))
        self.labels = group[LABELS if self.layout >= LAYOUT else OLD_LABELS]
        self.image = group[IMAGE] if self.layout >= LAYOUT else None  # the grey slices, where kept
        self.complete = group[COMPLETE]
        names = {name for name, _ in group.arrays()}
        self.probabilities = group[PROBABILITIES] if PROBABILITIES in names else None
        self.uncertainty = group[UNCERTAINTY] if UNCERTAINTY in names else None
        self.shape = tuple(int(n) for n in self.labels.shape)
        self.chunk_depth = int(self.labels.chunks[0])
        self.n_chunks = math.ceil(self.shape[0] / self.chunk_depth)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ChunkedLabels":
        import zarr

        try:
            return cls(zarr.open_group(str(path), mode="r+"))
        except (KeyError, FileNotFoundError, ValueError) as exc:
            raise VolumeError(f"{path}: not a socseg label store ({type(exc).__name__}: {exc})") from None

    @classmethod
    def create_or_resume(
        cls,
        path: str | os.PathLike,
        shape: tuple[int, int, int],
        chunk_depth: int,
        run: Mapping[str, Any],
        metadata: Mapping[str, Any],
        voxel_size_nm: float | None = None,
        overwrite: bool = False,
        n_classes: int = 0,
        image_dtype: Any = None,
    ) -> "ChunkedLabels":
        """A new store, or the existing one when it was made by the same ``run`` (model, input,
        shape, chunking, prediction settings): its flagged chunks are kept. A store made by another
        run is refused unless ``overwrite`` (then it is deleted first). ``image_dtype``: the grey
        input's dtype, kept as the root image (None: the first layout, labels only)."""
        import zarr

        path = Path(path)
        run = dict(run)
        if path.exists() and overwrite:
            shutil.rmtree(path)
        if path.exists():
            store = cls.open(path)
            recorded = dict(store.group.attrs.get("socseg", {})).get("run")
            if recorded != run:
                differs = sorted(k for k in set(run) | set(recorded or {}) if (recorded or {}).get(k) != run.get(k))
                raise VolumeError(f"{path} was written by another run (differs in: {', '.join(differs) or 'everything'}): "
                                  "use --overwrite to replace it, or another OUTPUT")
            return store
        phase_map = {int(k): str(v) for k, v in dict(metadata.get("phase_map", {})).items()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(str(path), mode="w-", zarr_format=3)
            z, y, x = shape
            plane = (chunk_depth, min(y, PLANE_CHUNK), min(x, PLANE_CHUNK))
            layout = LAYOUT if image_dtype is not None else 1
            if layout >= LAYOUT:
                group.create_array(IMAGE, shape=shape, dtype=np.dtype(image_dtype), fill_value=0, chunks=plane,
                                   dimension_names=("z", "y", "x"))
            group.create_array(LABELS if layout >= LAYOUT else OLD_LABELS, shape=shape, dtype="uint8", fill_value=0,
                               chunks=plane, dimension_names=("z", "y", "x"))
            group.create_array(COMPLETE, shape=(math.ceil(z / chunk_depth),), dtype="uint8", fill_value=0, chunks=(1,))
            if n_classes:
                group.create_array(PROBABILITIES, shape=(*shape, n_classes), dtype="uint8", fill_value=0,
                                   chunks=(*plane, n_classes), dimension_names=("z", "y", "x", "c"))
                group.create_array(UNCERTAINTY, shape=shape, dtype="uint8", fill_value=0, chunks=plane,
                                   dimension_names=("z", "y", "x"))
        except OSError as exc:
            raise VolumeError(f"{path}: cannot create the Zarr store ({exc})") from None
        socseg = {**dict(metadata), "run": run, "socseg_version": __version__}
        if layout >= LAYOUT:
            group.attrs.update({"ome": _multiscales("image", voxel_size_nm), "socseg": {**socseg, "layout": layout}})
            group["labels"].attrs.update({"ome": {"version": OME_VERSION, "labels": [LABEL_NAME]}})
            group[f"labels/{LABEL_NAME}"].attrs.update({"ome": {
                **_multiscales(LABEL_NAME, voxel_size_nm), "image-label": image_label_metadata(phase_map)}})
        else:
            group.attrs.update({"ome": _multiscales("labels", voxel_size_nm), "socseg": socseg})
        return cls(group)

    def chunk(self, index: int) -> tuple[int, int]:
        """Slices ``[start, stop)`` of z-chunk ``index``."""
        if not 0 <= index < self.n_chunks:
            raise IndexError(f"chunk {index} outside 0..{self.n_chunks - 1}")
        start = index * self.chunk_depth
        return start, min(start + self.chunk_depth, self.shape[0])

    def pending(self) -> list[int]:
        """The z-chunks not yet recorded as complete."""
        return [int(i) for i in np.flatnonzero(np.asarray(self.complete[:]) == 0)]

    def write(self, index: int, labels: np.ndarray, probabilities: np.ndarray | None = None,
              uncertainty: np.ndarray | None = None, image: np.ndarray | None = None) -> None:
        """Write z-chunk ``index`` (and, where the store keeps them, its grey slices ``image``, its
        uint8 class probabilities and uncertainty: :func:`socseg.analysis.uncertainty.quantise`d),
        then record it complete (never the other way round)."""
        start, stop = self.chunk(index)
        labels = np.asarray(labels, dtype=np.uint8)
        if labels.shape != (stop - start, *self.shape[1:]):
            raise VolumeError(f"labels of shape {labels.shape} for chunk {index} of shape {(stop - start, *self.shape[1:])}")
        if self.image is not None:
            if image is None or np.shape(image) != labels.shape:
                raise VolumeError(f"chunk {index}: this store keeps the grey image; give its {labels.shape} slices")
            self.image[start:stop] = image
        if self.probabilities is not None:
            if probabilities is None or uncertainty is None:
                raise VolumeError(f"chunk {index}: this store keeps probabilities and uncertainty, none were given")
            self.probabilities[start:stop] = probabilities
            self.uncertainty[start:stop] = uncertainty
        self.labels[start:stop] = labels
        self.complete[index] = 1

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs.get("socseg", {}))

    def record(self, **entries: Any) -> None:
        """Add facts learnt while the chunks were written (e.g. the runtimes that made them) to the
        store's socseg attributes."""
        self.group.attrs["socseg"] = {**self.attrs, **entries}


def _multiscales(name: str, voxel_size_nm: float | None) -> dict[str, Any]:
    """OME-NGFF ``multiscales`` of one full-resolution level ``0`` (axes z, y, x; micrometres
    when the voxel size is known, else unitless)."""
    scale = [voxel_size_nm / 1000.0] * 3 if voxel_size_nm else [1.0, 1.0, 1.0]
    unit = {"unit": "micrometer"} if voxel_size_nm else {}
    return {"version": OME_VERSION, "multiscales": [{
        "name": name,
        "axes": [{"name": axis, "type": "space", **unit} for axis in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }]}


def image_label_metadata(phase_map: Mapping[int, str], source: str | None = "../../") -> dict[str, Any]:
    """OME-NGFF ``image-label``: each label value's phase colour and name, and (``source``) the
    grey image it labels: the store's root, seen from ``labels/<name>``."""
    values = sorted(phase_map)
    colours = phase_colours([phase_map[v] for v in values])
    return {"version": OME_VERSION,
            "colors": [{"label-value": int(v), "rgba": rgba(c)} for v, c in zip(values, colours)],
            "properties": [{"label-value": int(v), "phase": phase_map[v]} for v in values],
            **({"source": {"image": source}} if source else {})}


def write_label_store(path: str | os.PathLike, labels: np.ndarray, phase_map: Mapping[int, str],
                      record: Mapping[str, Any] | None = None, voxel_size_nm: float | None = None) -> None:
    """A label volume alone as an OME-Zarr label image (``multiscales`` and ``image-label`` at the
    root, the labels in ``0``) with the phase map in its ``socseg`` attributes: what the napari
    plugin saves a painted Labels layer as. ``path`` must not exist."""
    import zarr

    labels = np.asarray(labels, dtype=np.uint8)
    z, y, x = labels.shape
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    group.create_array(OLD_LABELS, data=labels, chunks=(min(z, 16), min(y, PLANE_CHUNK), min(x, PLANE_CHUNK)),
                       dimension_names=("z", "y", "x"))
    group.attrs.update({
        "ome": {**_multiscales("labels", voxel_size_nm), "image-label": image_label_metadata(phase_map, source=None)},
        "socseg": {**dict(record or {}), "phase_map": {str(k): v for k, v in sorted(phase_map.items())},
                   "socseg_version": __version__},
    })
