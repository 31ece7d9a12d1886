"""What the computation runs on: Keras backend, device, precision, and seeding.

Every tracked run is tagged with these so numbers are never compared across hardware by accident.
"""

from __future__ import annotations

import os
import platform

import keras

from socseg.params import AUTO, PRECISIONS

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # without these, bf16 is emulated and slower than float32
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


def resolve_precision(precision: str, flags: set[str] | None = None, gpu_bf16: bool | None = None) -> str:
    """``auto`` -> ``mixed_bfloat16`` where the hardware does bf16 natively (a GPU of compute
    capability >= 8.0, or a CPU with AVX512-BF16 / AMX-BF16), else ``float32``.

    Decided from the hardware, not assumed: on a CPU without those units mixed bf16 is emulated
    and slower than float32. Any other value is checked and returned as it is.
    """
    if precision != AUTO:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: choose one of {AUTO}, {', '.join(PRECISIONS)}")
        return precision
    gpu = gpu_supports_bf16() if gpu_bf16 is None else gpu_bf16
    if gpu is not None:
        return "mixed_bfloat16" if gpu else "float32"
    flags = cpu_flags() if flags is None else flags
    return "mixed_bfloat16" if flags & set(BF16_CPU_FLAGS) and onednn_allows_bf16() else "float32"


def onednn_allows_bf16(isa_cap: str | None = None) -> bool:
    """Whether ``ONEDNN_MAX_CPU_ISA`` (default: the environment's) leaves oneDNN its bf16 units.

    The cap is how an AVX-512 machine stands in for the many CPUs without AVX-512 (``AVX2``); a
    user of such a CPU gets float32 from ``auto``, so the stand-in must too, or it would time
    emulated bf16 that no real AVX2 user runs.
    """
    cap = (os.environ.get(ONEDNN_ISA_ENV, "") if isa_cap is None else isa_cap).strip().upper()
    return not cap or cap in ONEDNN_BF16_ISAS


def set_precision(precision: str) -> str:
    """Set the global Keras dtype policy (``auto`` is resolved first); returns the policy set."""
    precision = resolve_precision(precision)
    keras.config.set_dtype_policy(precision)
    return precision


def runs_eagerly(epochs: int, steps_per_epoch: int, eager_max_steps: int) -> bool:
    """Whether a training of ``epochs`` x ``steps_per_epoch`` steps should run eagerly.

    Keras traces the training step into a graph before the first step: about 7 s for a small
    U-Net on 2 CPU cores, whatever the batch. A long training earns that back many times; a
    run of a few steps (a smoke test, a tiny search trial, a quick check of a new scan) does not,
    and runs faster step by step (params: ``train.eager_max_steps``; 0: always a graph).
    """
    return 0 < epochs * steps_per_epoch <= eager_max_steps


def seed_everything(seed: int) -> None:
    keras.utils.set_random_seed(int(seed))


def accelerator() -> str:
    """Name of the accelerator the Keras backend sees, or ``CPU (<processor>)``."""
    backend = keras.backend.backend()
    names: list[str] = []
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                details = tf.config.experimental.get_device_details(gpu)
                names.append(details.get("device_name", gpu.name))
        elif backend == "jax":
            import jax

            names = [d.device_kind for d in jax.devices() if d.platform != "cpu"]
        elif backend == "torch":
            import torch

            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as error:  # a broken driver must not stop training on the CPU
        names = [f"unknown ({error.__class__.__name__})"]
    if names:
        return f"{len(names)}x {names[0]}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores)"


def runtime_tags(precision: str, eager: bool | None = None) -> dict[str, str]:
    """Tags of a run: device, backend, precision and, for a run that trains, eager or graph execution."""
    tags = {
        "device": accelerator(),
        "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "precision": resolve_precision(precision),
    }
    if eager is not None:
        tags["execution"] = "eager" if eager else "graph"
    return tags
