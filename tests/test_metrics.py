"""NumPy metrics by hand, and the Keras metric against them."""

import keras
import numpy as np
import pytest

import socseg.model.metrics as metrics
from socseg.data.tasks import get_task
from socseg.model.metrics import ThresholdedIoU, confusion_matrix, segmentation_scores

TRUTH = np.array([[1, 1], [0, 0]])
PRED = np.array([[1, 0], [0, 0]])


def test_confusion_matrix_and_scores_by_hand():
    cm = confusion_matrix(TRUTH, PRED, 2)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[2, 0], [1, 1]])
    scores = segmentation_scores(cm, ["rest", "ni"])
    assert scores["iou_ni"] == pytest.approx(0.5)
    assert scores["iou_rest"] == pytest.approx(2 / 3)
    assert scores["dice_ni"] == pytest.approx(2 / 3)
    assert scores["dice_rest"] == pytest.approx(4 / 5)
    assert scores["mean_iou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert scores["mean_dice"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert scores["accuracy"] == pytest.approx(0.75)


def test_mask_counts_only_selected_pixels():
    mask = np.array([[True, False], [True, True]])
    np.testing.assert_array_equal(confusion_matrix(TRUTH, PRED, 2, mask=mask), [[2, 0], [0, 1]])


def test_chunked_counting_counts_every_pixel_once(monkeypatch):
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, size=(5, 33, 17)).astype(np.uint8)
    pred = rng.integers(0, 3, size=truth.shape).astype(np.uint8)
    whole = confusion_matrix(truth, pred, 3)
    monkeypatch.setattr(metrics, "_CHUNK", 100)
    np.testing.assert_array_equal(confusion_matrix(truth, pred, 3), whole)
    assert whole.sum() == truth.size
    expected = [[np.sum((truth == i) & (pred == j)) for j in range(3)] for i in range(3)]
    np.testing.assert_array_equal(whole, expected)


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="class indices"):
        confusion_matrix(TRUTH, PRED + 1, 2)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(TRUTH, PRED[0], 2)
    with pytest.raises(ValueError, match="mask"):
        confusion_matrix(TRUTH, PRED, 2, mask=np.ones(3, bool))


def test_absent_class_scores_one():
    cm = confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 3)
    scores = segmentation_scores(cm, ["pore", "ysz", "ni"])
    assert scores["iou_ni"] == 1.0 and scores["dice_ni"] == 1.0
    assert np.isnan(segmentation_scores(np.zeros((2, 2)), ["rest", "ni"])["accuracy"])
    with pytest.raises(ValueError):
        segmentation_scores(cm, ["rest", "ni"])


def test_scores_carry_the_ni_volume_fraction_and_its_error():
    # truth: 3 of 8 pixels Ni; prediction: 4 of 8 (one pore pixel called Ni)
    truth = np.array([0, 0, 1, 1, 2, 2, 2, 1])
    pred = np.array([0, 2, 1, 1, 2, 2, 2, 1])
    scores = segmentation_scores(confusion_matrix(truth, pred, 3), ["pore", "ysz", "ni"])
    assert scores["ni_fraction_true"] == pytest.approx(3 / 8)
    assert scores["ni_fraction_pred"] == pytest.approx(4 / 8)
    assert scores["ni_fraction_error"] == pytest.approx(1 / 8)
    binary = segmentation_scores(confusion_matrix((truth == 2).astype(int), (pred == 2).astype(int), 2), ["rest", "ni"])
    assert binary["ni_fraction_error"] == pytest.approx(1 / 8)
    # No Ni class (or nothing scored): no fraction keys
    assert not any(k.startswith("ni_fraction") for k in segmentation_scores(np.eye(2), ["pore", "ysz"]))
    assert not any(k.startswith("ni_fraction") for k in segmentation_scores(np.zeros((2, 2)), ["rest", "ni"]))


def probabilities_to_classes(probs, task):
    return get_task(task).to_classes(probs)


def class_names(task, n_classes=3):
    return get_task(task).default_class_names(n_classes)


