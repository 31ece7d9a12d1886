"""What the napari widget does, without Qt: segment an image layer with a registered model the way
``socseg segment`` does, and fine-tune on painted corrections.

Each step is a plain function (the segmentation a generator that yields its progress), run by
:mod:`socseg.viewer.jobs` in a child process (this module loads Keras, the viewer's process never
does). Nothing here writes a file: the segmentation lives in memory until the user saves a layer.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any, Generator, Mapping

import numpy as np

from socseg.analysis.uncertainty import class_probabilities, normalised_entropy, quantise
from socseg.data.context import iter_chunks
from socseg.data.stacks import SliceReader
from socseg.data.volumes import IMAGE_DTYPES, Volume, VolumeError, VolumeMeta, check_image_array
from socseg.inference.predictor import Predictor
from socseg.inference.request import InferenceOptions
from socseg.viewer.results import Segmentation
from socseg.viewer.layers import correction_to_labels, painted_slices


def load_predictor(model_uri: str, tracking_uri: str) -> Predictor:
    """The model at ``model_uri`` in the tracking store ``tracking_uri``; the store is also set for
    what this process does next (a fine-tune logs and registers there)."""
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # read by socseg.training.tracking.tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    return Predictor.load(model_uri)


def as_stack(image: Any) -> Any:
    """A layer's data as a (Z, Y, X) stack (a single 2-D image as one slice), dtype checked; lazy
    arrays (Zarr, Dask) stay lazy."""
    if getattr(image, "ndim", 0) == 2:
        image = np.asarray(image)[np.newaxis]
    if getattr(image, "ndim", 0) != 3:
        raise VolumeError(f"segment a grey image of 2 or 3 dimensions (z, y, x), this layer has shape {np.shape(image)}")
    if np.dtype(image.dtype).name not in IMAGE_DTYPES:
        raise VolumeError(f"image dtype {image.dtype} not allowed (allowed: {', '.join(IMAGE_DTYPES)})")
    return image


def segment_array(predictor: Predictor, image: Any, options: InferenceOptions = InferenceOptions(),
                  slice_batch: int = 8, model_uri: str = "") -> Generator[int, None, Segmentation]:
    """Segment a grey stack chunk by chunk, yielding the number of slices done; returns the
    :class:`Segmentation`. ``image``: the layer's array, or the path of the file it was opened
    from (any input ``socseg segment`` reads), read a chunk at a time. The request is resolved once
    on the whole stack and each chunk is read with the context slices it needs (2.5D, fusion
    halo), as ``socseg segment`` does, so the labels are the same voxel for voxel. Memory: the label and uncertainty
    volumes (uint8), one chunk's probabilities and, for an array, the array."""
    with ExitStack() as closing:
        if isinstance(image, (str, os.PathLike)):
            reader = closing.enter_context(SliceReader(image))
            shape, read = reader.shape, reader.read
            request = predictor.request(options, source=reader)
        else:
            stack = as_stack(image)
            shape = stack.shape

            def read(start: int, stop: int) -> np.ndarray:
                chunk = np.asarray(stack[start:stop])
                check_image_array(chunk, "the image layer")
                return chunk

            request = predictor.request(options, source=stack)
        labels = np.empty(shape, dtype=np.uint8)
        uncertainty = np.empty(shape, dtype=np.uint8)
        for piece in iter_chunks(shape[0], request.chunk_slices(slice_batch), request.context(predictor.context_slices)):
            probabilities = predictor.probabilities(read(piece.read.start, piece.read.stop), piece.before, piece.after,
                                                    request)
            labels[piece.start:piece.stop] = predictor.to_labels(predictor.to_classes(probabilities))
            uncertainty[piece.start:piece.stop] = quantise(normalised_entropy(class_probabilities(probabilities)))
            yield piece.stop
    return Segmentation(labels, uncertainty, dict(predictor.config.label_phase_map), model_uri,
                        {"model_uri": model_uri, **request.record()})


def corrected_volume(image: Any, painted: np.ndarray, phase_map: Mapping[int, str], ignore_value: int,
                     name: str = "napari") -> tuple[Volume, list[int]]:
    """The grey image and the painted corrections as a sparse labelled volume (the ignore value
    where nothing was painted), and the painted slices."""
    stack = np.asarray(as_stack(image))
    painted = np.asarray(painted)
    if painted.ndim == 2:
        painted = painted[np.newaxis]
    if painted.shape != stack.shape:
        raise VolumeError(f"the correction layer is {painted.shape}, the image {stack.shape}: paint on a layer of the image's shape")
    slices = painted_slices(painted)
    if not slices:
        raise VolumeError("nothing is painted: paint a few slices of the correction layer first")
    labels = correction_to_labels(painted, phase_map, ignore_value)
    meta = VolumeMeta(name=name, shape=stack.shape, image_dtype=stack.dtype.name,
                      phase_map={int(k): str(v) for k, v in phase_map.items()}, source="napari", has_labels=True)
    return Volume(stack, labels, meta), slices


def finetune_on_corrections(params: Mapping[str, Any], model_uri: str, image: Any, painted: np.ndarray,
                            phase_map: Mapping[int, str], run_name: str | None = None) -> Any:
    """``socseg finetune`` on the painted slices: an MLflow run, registered as challenger and gated
    on the held-out painted slices as the command does. Returns its FinetuneResult."""
    from socseg.params import typed
    from socseg.training.finetune import finetune

    ignore = typed(params).finetune.ignore_value
    volume, slices = corrected_volume(image, painted, phase_map, ignore)
    return finetune(params, model_uri, volume, labelled=slices, ignore_value=ignore, run_name=run_name)

