"""Intensity normalisation: percentile clip and scale to [0, 1].

Two modes (``normalise.mode`` in params.yaml), each a :class:`Normalisation` type stored in the
model config: the only place that decides how a model's raw grey values reach its network.

* ``fixed`` (:class:`FixedRange`): the percentiles are computed on the *training slab only* (computing them on the
  whole volume would leak test intensities into training) and are stored with the model: the
  exported model starts with an :class:`~socseg.model.export.IntensityNormalisation` layer
  holding the same two numbers, so inference applies exactly the mapping the network was
  trained with, on raw grey values of the training data's grey scale.
* ``per_volume`` (:class:`PerVolume`): every volume is mapped by its *own* grey range, the same percentiles of its
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
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np

from socseg.data.stacks import SliceReader
from socseg.params import NORMALISATION_MODES

# Percentiles of a few million voxels are as good as of all of them, and far cheaper.
_MAX_SAMPLES = 4_000_000
# Slices grey_range reads from a volume: evenly spaced, one at a time.
_MAX_SLICES = 64


GreyRange = tuple[float, float]  # (low, high) grey values of a volume: see grey_range


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


@dataclass(frozen=True, kw_only=True)
class Normalisation:
    """How a model's raw grey values reach its network: the one place the mode is decided.

    A trained network starts with an IntensityNormalisation layer (``layer``: clip to
    ``low..high``, scale to 0..1). Before it, a volume's own grey range (``source_range``) may be
    mapped affinely onto ``layer.low..layer.high``. The two modes differ only in which range that
    is: :class:`FixedRange` none (raw values of the training data's grey scale, unless a range is
    given), :class:`PerVolume` the volume's own percentiles. Stored in the model config as one
    dict (:meth:`to_dict`); :meth:`from_dict` also reads configs of earlier versions.
    """

    mode: ClassVar[str]
    low_percentile: float | None = None  # percentiles the ranges are estimated at (None: not recorded)
    high_percentile: float | None = None

    @property
    def layer(self) -> Normaliser:
        """What the exported model's IntensityNormalisation layer holds."""
        raise NotImplementedError

    @property
    def percentiles(self) -> tuple[float, float]:
        if self.low_percentile is None or self.high_percentile is None:
            raise ValueError("this model did not record its normalisation percentiles: give the volume's grey range "
                             "(--grey-range LOW,HIGH, or the request params grey_low and grey_high)")
        return self.low_percentile, self.high_percentile

    def estimate_range(self, source: Any) -> GreyRange:
        """The grey range of a whole volume (an array ``(Z, H, W)`` or an open SliceReader) at this
        model's percentiles: :func:`grey_range`, as training used it."""
        found = grey_range(source, *self.percentiles)
        return found.low, found.high

    def source_range(self, source: Any, given: GreyRange | None = None) -> GreyRange | None:
        """The grey range of ``source`` that is mapped onto the layer's range: ``given`` (checked)
        if any, else this mode's default (None: raw values reach the layer)."""
        raise NotImplementedError

    def unit_mapping(self, source_range: GreyRange | None) -> Normaliser:
        """Raw grey values -> the 0..1 the network's inner model sees, for a source whose range is
        ``source_range`` (None: the layer itself): the mapping training applies to its slabs."""
        if source_range is None:
            return self.layer
        return Normaliser(*source_range, *self.percentiles_or_nan)

    @property
    def percentiles_or_nan(self) -> tuple[float, float]:
        return (float("nan") if self.low_percentile is None else self.low_percentile,
                float("nan") if self.high_percentile is None else self.high_percentile)

    def to_dict(self) -> dict[str, Any]:
        """The model config's one encoding: mode, the layer's low/high, the percentiles (if recorded)."""
        recorded = {"low_percentile": self.low_percentile, "high_percentile": self.high_percentile}
        return {"mode": self.mode, "low": self.layer.low, "high": self.layer.high,
                **{k: v for k, v in recorded.items() if v is not None}}

    @staticmethod
    def from_dict(record: Mapping[str, Any], mode: str | None = None) -> "Normalisation":
        """From :meth:`to_dict`'s record. ``mode``: where an earlier version stored it beside the
        record (``normalisation_mode``); models logged before either are ``fixed``. Both earlier
        encodings are read until 0.2.0 (CHANGELOG.md, "Deprecated")."""
        fields = dict(record)
        chosen = str(fields.pop("mode", None) or mode or FixedRange.mode)
        kinds = {kind.mode: kind for kind in (FixedRange, PerVolume)}
        if chosen not in kinds:
            raise ValueError(f"normalisation mode {chosen!r} is not one of {', '.join(NORMALISATION_MODES)}")
        percentiles = {k: float(fields[k]) for k in ("low_percentile", "high_percentile") if fields.get(k) is not None}
        return kinds[chosen].from_layer(fields, **percentiles)

    @staticmethod
    def fit(mode: str, training_images: Iterable[np.ndarray], low_percentile: float, high_percentile: float) -> "Normalisation":
        """The normalisation of a new model, from params ``normalise.*`` and the training slabs."""
        kinds = {kind.mode: kind for kind in (FixedRange, PerVolume)}
        if mode not in kinds:
            raise ValueError(f"normalisation mode {mode!r} is not one of {', '.join(NORMALISATION_MODES)}")
        return kinds[mode].fitted(training_images, float(low_percentile), float(high_percentile))


