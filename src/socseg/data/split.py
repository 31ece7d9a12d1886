"""Leak-free train / validation / test splits by contiguous z-slabs.

Neighbouring PXCT slices are nearly identical (two-threshold agreement drops only from 96.7 % to
95.6 % one slice away), so a random slice split puts near-copies of test slices into training and
inflates every score. We cut each volume into contiguous slabs along z, in the order
train | gap | val | gap | test, and drop ``gap`` slices at each boundary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


def slab_split(n_slices: int, train: float, val: float, test: float, gap: int) -> SlabSplit:
    """Split ``n_slices`` into contiguous train/val/test slabs separated by ``gap`` slices.

    Fractions are of the slices left after removing the two gaps. A subset with fraction 0 gets an
    empty range. Raises ``ValueError`` when the volume is too thin for the requested split.
    """
    fractions = {"train": float(train), "val": float(val), "test": float(test)}
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"split fractions must be >= 0 and not all zero, got {fractions}")
    if gap < 0:
        raise ValueError(f"split gap must be >= 0, got {gap}")
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


def split_from_params(n_slices: int, split: SplitParams) -> SlabSplit:
    """:func:`slab_split` with the ``split`` section of params.yaml."""
    return slab_split(n_slices, split.train, split.val, split.test, split.gap)
