"""An interval on every microstructure number, from the model's per-voxel class probabilities.

A segmentation turns probabilities into labels with one decision rule (the argmax: a threshold of
0.5 between two classes), and the metrics of :mod:`socseg.analysis.microstructure` depend on that
choice (binarisation alone can change tortuosity by more than 2x, Pietsch et al. 2018).
:func:`measure_with_intervals` reports each metric of ``flatten_metrics`` as a
:class:`MetricInterval` ``(value, low, high)``: ``value`` is the metric of the argmax labels (what
``socseg segment`` writes), ``low``/``high`` its range over a sweep of class biases.

**Method: a class-bias sweep calibrated by the expected misclassifications** (:class:`BiasSweep`).
Adding ``b`` to the log-probability of class ``c`` moves its decision threshold against every
other class ``j`` from ``P_c / (P_c + P_j) > 0.5`` to ``> 1 / (1 + e^b)``: ``b > 0`` relabels as
``c`` the voxels where ``c`` came closest to winning, ``b < 0`` takes ``c`` from the voxels where it
won by the least -- every boundary of ``c`` moves at once, in the order of the model's doubt. How
far: if the probabilities are calibrated, the argmax labels are expected to miss
``sum over voxels not labelled c of P_c`` voxels of ``c`` and to label ``c`` wrongly
``sum over voxels labelled c of (1 - P_c)``; the sweep moves each class until its labels have
gained (``b > 0``) or lost (``b < 0``) that many voxels (times ``spread``), in even steps, and
measures every such label volume in full. The biases come from one exact histogram of the bias at
which each voxel changes class (:func:`class_margins`). The interval is the smallest and largest
value over those volumes and the argmax, so it always contains ``value``; with one-hot
probabilities nothing is expected to be wrong and its width is zero.

Why this method: the expected volume fraction of a class, ``mean(P_c)`` (the truth's fraction for
calibrated probabilities), always lies in its volume-fraction interval (``spread`` >= 1), which is
``[vf - expected wrong c, vf + expected missed c] / voxels``: the interval moves the volume fraction
within what the probabilities imply, as far as their own expected errors and no further. Sampling
each voxel independently from its probabilities scatters single flipped voxels wherever ``P`` is not
0 or 1 (salt-and-pepper), which adds surfaces and TPB that neither the argmax nor the truth has:
the sampled metrics of boundaries are biased, not spread around the truth. Spatially correlated
sampling (a smooth random field on the logits) avoids that but needs a correlation length the
probabilities do not give, and its spread of additive metrics shrinks with the volume (errors
average out over ``volume / length^3`` independent patches) while a systematic shift -- what
separates one model, threshold or annotator from another -- does not average out. The sweep is
that systematic shift.

Assumptions, and what the interval covers: (1) the probabilities are calibrated: an overconfident
model expects fewer errors than it makes and gets intervals too narrow (``spread`` > 1 widens them;
whether intervals cover the manual labels' values is what the real-data benchmark measures); (2) the
errors sit where the model doubts most; (3) they shift each class's boundaries coherently. For the
volume fractions the interval is then the exact range of the expected error mass; for surfaces, TPB,
percolation, sizes and tortuosity it is their range over the same coherent shifts, and errors of
mixed sign (some boundaries too far out, others too far in) fall in between for the additive ones
(fractions, areas). Segmentation uncertainty only: not errors in the labels compared with, not how
representative the volume is of the electrode (sampling / representative volume), not resolution or
the staircase corrections of :mod:`~socseg.analysis.microstructure`.

Checked on synthetic three-phase phantoms (48x80x80, outside the test suite). Probabilities
``softmax(S / T)`` of smooth scores ``S`` and truths drawn from them voxel by voxel with errors
correlated over 2-8 voxels (a Gaussian-copula Gumbel field: calibrated by construction), 45 draws:
the intervals covered the truth's Ni volume fraction 45 times, the pore fraction and pore-YSZ
interface 42, the Ni specific surface 43, but the TPB density only 11 and Ni percolation 20. TPB
barely moves when a class's boundaries shift together, while spatially random errors roughen or
smooth it by a few percent: read TPB and percolation intervals as lower bounds of their
uncertainty. Blurred one-hot probabilities (the truth under a random N(0, sigma^2) translation) are
covered at sigma = 0.5 voxel (tested); from sigma ~ 0.7 voxel the argmax rounds off corners and
thin features, so its surfaces and TPB read low by more than any threshold restores.

Input: a :class:`ProbabilityVolume`: the probability TIFF of ``socseg segment --probabilities
PATH.tif`` (ImageJ hyperstack ZCYX, uint8 = P x 255, read through a memory map), the
``probabilities`` array of a ``.zarr`` store segmented with ``--probabilities`` (read z-chunk by
z-chunk), or an array ``(Z, Y, X, C)`` (float in [0, 1] or uint8), recognised by what socseg
recorded in them (:func:`holds_probabilities`), not by the file name. The argmax of the stored
uint8 probabilities equals ``socseg segment``'s labels for an ``ni`` model and, for a ``phases``
model, except where two classes' probabilities are within 1/255. Float input is quantised the same
way, so an array and the files written from it give identical results.

Tortuosity, when asked for, costs more than all other metrics together: a phase's tortuosity and
effective diffusivity are measured on the argmax and on the two extreme volumes of its own class
only (its full expected gain and loss: :meth:`BiasSweep.tortuosity_phases`), so an interval on
them costs three solves per phase and axis instead of thirteen. All of them share one set of worker
processes (:class:`~socseg.analysis.tortuosity.SolveQueue`): the argmax's solves run while the sweep
volumes are measured, and each extreme's solve starts from the argmax's concentration field. A phase's tortuosity falls as it
gains voxels and rises as it loses them; the other classes' extremes move its boundaries less
(each takes only the share of the phase's voxels it came close to winning), so read these
intervals, like those of TPB, as a lower bound of the segmentation uncertainty.

Memory and time: probabilities are never held as float: each z-block of uint8 becomes int16
fixed-point log-probabilities (:data:`LOG_SCALE` per nat), biased and reduced to uint8 labels. Held
at once: the argmax labels and one sample's labels (1 B/voxel each) and what
:func:`~socseg.analysis.microstructure.measure` needs for one volume. Time: one ``measure`` per
sample that changes a voxel; the labels of a sample take ~1 s (TIFF) to ~5 s (Zarr, decompressed
again each time). Measured on a 200x501x501x3 phantom, 12 samples, 2 cores shared with other jobs
(load average 5-8): ``socseg microstructure`` of the Zarr store without sizes 81 s CPU (92 s wall),
peak RSS 0.82 GiB; of the TIFF with Ni sizes 149 s CPU (5.2 min wall under that load), 1.42 GiB.
zarr is imported inside the functions that open a store (CLI start-up
time; see :mod:`socseg.data.chunked`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tifffile

from socseg.analysis.microstructure import (MicrostructureResult, flatten_metrics, flatten_tortuosity, measure,
                                            tortuosity_phases)
from socseg.analysis.tortuosity import AXES, DEFAULT_MAX_VOXELS, phase_solves
from socseg.analysis.uncertainty import PROBABILITIES_CONTENT, class_probabilities, quantise
from socseg.data.chunked import ChunkedLabels
from socseg.data.formats import MULTIPAGE_TIFF, ZARR_ARRAY
from socseg.data.stacks import read_probability_metadata
from socseg.data.volumes import VolumeError

# Fixed-point scale of the int16 log-probabilities: 1024 per nat keeps every uint8 level distinct
# (log(255/254) x 1024 = 4), and a difference of two levels (at most log(255/0.5) x 1024 = 6384)
# plus a bias of the same size stays inside int16.
LOG_SCALE = 1024
# A stored 0 means P < 0.5/255: it is read as 0.5/255, so that no level is minus infinity.
_LOG_LUT = np.round(LOG_SCALE * np.log(np.maximum(np.arange(256), 0.5) / 255.0)).astype(np.int16)
assert np.all(np.diff(_LOG_LUT) > 0), "every uint8 probability level must keep its own log value"
# Histogram bins of the bias at which a voxel changes class: -_MARGIN_OFFSET .. _MARGIN_OFFSET - 1.
_MARGIN_OFFSET = 1 << 14
# Voxels per z-block turned into int16 scores at once (C x 2 B each): bounds the temporaries.
BLOCK_VOXELS = 1 << 22
# Tortuosity factors are left out of flatten_metrics where a phase does not percolate (an infinite
# factor): a sample without one makes the interval unbounded above instead of being skipped.
UNBOUNDED_WHEN_MISSING = ("tau.",)
# Keys of the transport metrics, measured on fewer sweep volumes (BiasSweep.tortuosity_phases).
TRANSPORT = ("tau.", "deff.")


@dataclass(frozen=True)
class MetricInterval:
    """One metric: its value on the argmax labels and its range over the bias sweep."""

    value: float
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low

    def covers(self, reference: float) -> bool:
        """Whether ``reference`` lies in ``[low, high]`` (up to float rounding)."""
        slack = 1e-9 * max(abs(self.low), abs(self.high)) if math.isfinite(self.high) else 0.0
        return self.low - slack <= reference <= self.high + slack

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready; an unbounded end (a tortuosity that may not percolate) is ``None``."""
        return {k: (float(v) if math.isfinite(v) else None) for k, v in
                (("value", self.value), ("low", self.low), ("high", self.high))}


