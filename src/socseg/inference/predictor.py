"""The predictor: one trained network and what it needs to segment raw grey slices of any size.

Everything that turns grey values into labels goes through :class:`Predictor`: the served model
(:mod:`socseg.inference.pyfunc` wraps one), ``socseg segment``, and every score socseg reports
(validation during training, the test metrics of a run, ``socseg evaluate``, the evaluate stage,
the registry gate, the benchmarks). So a number in ``metrics.json`` is what users get when they
segment the same slices: sliding window, Gaussian blend, optional TTA, the model's own
normalisation and, for a 2.5D model, real neighbouring slices as context.

The model's settings (:class:`ModelConfig`) are stored once, as the pyfunc's ``model_config``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from socseg.data.context import Chunk, iter_chunks, iter_with_context
from socseg.data.tasks import NI_PHASE, check_task, classes_to_label_values
from socseg.inference.window import Predict, WindowSettings, fixed_batch, iter_window_probabilities
from socseg.params import NORMALISATION_MODES, InferenceParams, parse_bool

# What models logged by earlier socseg versions did not record yet: the value they behaved with
# (the sliding window; whole-slice passes on request, up to the bound they were introduced with).
_RECORDED_LATER = {"max_clipped_fraction": 0.5, "context_slices": 0, "encoder": "", "window": "sliding",
                   "whole_slice_max_pixels": 4096 * 1024, "normalisation_mode": "fixed"}

GreyRange = tuple[float, float]  # (low, high) grey values of a volume: see socseg.data.normalise.grey_range


class GreyRangeError(ValueError):
    """Input mostly outside the model's grey range (see :meth:`Predictor.check_grey_range`)."""


@dataclass(frozen=True)
class ModelConfig:
    """What a trained network needs besides its weights to segment raw slices."""

    task: str
    encoder: str  # vgg16 | resnet50 | unet ("" in models logged before it was recorded)
    class_names: list[str]
    phase_map: dict[int, str]
    tile_size: int
    context_slices: int  # 2.5D: neighbouring slices on each side the network sees (socseg.data.context)
    normalisation: dict[str, float]  # the network's layer: low, high (0, 1 in per_volume mode) and percentiles
    normalisation_mode: str  # fixed | per_volume (socseg.data.normalise): how raw grey values reach that layer
    window: str  # whole_slice | sliding (socseg.inference.window)
    whole_slice_max_pixels: int  # larger slices take the sliding window
    step_fraction: float
    tta: bool
    batch_size: int
    max_slice_pixels: int
    max_clipped_fraction: float  # see Predictor.check_grey_range

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "ModelConfig":
        """From the stored record; training's record may carry the mode inside ``normalisation``."""
        record = {**_RECORDED_LATER, **dict(record)}
        normalisation = dict(record.get("normalisation") or {})
        mode = str(normalisation.pop("mode", record["normalisation_mode"]))
        if mode not in NORMALISATION_MODES:
            raise ValueError(f"normalisation mode {mode!r} is not one of {', '.join(NORMALISATION_MODES)}")
        return cls(
            task=check_task(str(record["task"])),
            encoder=str(record["encoder"]),
            class_names=[str(c) for c in record["class_names"]],
            phase_map={int(k): str(v) for k, v in dict(record["phase_map"]).items()},
            tile_size=int(record["tile_size"]),
            context_slices=int(record["context_slices"]),
            normalisation={k: float(v) for k, v in normalisation.items()},
            normalisation_mode=mode,
            window=str(record["window"]),
            whole_slice_max_pixels=int(record["whole_slice_max_pixels"]),
            step_fraction=float(record["step_fraction"]),
            tta=parse_bool(record["tta"]),
            batch_size=int(record["batch_size"]),
            max_slice_pixels=int(record["max_slice_pixels"]),
            max_clipped_fraction=float(record["max_clipped_fraction"]),
        )

    @classmethod
    def from_training(cls, trained: Mapping[str, Any], inference: InferenceParams) -> "ModelConfig":
        """Training's record (task, encoder, classes, phase map, normalisation, tile size, context)
        with the ``inference:`` settings of params.yaml."""
        return cls.from_dict({
            **dict(trained),
            "window": inference.window,
            "whole_slice_max_pixels": inference.whole_slice_max_pixels,
            "step_fraction": inference.step_fraction,
            "tta": inference.tta,
            "batch_size": inference.batch_size,
            "max_slice_pixels": inference.max_slice_pixels,
            "max_clipped_fraction": inference.max_clipped_fraction,
        })

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["phase_map"] = {str(k): v for k, v in sorted(self.phase_map.items())}  # YAML/JSON keys
        return record

    @property
    def percentiles(self) -> tuple[float, float]:
        """The normalisation's low/high percentiles (what :meth:`volume_grey_range` estimates)."""
        norm = self.normalisation
        if "low_percentile" not in norm or "high_percentile" not in norm:
            raise ValueError("this model did not record its normalisation percentiles: give the volume's grey range "
                             "(--grey-range LOW,HIGH, or the request params grey_low and grey_high)")
        return norm["low_percentile"], norm["high_percentile"]

    def volume_grey_range(self, source: Any) -> GreyRange:
        """The grey range of a whole volume (an array ``(Z, H, W)`` or an open SliceReader) at this
        model's percentiles: :func:`socseg.data.normalise.grey_range`, as training used it."""
        from socseg.data.normalise import grey_range

        found = grey_range(source, *self.percentiles)
        return found.low, found.high

    @property
    def label_phase_map(self) -> dict[int, str]:
        """Label value -> class name of what the model outputs (ni task: 0 is 'rest', not a phase)."""
        if self.task == "ni":
            ni_value = next(v for v, name in self.phase_map.items() if name == NI_PHASE)
            return {0: "rest", ni_value: NI_PHASE}
        return dict(sorted(self.phase_map.items()))

    def window_settings(
        self, tta: bool | None = None, step_fraction: float | None = None, window: str | None = None
    ) -> WindowSettings:
        """The model's inference settings, with per-call overrides (None: the model's own)."""
        return WindowSettings(
            tile_size=self.tile_size,
            step_fraction=self.step_fraction if step_fraction is None else float(step_fraction),
            tta=self.tta if tta is None else bool(tta),
            batch_size=self.batch_size,
            window=self.window if window is None else str(window),
            whole_slice_max_pixels=self.whole_slice_max_pixels,
        )


