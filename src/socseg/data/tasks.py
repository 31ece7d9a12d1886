"""The two segmentation tasks: what a model predicts and how labels and outputs map onto it.

A :class:`Task` owns everything that differs between them, so no other module branches on the
task's name: the class names, the training targets made from a label volume, the output layer
(channels and activation), whether the loss and metric read one sigmoid channel (``binary``), the
probabilities-to-classes step and the way back from classes to label values. :func:`get_task`
turns a name (params, a stored model record, the command line) into its Task.

``ni``: binary nickel vs everything else (the original report's task; class 0 = rest, 1 = ni).
``phases``: one class per phase of the phase map, in label-value order (pore, ysz, ni).

NumPy only: the Keras parts (losses, metric, output layer) read the Task's plain data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

NI_PHASE = "ni"
SOC_PHASES = ("pore", "ysz", "ni")  # a Ni/YSZ electrode's phases in grey-value (label-value) order
# Class index of an unlabelled pixel in target maps (sparse labels, ``socseg finetune``): losses,
# the training metric and every score skip it. Above any real class index (a phase map has at most
# 255 phases), and it survives the uint8 target maps unchanged.
IGNORE = 255
REST = "rest"  # the ni task's class 0: every phase but nickel


class Task(ABC):
    """What a segmentation model predicts. Tasks are stateless: two Tasks (or a Task and a str)
    compare equal when their names do, so stored records and command-line values compare directly."""

    name: ClassVar[str]
    activation: ClassVar[str]  # of the output layer: "sigmoid" or "softmax"
    # One sigmoid channel holding P(class 1), class 0 being its complement: the losses and the
    # training metric expand or threshold it instead of taking the argmax over channels.
    binary: ClassVar[bool]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"get_task({self.name!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Task, str)):
            return self.name == str(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickled (Dask tasks, deep copies) by name, so a copy is the registered instance."""
        return get_task, (self.name,)

    @abstractmethod
    def n_classes(self, n_phases: int) -> int:
        """Classes of the model's label map, given how many phases the phase map has."""

    @abstractmethod
    def n_outputs(self, n_phases: int) -> int:
        """Channels of the model's output layer, given how many phases the phase map has."""

    @abstractmethod
    def class_names(self, phase_names: list[str]) -> list[str]:
        """Names of the model's output classes for a phase map with ``phase_names`` (label-value order)."""

    @abstractmethod
    def default_class_names(self, n_phases: int) -> list[str]:
        """Class names when no phase map is at hand (metric names): the SOC phases' where they fit."""

    @abstractmethod
    def targets(self, class_index: np.ndarray, phase_names: list[str]) -> np.ndarray:
        """Phase class indices (0..n-1 in label-value order) -> this task's class indices (uint8);
        :data:`IGNORE` (an unlabelled pixel) stays IGNORE."""

    @abstractmethod
    def to_classes(self, probabilities: np.ndarray) -> np.ndarray:
        """Hard class map (uint8) from the model's output probabilities (channels last)."""

    @abstractmethod
    def label_phase_map(self, phase_map: dict[int, str]) -> dict[int, str]:
        """Label value -> class name of what the model outputs, in class-index order."""

    def to_label_values(self, classes: np.ndarray, phase_map: dict[int, str]) -> np.ndarray:
        """Class indices -> label values (uint8) of :meth:`label_phase_map`, what a label file holds."""
        lut = np.array(list(self.label_phase_map(phase_map)), dtype=np.uint8)
        return lut[classes]

    def model_class_lut(self, model_task: str | Task, model_class_names: list[str]) -> np.ndarray | None:
        """Lookup table from the classes of a ``model_task`` model (``model_class_names``) to this
        task's: None when they are the same task. ValueError when this task cannot score such a model."""
        model_task = get_task(model_task)
        if model_task != self:
            raise ValueError(f"a {model_task.name!r} model cannot be scored on task {self.name!r}")
        return None


