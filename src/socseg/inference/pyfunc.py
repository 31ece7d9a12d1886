"""The served model: an MLflow pyfunc that turns raw grey slices of any size into label slices.

:class:`Segmenter` wraps the exported Keras model (normalisation inside), the phase map and the
sliding-window settings, so ``mlflow models serve -m models:/<name>@champion --env-manager local``
serves whole-slice segmentation, and ``mlflow.pyfunc.load_model(uri).predict`` does the same
locally. Two input forms (serving/README.md has the JSON):

* tensor: an array ``(N, H, W)`` (or ``(N, H, W, 1)``) of uint8, uint16 or float32 grey values
  -> labels ``(N, H, W)`` uint8 with the phase map's label values (e.g. 0/128/255);
* compact: a column ``image`` of base64-encoded slices, each a ``.npy`` or TIFF file's bytes
  (uint16 stays exact and the payload is ~20x smaller than JSON numbers) -> a DataFrame with a
  column ``labels`` in the same encoding, ``phase_map`` (JSON) and optionally ``probabilities``.

Every problem with a request raises :class:`MlflowException` with ``INVALID_PARAMETER_VALUE``,
which MLflow's scoring server answers with HTTP 400 and the message; the server stays up.

Keras (and socseg's model modules) are imported where a network is loaded or saved: the Dask
client reads a model's config through :func:`model_config` without a deep-learning backend.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import tempfile
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import numpy as np
import pandas as pd
import tifffile
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ParamSchema, ParamSpec

from socseg.analysis.uncertainty import uncertainty
from socseg.data.normalise import check_grey_range_values
from socseg.inference.config import ModelConfig
from socseg.inference.predictor import GreyRangeError, Predictor
from socseg.inference.request import InferenceOptions
from socseg.params import parse_bool

KERAS_ARTIFACT = "keras_model"
IMAGE_COLUMN = "image"
ENCODINGS = ("npy", "tiff")
GREY_DTYPES = ("uint8", "uint16", "float32")

_NPY_MAGIC = b"\x93NUMPY"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class RequestError(MlflowException):
    """A bad request: the scoring server turns it into HTTP 400 with this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


# --------------------------------------------------------------------------- configuration


def _signature(config: ModelConfig) -> ModelSignature:
    """Per-request parameters only: inputs are checked by the model itself, with clearer messages
    than schema enforcement gives, and one schema could not cover both input forms."""
    return ModelSignature(
        params=ParamSchema(
            [
                ParamSpec("return_probabilities", "boolean", False),
                ParamSpec("return_uncertainty", "boolean", False),  # normalised entropy, float32 0..1
                ParamSpec("tta", "boolean", config.tta),
                ParamSpec("window", "string", config.window),  # whole_slice | sliding
                ParamSpec("step_fraction", "double", config.step_fraction),
                ParamSpec("smoothing_sigma", "double", config.smoothing_sigma),  # in-plane, pixels; 0: none
                ParamSpec("planes", "string", config.planes),  # planes fused: z | zyx (any of z, y, x)
                ParamSpec("encoding", "string", ""),  # compact output: "" = as the input, npy, tiff
                ParamSpec("dtype", "string", ""),  # tensor input: declared grey dtype, checked
                ParamSpec("context_before", "long", 0),  # 2.5D: leading slices sent as context only
                ParamSpec("context_after", "long", 0),  # 2.5D: trailing slices sent as context only
                ParamSpec("allow_out_of_range", "boolean", False),  # skip Predictor.check_grey_range
                ParamSpec("describe", "boolean", False),  # answer with the model's config, not labels
                # The whole volume's grey range (both or neither; `socseg stats`): mapped onto the
                # model's normalisation range. Neither: a per_volume model uses the request's own slices.
                ParamSpec("grey_low", "double", None),
                ParamSpec("grey_high", "double", None),
            ]
        )
    )


def pinned_requirements() -> list[str]:
    """Pinned runtime packages of this environment (skips MLflow's slow requirement inference).

    socseg itself is not on PyPI; the segmenter carries its code (``code_paths``), so these are
    all a serving environment needs besides it.
    """
    import keras  # not at import: the Dask and REST clients read model configs without a backend

    names = ["mlflow", "keras", "numpy", "pandas", "tifffile", "pyyaml"]
    names += {"tensorflow": ["tensorflow-cpu", "tensorflow"], "jax": ["jax", "jaxlib"]}.get(keras.backend.backend(), [])
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return pins


