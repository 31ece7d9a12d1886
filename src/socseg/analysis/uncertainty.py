"""Where to label next: slices ranked by how unsure the model was about them.

Reads the ``uncertainty`` array (normalised entropy of the class probabilities, uint8 0..255) that
``socseg segment ... OUT.zarr --probabilities`` keeps beside the labels, one z-chunk at a time,
so a volume of any size is ranked in bounded memory. The slices at the top of the list are the
ones worth labelling for fine-tuning (ilastik's "label where it is uncertain").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from socseg.data.chunked import ChunkedLabels
from socseg.data.volumes import VolumeError


@dataclass(frozen=True)
class SliceUncertainty:
    z: int
    mean: float  # mean normalised entropy of the slice, 0 (sure) .. 1 (every class equally likely)
    uncertain_fraction: float  # pixels with normalised entropy above 0.5


def rank_slices(store_path: str | os.PathLike) -> list[SliceUncertainty]:
    """Every slice of a label store with its uncertainty, most uncertain first."""
    store = ChunkedLabels.open(store_path)
    if store.uncertainty is None:
        raise VolumeError(f"{store_path} holds no uncertainty: segment with --probabilities into a .zarr OUTPUT")
    if store.pending():
        raise VolumeError(f"{store_path} is not finished (chunks {store.pending()} missing): run its segment command again")
    slices = []
    for index in range(store.n_chunks):
        start, stop = store.chunk(index)
        block = np.asarray(store.uncertainty[start:stop], dtype=np.float32) / 255.0
        for offset, plane in enumerate(block):
            slices.append(SliceUncertainty(start + offset, float(plane.mean()), float(np.mean(plane > 0.5))))
    return sorted(slices, key=lambda s: (-s.mean, s.z))