class NiTask(Task):
    """Nickel vs the rest: one sigmoid output P(ni); class 0 is ``rest``, class 1 ``ni``."""

    name = "ni"
    activation = "sigmoid"
    binary = True

    def n_classes(self, n_phases: int) -> int:
        return 2

    def n_outputs(self, n_phases: int) -> int:
        return 1

    def class_names(self, phase_names: list[str]) -> list[str]:
        _ni_index(phase_names)
        return [REST, NI_PHASE]

    def default_class_names(self, n_phases: int) -> list[str]:
        return [REST, NI_PHASE]

    def targets(self, class_index: np.ndarray, phase_names: list[str]) -> np.ndarray:
        targets = (class_index == _ni_index(phase_names)).astype(np.uint8)
        targets[class_index == IGNORE] = IGNORE
        return targets

    def to_classes(self, probabilities: np.ndarray) -> np.ndarray:
        """``P(ni) > 0.5`` -> 1. ``probabilities`` may keep its channel of 1 or be the bare P(ni) map."""
        probabilities = np.asarray(probabilities)
        p = probabilities[..., 0] if probabilities.ndim and probabilities.shape[-1] == 1 else probabilities
        return (p > 0.5).astype(np.uint8)

    def label_phase_map(self, phase_map: dict[int, str]) -> dict[int, str]:
        """``{0: 'rest', ni_value: 'ni'}``: 0 is the rest class, not a phase."""
        ni_values = [value for value, name in phase_map.items() if name == NI_PHASE]
        if not ni_values:
            raise ValueError(f"task 'ni' needs a phase named {NI_PHASE!r} in the phase map, got {phase_map}")
        if ni_values[0] == 0:
            raise ValueError(f"task 'ni' writes rest as label value 0, so {NI_PHASE!r} needs another value: {phase_map}")
        return {0: REST, ni_values[0]: NI_PHASE}

    def model_class_lut(self, model_task: str | Task, model_class_names: list[str]) -> np.ndarray | None:
        """A model of another task (phases) scores on ni as its ni class vs all the others."""
        if get_task(model_task) == self:
            return None
        if NI_PHASE not in model_class_names:
            raise ValueError(f"a {get_task(model_task).name!r} model without a {NI_PHASE!r} class "
                             f"({model_class_names}) cannot be scored on task {self.name!r}")
        return (np.arange(len(model_class_names)) == model_class_names.index(NI_PHASE)).astype(np.uint8)


class PhasesTask(Task):
    """One class per phase of the phase map (label-value order), softmax over them."""

    name = "phases"
    activation = "softmax"
    binary = False

    def n_classes(self, n_phases: int) -> int:
        return int(n_phases)

    def n_outputs(self, n_phases: int) -> int:
        if n_phases < 2:
            raise ValueError(f"phases needs n_classes >= 2, got {n_phases}")
        return int(n_phases)

    def class_names(self, phase_names: list[str]) -> list[str]:
        return list(phase_names)

    def default_class_names(self, n_phases: int) -> list[str]:
        """The SOC phases for three classes, else ``class<i>``."""
        if n_phases != len(SOC_PHASES):
            return [f"class{i}" for i in range(n_phases)]
        return list(SOC_PHASES)

    def targets(self, class_index: np.ndarray, phase_names: list[str]) -> np.ndarray:
        return np.asarray(class_index).astype(np.uint8, copy=False)

    def to_classes(self, probabilities: np.ndarray) -> np.ndarray:
        """Argmax over the last axis."""
        return np.argmax(np.asarray(probabilities), axis=-1).astype(np.uint8)

    def label_phase_map(self, phase_map: dict[int, str]) -> dict[int, str]:
        return dict(sorted(phase_map.items()))


# One instance per task, by name; params.TASKS (the choices of params.yaml and the CLI) lists the same names.
_REGISTERED: dict[str, Task] = {task.name: task for task in (NiTask(), PhasesTask())}


def get_task(task: str | Task) -> Task:
    """The Task called ``task`` (a Task is returned as it is); ValueError naming the choices otherwise."""
    if isinstance(task, Task):
        return task
    if not isinstance(task, str) or task not in _REGISTERED:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(_REGISTERED)}")
    return _REGISTERED[task]


def _ni_index(phase_names: list[str]) -> int:
    """Class index of the ni phase; ValueError when the phase map has none."""
    if NI_PHASE not in phase_names:
        raise ValueError(f"task 'ni' needs a phase named {NI_PHASE!r} in the phase map, got {phase_names}")
    return list(phase_names).index(NI_PHASE)
