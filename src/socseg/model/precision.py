"""Which precision the hardware computes natively, and a logged model made to fit it.

``auto`` is decided by the CPU flags where they settle it and by a measurement where they do not.
AMX (matrix units) makes bf16 training 1.6x faster than float32 (``train_throughput``); no bf16
flag at all makes it emulated and slower. AVX512-BF16 without AMX goes either way: bf16 was the
faster on an AMD EPYC (``inference_avx512``) and 1.5x the slower on an Intel Xeon
(``train_throughput_avx512``). There :func:`measured_cpu_precision` times one training step of a
small U-Net in each precision, once per machine, and keeps the answer in the socseg cache.

Below training and inference on purpose: training picks its dtype policy from it
(``train.precision: auto``), and loading a logged model uses it too, since a model keeps the policy
it was trained with: a model trained in bf16 on an AVX512-BF16 CPU or an Ampere GPU, loaded on a
CPU without native bf16, would otherwise crawl through emulated bf16 or fail outright (oneDNN
limited to AVX2 refuses bf16 convolutions).

:func:`gpu_supports_bf16` imports TensorFlow, JAX or PyTorch inside, only the one Keras runs on:
the others are optional and usually not installed.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from datetime import datetime, timezone
from typing import Any, Callable

import keras

from socseg.cache import cache_root
from socseg.params import AUTO, PRECISIONS

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # without these, bf16 is emulated and slower than float32
AMX_BF16_FLAG = "amx_bf16"  # with it (and oneDNN allowed to use it), bf16 is the faster: no measurement needed
# bf16 must beat float32 by this factor in the probe to be chosen: float32 is the more accurate of the two
PROBE_MARGIN = 1.1
PROBE_FILE = "precision.json"  # under the socseg cache: {machine key: the probe's record}
ONEDNN_ISA_ENV = "ONEDNN_MAX_CPU_ISA"  # caps the instructions oneDNN (TensorFlow's CPU kernels) may use
# oneDNN ISA levels that include native bf16 dot products (oneDNN's names; DEFAULT/ALL: no cap).
ONEDNN_BF16_ISAS = frozenset({"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                              "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                              "AVX10_2_512_AMX_2", "DEFAULT", "ALL"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_supports_bf16() -> bool | None:
    """``None`` without a GPU; else whether the first GPU has native bf16 (NVIDIA compute >= 8.0)."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if not gpus:
                return None
            capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
            return tuple(capability) >= (8, 0)
        if backend == "jax":
            import jax

            gpus = [d for d in jax.devices() if d.platform == "gpu"]
            if not gpus:
                return None
            return float(getattr(gpus[0], "compute_capability", "0")) >= 8.0
        if backend == "torch":
            import torch

            return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None
    except Exception:  # a broken driver: decide on the CPU
        return None
    return None


def resolve_precision(precision: str, flags: set[str] | None = None, gpu_bf16: bool | None = None,
                      probe: Callable[[], str] | None = None) -> str:
    """``auto`` -> ``mixed_bfloat16`` where the hardware does bf16 natively and fast (a GPU of
    compute capability >= 8.0, a CPU with AMX-BF16, or a CPU with AVX512-BF16 where the measured
    step says so), else ``float32``.

    Decided from the hardware, not assumed: on a CPU without bf16 units mixed bf16 is emulated and
    slower than float32, and with AVX512-BF16 alone it may be either (``probe``, default
    :func:`measured_cpu_precision`, decides). Any other value is checked and returned as it is.
    """
    if precision != AUTO:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: choose one of {AUTO}, {', '.join(PRECISIONS)}")
        return precision
    gpu = gpu_supports_bf16() if gpu_bf16 is None else gpu_bf16
    if gpu is not None:
        return "mixed_bfloat16" if gpu else "float32"
    flags = cpu_flags() if flags is None else flags
    if not flags & set(BF16_CPU_FLAGS) or not onednn_allows_bf16():
        return "float32"
    if AMX_BF16_FLAG in flags and onednn_allows_amx():
        return "mixed_bfloat16"
    return (probe or measured_cpu_precision)()


def onednn_allows_amx(isa_cap: str | None = None) -> bool:
    """Whether ``ONEDNN_MAX_CPU_ISA`` (default: the environment's) leaves oneDNN the AMX units."""
    cap = (os.environ.get(ONEDNN_ISA_ENV, "") if isa_cap is None else isa_cap).strip().upper()
    return not cap or cap in {"DEFAULT", "ALL"} or "AMX" in cap


def _machine_key() -> str:
    """What the probe's answer depends on: the CPU, its bf16 flags, oneDNN's cap, the Keras backend."""
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    backend = keras.backend.backend()
    try:
        backend_version = __import__(backend).__version__
    except Exception:  # a backend without __version__: the Keras version still changes the key
        backend_version = "?"
    bf16 = ",".join(sorted(cpu_flags() & {*BF16_CPU_FLAGS, "avx512_fp16", "amx_tile"}))
    cap = os.environ.get(ONEDNN_ISA_ENV, "")
    return (f"{model or platform.processor()} | {bf16} | oneDNN cap {cap or 'none'} | {backend} {backend_version} | "
            f"keras {keras.__version__} | {os.cpu_count()} cpus")