@dataclass(frozen=True)
class BiasSweep:
    """How the label volumes behind the intervals are chosen (see the module docstring).

    ``samples``: label volumes measured, shared evenly between the swept classes and, per class,
    between gaining and losing voxels (at least two per class; 0: none, the argmax metrics with
    zero-width intervals). ``spread``: how many times the expected misclassified voxels each class
    may gain or lose (1: exactly the probabilities' own expectation).
    """

    samples: int = 12
    spread: float = 1.0

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0, got {self.samples}")
        if not (math.isfinite(self.spread) and self.spread > 0):
            raise ValueError(f"spread must be a positive number, got {self.spread}")

    @staticmethod
    def swept_classes(n_classes: int) -> list[int]:
        """Each class; for two classes only the second (biasing either is the same threshold)."""
        if n_classes < 2:
            raise ValueError(f"a bias sweep needs at least two classes, got {n_classes}")
        return [1] if n_classes == 2 else list(range(n_classes))

    def plan(self, n_classes: int) -> list[tuple[int, float]]:
        """(class, signed share of its expected error mass) of each sample: per class, gains at
        ``spread * k/m`` of the expected missed voxels and losses at the same shares of the
        expected wrong ones (``-k/m``), the full amount always included."""
        classes = self.swept_classes(n_classes)
        if self.samples == 0:
            return []
        if self.samples < 2 * len(classes):
            raise ValueError(f"{self.samples} samples cannot sweep {len(classes)} classes: at least "
                             f"{2 * len(classes)} (a gain and a loss for each), or 0 for none")
        plan: list[tuple[int, float]] = []
        for k, c in enumerate(classes):
            count = self.samples // len(classes) + (1 if k < self.samples % len(classes) else 0)
            gains, losses = (count + 1) // 2, count // 2
            plan.extend((c, self.spread * i / gains) for i in range(gains, 0, -1))
            plan.extend((c, -self.spread * i / losses) for i in range(losses, 0, -1))
        return plan

    def tortuosity_phases(self, swept_class: str, share: float) -> tuple[str, ...]:
        """The phases whose tortuosity a sweep volume gets (see the module docstring): the swept
        class's own, on its two extremes (``share = +-spread``) only."""
        return (swept_class,) if math.isclose(abs(share), self.spread) else ()

    def describe(self) -> dict[str, Any]:
        return {"method": "class-bias sweep over the expected misclassified voxels", "samples": self.samples,
                "spread": self.spread, "tortuosity_measured_at": "argmax and, for each phase, its own class's shares +-spread"}


