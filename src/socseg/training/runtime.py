"""What the computation runs on: Keras backend, device, precision, and seeding.

Every tracked run is tagged with these so numbers are never compared across hardware by accident.
:func:`accelerator` imports TensorFlow, JAX or PyTorch inside, only the one Keras runs on: the
others are optional and usually not installed.
"""

from __future__ import annotations

import os
import platform

import keras

from socseg.model.precision import resolve_precision


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