def test_metric_names_use_the_tasks_default_class_names():
    assert ThresholdedIoU("ni", class_id=1).name == "iou_ni"
    assert ThresholdedIoU(get_task("phases"), n_classes=3, class_id=1).name == "iou_ysz"
    assert ThresholdedIoU("phases", n_classes=4, class_id=3, metric="dice").name == "dice_class3"


def keras_value(metric, *updates):
    for y_true, y_pred, *weight in updates:
        metric.update_state(y_true, y_pred, *weight)
    return float(keras.ops.convert_to_numpy(metric.result()))


def test_keras_metric_hand_example():
    probs = PRED[None, ..., None].astype("float32") * 0.8 + 0.1  # P(ni) 0.9 / 0.1
    assert keras_value(ThresholdedIoU("ni", class_id=1), (TRUTH[None], probs)) == pytest.approx(0.5)
    assert keras_value(ThresholdedIoU("ni", class_id=0), (TRUTH[None], probs)) == pytest.approx(2 / 3)


def random_batch(rng, task, n):
    truth = rng.integers(0, n, size=(3, 16, 16))
    if task == "ni":
        return truth, rng.random((3, 16, 16, 1)).astype("float32")
    logits = rng.normal(size=(3, 16, 16, n))
    return truth, (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype("float32")


@pytest.mark.parametrize("task,n", [("ni", 2), ("phases", 3)])
@pytest.mark.parametrize("kind", ["iou", "dice"])
def test_keras_metric_matches_numpy_over_batches(task, n, kind):
    rng = np.random.default_rng(2)
    batches = [random_batch(rng, task, n) for _ in range(2)]
    truth = np.concatenate([b[0] for b in batches])
    pred = probabilities_to_classes(np.concatenate([b[1] for b in batches]), task)
    names = class_names(task, n)
    expected = segmentation_scores(confusion_matrix(truth, pred, n), names)
    for class_id in [None, *range(n)]:
        metric = ThresholdedIoU(task, n_classes=n, class_id=class_id, metric=kind)
        key = f"mean_{kind}" if class_id is None else f"{kind}_{names[class_id]}"
        assert metric.name == key
        # labels as float, as a tf.data pipeline may deliver them
        got = keras_value(metric, *[(t.astype("float32"), p) for t, p in batches])
        assert got == pytest.approx(expected[key], rel=1e-6)
    metric.reset_state()
    assert keras_value(metric) == 1.0  # empty: every class absent


def test_keras_metric_sample_weight_matches_mask():
    rng = np.random.default_rng(3)
    truth, probs = random_batch(rng, "phases", 3)
    mask = rng.random(truth.shape) > 0.3
    expected = segmentation_scores(confusion_matrix(truth, probabilities_to_classes(probs, "phases"), 3, mask), class_names("phases"))
    metric = ThresholdedIoU("phases")
    assert keras_value(metric, (truth, probs, mask.astype("float32"))) == pytest.approx(expected["mean_iou"], rel=1e-6)
    # per-sample weights broadcast over pixels
    metric = ThresholdedIoU("phases")
    per_sample = keras_value(metric, (truth, probs, np.array([1.0, 0.0, 1.0])))
    keep = np.array([True, False, True])
    cm = confusion_matrix(truth[keep], probabilities_to_classes(probs[keep], "phases"), 3)
    assert per_sample == pytest.approx(segmentation_scores(cm, class_names("phases"))["mean_iou"], rel=1e-6)


def test_keras_metric_config_round_trip():
    metric = ThresholdedIoU("phases", n_classes=3, class_id=2, metric="dice")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert isinstance(clone, ThresholdedIoU)
    assert clone.get_config() == metric.get_config()
    assert clone.name == "dice_ni"


def test_keras_metric_rejects_bad_arguments():
    with pytest.raises(ValueError, match="class_id"):
        ThresholdedIoU("ni", class_id=2)
    with pytest.raises(ValueError, match="iou, dice"):
        ThresholdedIoU("ni", metric="f1")
    with pytest.raises(ValueError, match="ni, phases"):
        ThresholdedIoU("pores")
