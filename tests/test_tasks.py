"""The Task objects: class names, targets, output, probabilities to classes and back to label values."""

import copy
import pickle

import numpy as np
import pytest

from socseg.data.tasks import IGNORE, NI_PHASE, SOC_PHASES, NiTask, PhasesTask, Task, get_task
from socseg.params import TASKS

PHASE_MAP = {0: "pore", 128: "ysz", 255: "ni"}
PHASES = list(SOC_PHASES)


def test_get_task_by_name_and_object():
    ni, phases = get_task("ni"), get_task("phases")
    assert isinstance(ni, NiTask) and isinstance(phases, PhasesTask)
    assert get_task(ni) is ni
    assert [get_task(name).name for name in TASKS] == list(TASKS)  # params' choices are the registered tasks
    assert str(ni) == "ni" and ni == "ni" and "phases" == phases and ni != phases and ni != 1
    assert ni == NiTask() and hash(ni) == hash(NiTask())
    assert (ni.activation, ni.binary, phases.activation, phases.binary) == ("sigmoid", True, "softmax", False)


@pytest.mark.parametrize("name", [*TASKS])
def test_a_copied_task_is_the_registered_one(name):
    task = get_task(name)
    assert pickle.loads(pickle.dumps(task)) is task
    assert copy.deepcopy(task) is task


@pytest.mark.parametrize("bad", ["pores", "NI", "", None])
def test_unknown_task_names_the_choices(bad):
    with pytest.raises(ValueError, match=r"unknown task .*choose one of ni, phases"):
        get_task(bad)


def test_task_is_abstract():
    with pytest.raises(TypeError):
        Task()


def test_class_names():
    assert get_task("ni").class_names(PHASES) == ["rest", "ni"]
    assert get_task("phases").class_names(PHASES) == PHASES
    assert get_task("phases").class_names(["pore", "ysz"]) == ["pore", "ysz"]
    with pytest.raises(ValueError, match="needs a phase named 'ni'"):
        get_task("ni").class_names(["pore", "ysz"])


def test_default_class_names_and_counts():
    ni, phases = get_task("ni"), get_task("phases")
    assert ni.default_class_names(3) == ["rest", "ni"] and ni.n_classes(3) == 2 and ni.n_outputs(3) == 1
    assert phases.default_class_names(3) == PHASES and phases.n_classes(3) == 3 and phases.n_outputs(3) == 3
    assert phases.default_class_names(2) == ["class0", "class1"] and phases.n_classes(4) == 4
    with pytest.raises(ValueError, match="n_classes >= 2"):
        phases.n_outputs(1)


def test_targets_keep_ignore():
    class_index = np.array([[0, 1, 2], [IGNORE, 2, 0]], dtype=np.uint8)
    ni = get_task("ni").targets(class_index, PHASES)
    np.testing.assert_array_equal(ni, [[0, 0, 1], [IGNORE, 1, 0]])
    assert ni.dtype == np.uint8
    phases = get_task("phases").targets(class_index, PHASES)
    np.testing.assert_array_equal(phases, class_index)
    assert phases.dtype == np.uint8
    # ni is wherever the phase map puts it, not always the last phase
    np.testing.assert_array_equal(get_task("ni").targets(class_index, ["ni", "pore", "ysz"]), [[1, 0, 0], [IGNORE, 0, 1]])
    with pytest.raises(ValueError, match="needs a phase named 'ni'"):
        get_task("ni").targets(class_index, ["pore", "ysz", "metal"])


def test_to_classes_sigmoid_and_softmax():
    p = np.array([[0.2, 0.5], [0.51, 0.9]])
    expected = [[0, 0], [1, 1]]
    ni = get_task("ni")
    np.testing.assert_array_equal(ni.to_classes(p[..., None]), expected)  # with its channel of 1
    np.testing.assert_array_equal(ni.to_classes(p), expected)  # the bare P(ni) map
    assert ni.to_classes(p).dtype == np.uint8
    probs = np.array([[[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]])
    out = get_task("phases").to_classes(probs)
    np.testing.assert_array_equal(out, [[1, 0]])
    assert out.dtype == np.uint8


def test_label_phase_map():
    assert get_task("ni").label_phase_map(PHASE_MAP) == {0: "rest", 255: NI_PHASE}
    shuffled = {255: "ni", 0: "pore", 128: "ysz"}
    assert list(get_task("phases").label_phase_map(shuffled).items()) == sorted(PHASE_MAP.items())
    with pytest.raises(ValueError, match="needs a phase named 'ni'"):
        get_task("ni").label_phase_map({0: "pore", 128: "ysz"})
    with pytest.raises(ValueError, match="rest as label value 0"):
        get_task("ni").label_phase_map({0: "ni", 128: "ysz"})


@pytest.mark.parametrize("name", [*TASKS])
def test_to_label_values_round_trip(name):
    task = get_task(name)
    n = task.n_classes(len(PHASE_MAP))
    classes = np.arange(n, dtype=np.uint8).repeat(2).reshape(-1, 2)
    values = task.to_label_values(classes, PHASE_MAP)
    assert values.dtype == np.uint8
    label_map = task.label_phase_map(PHASE_MAP)
    assert [label_map[v] for v in values[:, 0]] == task.class_names(PHASES)
    # back as a label file is read: label values -> phase indices -> this task's classes
    phase_of_value = {value: i for i, value in enumerate(sorted(PHASE_MAP))}
    phase_index = np.vectorize(phase_of_value.get)(values)
    np.testing.assert_array_equal(task.targets(phase_index, PHASES), classes)
    expected = [[0, 0], [255, 255]] if name == "ni" else [[0, 0], [128, 128], [255, 255]]
    np.testing.assert_array_equal(values, expected)


def test_model_class_lut():
    ni, phases = get_task("ni"), get_task("phases")
    assert ni.model_class_lut("ni", ["rest", "ni"]) is None
    assert phases.model_class_lut(phases, PHASES) is None
    np.testing.assert_array_equal(ni.model_class_lut("phases", ["ni", "pore", "ysz"]), [1, 0, 0])
    with pytest.raises(ValueError, match="a 'ni' model cannot be scored on task 'phases'"):
        phases.model_class_lut(ni, ["rest", "ni"])
    with pytest.raises(ValueError, match="without a 'ni' class"):
        ni.model_class_lut("phases", ["pore", "ysz"])
