"""Fixed tilings of whole slices (validation, test, inference) and random training crops.

Fixed tiling: tiles of ``size`` start every ``step`` pixels; the last tile is shifted back to end
at the border, so every pixel is covered and no padding artefacts enter the prediction. Each
pixel is *owned* by exactly one tile (the centre-most one along each axis), which is what makes
stitched predictions - and the metrics computed on them - count every pixel exactly once.
Slices smaller than a tile are mirror-padded up to the tile size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


def tile_starts(length: int, size: int, step: int | None = None) -> list[int]:
    """Start offsets of tiles of ``size`` covering ``[0, length)`` (length >= size)."""
    if size <= 0:
        raise ValueError(f"tile size must be positive, got {size}")
    step = size if step is None else step
    if not 0 < step <= size:
        raise ValueError(f"tile step must be in (0, {size}], got {step}")
    if length < size:
        raise ValueError(f"length {length} is smaller than the tile size {size}: pad first")
    starts = list(range(0, length - size + 1, step))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def _ownership(starts: list[int], size: int, length: int) -> list[tuple[int, int]]:
    """For each tile, the [lo, hi) range of pixels it owns: split overlaps at their midpoint."""
    bounds = []
    for i, start in enumerate(starts):
        lo = 0 if i == 0 else (start + starts[i - 1] + size) // 2
        hi = length if i == len(starts) - 1 else (starts[i + 1] + start + size) // 2
        bounds.append((lo, hi))
    return bounds


@dataclass(frozen=True)
class Tiling:
    """A fixed 2D tiling of slices of shape ``(height, width)``."""

    height: int
    width: int
    size: int
    step: int

    @property
    def padded_shape(self) -> tuple[int, int]:
        return max(self.height, self.size), max(self.width, self.size)

    @property
    def positions(self) -> list[tuple[int, int]]:
        ph, pw = self.padded_shape
        return [(y, x) for y in tile_starts(ph, self.size, self.step) for x in tile_starts(pw, self.size, self.step)]

    def __len__(self) -> int:
        return len(self.positions)

    def pad(self, image: np.ndarray) -> np.ndarray:
        """Mirror-pad the last two axes up to the tile size where a slice is smaller."""
        ph, pw = self.padded_shape
        extra = [(0, 0)] * (image.ndim - 2) + [(0, ph - self.height), (0, pw - self.width)]
        if ph == self.height and pw == self.width:
            return image
        return np.pad(image, extra, mode="symmetric")

    def extract(self, image: np.ndarray) -> np.ndarray:
        """Tiles of a ``(..., H, W)`` array as ``(n_tiles, ..., size, size)``."""
        padded = self.pad(image)
        s = self.size
        return np.stack([padded[..., y : y + s, x : x + s] for y, x in self.positions])

    def ownership_masks(self) -> np.ndarray:
        """Boolean ``(n_tiles, size, size)``: which pixels of each tile it owns (a partition)."""
        ph, pw = self.padded_shape
        ys = tile_starts(ph, self.size, self.step)
        xs = tile_starts(pw, self.size, self.step)
        own_y = dict(zip(ys, _ownership(ys, self.size, ph)))
        own_x = dict(zip(xs, _ownership(xs, self.size, pw)))
        masks = np.zeros((len(self), self.size, self.size), dtype=bool)
        for k, (y, x) in enumerate(self.positions):
            (y0, y1), (x0, x1) = own_y[y], own_x[x]
            # Restrict to the un-padded image so padded pixels are owned by nobody.
            y1, x1 = min(y1, self.height), min(x1, self.width)
            if y1 > y0 and x1 > x0:
                masks[k, y0 - y : y1 - y, x0 - x : x1 - x] = True
        return masks

    def stitch(self, tiles: np.ndarray) -> np.ndarray:
        """Reassemble ``(n_tiles, size, size, ...)`` into ``(H, W, ...)``, each pixel from its owner tile."""
        ph, pw = self.padded_shape
        out = np.zeros((ph, pw) + tiles.shape[3:], dtype=tiles.dtype)
        masks = self.ownership_masks()
        for tile, mask, (y, x) in zip(tiles, masks, self.positions):
            region = out[y : y + self.size, x : x + self.size]
            region[mask] = tile[mask]
        return out[: self.height, : self.width]


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
