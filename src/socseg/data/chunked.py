"""A label volume in a Zarr store, written z-chunk by z-chunk and resumable.

The output of ``socseg segment ... OUTPUT.zarr`` (one process or a Dask cluster). The store is an
OME-Zarr (0.5, Zarr format 3) image group: the labels are the array ``0`` (uint8 label values,
chunked along z by ``chunk_depth``), its ``ome`` attributes name the axes and the voxel scale, and
its ``socseg`` attributes hold the phase map, the model, the input and the run's settings.

Resumable and idempotent: an array ``complete`` holds one flag per z-chunk, each in a Zarr chunk
of its own, set only after that z-chunk's labels are written. A rerun writes only the chunks not
flagged; a chunk whose writer died half-way is not flagged, so it is written again. Tasks write
disjoint Zarr chunks, so any number of processes can write one store at once.

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
from socseg.data.volumes import VolumeError


LABELS = "0"
COMPLETE = "complete"
PROBABILITIES = "probabilities"  # optional: class probabilities x 255, uint8 (z, y, x, class)
UNCERTAINTY = "uncertainty"  # optional: normalised entropy of the probabilities x 255, uint8 (z, y, x)
# Zarr chunks split each z-chunk in y and x too, so a reader of a small region reads little.
PLANE_CHUNK = 1024


class ChunkedLabels:
    """Open with :meth:`create_or_resume` (the client) or :meth:`open` (a worker)."""

    def __init__(self, group: Any):
        self.group = group
        self.labels = group[LABELS]
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
    ) -> "ChunkedLabels":
        """A new store, or the existing one when it was made by the same ``run`` (model, input,
        shape, chunking, prediction settings): its flagged chunks are kept. A store made by another
        run is refused unless ``overwrite`` (then it is deleted first)."""
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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(str(path), mode="w-", zarr_format=3)
            z, y, x = shape
            group.create_array(LABELS, shape=shape, dtype="uint8", fill_value=0,
                               chunks=(chunk_depth, min(y, PLANE_CHUNK), min(x, PLANE_CHUNK)),
                               dimension_names=("z", "y", "x"))
            group.create_array(COMPLETE, shape=(math.ceil(z / chunk_depth),), dtype="uint8", fill_value=0, chunks=(1,))
            if n_classes:
                plane = (chunk_depth, min(y, PLANE_CHUNK), min(x, PLANE_CHUNK))
                group.create_array(PROBABILITIES, shape=(*shape, n_classes), dtype="uint8", fill_value=0,
                                   chunks=(*plane, n_classes), dimension_names=("z", "y", "x", "c"))
                group.create_array(UNCERTAINTY, shape=shape, dtype="uint8", fill_value=0, chunks=plane,
                                   dimension_names=("z", "y", "x"))
        except OSError as exc:
            raise VolumeError(f"{path}: cannot create the Zarr store ({exc})") from None
        scale = [voxel_size_nm / 1000.0] * 3 if voxel_size_nm else [1.0, 1.0, 1.0]
        unit = {"unit": "micrometer"} if voxel_size_nm else {}
        group.attrs.update({
            "ome": {"version": "0.5", "multiscales": [{
                "name": "labels",
                "axes": [{"name": axis, "type": "space", **unit} for axis in "zyx"],
                "datasets": [{"path": LABELS, "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
            }]},
            "socseg": {**dict(metadata), "run": run, "socseg_version": __version__},
        })
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
              uncertainty: np.ndarray | None = None) -> None:
        """Write z-chunk ``index`` (and, where the store keeps them, its uint8 class probabilities
        and uncertainty: :func:`socseg.analysis.uncertainty.quantise`d), then record it complete
        (never the other way round)."""
        start, stop = self.chunk(index)
        labels = np.asarray(labels, dtype=np.uint8)
        if labels.shape != (stop - start, *self.shape[1:]):
            raise VolumeError(f"labels of shape {labels.shape} for chunk {index} of shape {(stop - start, *self.shape[1:])}")
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
