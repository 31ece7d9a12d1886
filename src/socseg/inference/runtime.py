"""Which runtime runs a network's forward passes: Keras itself, or OpenVINO on a CPU.

On a CPU, OpenVINO runs socseg's U-Nets faster than Keras on TensorFlow with the same weights and
precision (``benchmarks/results/runtime_avx2``: the comparison per CPU class, with label agreement),
so ``inference.runtime: auto`` takes it wherever the Keras backend sees no GPU and the
``openvino`` package imports; on a GPU, Keras stays (OpenVINO's CPU plugin would only slow it down).
``keras`` forces the Keras path everywhere. The choice is made where a logged model is loaded
(:class:`socseg.inference.pyfunc.Segmenter`), so ``socseg segment``, the Dask task and the served
model share it, and every output records the runtime that made it.

The conversion is Keras' own ``model.export(format="openvino")`` (any Keras backend), of the
float32 network; the compiled model computes in the precision the Keras path would use on this
machine (bf16 only where the network computes in bf16 natively, else f32), so the two agree to
rounding. Converting takes seconds; the IR is cached on disk, keyed on the ``.keras`` file's
bytes and the Keras and OpenVINO versions, so a server restart or a Dask worker loads it in a
fraction of a second. A conversion that fails falls back to Keras with a warning: the runtime is
an optimisation, never a reason not to segment.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from socseg.cache import cache_root
from socseg.params import AUTO, RUNTIMES

KERAS, OPENVINO = "keras", "openvino"
IR_NAME = "segmenter.xml"  # + segmenter.bin


@dataclass(frozen=True)
class RuntimeNetwork:
    """What runs the forward passes (``predict_on_batch``) and a line saying how, for the records."""

    runner: Any
    description: str


def openvino_version() -> str | None:
    try:
        return version(OPENVINO)
    except PackageNotFoundError:
        return None


def check_runtime(setting: str) -> str:
    if setting not in RUNTIMES:
        raise ValueError(f"unknown inference runtime {setting!r}: choose one of {', '.join(RUNTIMES)}")
    return setting


def resolve_runtime(setting: str, gpu: bool | None = None) -> str:
    """``auto`` -> ``openvino`` on a CPU-only Keras backend with OpenVINO installed, else ``keras``;
    ``keras`` / ``openvino`` are returned as they are (checked)."""
    if check_runtime(setting) != AUTO:
        return setting
    if gpu is None:
        from socseg.model.precision import gpu_supports_bf16

        gpu = gpu_supports_bf16() is not None
    return OPENVINO if not gpu and openvino_version() is not None else KERAS


def _ir_key(source_file: Path) -> str:
    import keras

    digest = hashlib.sha256()
    with open(source_file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"keras {keras.__version__} openvino {openvino_version()}".encode())
    return digest.hexdigest()[:32]


@contextlib.contextmanager
def _no_telemetry() -> Iterator[None]:
    """OpenVINO's converter sends usage events to Google Analytics unless a consent file in the
    user's home says no; converting a user's model must not phone home, so the converter gets its
    own no-op stub for the duration."""
    import importlib

    modules = []
    for name in ("openvino.tools.ovc.convert_impl", "openvino.tools.ovc.telemetry_utils"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    try:
        stub = importlib.import_module("openvino.tools.ovc.telemetry_stub")
    except ImportError:
        yield
        return
    saved = [(module, getattr(module, "tm", None)) for module in modules]
    for module, _ in saved:
        module.tm = stub
    try:
        yield
    finally:
        for module, previous in saved:
            module.tm = previous


def export_ir(network: Any, folder: Path) -> Path:
    """The float32 network as OpenVINO IR in ``folder`` (written whole, then renamed into place)."""
    from socseg.model.precision import float32_network

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    try:
        plain, _ = float32_network(network)
        with _no_telemetry():
            plain.export(str(staging / IR_NAME), format="openvino", verbose=False)
        try:
            staging.rename(folder)
        except OSError:  # another process (a Dask worker) cached the same model first
            if not (folder / IR_NAME).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / IR_NAME


class OpenVinoNetwork:
    """A compiled OpenVINO model with Keras' ``predict_on_batch``: (B, H, W, C) float32 in, out.

    ``model``: an IR file or an ``openvino.Model`` (e.g. an int8-quantised one)."""

    def __init__(self, model: Path | Any, precision: str):
        import openvino as ov

        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        source = str(model) if isinstance(model, (str, Path)) else model
        self.compiled = ov.Core().compile_model(source, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                                "INFERENCE_NUM_THREADS": threads})
        self._request = self.compiled.create_infer_request()
        self.precision, self.threads = precision, threads

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        # A copy: the request reuses its output buffer on the next call.
        return np.array(self._request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})[0])


def openvino_network(network: Any, source_file: Path | None = None) -> OpenVinoNetwork:
    """``network`` (a Keras model) compiled by OpenVINO for this CPU; its IR is cached by
    ``source_file`` (the ``.keras`` file it was loaded from) when given."""
    from socseg.model.precision import computes_in_bf16

    precision = "bf16" if computes_in_bf16(network) else "f32"  # what the Keras path computes in here
    if source_file is None:
        with tempfile.TemporaryDirectory(prefix="socseg-openvino-") as tmp:
            return OpenVinoNetwork(export_ir(network, Path(tmp) / "ir"), precision)
    folder = cache_root() / "openvino" / _ir_key(Path(source_file))
    ir = folder / IR_NAME if (folder / IR_NAME).is_file() else export_ir(network, folder)
    return OpenVinoNetwork(ir, precision)


def keras_runtime(network: Any) -> RuntimeNetwork:
    """``network`` run by Keras itself."""
    import keras

    return RuntimeNetwork(network, f"keras {keras.__version__} ({keras.backend.backend()})")


def runtime_network(network: Any, setting: str, source_file: Path | None = None) -> RuntimeNetwork:
    """What runs ``network``'s forward passes under the runtime ``setting`` (``auto`` resolved here)."""
    chosen = resolve_runtime(setting)
    if chosen == KERAS:
        return keras_runtime(network)
    try:
        compiled = openvino_network(network, source_file)
    except Exception as error:  # noqa: BLE001 - any converter failure: segment with Keras instead
        if setting == OPENVINO:
            raise RuntimeError(f"inference.runtime openvino: the network could not be converted "
                               f"({type(error).__name__}: {error})") from error
        warnings.warn(f"OpenVINO could not convert the network ({type(error).__name__}: {error}); using Keras",
                      RuntimeWarning, stacklevel=2)
        return runtime_network(network, KERAS)
    return RuntimeNetwork(compiled, f"openvino {openvino_version()} (CPU, {compiled.precision}, "
                                    f"{compiled.threads} threads)")