# --------------------------------------------------------------------------- input


def recorded_voxel_size_nm(path: str | os.PathLike) -> float | None:
    """The voxel size a ``.zarr`` store of ``socseg segment`` records (its OME scale, when the
    axes are in micrometres: the input was a volume directory with a voxel size); None otherwise."""
    if not ZARR_ARRAY.recognises(str(path)):
        return None
    import zarr

    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        multiscale = (attrs.get("ome") or {}).get("multiscales", [{}])[0]
        units = {axis.get("unit") for axis in multiscale.get("axes", [])}
        transforms = multiscale["datasets"][0]["coordinateTransformations"]
        scale = [t["scale"] for t in transforms if t.get("type") == "scale"][0]
    except Exception:  # not an OME group socseg wrote: nothing recorded
        return None
    if units != {"micrometer"} or len(set(scale)) != 1:
        return None
    return float(scale[0]) * 1000.0


def _tiff_record(path: str) -> dict[str, Any]:
    if not MULTIPAGE_TIFF.recognises(path):
        return {}
    try:
        return read_probability_metadata(path)
    except Exception:  # not a TIFF tifffile can read: not a probability stack
        return {}


def _store_has_probabilities(path: str) -> bool:
    if not ZARR_ARRAY.recognises(path):
        return False
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
        return "probabilities" in {name for name, _ in group.arrays()} and "socseg" in dict(group.attrs)
    except Exception:  # a bare array, or not readable as a group: labels (their reader says what is wrong)
        return False


