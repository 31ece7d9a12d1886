"""Intensity normalisation: percentile clip and scale to [0, 1].

Two modes (``normalise.mode`` in params.yaml, recorded in the model):

* ``fixed``: the percentiles are computed on the *training slab only* (computing them on the
  whole volume would leak test intensities into training) and are stored with the model: the
  exported model starts with an :class:`~socseg.model.export.IntensityNormalisation` layer
  holding the same two numbers, so inference applies exactly the mapping the network was
  trained with, on raw grey values of the training data's grey scale.
* ``per_volume``: every volume is mapped by its *own* grey range, the same percentiles of its
  own grey values (:func:`grey_range`, on the whole volume: training volumes and scans to
  segment alike). The network then sees the same values whether a scan was saved as uint16,
  as uint8 or as a float32 phase reconstruction (``a * x + b``); the exported model's layer is
  ``IntensityNormalisation(0, 1)`` and the predictor maps a volume's range to 0..1 first. Only
  two unsupervised numbers per volume come from its val/test slices, as at inference.

:func:`grey_range` samples a volume slice by slice (a few dozen evenly spaced slices, a random
pixel subset of each, fixed seed: deterministic), so a scan larger than memory, streamed by
:class:`socseg.data.stacks.SliceReader`, costs one pass over those slices.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

# Percentiles of a few million voxels are as good as of all of them, and far cheaper.
_MAX_SAMPLES = 4_000_000
# Slices grey_range reads from a volume: evenly spaced, one at a time.
_MAX_SLICES = 64


class GreyRangeEstimateError(ValueError):
    """A volume whose grey range cannot be estimated: empty, constant, or without finite values."""


def _percentile_range(values: np.ndarray, low_percentile: float, high_percentile: float, what: str) -> tuple[float, float]:
    """(low, high) percentiles of the finite ``values``: the one place both modes compute them.

    Raises :class:`GreyRangeEstimateError` naming ``what`` when there is nothing to normalise with.
    """
    if values.size == 0:
        raise GreyRangeEstimateError(f"{what}: empty, no grey values to estimate a grey range from")
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise GreyRangeEstimateError(f"{what}: no finite grey values (all {values.size} sampled are NaN or infinite): "
                                     "cannot estimate a grey range")
    low, high = (float(v) for v in np.percentile(finite.astype(np.float64, copy=False), [low_percentile, high_percentile]))
    if not high > low:
        raise GreyRangeEstimateError(
            f"{what}: grey values are constant ({low:g} at the {low_percentile:g}th and {high_percentile:g}th "
            "percentiles): cannot normalise")
    return low, high


@dataclass(frozen=True)
class Normaliser:
    low: float
    high: float
    low_percentile: float
    high_percentile: float

    @classmethod
    def fit(
        cls, images: Iterable[np.ndarray], low_percentile: float, high_percentile: float, seed: int = 0
    ) -> "Normaliser":
        """Percentiles of the grey values of ``images`` (the training slabs)."""
        rng = np.random.default_rng(seed)
        samples = []
        arrays = [np.asarray(a) for a in images]
        total = sum(a.size for a in arrays)
        if total == 0:
            raise ValueError("cannot fit intensity normalisation on empty training data")
        for a in arrays:
            flat = a.reshape(-1)
            n = max(1, int(round(_MAX_SAMPLES * a.size / total)))
            samples.append(flat if flat.size <= n else flat[rng.integers(0, flat.size, n)])
        low, high = _percentile_range(np.concatenate(samples), low_percentile, high_percentile, "training grey values")
        return cls(low, high, float(low_percentile), float(high_percentile))

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Clip to [low, high] and scale to float32 [0, 1]."""
        scaled = (np.asarray(image, dtype=np.float32) - np.float32(self.low)) / np.float32(self.high - self.low)
        return np.clip(scaled, 0.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Normaliser":
        return cls(**json.loads(Path(path).read_text()))


def sampled_grey_range(
    source: Any, low_percentile: float, high_percentile: float, seed: int = 0, max_slices: int = _MAX_SLICES
) -> tuple[Normaliser, int]:
    """:func:`grey_range` and the number of finite grey values its percentiles come from."""
    from socseg.data.stacks import SliceReader  # stacks imports volumes; keep this module light

    reader = source if isinstance(source, SliceReader) else None
    shape = tuple(int(n) for n in (reader.shape if reader is not None else np.shape(source)))
    what = f"volume {reader.path}" if reader is not None else f"volume of shape {shape}"
    if len(shape) != 3:
        raise GreyRangeEstimateError(f"{what}: expected a (Z, H, W) volume to estimate a grey range from")
    if 0 in shape:
        raise GreyRangeEstimateError(f"{what}: empty, no grey values to estimate a grey range from")
    depth, pixels = shape[0], shape[1] * shape[2]
    picked = np.unique(np.linspace(0, depth - 1, min(depth, max_slices)).round().astype(np.int64))
    per_slice = max(1, _MAX_SAMPLES // len(picked))
    rng = np.random.default_rng(seed)
    samples = []
    for z in picked:
        flat = np.asarray(reader.read(int(z), int(z) + 1)[0] if reader is not None else source[int(z)]).reshape(-1)
        if flat.size > per_slice:
            flat = flat[rng.integers(0, pixels, per_slice)]
        samples.append(flat.astype(np.float64))
    values = np.concatenate(samples)
    low, high = _percentile_range(values, low_percentile, high_percentile, what)
    return Normaliser(low, high, float(low_percentile), float(high_percentile)), int(np.isfinite(values).sum())


def grey_range(source: Any, low_percentile: float, high_percentile: float, seed: int = 0) -> Normaliser:
    """The grey range of a whole volume: its ``low``/``high`` percentiles, as a :class:`Normaliser`.

    ``source``: an array or memory map ``(Z, H, W)`` (anything indexable by slice, e.g. a Zarr
    array) or an open :class:`~socseg.data.stacks.SliceReader`. Reads at most 64 evenly spaced
    slices, one at a time, and a random subset of each slice's pixels (fixed ``seed``: the same
    volume always gives the same range, so training, scoring, ``socseg segment``, ``socseg
    stats`` and the REST client agree). NaN and infinite values are ignored. Raises
    :class:`GreyRangeEstimateError` (a ValueError) naming the problem for an empty or constant
    volume or one without finite values.

    Why per volume: the same sample saved as uint16, uint8 or as a float32 phase reconstruction
    (``a * x + b``) has different grey values but the same percentiles *relative to its own
    distribution*, so mapping each volume's range to 0..1 gives the network the same input.
    """
    return sampled_grey_range(source, low_percentile, high_percentile, seed)[0]


def parse_grey_range(text: str) -> tuple[float, float]:
    """``"LOW,HIGH"`` (``--grey-range``) -> (low, high), finite with low < high."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"grey range {text!r}: expected LOW,HIGH, two numbers, e.g. 20000,43000") from None
    return check_grey_range_values(low, high)


def check_grey_range_values(low: float, high: float) -> tuple[float, float]:
    """A given grey range as floats, refused unless finite with low < high."""
    low, high = float(low), float(high)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"grey range {low:g},{high:g}: both ends must be finite numbers")
    if not high > low:
        raise ValueError(f"grey range {low:g},{high:g}: LOW must be below HIGH")
    return low, high
