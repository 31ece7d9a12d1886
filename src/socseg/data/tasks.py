"""The two segmentation tasks and how label volumes become training targets.

``ni``: binary nickel vs everything else (the original report's task; class 0 = rest, 1 = ni).
``phases``: one class per phase of the phase map, in label-value order (pore, ysz, ni).
"""

from __future__ import annotations

import numpy as np

from socseg.params import TASKS

NI_PHASE = "ni"
SOC_PHASES = ("pore", "ysz", "ni")  # a Ni/YSZ electrode's phases in grey-value (label-value) order
# Class index of an unlabelled pixel in target maps (sparse labels, ``socseg finetune``): losses,
# the training metric and every score skip it. Above any real class index (a phase map has at most
# 255 phases), and it survives the uint8 target maps unchanged.
IGNORE = 255


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    return task


def task_class_names(task: str, phase_names: list[str]) -> list[str]:
    """Names of the model's output classes for ``task``."""
    check_task(task)
    if task == "ni":
        if NI_PHASE not in phase_names:
            raise ValueError(f"task 'ni' needs a phase named {NI_PHASE!r} in the phase map, got {phase_names}")
        return ["rest", NI_PHASE]
    return list(phase_names)


def task_targets(class_index: np.ndarray, task: str, phase_names: list[str]) -> np.ndarray:
    """Map phase class indices (0..n-1 in label-value order) to the task's class indices (uint8);
    :data:`IGNORE` (an unlabelled pixel) stays IGNORE."""
    check_task(task)
    if task == "ni":
        targets = (class_index == phase_names.index(NI_PHASE)).astype(np.uint8)
        targets[class_index == IGNORE] = IGNORE
        return targets
    return class_index.astype(np.uint8, copy=False)


def classes_to_label_values(classes: np.ndarray, task: str, phase_map: dict[int, str]) -> np.ndarray:
    """Task class indices back to label values of the phase map (ni task: rest -> 0, ni -> its value)."""
    values = sorted(phase_map)
    if task == "ni":
        ni_value = next(v for v in values if phase_map[v] == NI_PHASE)
        lut = np.array([0, ni_value], dtype=np.uint8)
    else:
        lut = np.array(values, dtype=np.uint8)
    return lut[classes]