def _model_kwargs(keras_model, config: ModelConfig, tmp: str) -> dict[str, Any]:
    path = Path(tmp) / "model.keras"
    keras_model.save(path)
    return {
        "python_model": Segmenter(),
        "artifacts": {KERAS_ARTIFACT: str(path)},
        "model_config": config.to_dict(),
        "signature": _signature(config),
        "pip_requirements": pinned_requirements(),
        # The socseg package travels inside the model (code/socseg): a server whose environment
        # MLflow builds from the pinned requirements (or any Python with them) can load it, and a
        # model keeps the pre/post-processing code it was trained with.
        "code_paths": [str(Path(__file__).resolve().parents[1])],
    }


@contextlib.contextmanager
def _no_input_example_warning() -> Iterator[None]:
    """No input example on purpose: MLflow would load and run the model while logging it (seconds
    per training run); serving/README.md documents the request format instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        yield


def log_segmenter(keras_model, config: ModelConfig, name: str = "segmenter", **kwargs: Any):
    """Log ``keras_model`` (raw grey in, probabilities out: :func:`socseg.model.export.export_model`)
    as a pyfunc segmenter in the active run; returns MLflow's ModelInfo. ``kwargs`` go to
    ``log_model`` (e.g. ``registered_model_name``)."""
    with tempfile.TemporaryDirectory() as tmp, _no_input_example_warning():
        return mlflow.pyfunc.log_model(name=name, **_model_kwargs(keras_model, config, tmp), **kwargs)


def save_segmenter(keras_model, config: ModelConfig, path: str | Path) -> Path:
    """Save the pyfunc segmenter to a local folder (no tracking server); ``path`` is its model URI."""
    with tempfile.TemporaryDirectory() as tmp, _no_input_example_warning():
        mlflow.pyfunc.save_model(path=str(path), **_model_kwargs(keras_model, config, tmp))
    return Path(path)


def model_config(model_uri: str) -> ModelConfig:
    """The :class:`ModelConfig` stored with a logged segmenter, read from its MLmodel (nothing is loaded)."""
    info = mlflow.models.get_model_info(model_uri)
    record = (info.flavors.get("python_function") or {}).get("config")
    if not record or "class_names" not in record:
        raise ValueError(f"{model_uri} is not a socseg segmenter (its MLmodel has no socseg model config)")
    return ModelConfig.from_dict(record)


# --------------------------------------------------------------------------- request parsing


@dataclass
class ParsedRequest:
    images: np.ndarray  # (N, H, W) uint8/uint16/float32
    compact: bool
    encoding: str  # compact form: "npy" or "tiff"


def _check_grey(array: np.ndarray, what: str, declared: str = "") -> np.ndarray:
    """Grey values as uint8/uint16/float32; JSON numbers arrive as int64/float64 and are narrowed."""
    kind = array.dtype.kind
    if kind not in "uif":
        raise RequestError(
            f"{what}: grey values must be numbers (uint8, uint16 or float32), got dtype {array.dtype}"
        )
    if kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            finite = bool(np.isfinite(array).all())
            narrowed = array.astype(np.float32, copy=False)
        if not finite:
            raise RequestError(f"{what}: grey values contain NaN or infinity")
        if not np.isfinite(narrowed).all():
            raise RequestError(f"{what}: grey values exceed the float32 range")
    if declared:
        if declared not in GREY_DTYPES:
            raise RequestError(f"unknown dtype {declared!r}: use one of {', '.join(GREY_DTYPES)}")
        if declared == "float32":
            return array.astype(np.float32, copy=False)
        limit = np.iinfo(declared).max
        if kind == "f" and not np.array_equal(array, np.round(array)):
            raise RequestError(f"{what}: dtype {declared} declared but the values are not integers")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > limit:
            raise RequestError(f"{what}: dtype {declared} declared but values span {low:g}..{high:g} (allowed 0..{limit})")
        return array.astype(declared, copy=False)
    if array.dtype.name in GREY_DTYPES:
        return array
    if kind == "f":
        return array.astype(np.float32)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 65535:
        raise RequestError(
            f"{what}: integer grey values must lie in 0..65535 (uint8/uint16), got {low}..{high}; "
            "send float32 for other ranges"
        )
    return array.astype(np.uint8 if high <= 255 and array.dtype.itemsize == 1 else np.uint16)


def _check_batch(images: np.ndarray, max_pixels: int) -> np.ndarray:
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise RequestError(
            f"expected a batch of 2-D slices (N, H, W), got an array of rank {images.ndim} with shape "
            f"{images.shape}" + ("; wrap a single slice in a list" if images.ndim == 2 else "")
        )
    n, h, w = images.shape
    if n == 0:
        raise RequestError("empty batch: send at least one slice")
    if h == 0 or w == 0:
        raise RequestError(f"empty slices: shape {images.shape}")
    if h * w > max_pixels:
        raise RequestError(f"slice of {h}x{w} = {h * w} pixels exceeds this model's limit of {max_pixels} pixels")
    return images


def _decode_slice(value: Any, index: int, max_pixels: int) -> tuple[np.ndarray, str]:
    """One compact-form entry -> (2-D grey slice, "npy" | "tiff")."""
    where = f"slice {index}"
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)  # local callers may pass the file bytes themselves
    elif isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(f"{where}: not valid base64 ({exc})") from None
    else:
        raise RequestError(f"{where}: expected a base64 string, got {type(value).__name__}")
    if raw.startswith(_NPY_MAGIC):
        encoding = "npy"
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as exc:  # truncated data, object arrays...
            raise RequestError(f"{where}: corrupt .npy data ({type(exc).__name__}: {exc})") from None
    elif raw[:4] in _TIFF_MAGICS:
        encoding = "tiff"
        array = _read_tiff_bytes(raw, where, max_pixels)
    else:
        raise RequestError(f"{where}: neither .npy nor TIFF bytes (first bytes {raw[:8]!r})")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise RequestError(f"{where}: expected one 2-D slice, got shape {array.shape}")
    if array.dtype.name not in GREY_DTYPES:
        raise RequestError(f"{where}: dtype {array.dtype} not allowed (use {', '.join(GREY_DTYPES)})")
    return _check_grey(array.astype(array.dtype.newbyteorder("="), copy=False), where), encoding


def _read_tiff_bytes(raw: bytes, where: str, max_pixels: int) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            if not tif.pages:  # tifffile only warns about a broken first-page offset
                raise RequestError(f"{where}: corrupt TIFF (no readable image pages)")
            if len(tif.pages) != 1:
                raise RequestError(f"{where}: TIFF holds {len(tif.pages)} pages; send one 2-D slice per entry")
            page = tif.pages[0]
            if int(np.prod(page.shape[:2])) > max_pixels:  # check before decoding a huge page
                raise RequestError(
                    f"{where}: slice of {page.shape[0]}x{page.shape[1]} exceeds this model's limit of {max_pixels} pixels"
                )
            return np.asarray(page.asarray())
    except RequestError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise RequestError(f"{where}: corrupt TIFF ({type(exc).__name__}: {exc})") from None


def _compact_values(model_input: Any) -> list[Any] | None:
    """The base64 column of a compact request, or None for a tensor request."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise RequestError(
                f"expected a column {IMAGE_COLUMN!r} of base64-encoded slices, got columns {list(model_input.columns)}"
            )
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, dict):
        if set(model_input) != {IMAGE_COLUMN}:
            raise RequestError(
                f"expected inputs {{{IMAGE_COLUMN!r}: [base64 slices]}} or a tensor, got keys {sorted(model_input)}"
            )
        return list(np.atleast_1d(np.asarray(model_input[IMAGE_COLUMN], dtype=object)))
    if isinstance(model_input, np.ndarray) and model_input.ndim == 1 and model_input.dtype.kind in "USO":
        return list(model_input)
    return None


