"""The model's uncertainty: how it is computed and stored, and where to label next.

One definition for every output (a ``.zarr`` store's arrays, the ``--probabilities`` /
``--uncertainty`` TIFFs of ``socseg segment``, the served model's ``return_uncertainty``):
:func:`class_probabilities` (one probability per class), :func:`normalised_entropy` (0 = sure,
1 = every class equally likely) and :func:`quantise` (0..1 -> uint8 0..255, how files store both).

:func:`rank_slices` reads an uncertainty map (a store's ``uncertainty`` array or an uncertainty
TIFF) a few slices at a time, so a volume of any size is ranked in bounded memory. The slices at
the top of the list are the ones worth labelling for fine-tuning (ilastik's "label where it is
uncertain").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tifffile

from socseg.data.chunked import ChunkedLabels
from socseg.data.formats import TIFF_SUFFIXES
from socseg.data.stacks import SliceReader, read_label_metadata
from socseg.data.volumes import VolumeError

UNCERTAINTY_CONTENT = "uncertainty"  # the ``content`` an uncertainty TIFF's description records
PROBABILITIES_CONTENT = "probabilities"
# How many slices of an uncertainty TIFF are read at once while ranking (memory, not results).
_READ_SLICES = 16


def class_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """One probability per class: the ``ni`` task's single P(ni) becomes (rest, ni)."""
    probabilities = np.clip(np.asarray(probabilities, dtype=np.float32), 0.0, 1.0)
    if probabilities.shape[-1] == 1:
        return np.concatenate([1.0 - probabilities, probabilities], axis=-1)
    return probabilities


def normalised_entropy(classes: np.ndarray) -> np.ndarray:
    """Entropy of per-class probabilities over log(classes): 0 where the model is sure, 1 where
    every class is equally likely. Where it is high is where labelling a slice helps most."""
    p = np.clip(classes, 1e-7, 1.0)
    return np.clip(-(p * np.log(p)).sum(axis=-1) / np.log(classes.shape[-1]), 0.0, 1.0)


def uncertainty(probabilities: np.ndarray) -> np.ndarray:
    """Normalised entropy (float32, 0..1) of a predictor's probabilities ``(..., C)``, C = 1 included."""
    return normalised_entropy(class_probabilities(probabilities)).astype(np.float32)


def quantise(values: np.ndarray) -> np.ndarray:
    """Values in 0..1 as uint8 0..255 (rounded): a quarter of float32's bytes, and readable by
    any image viewer, at a resolution (1/255) far finer than a probability is worth."""
    return np.rint(np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * 255).astype(np.uint8)


@dataclass(frozen=True)
class SliceUncertainty:
    z: int
    mean: float  # mean normalised entropy of the slice, 0 (sure) .. 1 (every class equally likely)
    uncertain_fraction: float  # pixels with normalised entropy above 0.5


def rank_slices(path: str | os.PathLike) -> list[SliceUncertainty]:
    """Every slice of an uncertainty map with its uncertainty, most uncertain first.

    ``path``: a ``.zarr`` label store segmented with ``--probabilities`` (its ``uncertainty``
    array), or the uncertainty TIFF of ``socseg segment ... --uncertainty PATH.tif``.
    """
    return rank_blocks(_tiff_blocks(Path(path)) if Path(path).suffix.lower() in TIFF_SUFFIXES else _zarr_blocks(path))


def rank_blocks(blocks: Iterable[tuple[int, np.ndarray]]) -> list[SliceUncertainty]:
    """:func:`rank_slices` of ``(first slice, uint8 uncertainty block)`` pairs (e.g. an
    uncertainty volume in memory as one block: ``[(0, volume)]``)."""
    slices = []
    for start, block in blocks:
        block = np.asarray(block, dtype=np.float32) / 255.0
        for offset, plane in enumerate(block):
            slices.append(SliceUncertainty(start + offset, float(plane.mean()), float(np.mean(plane > 0.5))))
    return sorted(slices, key=lambda s: (-s.mean, s.z))


def _zarr_blocks(store_path: str | os.PathLike) -> Iterator[tuple[int, np.ndarray]]:
    """(first slice, uint8 uncertainty of a z-chunk) of a label store, checked before any is read."""
    store = ChunkedLabels.open(store_path)
    if store.uncertainty is None:
        raise VolumeError(f"{store_path} holds no uncertainty: segment into it with --uncertainty")
    if store.pending():
        raise VolumeError(f"{store_path} is not finished (chunks {store.pending()} missing): run its segment command again")

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        for index in range(store.n_chunks):
            start, stop = store.chunk(index)
            yield start, store.uncertainty[start:stop]

    return blocks()


def _tiff_blocks(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    """(first slice, uint8 uncertainty) of an uncertainty TIFF, a few slices at a time. Refuses a
    label stack or a probability stack (both uint8 TIFFs too) before anything is ranked."""
    if not path.is_file():
        raise VolumeError(f"{path}: no such file")
    try:
        with tifffile.TiffFile(path) as tif:
            channels = int((tif.imagej_metadata or {}).get("channels", 1)) if tif.is_imagej else 1
            dtype = tif.series[0].dtype
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise VolumeError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    recorded = read_label_metadata(path)
    content = recorded.get("content")
    hint = "segment with --uncertainty PATH.tif and rank that file"
    if content == PROBABILITIES_CONTENT or channels > 1:
        raise VolumeError(f"{path} holds class probabilities ({channels} channels), not an uncertainty map: {hint}")
    if content is None and "phase_map" in recorded:
        raise VolumeError(f"{path} is a label stack, not an uncertainty map: {hint}")
    if content not in (None, UNCERTAINTY_CONTENT):
        raise VolumeError(f"{path} holds {content!r}, not an uncertainty map: {hint}")
    if dtype != np.uint8:
        raise VolumeError(f"{path}: an uncertainty map is uint8 (normalised entropy x 255), this is {dtype}: {hint}")
    reader = SliceReader(path)

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        with reader:
            for start in range(0, reader.shape[0], _READ_SLICES):
                yield start, reader.read(start, min(start + _READ_SLICES, reader.shape[0]))

    return blocks()
