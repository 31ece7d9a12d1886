"""Whole slices of any size from a network trained on small tiles: one pass, or a sliding window.

A U-Net is fully convolutional, so the default (``window: whole_slice``) predicts each slice in one
forward pass, mirror-padded by :data:`WHOLE_SLICE_MARGIN` and up to a multiple of
:data:`WHOLE_SLICE_MULTIPLE`: every pixel is computed once and sees the whole slice as context.
Slices above ``whole_slice_max_pixels`` (activation memory grows with the slice) and
``window: sliding`` use the sliding window instead.

The sliding window is nnU-Net style: tiles overlap (``step_fraction`` of a tile), each tile's prediction is weighted by
a Gaussian centred on the tile before blending (a U-Net is least reliable near a tile's edge,
where it sees zero padding instead of context), slices are mirror-padded at their borders, and
8-fold flip/rotation test-time augmentation is optional. It streams: slices go in one by one,
tiles of consecutive slices share forward passes, and only the slices still waiting for tiles
are held in memory, whatever the depth of the volume.

Backend-agnostic: ``predict`` is any callable ``(B, s, s, 2k + 1) -> (B, s, s, C)`` (e.g. a Keras 3
model's ``predict_on_batch`` on TensorFlow or JAX; k = ``context_slices``, 0 unless the model is
2.5D, see :mod:`socseg.data.context`); everything else is NumPy. :class:`socseg.inference.predictor.Predictor`
is what uses it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Iterator

import numpy as np

from socseg.data.tiling import tile_starts
from socseg.params import check_smoothing_sigma, check_step_fraction, check_window

Predict = Callable[[np.ndarray], np.ndarray]

# nnU-Net: Gaussian sigma = 1/8 of the tile; the weight at a tile's edge is exp(-8) of its centre.
GAUSSIAN_SIGMA_SCALE = 0.125
# Test-time augmentation: the 8 symmetries of a square tile (quarter turns, each with and without
# a mirror). Training augments with flips and rot90, so the network has seen every one of them.
DIHEDRAL: tuple[tuple[int, bool], ...] = tuple((turns, mirror) for turns in range(4) for mirror in (False, True))
# Whole-slice input: a multiple of the deepest encoder's downsampling (VGG16/ResNet50: 5 poolings),
# mirror-padded by a margin so that border pixels see image-like context rather than the zeros of
# the first convolutions' padding.
WHOLE_SLICE_MULTIPLE = 32
WHOLE_SLICE_MARGIN = 16


@dataclass(frozen=True)
class WindowSettings:
    """How whole slices are predicted: the ``inference:`` section of params.yaml plus the model's tile size.

    ``batch_size`` counts training-size tiles; a whole-slice pass takes as many slices as hold that
    many pixels (at least one).
    """

    tile_size: int
    step_fraction: float
    tta: bool
    batch_size: int
    window: str
    whole_slice_max_pixels: int
    smoothing_sigma: float = 0.0  # in-plane Gaussian on each slice's probabilities (smooth_probabilities)

    def __post_init__(self) -> None:
        check_window(self.window)
        check_smoothing_sigma(self.smoothing_sigma)
        if self.whole_slice_max_pixels < 0:
            raise ValueError(f"whole_slice_max_pixels must be >= 0, got {self.whole_slice_max_pixels}")
        if self.tile_size <= 0:
            raise ValueError(f"tile size must be positive, got {self.tile_size}")
        check_step_fraction(self.step_fraction)
        if self.batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")

    @property
    def step(self) -> int:
        return max(1, int(round(self.tile_size * float(self.step_fraction))))

    @property
    def margin(self) -> int:
        """Mirror padding on every side: half the overlap.

        An interior pixel is at most ``step / 2`` from the nearest tile centre, so at least
        ``(tile - step) / 2`` from that tile's edge; padding the border by the same amount gives
        border pixels the same context as the worst interior pixel. No overlap, no padding.
        """
        return (self.tile_size - self.step) // 2


@lru_cache(maxsize=8)
def gaussian_importance(size: int, sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """``(size, size)`` float32 weights, 1 at the tile centre, falling to ~exp(-8) at the edges (never 0)."""
    centre = (size - 1) / 2.0
    sigma = max(size * sigma_scale, 1e-6)
    profile = np.exp(-((np.arange(size) - centre) ** 2) / (2.0 * sigma**2))
    weights = np.outer(profile, profile)
    weights /= weights.max()
    weights = np.maximum(weights, weights[weights > 0].min()).astype(np.float32)
    weights.setflags(write=False)  # cached and shared: nobody may change it
    return weights


@dataclass(frozen=True)
class SlidingWindow:
    """Tile positions, padding and blend weights for slices of one shape ``(height, width)``."""

    height: int
    width: int
    settings: WindowSettings

    @property
    def pads(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Mirror padding (before, after) per axis: the margin, plus whatever makes a small slice a whole tile."""
        m, s = self.settings.margin, self.settings.tile_size
        out = []
        for length in (self.height, self.width):
            short = max(0, s - (length + 2 * m))
            out.append((m + short // 2, m + short - short // 2))
        return out[0], out[1]

    @property
    def padded_shape(self) -> tuple[int, int]:
        (a, b), (c, d) = self.pads
        return self.height + a + b, self.width + c + d

    @property
    def positions(self) -> list[tuple[int, int]]:
        s, step = self.settings.tile_size, self.settings.step
        ph, pw = self.padded_shape
        return [(y, x) for y in tile_starts(ph, s, step) for x in tile_starts(pw, s, step)]

    def pad(self, image: np.ndarray) -> np.ndarray:
        """Mirror-pad the two spatial axes of ``(H, W)`` or ``(H, W, channels)``."""
        return np.pad(image, [*self.pads] + [(0, 0)] * (image.ndim - 2), mode="symmetric")

    def weight_sum(self) -> np.ndarray:
        """Sum of the Gaussian weights of all tiles, per padded pixel (the blend's denominator)."""
        s = self.settings.tile_size
        total = np.zeros(self.padded_shape, dtype=np.float32)
        weights = gaussian_importance(s)
        for y, x in self.positions:
            total[y : y + s, x : x + s] += weights
        return total

    def crop(self, padded: np.ndarray) -> np.ndarray:
        (top, _), (left, _) = self.pads
        return padded[top : top + self.height, left : left + self.width]


@lru_cache(maxsize=8)
def _window(height: int, width: int, settings: WindowSettings) -> tuple[SlidingWindow, list[tuple[int, int]], np.ndarray]:
    window = SlidingWindow(height, width, settings)
    return window, window.positions, window.weight_sum()


def with_tta(predict: Predict) -> Predict:
    """``predict`` averaged over the 8 :data:`DIHEDRAL` transforms of each tile or whole slice, each
    undone on the output before averaging (8x the compute). The one TTA of socseg: scoring and serving."""

    def averaged(tiles: np.ndarray) -> np.ndarray:
        total = None
        for turns, mirror in DIHEDRAL:
            x = np.rot90(tiles, turns, axes=(1, 2))
            x = x[:, :, ::-1] if mirror else x
            out = np.asarray(predict(np.ascontiguousarray(x)), dtype=np.float32)
            out = out[:, :, ::-1] if mirror else out
            out = np.rot90(out, -turns, axes=(1, 2))
            total = out if total is None else total + out
        return total / np.float32(len(DIHEDRAL))

    return averaged


def predict_tiles(predict: Predict, tiles: np.ndarray, tta: bool = False) -> np.ndarray:
    """``predict`` on a ``(B, s, s, C)`` batch, with :func:`with_tta` when ``tta``."""
    return np.asarray((with_tta(predict) if tta else predict)(tiles), dtype=np.float32)


def fixed_batch(predict: Predict) -> Predict:
    """``predict`` that sees one batch size per tile shape: a batch shorter than the largest one
    seen so far for its shape is zero-padded to it and the padding's output dropped. JAX compiles
    one program per input shape, so a volume's ragged last batches would each cost a compilation;
    the padding costs a few wasted tiles instead."""
    largest: dict[tuple[int, ...], int] = {}

    def padded(tiles: np.ndarray) -> np.ndarray:
        n, shape = len(tiles), tuple(tiles.shape[1:])
        size = largest[shape] = max(n, largest.get(shape, 0))
        if n == size:
            return np.asarray(predict(tiles))
        filler = np.zeros((size - n, *shape), dtype=tiles.dtype)
        return np.asarray(predict(np.concatenate([tiles, filler])))[:n]

    return padded


@dataclass
class _InFlight:
    """One slice whose tiles are (partly) still waiting for the network."""

    window: SlidingWindow
    weight_sum: np.ndarray
    remaining: int
    acc: np.ndarray | None = field(default=None)

    def add(self, pred: np.ndarray, y: int, x: int, weights: np.ndarray) -> None:
        if self.acc is None:
            self.acc = np.zeros((*self.window.padded_shape, pred.shape[-1]), dtype=np.float32)
        s = pred.shape[0]
        self.acc[y : y + s, x : x + s] += pred * weights[..., None]
        self.remaining -= 1

    def result(self) -> np.ndarray:
        assert self.acc is not None
        return self.window.crop(self.acc / self.weight_sum[..., None])


def _checked(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"expected a non-empty (H, W) or (H, W, channels) slice, got shape {image.shape}")
    return image.astype(np.float32, copy=False).reshape(*image.shape[:2], -1)


def whole_slice_pads(height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Mirror padding (before, after) per axis of a whole-slice pass: the margin, then up to a multiple."""
    out = []
    for length in (height, width):
        total = -(-(length + 2 * WHOLE_SLICE_MARGIN) // WHOLE_SLICE_MULTIPLE) * WHOLE_SLICE_MULTIPLE - length
        out.append((total // 2, total - total // 2))
    return out[0], out[1]


def fits_whole_slice(height: int, width: int, settings: WindowSettings) -> bool:
    """Whether a slice goes through in one pass (else: the sliding window)."""
    if settings.window != "whole_slice":
        return False
    (a, b), (c, d) = whole_slice_pads(height, width)
    return (height + a + b) * (width + c + d) <= settings.whole_slice_max_pixels


def smooth_probabilities(probabilities: np.ndarray, sigma: float) -> np.ndarray:
    """``(H, W, C)`` class probabilities blurred in-plane by a Gaussian of ``sigma`` pixels (0: as given).

    Why: the network decides each pixel on its own, so boundaries come out ragged and a pixel of
    intermediate grey between pore and Ni (partial volume) often reads as YSZ. Such specks and
    one-pixel layers each add triple-phase boundary, a sum over every pore/YSZ/Ni contact, far more
    than they cost in IoU (benchmarks/results/cv_phases_postprocess/). Averaging the probabilities
    over a neighbourhood before the argmax lets a class win a pixel only where it is likely around
    it too. The smoothing is linear, so each pixel's probabilities still sum to one, and it stays
    within the slice, so a slice's labels do not depend on which other slices share its request.
    """
    if sigma <= 0.0:
        return probabilities
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(probabilities, (sigma, sigma, 0.0), mode="reflect").astype(np.float32, copy=False)


def iter_window_probabilities(
    predict: Predict, slices: Iterable[np.ndarray], settings: WindowSettings
) -> Iterator[np.ndarray]:
    """Class probabilities ``(H, W, C)`` float32 for each slice, in input order, smoothed in-plane
    by ``settings.smoothing_sigma`` (:func:`smooth_probabilities`).

    A slice is ``(H, W)`` grey values, or ``(H, W, 2k + 1)`` for a 2.5D model (see
    :func:`socseg.data.context.iter_with_context)`. Slices may differ in shape. Whole-slice passes
    batch consecutive slices of one shape; a slice too large for one pass (or every slice, with
    ``window: sliding``) goes through :func:`iter_sliding_window_probabilities`. A slice is yielded
    as soon as it is done, so memory holds only the slices of one batch.
    """
    for probabilities in _iter_unsmoothed_probabilities(predict, slices, settings):
        yield smooth_probabilities(probabilities, settings.smoothing_sigma)


def _iter_unsmoothed_probabilities(
    predict: Predict, slices: Iterable[np.ndarray], settings: WindowSettings
) -> Iterator[np.ndarray]:
    """:func:`iter_window_probabilities` before the smoothing."""
    if settings.window == "sliding":  # tiles of consecutive slices share forward passes
        yield from iter_sliding_window_probabilities(predict, slices, settings)
        return
    batch: list[np.ndarray] = []

    def flush() -> Iterator[np.ndarray]:
        if batch:
            (a, b), (c, d) = whole_slice_pads(*batch[0].shape[:2])
            padded = np.pad(np.stack(batch), [(0, 0), (a, b), (c, d), (0, 0)], mode="symmetric")
            preds = predict_tiles(predict, padded, settings.tta)
            batch.clear()
            for pred in preds:
                yield pred[a : pred.shape[0] - b, c : pred.shape[1] - d]

    for image in slices:
        image = _checked(image)
        if not fits_whole_slice(image.shape[0], image.shape[1], settings):  # too large: many tiles of its own
            yield from flush()
            yield from iter_sliding_window_probabilities(predict, [image], settings)
            continue
        if batch and batch[0].shape != image.shape:
            yield from flush()
        batch.append(image)
        (a, b), (c, d) = whole_slice_pads(*image.shape[:2])
        per_pass = max(1, settings.batch_size * settings.tile_size**2 // ((image.shape[0] + a + b) * (image.shape[1] + c + d)))
        if len(batch) >= per_pass:
            yield from flush()
    yield from flush()


def iter_sliding_window_probabilities(
    predict: Predict, slices: Iterable[np.ndarray], settings: WindowSettings
) -> Iterator[np.ndarray]:
    """Blended sliding-window class probabilities ``(H, W, C)`` float32 for each slice, in input order.

    A slice is ``(H, W)`` grey values, or ``(H, W, 2k + 1)`` for a 2.5D model (see
    :func:`socseg.data.context.iter_with_context`). Slices may differ in shape. A forward pass takes
    ``settings.batch_size`` tiles, across slice boundaries, so small slices do not waste batches;
    a slice is yielded as soon as its last tile is back, so memory holds only the slices in flight.
    """
    s = settings.tile_size
    weights = gaussian_importance(s)
    pending: deque[_InFlight] = deque()
    tiles: list[np.ndarray] = []
    owners: list[tuple[_InFlight, int, int]] = []

    def flush() -> None:
        preds = predict_tiles(predict, np.stack(tiles), settings.tta)
        for pred, (state, y, x) in zip(preds, owners):
            state.add(pred, y, x, weights)
        tiles.clear()
        owners.clear()

    def done() -> Iterator[np.ndarray]:
        while pending and pending[0].remaining == 0:
            yield pending.popleft().result()

    for image in slices:
        image = _checked(image)
        window, positions, weight_sum = _window(image.shape[0], image.shape[1], settings)
        padded = window.pad(image)
        state = _InFlight(window, weight_sum, len(positions))
        pending.append(state)
        for y, x in positions:
            tiles.append(padded[y : y + s, x : x + s])
            owners.append((state, y, x))
            if len(tiles) == settings.batch_size:
                flush()
                yield from done()
    if tiles:
        flush()
    yield from done()