def parse_context(params: Mapping[str, Any], n_slices: int) -> tuple[int, int]:
    """``context_before``/``context_after``: how many leading/trailing slices of a request are context only.

    A 2.5D model needs each slice's neighbours; a client that sends a volume in chunks adds the
    slices around each chunk as context and gets labels for the chunk alone.
    """
    context = []
    for name in ("context_before", "context_after"):
        value = params.get(name) or 0
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise RequestError(f"{name} must be a whole number of slices, got {value!r}") from None
        if number < 0 or number != float(value):
            raise RequestError(f"{name} must be a whole number of slices >= 0, got {value!r}")
        context.append(number)
    if sum(context) >= n_slices:
        raise RequestError(
            f"context_before + context_after = {sum(context)} leaves none of the {n_slices} slices to segment"
        )
    return context[0], context[1]


def parse_request(model_input: Any, config: ModelConfig, declared_dtype: str = "") -> ParsedRequest:
    """Validate a request of either form; raise :class:`RequestError` naming the problem."""
    values = _compact_values(model_input)
    if values is not None:
        if not values:
            raise RequestError("empty batch: send at least one slice")
        decoded = [_decode_slice(v, k, config.max_slice_pixels) for k, v in enumerate(values)]
        first = decoded[0][0]
        for k, (array, _) in enumerate(decoded):
            if array.shape != first.shape:
                raise RequestError(
                    f"slice {k} is {array.shape[0]}x{array.shape[1]} but slice 0 is {first.shape[0]}x{first.shape[1]}: "
                    "all slices of one request must have the same size"
                )
        dtypes = {a.dtype for a, _ in decoded}
        dtype = dtypes.pop() if len(dtypes) == 1 else np.float32
        images = np.stack([a.astype(dtype, copy=False) for a, _ in decoded])
        return ParsedRequest(_check_batch(images, config.max_slice_pixels), True, decoded[0][1])
    if isinstance(model_input, pd.DataFrame):  # unreachable: _compact_values raised
        raise RequestError("bad DataFrame input")
    try:
        images = np.asarray(model_input)
    except ValueError as exc:  # ragged nested lists
        raise RequestError(f"slices of different sizes in one batch ({exc})") from None
    if images.size == 0 and images.ndim <= 1:
        raise RequestError("empty batch: send at least one slice")
    if images.ndim == 0:
        raise RequestError(f"expected a batch of 2-D slices (N, H, W), got a scalar {images!r}")
    images = _check_batch(images, config.max_slice_pixels)
    return ParsedRequest(_check_grey(images, "inputs", declared_dtype), False, "npy")