@dataclass(frozen=True, kw_only=True)
class FixedRange(Normalisation):
    """``fixed``: the training slabs' grey range is the layer; raw values go in as they are."""

    mode: ClassVar[str] = "fixed"
    low: float
    high: float

    @property
    def layer(self) -> Normaliser:
        low_p, high_p = self.percentiles_or_nan
        return Normaliser(self.low, self.high, low_p, high_p)

    def source_range(self, source: Any, given: GreyRange | None = None) -> GreyRange | None:
        return None if given is None else check_grey_range_values(*given)

    @classmethod
    def from_layer(cls, fields: Mapping[str, Any], **percentiles: float) -> "FixedRange":
        if "low" not in fields or "high" not in fields:
            raise ValueError(f"a fixed normalisation records the layer's low and high, got {sorted(fields)}")
        return cls(low=float(fields["low"]), high=float(fields["high"]), **percentiles)

    @classmethod
    def fitted(cls, training_images: Iterable[np.ndarray], low_percentile: float, high_percentile: float) -> "FixedRange":
        """Percentiles of the training slabs only: computing them on the whole volume would leak
        test intensities into training."""
        fit = Normaliser.fit(training_images, low_percentile, high_percentile)
        return cls(low=fit.low, high=fit.high, low_percentile=low_percentile, high_percentile=high_percentile)


@dataclass(frozen=True, kw_only=True)
class PerVolume(Normalisation):
    """``per_volume``: each volume's own grey range is mapped onto a 0..1 layer."""

    mode: ClassVar[str] = "per_volume"

    @property
    def layer(self) -> Normaliser:
        low_p, high_p = self.percentiles_or_nan
        return Normaliser(0.0, 1.0, low_p, high_p)

    def source_range(self, source: Any, given: GreyRange | None = None) -> GreyRange | None:
        return self.estimate_range(source) if given is None else check_grey_range_values(*given)

    @classmethod
    def from_layer(cls, fields: Mapping[str, Any], **percentiles: float) -> "PerVolume":
        if (float(fields.get("low", 0.0)), float(fields.get("high", 1.0))) != (0.0, 1.0):
            raise ValueError(f"a per_volume normalisation's layer maps 0..1, got {fields.get('low')}..{fields.get('high')}")
        return cls(**percentiles)

    @classmethod
    def fitted(cls, training_images: Iterable[np.ndarray], low_percentile: float, high_percentile: float) -> "PerVolume":
        """Nothing to fit: every volume, training or not, brings its own range."""
        return cls(low_percentile=low_percentile, high_percentile=high_percentile)


def sampled_grey_range(
    source: Any, low_percentile: float, high_percentile: float, seed: int = 0, max_slices: int = _MAX_SLICES
) -> tuple[Normaliser, int]:
    """:func:`grey_range` and the number of finite grey values its percentiles come from."""
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
