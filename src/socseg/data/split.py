"""Leak-free train / validation / test splits by contiguous z-slabs.

Neighbouring PXCT slices are nearly identical (two-threshold agreement drops only from 96.7 % to
95.6 % one slice away), so a random slice split puts near-copies of test slices into training and
inflates every score. We cut each volume into contiguous slabs along z, in the order
train | gap | val | gap | test, and drop ``gap`` slices at each boundary. A 2.5D model reads
``train.context_slices`` neighbours on each side of a slice, from the whole volume when it is
scored, so the gap must be at least that wide: :func:`check_context_gap`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from socseg.params import SplitParams

SUBSETS = ("train", "val", "test")


@dataclass(frozen=True)
class SlabSplit:
    """Half-open z ranges [start, stop) of each subset in one volume."""

    n_slices: int
    gap: int
    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]

    def range(self, subset: str) -> range:
        start, stop = getattr(self, subset)
        return range(start, stop)

    def to_dict(self) -> dict:
        return asdict(self)


def check_context_gap(gap: int, context_slices: int, fractions: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
    """Refuse a ``gap`` narrower than the 2.5D context (``context_slices`` neighbours per side).

    Scoring reads a slice's neighbours from the whole volume, so the first validation or test
    slice next to a gap of fewer than ``context_slices`` slices would take training slices as
    input. ``fractions`` (train, val, test): with a single non-empty subset there is no boundary.
    """
    if sum(1 for f in fractions if float(f) > 0) > 1 and int(gap) < int(context_slices):
        raise ValueError(
            f"split gap {int(gap)} is smaller than train.context_slices {int(context_slices)}: a 2.5D model reads "
            f"{int(context_slices)} neighbouring slices on each side, so slices next to the gap would take the "
            f"neighbouring slab's slices as context; set split.gap >= {int(context_slices)} or lower train.context_slices")


def slab_split(n_slices: int, train: float, val: float, test: float, gap: int, context_slices: int = 0) -> SlabSplit:
    """Split ``n_slices`` into contiguous train/val/test slabs separated by ``gap`` slices.

    Fractions are of the slices left after removing the two gaps. A subset with fraction 0 gets an
    empty range. Raises ``ValueError`` when the volume is too thin for the requested split, or when
    ``gap`` is narrower than the model's 2.5D ``context_slices`` (:func:`check_context_gap`).
    """
    fractions = {"train": float(train), "val": float(val), "test": float(test)}
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"split fractions must be >= 0 and not all zero, got {fractions}")
    if gap < 0:
        raise ValueError(f"split gap must be >= 0, got {gap}")
    check_context_gap(gap, context_slices, list(fractions.values()))
    used = [name for name in SUBSETS if fractions[name] > 0]
    usable = n_slices - gap * (len(used) - 1)
    if usable < len(used):
        raise ValueError(
            f"volume has {n_slices} slices: too few for subsets {used} with gap {gap} "
            f"(need at least {len(used) + gap * (len(used) - 1)})"
        )
    total = sum(fractions[name] for name in used)
    sizes = {name: max(1, int(round(usable * fractions[name] / total))) for name in used}
    # Rounding may over/under-shoot by a slice or two: adjust the largest subset.
    largest = max(used, key=lambda name: sizes[name])
    sizes[largest] += usable - sum(sizes.values())
    ranges: dict[str, tuple[int, int]] = {}
    cursor = 0
    for name in SUBSETS:
        if name not in sizes:
            ranges[name] = (cursor, cursor)
            continue
        ranges[name] = (cursor, cursor + sizes[name])
        cursor += sizes[name] + gap
    return SlabSplit(n_slices=n_slices, gap=gap, **ranges)


def split_from_params(n_slices: int, split: SplitParams, context_slices: int = 0) -> SlabSplit:
    """:func:`slab_split` with the ``split`` section of params.yaml (and ``train.context_slices``)."""
    return slab_split(n_slices, split.train, split.val, split.test, split.gap, context_slices)


def check_split_context(split: SplitParams, context_slices: int) -> None:
    """:func:`check_context_gap` for the ``split`` section: what ``socseg train`` checks first."""
    check_context_gap(split.gap, context_slices, (split.train, split.val, split.test))