def parse_grey_range_params(params: Mapping[str, Any]) -> tuple[float, float] | None:
    """``grey_low`` / ``grey_high``: the grey range of the volume a request's slices come from
    (both or neither), so a per_volume model maps every request of one volume alike."""
    low, high = params.get("grey_low"), params.get("grey_high")
    if low is None and high is None:
        return None
    if low is None or high is None:
        missing, given = ("grey_low", "grey_high") if low is None else ("grey_high", "grey_low")
        raise RequestError(f"{given} given without {missing}: send both (the volume's grey range, e.g. from "
                           "`socseg stats`) or neither")
    try:
        return check_grey_range_values(float(low), float(high))
    except (TypeError, ValueError) as exc:
        raise RequestError(f"grey_low/grey_high: {exc}") from None


def parse_options(params: Mapping[str, Any]) -> InferenceOptions:
    """A request's inference settings (``tta``, ``window``, ``step_fraction``, ``smoothing_sigma``, ``planes``,
    ``grey_low``/``grey_high``, ``allow_out_of_range``) as :class:`InferenceOptions`, checked once."""
    grey_range = parse_grey_range_params(params)
    tta = None if params.get("tta") is None else parse_flag(params, "tta")
    try:
        return InferenceOptions(tta=tta, step_fraction=params.get("step_fraction"), window=params.get("window") or None,
                                smoothing_sigma=params.get("smoothing_sigma"), grey_range=grey_range,
                                planes=params.get("planes") or None,
                                allow_out_of_range=parse_flag(params, "allow_out_of_range"))
    except ValueError as error:
        raise RequestError(str(error)) from None


def parse_flag(params: Mapping[str, Any], name: str) -> bool:
    """A boolean request param (MLflow converts per the signature; direct callers may pass text)."""
    try:
        return parse_bool(params.get(name) or False)
    except ValueError:
        raise RequestError(f"{name} must be true or false, got {params.get(name)!r}") from None


# --------------------------------------------------------------------------- encoding


