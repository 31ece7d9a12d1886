"""The predictor: one trained network and what it needs to segment raw grey slices of any size.

Everything that turns grey values into labels goes through :class:`Predictor`: the served model
(:mod:`socseg.inference.pyfunc` wraps one), ``socseg segment``, and every score socseg reports
(validation during training, the test metrics of a run, ``socseg evaluate``, the evaluate stage,
the registry gate, the benchmarks). So a number in ``metrics.json`` is what users get when they
segment the same slices: sliding window, Gaussian blend, optional TTA, the model's own
normalisation and, for a 2.5D model, real neighbouring slices as context.

The model's settings (:class:`~socseg.inference.config.ModelConfig`) are stored once, as the
pyfunc's ``model_config``; each call's settings arrive as one
:class:`~socseg.inference.request.InferenceRequest`, built by the entry point.

Keras and MLflow are imported where a network is wrapped or loaded, not at import: the Dask client
and the serving client import this package's inference modules to read a model's config and
split work, and must not pay for (or need) a deep-learning backend.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterator, Sequence

import numpy as np

from socseg.data.context import Chunk, iter_chunks, iter_with_context
from socseg.data.normalise import GreyRange
from socseg.inference.config import ModelConfig
from socseg.inference.request import InferenceOptions, InferenceRequest
from socseg.inference.runtime import RuntimeNetwork, check_runtime, keras_runtime
from socseg.inference.window import Predict, fixed_batch, iter_window_probabilities

__all__ = ["Ensemble", "GreyRangeError", "ModelConfig", "Predictor", "load_predictor"]

AXES = {"z": 0, "y": 1, "x": 2}  # request.planes letter -> array axis of a (Z, Y, X) stack


class GreyRangeError(ValueError):
    """Input mostly outside the model's grey range (see :meth:`Predictor.check_grey_range`)."""


