"""What the computation runs on: Keras backend, device, precision, and seeding.

Every tracked run is tagged with these so numbers are never compared across hardware by accident.
"""

from __future__ import annotations

import os
import platform

import keras

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def set_precision(precision: str) -> None:
    """Set the global Keras dtype policy (``mixed_bfloat16`` is 2-5x faster on AMX CPUs)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    keras.config.set_dtype_policy(precision)


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


def runtime_tags(precision: str) -> dict[str, str]:
    return {
        "device": accelerator(),
        "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "precision": precision,
    }