def encode_array(array: np.ndarray, encoding: str) -> str:
    """A slice (or its ``(H, W, C)`` probabilities) as base64 ``.npy`` or TIFF bytes (zlib)."""
    buffer = io.BytesIO()
    if encoding == "npy":
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    elif encoding == "tiff":
            # tifffile's shaped description keeps (H, W, C) probabilities, C = 1 included, on reading.
        tifffile.imwrite(buffer, np.ascontiguousarray(array), photometric="minisblack", compression="zlib")
    else:
        raise RequestError(f"unknown encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_array(text: str) -> np.ndarray:
    """Inverse of :func:`encode_array` (either encoding), for clients."""
    array, _ = _decode_any(base64.b64decode(text))
    return array


def _decode_any(raw: bytes) -> tuple[np.ndarray, str]:
    if raw.startswith(_NPY_MAGIC):
        return np.load(io.BytesIO(raw), allow_pickle=False), "npy"
    return tifffile.imread(io.BytesIO(raw)), "tiff"


# --------------------------------------------------------------------------- the model


class Segmenter(mlflow.pyfunc.PythonModel):
    """The served model: requests in, the :class:`~socseg.inference.predictor.Predictor` in between, labels out."""

    # predict deliberately has no type hint on its input (see predict); this tells MLflow not to
    # look for one (and not to warn at import).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import keras

        # Register every custom object the .keras file may name: layers, and the loss and metric
        # that the trained inner network's compile config still mentions (even with compile=False).
        import socseg.model.export  # noqa: F401
        import socseg.model.losses  # noqa: F401
        import socseg.model.metrics  # noqa: F401
        import socseg.model.unet  # noqa: F401
        from socseg.inference.runtime import runtime_network
        from socseg.model.precision import runnable_network

        config = ModelConfig.from_dict(context.model_config)
        network = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)
        # A model keeps the dtype policy it was trained with: bf16 where it is not native would
        # crawl (emulated) or fail (oneDNN without bf16 refuses the convolutions); run float32 there.
        network, self.computes_in = runnable_network(network)
        # OpenVINO on a CPU (inference.runtime auto), its IR cached by the .keras file's bytes.
        runtime = runtime_network(network, config.runtime, Path(context.artifacts[KERAS_ARTIFACT]))
        self.predictor = Predictor(network, config, runtime)
        # The scoring server runs requests in threads; one forward pass at a time bounds memory.
        self._lock = threading.Lock()

    @property
    def config(self) -> ModelConfig:
        return self.predictor.config

    # No type hint on model_input on purpose: MLflow would derive a signature from it and then
    # skip the JSON parsing that both input forms rely on.
    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        params = dict(params or {})
        if parse_flag(params, "describe"):  # what a client needs to know (context_slices, phase map...)
            return pd.DataFrame({"config": [json.dumps(self.config.to_dict())], "runtime": [self.predictor.runtime]})
        encoding = str(params.get("encoding") or "")
        if encoding and encoding not in ENCODINGS:
            raise RequestError(f"unknown encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
        options = parse_options(params)
        request = parse_request(model_input, self.config, str(params.get("dtype") or ""))
        before, after = parse_context(params, len(request.images))
        try:  # a per_volume model without grey_low/grey_high: the range of this request's own slices
            resolved = self.predictor.request(options, source=request.images)
        except ValueError as error:  # e.g. constant slices: no range to estimate
            raise RequestError(f"{error}; send the volume's grey range as grey_low and grey_high") from None
        try:
            with self._lock:
                probs = self.predictor.probabilities(request.images, before, after, resolved)
        except GreyRangeError as error:
            raise RequestError(str(error)) from None
        labels = self.predictor.to_labels(self.predictor.to_classes(probs))
        want_probs = parse_flag(params, "return_probabilities")
        # The uncertainty `socseg segment --uncertainty` writes (x 255 there), from the same probabilities.
        unsure = uncertainty(probs) if parse_flag(params, "return_uncertainty") else None
        if not request.compact:
            answer = {"labels": labels}
            if want_probs:
                answer["probabilities"] = probs
            if unsure is not None:
                answer["uncertainty"] = unsure
            return answer if len(answer) > 1 else labels
        encoding = encoding or request.encoding
        frame = pd.DataFrame({"labels": [encode_array(lab, encoding) for lab in labels]})
        if want_probs:
            frame["probabilities"] = [encode_array(p, encoding) for p in probs]
        if unsure is not None:
            frame["uncertainty"] = [encode_array(u, encoding) for u in unsure]
        frame["phase_map"] = json.dumps({str(k): v for k, v in self.config.label_phase_map.items()})
        frame["runtime"] = self.predictor.runtime
        return frame