class Predictor:
    """Raw grey slices in, class probabilities, classes or label values out.

    ``network`` is the exported Keras model (raw grey ``(B, s, s, 2k + 1)`` in, probabilities
    out: :func:`socseg.model.export.export_model`), or any object with ``predict_on_batch``; it
    stays the model that fine-tuning and re-logging start from. ``runtime`` runs the forward
    passes instead when given (:func:`socseg.inference.runtime.runtime_network`: OpenVINO on a CPU).
    """

    def __init__(self, network: Any, config: ModelConfig, runtime: RuntimeNetwork | None = None):
        import keras

        self.network = network
        self.config = config
        runtime = runtime or keras_runtime(network)
        self.runtime = runtime.description  # what every output records as the runtime that made it
        predict: Predict = runtime.runner.predict_on_batch
        if keras.backend.backend() == "jax" and runtime.runner is network:  # one compiled shape (see fixed_batch)
            predict = fixed_batch(predict)
        self._predict = predict

    @classmethod
    def load(cls, model_uri: str, runtime: str | None = None) -> "Predictor":
        """The predictor inside a logged socseg model (``runs:/<id>/segmenter``,
        ``models:/socseg-ni@champion``, a local model folder); ``runtime`` (auto, keras,
        openvino) overrides the model's ``inference.runtime`` for this load."""
        import mlflow

        override = {"runtime": check_runtime(runtime)} if runtime else None
        wrapped = mlflow.pyfunc.load_model(model_uri, model_config=override).unwrap_python_model()
        predictor = getattr(wrapped, "predictor", None)
        if not isinstance(predictor, Predictor):
            raise ValueError(f"{model_uri} is not a socseg segmenter (the pyfunc model socseg train logs)")
        if runtime and predictor.config.runtime != runtime:  # a model logged before it recorded a runtime:
            # MLflow only overrides keys the model has, so the requested runtime is applied here
            from dataclasses import replace

            from socseg.inference.runtime import runtime_network

            return Predictor(predictor.network, replace(predictor.config, runtime=runtime),
                             runtime_network(predictor.network, runtime))
        return predictor

    def as_served(self) -> "Predictor":
        """This network with its weights as they are now, run as the logged model will run
        (``inference.runtime`` of its config): a training run's final scores, which the registry
        gate compares with a loaded champion's, are then the served model's, not Keras'."""
        from socseg.inference.runtime import runtime_network

        return Predictor(self.network, self.config, runtime_network(self.network, self.config.runtime))

    @property
    def context_slices(self) -> int:
        return self.config.context_slices

    def request(self, options: InferenceOptions = InferenceOptions(), source: Any = None,
                check_range: bool | None = None) -> InferenceRequest:
        """``options`` resolved against this model (:meth:`InferenceRequest.resolve`); ``source``:
        the whole volume, whose grey range a per_volume model maps."""
        return InferenceRequest.resolve(self.config, options, source, check_range)

    def map_grey(self, images: np.ndarray, grey_range: GreyRange | None) -> np.ndarray:
        """``images`` mapped affinely so that ``grey_range`` lands on the model's layer range
        (float32, NaN -> low); unchanged for None."""
        if grey_range is None:
            return images
        layer = self.config.normalisation.layer
        low, high = float(layer.low), float(layer.high)
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
        model's own estimate of ``images``) after :meth:`map_grey`, so a float32 scan whose range
        is given or estimated passes.
        """
        if np.asarray(images).size == 0:
            return
        given = self.config.normalisation.source_range(images, grey_range)
        self._check_mapped(self.map_grey(images, given), given)

    def _check_mapped(self, images: np.ndarray, given: GreyRange | None) -> None:
        """:meth:`check_grey_range` of grey values already mapped from ``given`` (None: raw)."""
        normalisation, config = self.config.normalisation, self.config
        if images.size == 0:
            return
        low, high = float(normalisation.layer.low), float(normalisation.layer.high)
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
        elif normalisation.low_percentile is not None and normalisation.high_percentile is not None:
            origin = (f" (the training slab's {normalisation.low_percentile:g}th..{normalisation.high_percentile:g}th "
                      "percentiles)")
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
        self, images: np.ndarray, context_before: int = 0, context_after: int = 0,
        request: InferenceRequest | None = None,
    ) -> np.ndarray:
        """``(N, H, W, C)`` float32 blended probabilities for adjacent slices ``(N + before + after, H, W)``.

        The first ``context_before`` and last ``context_after`` slices are context only: not
        predicted, not returned. At the stack's ends the outermost slice stands in for missing
        neighbours.

        ``request.planes``: the planes each voxel is predicted in. ``"z"``: each slice on its own
        (a 2.5D model with its ``context_slices`` neighbours). With ``y`` or ``x`` (multi-axis
        fusion, as in volume-segmantics) the whole stack is also cut along y and x, each such
        (Z, X) or (Z, Y) plane predicted with its own neighbours along that axis, and the
        probabilities of the returned slices averaged over the planes: a 2-D network then sees each
        voxel in three planes, which removes the slice-to-slice flicker of z-only prediction at
        phase boundaries (the cross-validated gain in IoU and TPB density:
        ``benchmarks/results/cv_inference_microstructure``). The context slices are what the y
        and x planes extend into beyond the chunk, so a chunk read with
        :meth:`InferenceRequest.context` slices around it (``fusion_halo``) is predicted as in
        the whole volume (``benchmarks/results/fusion_halo``); each plane is smoothed in its own
        plane (``smoothing_sigma``) before the average.

        ``request``: the call's settings (:meth:`request`), built once by the entry point; its
        grey range is mapped onto the model's normalisation range (:meth:`map_grey`) and, if it
        says so, input mostly outside the model's range is refused on the mapped values this
        pass uses (:meth:`check_grey_range`). None: the model's settings, with ``images``
        themselves as the volume (a per_volume model estimates their range), no range check.
        """
        images = np.asarray(images)
        if images.ndim != 3:
            raise ValueError(f"expected a (N, H, W) stack, got shape {images.shape}")
        if request is None:
            request = self.request(source=images, check_range=False)
        n = len(images) - context_before - context_after
        if context_before < 0 or context_after < 0 or n < 0:
            raise ValueError(f"context {context_before} + {context_after} does not fit a stack of {len(images)} slices")
        images = self.map_grey(images, request.grey_range)
        if request.check_range:  # the slices segmented: a fusion halo would dilute a chunk of another scale
            self._check_mapped(images[context_before : context_before + n], request.grey_range)
        total: np.ndarray | None = None
        for axis in request.planes:
            stack = np.moveaxis(images, AXES[axis], 0)
            wanted = (context_before, n) if axis == "z" else (0, stack.shape[0])  # z: context slices not predicted
            for k, probs in self._plane_probabilities(stack, *wanted, request):
                if axis != "z":  # a (Z, ., C) plane: keep the chunk's rows
                    probs = probs[context_before : context_before + n]
                if total is None:
                    total = np.zeros((n, *images.shape[1:], probs.shape[-1]), dtype=np.float32)
                np.moveaxis(total, AXES[axis], 0)[k] += probs
        if total is None:
            return np.empty((0, *images.shape[1:], 1), np.float32)
        if len(request.planes) > 1:
            total /= np.float32(len(request.planes))
        return total

    def _plane_probabilities(
        self, planes: np.ndarray, first: int, count: int, request: InferenceRequest,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(k, probabilities)`` of planes ``first .. first + count - 1`` of a mapped stack, each
        with its neighbours along the stack as 2.5D context; ``k`` is the plane's index minus ``first``."""
        stream = iter_with_context(planes, self.context_slices)
        between = islice(stream, first, first + count)
        yield from enumerate(iter_window_probabilities(self._predict, between, request.window))

    def to_classes(self, probabilities: np.ndarray) -> np.ndarray:
        """Class indices (uint8) of the task's output probabilities."""
        return self.config.task.to_classes(probabilities)

    def to_labels(self, classes: np.ndarray) -> np.ndarray:
        """Class indices -> label values of the phase map."""
        return self.config.task.to_label_values(classes, self.config.phase_map)

    def classes(self, images: np.ndarray, context_before: int = 0, context_after: int = 0,
                request: InferenceRequest | None = None) -> np.ndarray:
        """Task class indices (uint8) for the slices between the context (see :meth:`probabilities`)."""
        return self.to_classes(self.probabilities(images, context_before, context_after, request))

    def iter_volume(
        self, images: Any, z_range: tuple[int, int] | None = None, chunk: int = 8,
        request: InferenceRequest | None = None,
    ) -> Iterator[tuple[Chunk, np.ndarray]]:
        """``(chunk, class indices)`` for slices ``z_range`` of a stack ``(Z, H, W)`` (an array or a
        memory map), ``chunk`` slices at a time (with fusion ``request.fusion_depth``); the context
        (2.5D neighbours, the fusion halo: :meth:`InferenceRequest.context`) comes from the whole
        stack, so the slices around ``z_range`` are real neighbours. ``request`` None: the
        model's settings with the whole stack as the volume (a per_volume model maps the
        stack's range, as training did, not each chunk's)."""
        if request is None:
            request = self.request(source=images, check_range=False)
        total = images.shape[0]
        start, stop = z_range or (0, total)
        for piece in iter_chunks(total, request.chunk_slices(chunk), request.context(self.context_slices), start, stop):
            stack = np.asarray(images[piece.read])
            yield piece, self.classes(stack, piece.before, piece.after, request)


