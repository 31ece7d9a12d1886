"""Where the tiles of a fixed tiling start along one axis of a slice.

Tiles of ``size`` start every ``step`` pixels; the last tile is shifted back to end at the border,
so every pixel is covered and no tile reaches into padding. The sliding window of
:mod:`socseg.inference.window` places its tiles with :func:`tile_starts` along y and x.
"""

from __future__ import annotations


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
