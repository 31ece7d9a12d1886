"""2.5D input: each slice goes to the network with its ``k`` neighbours on either side as channels.

A PXCT slice is one plane of a 3-D volume; its neighbours (a voxel apart) carry the same phases,
with independent noise. Giving a 2-D U-Net ``2k + 1`` adjacent slices lets it average that noise
and see where a grain ends along z, at 2-D cost. ``k = 0`` is plain 2-D.

One rule everywhere (training crops, validation, scoring, serving): a neighbour outside the
available stack is replaced by the nearest slice that exists (edge replication). In training the
stack is the training slab, so crops never take context from the gap, validation or test slabs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np


def n_channels(context_slices: int) -> int:
    """Input channels of a model that sees ``context_slices`` neighbours on each side."""
    if int(context_slices) < 0:
        raise ValueError(f"context_slices must be >= 0, got {context_slices}")
    return 2 * int(context_slices) + 1


def neighbour_indices(z: int, context_slices: int, start: int, stop: int) -> np.ndarray:
    """Slice indices ``z - k .. z + k``, clamped into ``[start, stop)``."""
    if not start <= z < stop:
        raise ValueError(f"slice {z} outside [{start}, {stop})")
    offsets = np.arange(-int(context_slices), int(context_slices) + 1)
    return np.clip(z + offsets, start, stop - 1)


@dataclass(frozen=True)
class Chunk:
    """Slices ``[start, stop)`` of a stack, read with ``before``/``after`` context slices around them."""

    start: int
    stop: int
    before: int
    after: int

    @property
    def read(self) -> slice:
        """What to read from the stack: the chunk and its context."""
        return slice(self.start - self.before, self.stop + self.after)

    @property
    def size(self) -> int:
        return self.stop - self.start


def iter_chunks(total: int, size: int, context_slices: int, start: int = 0, stop: int | None = None) -> Iterator[Chunk]:
    """Chunks of ``size`` slices covering ``[start, stop)`` of a stack of ``total`` slices, each
    with up to ``context_slices`` real neighbours on either side (fewer at the stack's ends).

    The one way socseg walks a volume in pieces for a 2.5D model (``socseg segment``, the REST
    client, scoring, multi-axis prediction): the slices around a chunk are read as context, so
    a chunk boundary changes nothing in the result.
    """
    stop = total if stop is None else stop
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    if not 0 <= start <= stop <= total:
        raise ValueError(f"slices {start}:{stop} outside a stack of {total}")
    k = int(context_slices)
    n_channels(k)
    for first in range(start, stop, size):
        last = min(first + size, stop)
        yield Chunk(first, last, min(k, first), min(k, total - last))


def iter_with_context(slices: Iterable[np.ndarray], context_slices: int) -> Iterator[np.ndarray]:
    """Stream ``(H, W)`` slices as ``(H, W, 2k + 1)`` stacks, holding only ``2k + 1`` slices.

    With ``k = 0`` slices pass through unchanged (2-D), so callers need no special case.
    """
    k = int(context_slices)
    n_channels(k)
    if k == 0:
        yield from slices
        return
    window: deque[np.ndarray] = deque()
    emitted = 0
    received = 0

    def stack(centre: int) -> np.ndarray:
        # window holds slices [received - len(window), received); clamp to what the stream had.
        first = received - len(window)
        picks = np.clip(np.arange(centre - k, centre + k + 1), 0, received - 1)
        return np.stack([window[int(i) - first] for i in picks], axis=-1)

    for image in slices:
        image = np.asarray(image)
        if window and image.shape != window[-1].shape:
            raise ValueError(f"2.5D input needs slices of one shape: {image.shape} after {window[-1].shape}")
        window.append(image)
        received += 1
        if received - 1 - emitted >= k:  # the slice k back now has all its neighbours
            yield stack(emitted)
            emitted += 1
            while received - len(window) < emitted - k:  # no later centre needs it
                window.popleft()
    while emitted < received:
        yield stack(emitted)
        emitted += 1
