"""The isolated components of a phase, one by one, and the grey-value evidence for a contact
that a segmentation leaves out.

A phase's isolated share (``perc.<phase>.isolated`` of :mod:`socseg.analysis.microstructure`:
the volume in components touching no face) is decided by a handful of components, often by
one large particle that either touches the network or does not. Two segmentations can then
differ by tens of percent in that share through a contact of a few voxels, and the number alone
cannot say which is right. This module lists each isolated component of a mask (6-connected,
as percolation counts them) with:

* its size, z extent and distance to the rest of the phase;
* its **bridge level**: the highest grey value ``t`` such that the phase's voxels together with
  the voxels of grey value ``>= t`` connect the component to the rest of the phase, within
  ``reach`` voxels of the component's bounding box -- the weakest voxel of the brightest path
  (a widest-path, or maximin, value). A level at the phase's own grey values says the image holds
  a path as bright as the phase (a contact the mask leaves out, or two particles closer than the
  resolution blurs apart); a level at the neighbouring phase's values says the image separates
  them. It assumes the phase is the brightest one, as Ni is in PXCT of Ni/YSZ electrodes.

:func:`compare_isolated` adds what a second segmentation does with each of those components:
how much of it it keeps, and whether it joins it to a component that reaches a face.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

_SIX_CONNECTED = ndi.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class IsolatedComponent:
    """One component of a phase that touches no face of the volume."""

    label: int  # its label in the 6-connected labelling of the mask
    voxels: int
    z_range: tuple[int, int]  # first and last slice it occupies
    distance: float | None  # voxel-centre distance to the rest of the phase within reach; None: none there
    bridge_level: float | None  # None: no path within reach at any grey value, or no image given


@dataclass(frozen=True)
class IsolatedComparison:
    """A reference segmentation's isolated component as another segmentation has it."""

    component: IsolatedComponent
    kept: float  # share of its voxels the other segmentation also gives the phase
    joined: bool  # those voxels lie (mostly) in a component of the other segmentation that touches a face


def _touching_faces(components: np.ndarray, n_components: int) -> np.ndarray:
    touching = np.zeros(n_components + 1, dtype=bool)
    for axis in range(components.ndim):
        for end in (0, -1):
            touching[np.unique(np.take(components, end, axis=axis))] = True
    touching[0] = False
    return touching


def _bridge_level(component: np.ndarray, rest: np.ndarray, image: np.ndarray) -> float | None:
    """Largest ``t`` for which ``component`` and ``rest`` share a 6-connected component of
    ``component | rest | image >= t`` (connectivity only shrinks as ``t`` rises: a binary search)."""
    if not rest.any():
        return None
    phase = component | rest

    def connected(level: float) -> bool:
        joined, _ = ndi.label(phase | (image >= level), structure=_SIX_CONNECTED)
        return bool(np.intersect1d(np.unique(joined[component]), np.unique(joined[rest])).size)

    levels = np.unique(image[~phase])
    if levels.size == 0 or not connected(levels[0]):
        return None
    low, high = 0, levels.size - 1  # connected(levels[low]) holds
    while low < high:
        middle = (low + high + 1) // 2
        if connected(levels[middle]):
            low = middle
        else:
            high = middle - 1
    return float(levels[low])


def isolated_components(mask: np.ndarray, image: np.ndarray | None = None, reach: int = 8) -> list[IsolatedComponent]:
    """The components of ``mask`` (one phase, ``(Z, Y, X)`` bool) touching no face, largest first,
    with their distance to the rest of the phase and, given the grey-value ``image``, their bridge
    level; both looked for within ``reach`` voxels of each component's bounding box."""
    return labelled_isolated(mask, image, reach)[1]


def labelled_isolated(mask: np.ndarray, image: np.ndarray | None = None,
                      reach: int = 8) -> tuple[np.ndarray, list[IsolatedComponent]]:
    """:func:`isolated_components` and the 6-connected labelling their ``label`` fields refer to."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"isolated_components needs a (Z, Y, X) mask, got shape {mask.shape}")
    if image is not None and image.shape != mask.shape:
        raise ValueError(f"image shape {image.shape} differs from the mask's {mask.shape}")
    if reach < 1:
        raise ValueError(f"reach must be at least 1 voxel, got {reach}")
    components, n = ndi.label(mask, structure=_SIX_CONNECTED)
    touching = _touching_faces(components, n)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    boxes = ndi.find_objects(components)
    found: list[IsolatedComponent] = []
    for label in sorted(np.flatnonzero(~touching[1:]) + 1, key=lambda k: -sizes[k]):
        box = tuple(slice(max(s.start - reach, 0), s.stop + reach) for s in boxes[label - 1])
        local = components[box]
        me, rest = local == label, (local > 0) & (local != label)
        distance = float(ndi.distance_transform_edt(~rest)[me].min()) if rest.any() else None
        level = _bridge_level(me, rest, image[box]) if image is not None else None
        z = boxes[label - 1][0]
        found.append(IsolatedComponent(int(label), int(sizes[label]), (int(z.start), int(z.stop - 1)), distance, level))
    return components, found


def compare_isolated(reference: np.ndarray, other: np.ndarray, image: np.ndarray | None = None,
                     reach: int = 8,
                     isolated: tuple[np.ndarray, list[IsolatedComponent]] | None = None) -> list[IsolatedComparison]:
    """Each isolated component of ``reference`` (:func:`isolated_components`) with the share of it
    that ``other`` (the same phase in another segmentation) keeps and whether ``other`` joins it to
    a component touching a face. ``isolated``: the reference's :func:`labelled_isolated`, when one
    reference is compared with several segmentations (its bridge levels are then found once)."""
    reference, other = np.asarray(reference, dtype=bool), np.asarray(other, dtype=bool)
    if reference.shape != other.shape:
        raise ValueError(f"the two masks differ in shape: {reference.shape} and {other.shape}")
    theirs, n = ndi.label(other, structure=_SIX_CONNECTED)
    touching = _touching_faces(theirs, n)
    mine, components = isolated if isolated is not None else labelled_isolated(reference, image, reach)
    out = []
    for component in components:
        held = theirs[mine == component.label]
        kept = held[held > 0]
        joined = bool(kept.size) and bool(touching[np.bincount(kept).argmax()])
        out.append(IsolatedComparison(component, float(kept.size / held.size), joined))
    return out
