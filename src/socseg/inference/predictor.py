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
from socseg.params import InferenceParams, parse_bool

# What models logged by earlier socseg versions did not record yet: the value they behaved with.
_RECORDED_LATER = {"max_clipped_fraction": 0.5, "context_slices": 0, "encoder": ""}


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
    normalisation: dict[str, float]
    step_fraction: float
    tta: bool
    batch_size: int
    max_slice_pixels: int
    max_clipped_fraction: float  # see Predictor.check_grey_range

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "ModelConfig":
        record = {**_RECORDED_LATER, **dict(record)}
        return cls(
            task=check_task(str(record["task"])),
            encoder=str(record["encoder"]),
            class_names=[str(c) for c in record["class_names"]],
            phase_map={int(k): str(v) for k, v in dict(record["phase_map"]).items()},
            tile_size=int(record["tile_size"]),
            context_slices=int(record["context_slices"]),
            normalisation={k: float(v) for k, v in dict(record.get("normalisation") or {}).items()},
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
    def label_phase_map(self) -> dict[int, str]:
        """Label value -> class name of what the model outputs (ni task: 0 is 'rest', not a phase)."""
        if self.task == "ni":
            ni_value = next(v for v, name in self.phase_map.items() if name == NI_PHASE)
            return {0: "rest", ni_value: NI_PHASE}
        return dict(sorted(self.phase_map.items()))

    def window(self, tta: bool | None = None, step_fraction: float | None = None) -> WindowSettings:
        return WindowSettings(
            tile_size=self.tile_size,
            step_fraction=self.step_fraction if step_fraction is None else float(step_fraction),
            tta=self.tta if tta is None else bool(tta),
            batch_size=self.batch_size,
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
            predict = fixed_batch(predict, config.batch_size)
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

    def check_grey_range(self, images: np.ndarray) -> None:
        """Refuse a batch mostly outside the model's grey range, before it is silently mislabelled.

        The network sees ``clip((x - low) / (high - low), 0, 1)`` with ``low``/``high`` fixed on
        the training slab (:mod:`socseg.data.normalise`). A volume on another grey scale (e.g. the
        same slices saved as float after ``2.5e-5 * x - 0.55``) clips almost entirely to one end
        and comes back as a single class without any warning. More than
        ``config.max_clipped_fraction`` of the pixels below ``low`` or above ``high`` raises
        :class:`GreyRangeError` (HTTP 400 when served; one ``error:`` line in ``socseg segment``).
        """
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
        if "low_percentile" in norm and "high_percentile" in norm:
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
    ) -> np.ndarray:
        """``(N, H, W, C)`` float32 blended probabilities for adjacent slices ``(N + before + after, H, W)``.

        The first ``context_before`` and last ``context_after`` slices are context only (a 2.5D
        model's neighbours of the chunk): not predicted, not returned. At the stack's ends the
        outermost slice stands in for missing neighbours.
        """
        images = np.asarray(images)
        if images.ndim != 3:
            raise ValueError(f"expected a (N, H, W) stack, got shape {images.shape}")
        n = len(images) - context_before - context_after
        if context_before < 0 or context_after < 0 or n < 0:
            raise ValueError(f"context {context_before} + {context_after} does not fit a stack of {len(images)} slices")
        window = self.config.window(tta, step_fraction)
        stream = iter_with_context(images, self.context_slices)
        out: np.ndarray | None = None
        between = islice(stream, context_before, context_before + n)  # context slices are not predicted
        for k, probs in enumerate(iter_window_probabilities(self._predict, between, window)):
            if out is None:
                out = np.empty((n, *probs.shape), dtype=np.float32)
            out[k] = probs
        return out if out is not None else np.empty((0, *images.shape[1:], 1), np.float32)

    def to_classes(self, probabilities: np.ndarray) -> np.ndarray:
        from socseg.model.metrics import probabilities_to_classes  # keeps keras out of this import

        return probabilities_to_classes(probabilities, self.config.task)

    def to_labels(self, classes: np.ndarray) -> np.ndarray:
        return classes_to_label_values(classes, self.config.task, self.config.phase_map)

    def classes(self, images: np.ndarray, context_before: int = 0, context_after: int = 0, **window: Any) -> np.ndarray:
        """Task class indices (uint8) for the slices between the context (see :meth:`probabilities`)."""
        return self.to_classes(self.probabilities(images, context_before, context_after, **window))

    def iter_volume(
        self,
        images: Any,
        z_range: tuple[int, int] | None = None,
        chunk: int = 8,
        **window: Any,
    ) -> Iterator[tuple[Chunk, np.ndarray]]:
        """``(chunk, class indices)`` for slices ``z_range`` of a stack ``(Z, H, W)`` (an array or a
        memory map), ``chunk`` slices at a time; a 2.5D model's context comes from the whole
        stack, so the slices around ``z_range`` are real neighbours."""
        total = images.shape[0]
        start, stop = z_range or (0, total)
        for piece in iter_chunks(total, chunk, self.context_slices, start, stop):
            stack = np.asarray(images[piece.read])
            yield piece, self.classes(stack, piece.before, piece.after, **window)

    def multi_axis_probabilities(
        self,
        volume: np.ndarray,
        axes: tuple[str, ...] = ("z", "y", "x"),
        chunk: int = 8,
        progress: Callable[[int], Any] | None = None,
        **window: Any,
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
        total: np.ndarray | None = None
        for name in names:
            planes = np.moveaxis(volume, AXES[name], 0)
            for piece in iter_chunks(planes.shape[0], chunk, self.context_slices):
                stack = np.ascontiguousarray(planes[piece.read])
                probs = self.probabilities(stack, piece.before, piece.after, **window)
                if total is None:
                    total = np.zeros((*volume.shape, probs.shape[-1]), dtype=np.float32)
                np.moveaxis(total, AXES[name], 0)[piece.start : piece.stop] += probs
                if progress is not None:
                    progress(piece.size)
        assert total is not None
        total /= np.float32(len(names))
        return total


AXES = {"z": 0, "y": 1, "x": 2}