class Predictor:
    """Raw grey slices in, class probabilities, classes or label values out.

    ``network`` is the exported Keras model (raw grey ``(B, s, s, 2k + 1)`` in, probabilities
    out: :func:`socseg.model.export.export_model`), or any object with ``predict_on_batch``.
    """

    def __init__(self, network: Any, config: ModelConfig):
        import keras

        self.network = network
        self.config = config
        predict: Predict = network.predict_on_batch
        if keras.backend.backend() == "jax":  # one compiled shape (see fixed_batch)
            predict = fixed_batch(predict)
        self._predict = predict

    @classmethod
    def load(cls, model_uri: str) -> "Predictor":
        """The predictor inside a logged socseg model (``runs:/<id>/segmenter``,
        ``models:/socseg-ni@champion``, a local model folder)."""
        import mlflow

        wrapped = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
        predictor = getattr(wrapped, "predictor", None)
        if not isinstance(predictor, Predictor):
            raise ValueError(f"{model_uri} is not a socseg segmenter (the pyfunc model socseg train logs)")
        return predictor

    @property
    def context_slices(self) -> int:
        return self.config.context_slices

    @property
    def per_volume(self) -> bool:
        """Whether the model maps each volume's own grey range (normalise.mode per_volume)."""
        return self.config.normalisation_mode == "per_volume"

    def volume_grey_range(self, source: Any) -> GreyRange:
        """The grey range of a whole volume at this model's percentiles (:meth:`ModelConfig.volume_grey_range`):
        pass it as ``grey_range`` to every chunk of that volume."""
        return self.config.volume_grey_range(source)

    def resolve_grey_range(self, images: np.ndarray, grey_range: GreyRange | None = None) -> GreyRange | None:
        """The grey range ``images`` are mapped from: the one given; else, for a per_volume model,
        that of ``images`` themselves (a REST request's own slices: a client that sends a volume
        in pieces should send the whole volume's range); else None (fixed mode: raw values)."""
        if grey_range is not None:
            from socseg.data.normalise import check_grey_range_values

            return check_grey_range_values(*grey_range)
        if self.per_volume:
            return self.volume_grey_range(np.asarray(images))
        return None

    def map_grey(self, images: np.ndarray, grey_range: GreyRange | None) -> np.ndarray:
        """``images`` mapped affinely so that ``grey_range`` lands on the model's (low, high)
        (float32, NaN -> low); unchanged for None."""
        if grey_range is None:
            return images
        norm = self.config.normalisation
        low, high = float(norm.get("low", 0.0)), float(norm.get("high", 1.0))
        source_low, source_high = grey_range
        mapped = np.asarray(images, dtype=np.float32) - np.float32(source_low)  # a new array
        mapped *= np.float32((high - low) / (source_high - source_low))
        mapped += np.float32(low)
        np.nan_to_num(mapped, copy=False, nan=low)
        return mapped

    def check_grey_range(self, images: np.ndarray, grey_range: GreyRange | None = None) -> None:
        """Refuse a batch mostly outside the model's grey range, before it is silently mislabelled.

        The network sees ``clip((x - low) / (high - low), 0, 1)`` with ``low``/``high`` fixed on
        the training slab (:mod:`socseg.data.normalise`). A volume on another grey scale (e.g. the
        same slices saved as float after ``2.5e-5 * x - 0.55``) clips almost entirely to one end
        and comes back as a single class without any warning. More than
        ``config.max_clipped_fraction`` of the pixels below ``low`` or above ``high`` raises
        :class:`GreyRangeError` (HTTP 400 when served; one ``error:`` line in ``socseg segment``).

        The check runs on the values the network will see: with a ``grey_range`` (or a per_volume
        model's own estimate, :meth:`resolve_grey_range`) after :meth:`map_grey`, so a float32
        scan whose range is given or estimated passes.
        """
        if "low" not in self.config.normalisation or np.asarray(images).size == 0:
            return
        given = self.resolve_grey_range(images, grey_range)
        self._check_mapped(self.map_grey(images, given), given)

    def _check_mapped(self, images: np.ndarray, given: GreyRange | None) -> None:
        """:meth:`check_grey_range` of grey values already mapped from ``given`` (None: raw)."""
        norm, config = self.config.normalisation, self.config
        if "low" not in norm or "high" not in norm or images.size == 0:
            return
        low, high = float(norm["low"]), float(norm["high"])
        below = int(np.count_nonzero(images < low))
        above = int(np.count_nonzero(images > high))
        fraction = (below + above) / images.size
        if fraction <= config.max_clipped_fraction:
            return
        flat = images.reshape(-1)
        sample = flat[:: max(1, flat.size // 1_000_000)]  # percentiles of ~1M values are plenty
        p1, p99 = (float(v) for v in np.percentile(sample, [1, 99]))
        if given is not None:
            origin = f" (after mapping the grey range {given[0]:g}..{given[1]:g} onto it)"
        elif "low_percentile" in norm and "high_percentile" in norm:
            origin = f" (the training slab's {norm['low_percentile']:g}th..{norm['high_percentile']:g}th percentiles)"
        else:
            origin = ""
        side = "below" if below >= above else "above"
        raise GreyRangeError(
            f"grey values out of this model's range: {fraction:.1%} of the {images.size} pixels lie outside the "
            f"model's range {low:g}..{high:g}{origin} ({below} below, {above} above) and would be clipped "
            f"(allowed: {config.max_clipped_fraction:.0%}, inference.max_clipped_fraction); the input spans "
            f"{float(flat.min()):.6g}..{float(flat.max()):.6g} (1st..99th percentile {p1:.6g}..{p99:.6g}), mostly "
            f"{side} the model's range: it is probably on another grey scale than the training data (another "
            "dtype, or rescaled when saved), so convert it back, or segment it anyway with `socseg segment "
            "--allow-out-of-range` or the request param allow_out_of_range=true"
        )

    def probabilities(
        self,
        images: np.ndarray,
        context_before: int = 0,
        context_after: int = 0,
        tta: bool | None = None,
        step_fraction: float | None = None,
        window: str | None = None,
        grey_range: GreyRange | None = None,
        check_range: bool = False,
    ) -> np.ndarray:
        """``(N, H, W, C)`` float32 blended probabilities for adjacent slices ``(N + before + after, H, W)``.

        The first ``context_before`` and last ``context_after`` slices are context only (a 2.5D
        model's neighbours of the chunk): not predicted, not returned. At the stack's ends the
        outermost slice stands in for missing neighbours.

        ``grey_range`` (low, high): the grey values of the whole volume these slices come from
        that are mapped onto the model's normalisation range (:meth:`map_grey`). A per_volume
        model given none uses the range of ``images`` themselves (:meth:`resolve_grey_range`).
        ``check_range``: refuse input mostly outside the model's range (:meth:`check_grey_range`),
        on the mapped values this pass uses (mapped once, not once to check and once to predict).
        """
        images = np.asarray(images)
        if images.ndim != 3:
            raise ValueError(f"expected a (N, H, W) stack, got shape {images.shape}")
        given = self.resolve_grey_range(images, grey_range)
        images = self.map_grey(images, given)
        if check_range:
            self._check_mapped(images, given)
        n = len(images) - context_before - context_after
        if context_before < 0 or context_after < 0 or n < 0:
            raise ValueError(f"context {context_before} + {context_after} does not fit a stack of {len(images)} slices")
        settings = self.config.window_settings(tta, step_fraction, window)
        stream = iter_with_context(images, self.context_slices)
        out: np.ndarray | None = None
        between = islice(stream, context_before, context_before + n)  # context slices are not predicted
        for k, probs in enumerate(iter_window_probabilities(self._predict, between, settings)):
            if out is None:
                out = np.empty((n, *probs.shape), dtype=np.float32)
            out[k] = probs
        return out if out is not None else np.empty((0, *images.shape[1:], 1), np.float32)

    def to_classes(self, probabilities: np.ndarray) -> np.ndarray:
        from socseg.model.metrics import probabilities_to_classes  # keeps keras out of this import

        return probabilities_to_classes(probabilities, self.config.task)

    def to_labels(self, classes: np.ndarray) -> np.ndarray:
        return classes_to_label_values(classes, self.config.task, self.config.phase_map)

    def classes(self, images: np.ndarray, context_before: int = 0, context_after: int = 0, **settings: Any) -> np.ndarray:
        """Task class indices (uint8) for the slices between the context (see :meth:`probabilities`)."""
        return self.to_classes(self.probabilities(images, context_before, context_after, **settings))

    def iter_volume(
        self,
        images: Any,
        z_range: tuple[int, int] | None = None,
        chunk: int = 8,
        **settings: Any,
    ) -> Iterator[tuple[Chunk, np.ndarray]]:
        """``(chunk, class indices)`` for slices ``z_range`` of a stack ``(Z, H, W)`` (an array or a
        memory map), ``chunk`` slices at a time; a 2.5D model's context comes from the whole
        stack, so the slices around ``z_range`` are real neighbours. A per_volume model without
        a ``grey_range`` setting uses the whole stack's (as training did), not each chunk's."""
        if self.per_volume and settings.get("grey_range") is None:
            settings["grey_range"] = self.volume_grey_range(images)
        total = images.shape[0]
        start, stop = z_range or (0, total)
        for piece in iter_chunks(total, chunk, self.context_slices, start, stop):
            stack = np.asarray(images[piece.read])
            yield piece, self.classes(stack, piece.before, piece.after, **settings)

    def multi_axis_probabilities(
        self,
        volume: np.ndarray,
        axes: tuple[str, ...] = ("z", "y", "x"),
        chunk: int = 8,
        progress: Callable[[int], Any] | None = None,
        **settings: Any,
    ) -> np.ndarray:
        """Mean of the probabilities from slicing ``volume`` (Z, Y, X) along each of ``axes``.

        As in volume-segmantics: a 2-D network sees each voxel in three planes, and averaging
        removes the slice-to-slice flicker of z-only prediction. Holds the volume's
        probabilities, ``4 * C`` bytes per voxel. ``progress(n)`` is called after every ``n``
        planes. A 2.5D model sees each plane's real neighbours along the axis being sliced.
        """
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ValueError(f"expected a (Z, Y, X) volume, got shape {volume.shape}")
        names = list(axes)
        unknown = [a for a in names if a not in AXES]
        if unknown or not names:
            raise ValueError(f"axes must be a non-empty subset of z, y, x; got {names}")
        if self.per_volume and settings.get("grey_range") is None:  # the volume's range, not each plane chunk's
            settings["grey_range"] = self.volume_grey_range(volume)
        total: np.ndarray | None = None
        for name in names:
            planes = np.moveaxis(volume, AXES[name], 0)
            for piece in iter_chunks(planes.shape[0], chunk, self.context_slices):
                stack = np.ascontiguousarray(planes[piece.read])
                probs = self.probabilities(stack, piece.before, piece.after, **settings)
                if total is None:
                    total = np.zeros((*volume.shape, probs.shape[-1]), dtype=np.float32)
                np.moveaxis(total, AXES[name], 0)[piece.start : piece.stop] += probs
                if progress is not None:
                    progress(piece.size)
        assert total is not None
        total /= np.float32(len(names))
        return total


AXES = {"z": 0, "y": 1, "x": 2}