def holds_probabilities(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds class probabilities by what socseg recorded in it: a TIFF whose
    ImageJ ``Info`` says ``"content": "probabilities"``, or a socseg ``.zarr`` store with a
    ``probabilities`` array. Label stacks, volume directories and anything else: False."""
    text = str(path)
    return _tiff_record(text).get("content") == PROBABILITIES_CONTENT or _store_has_probabilities(text)


class ProbabilityVolume:
    """Class probabilities ``(Z, Y, X, C)`` read a z-block at a time as uint8 (P x 255).

    Build with :meth:`open` (a file) or :meth:`from_array`. ``read(start, stop)`` returns the block
    with the classes on axis ``channel_axis`` (3, or 1 for a TIFF's ZCYX pages: no transposed copy).
    """

    def __init__(self, name: str, shape: tuple[int, int, int], class_names: Sequence[str],
                 read: Callable[[int, int], np.ndarray], channel_axis: int = 3,
                 voxel_size_nm: float | None = None, block_depth: int | None = None):
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.class_names = [str(c) for c in class_names]
        if len(self.class_names) < 2:
            raise VolumeError(f"{name}: probabilities need at least two classes, got {self.class_names}")
        self.read = read
        self.channel_axis = channel_axis
        self.voxel_size_nm = voxel_size_nm
        plane = self.shape[1] * self.shape[2] * len(self.class_names)
        self.block_depth = block_depth or max(1, BLOCK_VOXELS // max(plane, 1))

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def blocks(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.shape[0], self.block_depth):
            yield start, min(start + self.block_depth, self.shape[0])

    @classmethod
    def from_array(cls, probabilities: np.ndarray, class_names: Sequence[str], name: str = "array",
                   voxel_size_nm: float | None = None) -> "ProbabilityVolume":
        """An in-memory ``(Z, Y, X, C)`` array: uint8 (P x 255) as stored, or float in [0, 1]
        (quantised a block at a time, as ``socseg segment`` stores it); ``C = 1`` is P of the
        second class (an ``ni`` model's P(ni))."""
        array = np.asarray(probabilities)
        if array.ndim != 4:
            raise VolumeError(f"{name}: probabilities must be (Z, Y, X, classes), got shape {array.shape}")
        n_classes = max(array.shape[-1], 2)
        if len(class_names) != n_classes:
            raise VolumeError(f"{name}: {n_classes} probability channels but {len(class_names)} class names")
        if array.dtype != np.uint8 and array.dtype.kind != "f":
            raise VolumeError(f"{name}: probabilities must be uint8 (P x 255) or float in [0, 1], got {array.dtype}")

        def read(start: int, stop: int) -> np.ndarray:
            block = array[start:stop]
            if block.dtype == np.uint8 and block.shape[-1] > 1:
                return block
            return quantise(class_probabilities(block.astype(np.float32) / 255.0 if block.dtype == np.uint8 else block))

        return cls(name, array.shape[:3], class_names, read, 3, voxel_size_nm)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ProbabilityVolume":
        """A probability TIFF or a ``.zarr`` store segmented with ``--probabilities`` (see
        :func:`holds_probabilities`); a :class:`VolumeError` naming what it is instead."""
        text = str(path)
        record = _tiff_record(text)
        if record.get("content") == PROBABILITIES_CONTENT:
            return _open_tiff(Path(text), record)
        if _store_has_probabilities(text):
            return _open_store(Path(text))
        raise VolumeError(f"{path}: holds no class probabilities (expected the PATH.tif of `socseg segment ... "
                          "--probabilities PATH.tif`, or a .zarr store segmented with --probabilities)")


def _open_tiff(path: Path, record: dict[str, Any]) -> ProbabilityVolume:
    classes = [str(c) for c in record.get("classes") or []]
    shape = [int(s) for s in record.get("shape") or []]
    if len(shape) != 4 or shape[1] != len(classes):
        raise VolumeError(f"{path}: the recorded shape {shape} (Z, C, Y, X) does not match the classes {classes}")
    try:
        pages = tifffile.memmap(path, mode="r")
    except Exception as exc:  # compressed or re-saved by another program: not one contiguous block
        raise VolumeError(f"{path}: cannot map the probability pages ({type(exc).__name__}: {exc}); "
                          "write them again with socseg segment --probabilities") from None
    if pages.size != math.prod(shape) or pages.dtype != np.uint8:
        raise VolumeError(f"{path}: {pages.size} {pages.dtype} values stored for the recorded shape {shape} (uint8)")
    pages = pages.reshape(shape)  # ImageJ drops Z for a single slice
    z, _, y, x = shape
    return ProbabilityVolume(path.stem, (z, y, x), classes, lambda start, stop: pages[start:stop], 1)


def _open_store(path: Path) -> ProbabilityVolume:
    store = ChunkedLabels.open(path)
    if store.pending():
        raise VolumeError(f"{path} is not finished (chunks {store.pending()} missing): run its segment command again")
    recorded = store.attrs.get("phase_map") or {}
    try:
        classes = [str(recorded[k]) for k in sorted(recorded, key=int)]  # class order = ascending label value
    except (TypeError, ValueError):
        raise VolumeError(f"{path}: bad recorded phase_map {recorded!r}") from None
    probabilities = store.probabilities
    if probabilities is None or probabilities.shape[-1] != len(classes):
        raise VolumeError(f"{path}: {None if probabilities is None else probabilities.shape[-1]} probability "
                          f"channels for the recorded classes {classes}")
    return ProbabilityVolume(path.stem or path.name, store.shape, classes,
                             lambda start, stop: np.asarray(probabilities[start:stop]), 3,
                             recorded_voxel_size_nm(path), block_depth=store.chunk_depth)


# --------------------------------------------------------------------------- labels


def _offsets(volume: ProbabilityVolume, bias: np.ndarray) -> np.ndarray:
    """Integer (fixed-point) bias per class, shaped to broadcast over a block's channel axis."""
    shape = [1, 1, 1, 1]
    shape[volume.channel_axis] = volume.n_classes
    return np.asarray(bias, dtype=np.int16).reshape(shape)


def decide(volume: ProbabilityVolume, bias: np.ndarray | None = None,
           reference: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Class-index labels (uint8) of ``argmax(log P + bias)`` (``bias``: int, :data:`LOG_SCALE`
    per nat, one per class; ties go to the lower class, as ``np.argmax``) and how many voxels
    differ from ``reference`` (0 without one). ``bias=None``: the argmax of the stored probabilities."""
    labels = np.empty(volume.shape, dtype=np.uint8)
    offsets = None if bias is None else _offsets(volume, bias)
    changed = 0
    for start, stop in volume.blocks():
        block = volume.read(start, stop)
        if offsets is not None:
            block = _LOG_LUT[block]
            block += offsets
        labels[start:stop] = np.argmax(block, axis=volume.channel_axis)
        if reference is not None:
            changed += int(np.count_nonzero(labels[start:stop] != reference[start:stop]))
    return labels, changed


@dataclass
class ClassMargins:
    """Per class ``c``: ``histogram[c][b + offset]`` voxels become ``c`` at an added bias of ``b``
    (fixed point) or more; the expected voxels of ``c`` the argmax misses and labels ``c`` wrongly;
    the probability-weighted volume fraction ``mean(P_c)``."""

    histogram: np.ndarray  # (C, 2 * offset) int64
    expected_missed: np.ndarray  # (C,) voxels
    expected_wrong: np.ndarray  # (C,) voxels
    expected_fraction: np.ndarray  # (C,)

    def bias_moving(self, c: int, voxels: float) -> int:
        """The smallest bias (fixed point) on class ``c`` that labels ``voxels`` more voxels ``c``
        than the argmax (``voxels < 0``: the largest that labels that many fewer); 0 for none."""
        cumulative = np.cumsum(self.histogram[c])  # voxels labelled c at bias index i
        argmax_count = cumulative[_MARGIN_OFFSET]
        target = int(round(voxels))
        if target > 0:
            index = int(np.searchsorted(cumulative, argmax_count + target, side="left"))
            return min(index, len(cumulative) - 1) - _MARGIN_OFFSET
        if target < 0:
            index = int(np.searchsorted(cumulative, argmax_count + target, side="right")) - 1
            return max(index, 0) - _MARGIN_OFFSET
        return 0


def class_margins(volume: ProbabilityVolume) -> ClassMargins:
    """One pass over ``volume``: for each voxel and class ``c``, the least bias on ``c`` that
    makes it the argmax (``max_j (L_j - L_c)``, plus one where a lower class ``j`` wins ties),
    histogrammed, and the expected errors of the argmax."""
    n = volume.n_classes
    histogram = np.zeros((n, 2 * _MARGIN_OFFSET), dtype=np.int64)
    missed, wrong, total = np.zeros(n), np.zeros(n), np.zeros(n)
    for start, stop in volume.blocks():
        quantised = volume.read(start, stop)
        scores = _LOG_LUT[quantised].astype(np.int32)
        for c in range(n):
            others = [np.take(scores, j, axis=volume.channel_axis) + (1 if j < c else 0) for j in range(n) if j != c]
            needed = np.maximum.reduce(others) - np.take(scores, c, axis=volume.channel_axis)
            histogram[c] += np.bincount((needed + _MARGIN_OFFSET).ravel(), minlength=2 * _MARGIN_OFFSET)
            p = np.take(quantised, c, axis=volume.channel_axis)
            is_c = needed <= 0
            missed[c] += float(p[~is_c].sum(dtype=np.int64)) / 255.0
            wrong[c] += float((255 - p[is_c].astype(np.int64)).sum()) / 255.0
            total[c] += float(p.sum(dtype=np.int64))
    return ClassMargins(histogram, missed, wrong, total / max(total.sum(), 1.0))


# --------------------------------------------------------------------------- intervals


@dataclass
class SweepSample:
    """One label volume of the sweep: which class gained or lost how many voxels, and its metrics."""

    swept_class: str
    share: float  # signed share of the class's expected missed (+) or wrong (-) voxels
    bias: float  # added to the class's log-probability, in nats
    threshold: float  # the class's resulting threshold against each other class, 1 / (1 + e^bias)
    changed_fraction: float  # voxels whose class differs from the argmax
    metrics: dict[str, float]
    tortuosity: tuple[str, ...] = ()  # phases whose tortuosity (when asked for) was measured on this volume


@dataclass
class IntervalResult:
    """The argmax metrics, their intervals and the sweep behind them; :meth:`to_dict` is JSON-ready."""

    result: MicrostructureResult
    intervals: dict[str, MetricInterval]
    sweep: BiasSweep
    samples: list[SweepSample]
    expected_volume_fraction: dict[str, float]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.sweep.describe(), "intervals": {k: v.to_dict() for k, v in self.intervals.items()},
                "expected_volume_fraction": self.expected_volume_fraction,
                "samples": [vars(s) for s in self.samples], "notes": list(self.notes), "seconds": self.seconds}


def sweep_intervals(value: dict[str, float], samples: list[dict[str, float]],
                    tortuosity_phases: Sequence[Sequence[str]] | None = None) -> tuple[dict[str, MetricInterval], list[str]]:
    """Interval per metric over the argmax (``value``) and the samples, and notes on metrics some
    samples lack. A tortuosity key missing (not percolating: an infinite factor) makes the
    interval unbounded above; one only samples have gets an infinite value.
    ``tortuosity_phases``: per sample, the phases whose tortuosity was measured on it (default:
    all); a ``tau.``/``deff.`` key of another phase does not count that sample."""

    def counts(key: str, phases: Sequence[str] | None) -> bool:
        return phases is None or not key.startswith(TRANSPORT) or key.split(".")[1] in {p.lower() for p in phases}

    measured = list(tortuosity_phases) if tortuosity_phases is not None else [None] * len(samples)
    keys = list(value) + [k for s in samples for k in s if k not in value and k.startswith(UNBOUNDED_WHEN_MISSING)]
    intervals: dict[str, MetricInterval] = {}
    notes = []
    for key in dict.fromkeys(keys):
        counted = [s for s, phases in zip(samples, measured) if counts(key, phases)]
        found = [s[key] for s in counted if key in s] + ([value[key]] if key in value else [])
        missing = len(counted) + 1 - len(found)
        unbounded = missing > 0 and key.startswith(UNBOUNDED_WHEN_MISSING)
        intervals[key] = MetricInterval(value.get(key, math.inf), min(found), math.inf if unbounded else max(found))
        if missing and not unbounded:
            notes.append(f"{key}: not defined in {missing} of {len(samples)} sweep volumes (range over the others)")
    return intervals, notes


def _sweep(probabilities: ProbabilityVolume, sweep: BiasSweep, argmax: np.ndarray, margins: ClassMargins,
           measure_flat: Callable[[np.ndarray], dict[str, float] | None],
           keep_for_tortuosity: Callable[[int, np.ndarray, tuple[str, ...]], None] | None) -> list[SweepSample]:
    """Measure the label volume of every (class, share) of the sweep's plan. ``metrics`` None: the
    volume is the argmax (no voxel changed). ``keep_for_tortuosity(sample index, labels, phases)``
    receives the changed volumes :meth:`BiasSweep.tortuosity_phases` names phases for."""
    samples = []
    for c, share in sweep.plan(probabilities.n_classes):
        voxels = share * (margins.expected_missed[c] if share > 0 else margins.expected_wrong[c])
        bias = np.zeros(probabilities.n_classes, dtype=np.int64)
        bias[c] = margins.bias_moving(c, voxels)
        labels, changed = decide(probabilities, bias, argmax)
        tortuosity = sweep.tortuosity_phases(probabilities.class_names[c], share)
        metrics = None if changed == 0 else measure_flat(labels)
        if changed and tortuosity and keep_for_tortuosity is not None:
            keep_for_tortuosity(len(samples), labels, tortuosity)
        del labels
        nats = float(bias[c]) / LOG_SCALE
        samples.append(SweepSample(probabilities.class_names[c], share, nats, 1.0 / (1.0 + math.exp(nats)),
                                   changed / argmax.size, metrics, tortuosity))  # type: ignore[arg-type]
    return samples


def measure_with_intervals(
    probabilities: ProbabilityVolume,
    sweep: BiasSweep = BiasSweep(),
    voxel_size: float | Sequence[float] | None = None,
    unit: str | None = None,
    **measure_options: Any,
) -> IntervalResult:
    """Metrics of the argmax labels of ``probabilities`` with their :class:`MetricInterval` over
    ``sweep``. ``voxel_size``/``unit``/``measure_options``: as for
    :func:`~socseg.analysis.microstructure.measure` (phase names are the class names).

    A sample that changes no voxel (one-hot probabilities) reuses the argmax metrics instead of
    measuring the same labels again. Tortuosity, when asked for, is solved for all volumes in one
    :class:`~socseg.analysis.tortuosity.SolveQueue`: the argmax's solves start first and run while
    the sweep volumes are measured; a sweep volume's solve then starts from the argmax's
    concentration field of its phase and axis (a warm start: the volumes differ by a few percent
    of the voxels, on the phase's boundaries).
    """
    started = time.perf_counter()
    phase_map = dict(enumerate(probabilities.class_names))
    names = list(probabilities.class_names)
    sweep.plan(probabilities.n_classes)  # refuses a bad sample count before any slow work
    options = dict(measure_options)
    asked = tortuosity_phases(names, options.pop("tortuosity", False))
    max_voxels = options.pop("tortuosity_max_voxels", DEFAULT_MAX_VOXELS)
    workers = options.pop("tortuosity_workers", None)

    def measure_flat(labels: np.ndarray) -> dict[str, float]:
        return flatten_metrics(measure(labels, phase_map, voxel_size, unit, **options))

    argmax, _ = decide(probabilities)
    result = measure(argmax, phase_map, voxel_size, unit, **options)
    margins = class_margins(probabilities)
    with ExitStack() as stack:
        queue, kept = None, []
        if asked:
            queue = stack.enter_context(phase_solves({name: argmax == names.index(name) for name in asked}, AXES,
                                                     voxel_size, max_voxels, workers, "argmax", keep_field=True))

        def keep_for_tortuosity(index: int, labels: np.ndarray, phases: tuple[str, ...]) -> None:
            for name in phases:
                if name in asked:
                    queue.add_mask((index, name), labels == names.index(name))  # type: ignore[union-attr]
                    kept.append((index, name))

        samples = (_sweep(probabilities, sweep, argmax, margins, measure_flat, keep_for_tortuosity if asked else None)
                   if sweep.samples else [])
        for index, name in kept:
            for axis in AXES:
                queue.submit((index, name, axis), (index, name), axis, start_from=("argmax", name, axis))  # type: ignore[union-attr]
        if queue is not None:
            result = dataclasses.replace(result, tortuosity={
                name: {axis: queue.result(("argmax", name, axis)) for axis in AXES} for name in asked})
            for index, name in kept:
                samples[index].metrics.update(flatten_tortuosity({name: {axis: queue.result((index, name, axis)) for axis in AXES}}))
    value = flatten_metrics(result)
    for sample in samples:
        if sample.metrics is None:  # the argmax itself
            sample.metrics = dict(value)
    intervals, notes = sweep_intervals(value, [s.metrics for s in samples], [s.tortuosity for s in samples])
    expected = {name: float(f) for name, f in zip(probabilities.class_names, margins.expected_fraction)}
    for name, fraction in expected.items():
        interval = intervals.get(f"vf.{name.lower()}")
        if samples and interval is not None and not interval.covers(fraction):
            notes.append(f"vf.{name.lower()}: the probability-weighted fraction {fraction:.4g} lies outside "
                         f"[{interval.low:.4g}, {interval.high:.4g}] (a class not swept, or a coarse sweep)")
    return IntervalResult(result, intervals, sweep, samples, expected, notes, time.perf_counter() - started)


def metric_intervals(probabilities: ProbabilityVolume | np.ndarray, class_names: Sequence[str] | None = None,
                     **options: Any) -> dict[str, MetricInterval]:
    """``{flat metric name: MetricInterval}`` of :func:`measure_with_intervals`, for a
    :class:`ProbabilityVolume` or an array ``(Z, Y, X, C)`` with its ``class_names``."""
    if not isinstance(probabilities, ProbabilityVolume):
        if class_names is None:
            raise ValueError("an array of probabilities needs its class_names")
        probabilities = ProbabilityVolume.from_array(probabilities, class_names)
    return measure_with_intervals(probabilities, **options).intervals
