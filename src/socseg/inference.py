"""Slice-wise prediction of whole slabs and volumes with a fixed tiling.

The network sees tiles of the size it was trained on; predictions are stitched back so each pixel
comes from exactly one tile (see :mod:`socseg.tiling`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from socseg.tiling import Tiling, iter_batches

Predict = Callable[[np.ndarray], np.ndarray]


def predict_probabilities(
    predict: Predict, images: np.ndarray, tile_size: int, batch_size: int = 8, step: int | None = None
) -> np.ndarray:
    """Class probabilities ``(Z, H, W, C)`` for a stack ``(Z, H, W)`` of model-ready slices.

    ``predict`` maps a batch ``(B, s, s, 1)`` to ``(B, s, s, C)`` (e.g. ``model.predict_on_batch``).
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected a (Z, H, W) stack, got shape {images.shape}")
    z, h, w = images.shape
    tiling = Tiling(h, w, tile_size, step or tile_size)
    out = None
    for k in range(z):
        tiles = tiling.extract(images[k])[..., None]
        preds = np.concatenate([np.asarray(predict(tiles[b])) for b in iter_batches(len(tiles), batch_size)])
        if out is None:
            out = np.empty((z, h, w, preds.shape[-1]), dtype=np.float32)
        out[k] = tiling.stitch(preds.astype(np.float32))
    return out if out is not None else np.empty((0, h, w, 1), np.float32)