class Ensemble(Predictor):
    """Several trained networks of one task and input, their probabilities averaged.

    Averaging the softmax of independently trained networks (other seeds, other folds) is what
    nnU-Net and most segmentation challenges do for the last point of accuracy: the members' errors
    at phase boundaries are partly independent, so the mean is smoother and better calibrated than
    any one of them, and the members' spread is a model-uncertainty estimate. An ensemble is a
    :class:`Predictor` everywhere one is taken (scoring, ``iter_volume``, serving);
    the first member's config (window, batch, TTA, grey-range check) drives the requests, and
    each member maps grey values with its own normalisation layer.
    """

    def __init__(self, members: Sequence[Predictor]):
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 models, got {len(members)}")
        first = members[0].config
        for k, member in enumerate(members[1:], start=2):
            config = member.config
            differs = [name for name, a, b in (
                ("task", first.task.name, config.task.name),
                ("class_names", first.class_names, config.class_names),
                ("phase_map", first.phase_map, config.phase_map),
                ("context_slices", first.context_slices, config.context_slices),
                ("normalisation mode", first.normalisation.mode, config.normalisation.mode),
                ("normalisation percentiles", (first.normalisation.low_percentile, first.normalisation.high_percentile),
                 (config.normalisation.low_percentile, config.normalisation.high_percentile)),
            ) if a != b]
            if differs:
                raise ValueError(f"ensemble member {k} differs from member 1 in {', '.join(differs)}: "
                                 "averaged probabilities need one task, one class order and one input")
        self.members = members
        self.network = members[0].network
        self.config = first
        runtimes = list(dict.fromkeys(m.runtime for m in members))
        self.runtime = f"ensemble of {len(members)} ({'; '.join(runtimes)})"

    @classmethod
    def load(cls, model_uris: Sequence[str], runtime: str | None = None) -> "Ensemble":  # type: ignore[override]
        """The ensemble of logged socseg models (see :meth:`Predictor.load`)."""
        return cls([Predictor.load(uri, runtime) for uri in model_uris])

    def as_served(self) -> "Ensemble":
        return Ensemble([m.as_served() for m in self.members])

    def probabilities(
        self, images: np.ndarray, context_before: int = 0, context_after: int = 0,
        request: InferenceRequest | None = None,
    ) -> np.ndarray:
        """The members' :meth:`Predictor.probabilities` averaged (one request for all, resolved
        against the first member's config when None)."""
        images = np.asarray(images)
        if request is None:
            request = self.request(source=images, check_range=False)
        total = self.members[0].probabilities(images, context_before, context_after, request)
        for member in self.members[1:]:
            total += member.probabilities(images, context_before, context_after, request)
        total /= np.float32(len(self.members))
        return total


def load_predictor(model_uris: str | Sequence[str], runtime: str | None = None) -> Predictor:
    """One logged model's :class:`Predictor`, or the :class:`Ensemble` of several (a sequence, or
    one string of URIs separated by commas, as a CSV cell or a command line holds them)."""
    uris = [u.strip() for u in model_uris.split(",")] if isinstance(model_uris, str) else list(model_uris)
    uris = [u for u in uris if u]
    if not uris:
        raise ValueError("no model URI given")
    return Predictor.load(uris[0], runtime) if len(uris) == 1 else Ensemble.load(uris, runtime)

