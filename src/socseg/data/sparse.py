"""Sparse labels: a labelled volume in which only some pixels, or only some slices, carry a label.

Labelling a whole new scan is what fine-tuning is meant to avoid: an annotator labels a few
slices, or paints a few regions of them, and marks everything else unlabelled, either with a
reserved label value (``finetune.ignore_value``, outside the phase map) or by naming the
labelled slices. :class:`SparseVolume` turns both into the class index
:data:`~socseg.data.tasks.IGNORE` in :meth:`SparseVolume.class_index`, which every target map
(:meth:`socseg.data.prepare.Slab.targets`) and every score
(:func:`socseg.inference.evaluate.slab_confusion`) reads: the losses and the scores skip those
pixels without knowing where they came from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from socseg.data.tasks import IGNORE
from socseg.data.volumes import Volume, VolumeError, format_phase_map


@dataclass
class SparseVolume(Volume):
    """A :class:`Volume` whose labels mark unlabelled pixels (``ignore_value``) and whose slices
    outside ``labelled_slices`` (None: all) are unlabelled as a whole.

    The arrays are shared, not copied, by :meth:`with_labelled_slices`: the training and the
    held-out views of one scan cost nothing.
    """

    ignore_value: int | None = None
    labelled_slices: tuple[int, ...] | None = None

    def validate(self) -> None:
        super().validate()
        if self.labels is None:
            raise VolumeError(f"volume {self.meta.name!r}: sparse labels need a label stack")
        if self.ignore_value is not None and self.ignore_value in self.meta.phase_map:
            raise VolumeError(
                f"ignore value {self.ignore_value} is a phase of the phase map {format_phase_map(self.meta.phase_map)}: "
                "choose a label value outside it for unlabelled pixels (--ignore-value, params: finetune.ignore_value)")
        if self.labelled_slices is not None:
            depth = self.image.shape[0]
            outside = [z for z in self.labelled_slices if not 0 <= z < depth]
            if outside:
                raise VolumeError(f"labelled slices {outside} outside volume {self.meta.name!r} with {depth} slices "
                                  f"(0..{depth - 1})")

    def class_index(self, z: slice | None = None) -> np.ndarray:
        """Labels mapped to 0..n-1 in label-value order, :data:`IGNORE` where unlabelled."""
        index = super().class_index(z)  # a new array (a lookup), safe to write into
        labels = self.labels if z is None else self.labels[z]
        if self.ignore_value is not None:
            index[np.asarray(labels) == self.ignore_value] = IGNORE
        if self.labelled_slices is not None:
            slices = np.arange(self.image.shape[0])[slice(None) if z is None else z]
            index[~np.isin(slices, self.labelled_slices)] = IGNORE
        return index

    def with_labelled_slices(self, slices: Iterable[int]) -> "SparseVolume":
        """The same scan with only ``slices`` labelled (e.g. the training or the held-out ones)."""
        return dataclasses.replace(self, labelled_slices=tuple(sorted(int(z) for z in slices)))

    def labelled_pixels(self, z: int) -> int:
        """How many pixels of slice ``z`` carry a label."""
        if self.labelled_slices is not None and z not in self.labelled_slices:
            return 0
        if self.ignore_value is None:
            return int(np.prod(self.image.shape[1:]))
        return int(np.count_nonzero(np.asarray(self.labels[z]) != self.ignore_value))

    def slices_with_labels(self) -> list[int]:
        """The slices with at least one labelled pixel, in z order."""
        candidates = range(self.image.shape[0]) if self.labelled_slices is None else self.labelled_slices
        return [int(z) for z in candidates if self.labelled_pixels(int(z))]


def sparse_volume(volume: Volume, ignore_value: int | None, labelled_slices: Sequence[int] | None = None) -> SparseVolume:
    """``volume`` with sparse labels, checked before anything is trained on it.

    Refused (:class:`VolumeError`, naming the problem): an ignore value that is a phase, a
    labelled slice outside the volume, a label value in a labelled slice that is neither a phase
    nor the ignore value, and a volume without any labelled pixel.
    """
    if volume.labels is None:
        raise VolumeError(f"volume {volume.meta.name!r} has no labels: give a label stack (--labels)")
    slices = None if labelled_slices is None else tuple(sorted({int(z) for z in labelled_slices}))
    if slices is not None and not slices:
        raise VolumeError("no labelled slices given: name at least one (--labelled-slices 3,17,40)")
    sparse = SparseVolume(volume.image, volume.labels, volume.meta, ignore_value=ignore_value, labelled_slices=slices)
    allowed = set(volume.meta.phase_map) | ({ignore_value} if ignore_value is not None else set())
    counts = np.zeros(256, np.int64)
    for z in range(volume.image.shape[0]) if slices is None else slices:
        counts += np.bincount(np.asarray(volume.labels[z], np.uint8).ravel(), minlength=256)
    bad = sorted(set(np.flatnonzero(counts).tolist()) - allowed)
    if bad:
        where = "" if slices is None else " in the labelled slices"
        raise VolumeError(
            f"label values {bad}{where} of {volume.meta.name!r} are not in the phase map "
            f"{format_phase_map(volume.meta.phase_map)}"
            + ("" if ignore_value is None else f" nor the ignore value {ignore_value}")
            + ": fix the labels, or give the phase map (--phase-map) or the value of unlabelled pixels (--ignore-value)")
    labelled = sum(counts[v] for v in volume.meta.phase_map)
    if not labelled:
        raise VolumeError(
            f"volume {volume.meta.name!r} has no labelled pixel"
            + ("" if slices is None else f" in slices {list(slices)}")
            + ("" if ignore_value is None else f" (every label is the ignore value {ignore_value})")
            + ": label some pixels with phase values " + format_phase_map(volume.meta.phase_map))
    return sparse


def parse_slice_list(text: str | None) -> list[int] | None:
    """``"3,17,40"`` or ``"3,10-14"`` (inclusive ranges) -> slice indices; None or blank: None."""
    if text is None or not str(text).strip():
        return None
    slices: list[int] = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        first, dash, last = item.partition("-")
        try:
            if dash:
                a, b = int(first), int(last)
                if b < a:
                    raise ValueError
                slices.extend(range(a, b + 1))
            else:
                slices.append(int(item))
        except ValueError:
            raise VolumeError(f"bad slice list {text!r}: expected slice numbers and ranges, e.g. 3,17,40 or 10-14") from None
    if not slices:
        raise VolumeError(f"bad slice list {text!r}: no slice numbers")
    return sorted(set(slices))