def time_training_step(policy: str, steps: int = 4, batch: int = 8, size: int = 128) -> float:
    """Seconds per training step of the from-scratch 2.5D U-Net (base 16) in dtype ``policy``,
    after two warm-up steps; the global dtype policy is restored afterwards."""
    import numpy as np

    from socseg.model.unet import build_model

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        network = build_model("unet", "ni", base_filters=16, context_slices=1)
        network.compile(optimizer="adam", loss="binary_crossentropy")
        rng = np.random.default_rng(0)
        x = rng.random((batch, size, size, 3), dtype=np.float32)
        y = (x[..., 1:2] > 0.5).astype(np.float32)
        for _ in range(2):
            network.train_on_batch(x, y)
        started = time.perf_counter()
        for _ in range(steps):
            network.train_on_batch(x, y)
        return (time.perf_counter() - started) / steps
    finally:
        keras.config.set_dtype_policy(previous)


@functools.lru_cache(maxsize=None)
def measured_cpu_precision() -> str:
    """The faster of ``mixed_bfloat16`` and ``float32`` for training on this CPU, measured once
    (:func:`time_training_step`, under half a minute) and then read from ``precision.json`` in the
    socseg cache; bf16 only if it is :data:`PROBE_MARGIN` times faster. Processes that start at
    once (Dask workers loading a model) wait on a lock for the first one's answer rather than time
    each other's contention. A cache that cannot be written costs a probe per process, nothing else."""
    from filelock import FileLock, Timeout

    path = cache_root() / PROBE_FILE
    key = _machine_key()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock", timeout=300)
        lock.acquire()
    except (OSError, Timeout):
        lock = None
    try:
        try:
            records = json.loads(path.read_text())
        except (OSError, ValueError):
            records = {}
        if isinstance(records.get(key), dict) and records[key].get("precision") in PRECISIONS:
            return records[key]["precision"]
        float32_s = time_training_step("float32")
        bf16_s = time_training_step("mixed_bfloat16")
        choice = "mixed_bfloat16" if float32_s >= PROBE_MARGIN * bf16_s else "float32"
        records[key] = {"precision": choice, "float32_step_s": round(float32_s, 4), "bf16_step_s": round(bf16_s, 4),
                        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(records, indent=1))
            partial.replace(path)
        except OSError:
            pass
        return choice
    finally:
        if lock is not None:
            lock.release()


def onednn_allows_bf16(isa_cap: str | None = None) -> bool:
    """Whether ``ONEDNN_MAX_CPU_ISA`` (default: the environment's) leaves oneDNN its bf16 units.

    The cap is how an AVX-512 machine stands in for the many CPUs without AVX-512 (``AVX2``); a
    user of such a CPU gets float32 from ``auto``, so the stand-in must too, or it would time
    emulated bf16 that no real AVX2 user runs.
    """
    cap = (os.environ.get(ONEDNN_ISA_ENV, "") if isa_cap is None else isa_cap).strip().upper()
    return not cap or cap in ONEDNN_BF16_ISAS


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively (what ``auto`` would train in)."""
    return resolve_precision(AUTO) == "mixed_bfloat16"


def computes_in_bf16(network: Any) -> bool:
    """Whether any weighted layer of ``network`` (nested models included) computes in bf16."""
    def walk(model: Any) -> bool:
        return any(walk(layer) if hasattr(layer, "layers") else
                   bool(layer.weights) and layer.dtype_policy.compute_dtype == "bfloat16"
                   for layer in model.layers)

    return walk(network)


def runnable_network(network: Any) -> tuple[Any, str]:
    """``network`` as this machine should run it, and a word for the logs: a bf16 model where bf16
    is not native becomes its float32 copy (same weights, :func:`float32_network`)."""
    if computes_in_bf16(network) and not native_bf16():
        return float32_network(network)[0], "float32 (bf16 model; no native bf16 here)"
    return network, "as trained"


def _float32_policies(config: Any) -> tuple[Any, bool]:
    """``config`` (a serialised model) with every mixed dtype policy made ``float32``; whether any was."""
    if isinstance(config, dict):
        changed = False
        if str(config.get("class_name", "")).endswith("DTypePolicy"):
            inner = config.get("config") or {}
            if str(inner.get("name", "")).startswith("mixed_"):
                return {**config, "config": {**inner, "name": "float32"}}, True
        out = {}
        for key, value in config.items():
            if key == "dtype" and isinstance(value, str) and value.startswith("mixed_"):
                out[key], hit = "float32", True
            else:
                out[key], hit = _float32_policies(value)
            changed |= hit
        return out, changed
    if isinstance(config, list):
        items = [_float32_policies(v) for v in config]
        return [v for v, _ in items], any(hit for _, hit in items)
    return config, False


def float32_network(network: Any) -> tuple[Any, bool]:
    """A float32 copy (same weights) of a network trained with a mixed precision policy, and whether one was needed.

    ``precision: auto`` trains ``mixed_bfloat16`` where bf16 is native, and a loaded model keeps
    computing in the policy it was trained with. Elsewhere that fails or crawls: the exported ONNX
    has bf16 convolutions that neither ONNX Runtime nor OpenVINO loads, and oneDNN capped to AVX2
    refuses bf16 convolutions. The weights are float32 variables either way, so a float32 copy is
    the same network at full precision (what ``auto`` trains on a CPU without native bf16).
    """
    serialised, changed = _float32_policies(keras.saving.serialize_keras_object(network))
    if not changed:
        return network, False
    copy = keras.saving.deserialize_keras_object(serialised)
    copy.set_weights(network.get_weights())
    return copy, True
