"""Losses against hand-computed values on tiny class maps."""

import keras
import numpy as np
import pytest

from socseg.model.losses import LOSSES, CEDiceLoss, DiceLoss, get_loss

# ni: one sample, 2x2 pixels; truth and P(ni).
NI_TRUE = np.array([[[1, 0], [1, 0]]], dtype="int32")
NI_PROB = np.array([[[0.9, 0.2], [0.6, 0.1]]], dtype="float32")[..., None]
# phases: 3 classes, softmax-like rows.
PH_TRUE = np.array([[[0, 1], [2, 2]]], dtype="int32")
PH_PROB = np.array(
    [[[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], [[0.2, 0.2, 0.6], [0.5, 0.1, 0.4]]]], dtype="float32"
)


def value(loss, y_true, y_pred, **kwargs):
    return float(keras.ops.convert_to_numpy(loss(y_true, y_pred, **kwargs)))


def per_sample(loss, y_true, y_pred):
    return keras.ops.convert_to_numpy(loss.call(keras.ops.convert_to_tensor(y_true, "float32"), y_pred))


def p_true(y_true, probs):
    """Probability of the true class per pixel."""
    return np.take_along_axis(probs, y_true[..., None], axis=-1)[..., 0]


def test_ce_ni_is_binary_cross_entropy_by_hand():
    expected = -np.mean(np.log([0.9, 0.8, 0.6, 0.9]))
    assert value(get_loss("ce", "ni"), NI_TRUE, NI_PROB) == pytest.approx(expected, rel=1e-5)


def test_ce_phases_from_integer_labels_by_hand():
    expected = -np.mean(np.log([0.7, 0.8, 0.6, 0.4]))
    assert value(get_loss("ce", "phases"), PH_TRUE, PH_PROB) == pytest.approx(expected, rel=1e-5)
    assert np.isclose(expected, -np.log(p_true(PH_TRUE, PH_PROB)).mean())


def test_labels_as_float_or_with_channel_give_the_same_loss():
    loss = get_loss("ce_dice", "ni")
    base = value(loss, NI_TRUE, NI_PROB)
    assert value(loss, NI_TRUE.astype("float32"), NI_PROB) == pytest.approx(base)
    assert value(loss, NI_TRUE[..., None], NI_PROB) == pytest.approx(base)


def test_dice_by_hand_with_smoothing():
    # Two classes for ni: rest (1 - p) and ni (p); smooth = 1.
    p = NI_PROB[0, ..., 0]
    t = NI_TRUE[0].astype(float)
    dice_ni = (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    dice_rest = (2 * ((1 - p) * (1 - t)).sum() + 1) / ((1 - p).sum() + (1 - t).sum() + 1)
    expected = 1 - (dice_ni + dice_rest) / 2
    assert value(get_loss("dice", "ni"), NI_TRUE, NI_PROB) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("task", ["ni", "phases"])
def test_dice_perfect_is_zero_and_fully_wrong_is_one(task):
    rng = np.random.default_rng(0)
    n = 2 if task == "ni" else 3
    truth = rng.integers(0, n, size=(2, 16, 16))
    wrong = (truth + 1) % n
    if task == "ni":
        perfect_pred, wrong_pred = truth[..., None].astype("float32"), wrong[..., None].astype("float32")
    else:
        perfect_pred, wrong_pred = np.eye(n, dtype="float32")[truth], np.eye(n, dtype="float32")[wrong]
    loss = get_loss("dice", task)
    assert value(loss, truth, perfect_pred) == pytest.approx(0.0, abs=1e-6)
    assert value(loss, truth, wrong_pred) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("task", ["ni", "phases"])
def test_ce_dice_is_the_sum(task):
    y_true, y_pred = (NI_TRUE, NI_PROB) if task == "ni" else (PH_TRUE, PH_PROB)
    total = value(get_loss("ce_dice", task), y_true, y_pred)
    parts = value(get_loss("ce", task), y_true, y_pred) + value(get_loss("dice", task), y_true, y_pred)
    assert total == pytest.approx(parts, rel=1e-6)


def test_focal_by_hand_and_smaller_than_ce_when_confident():
    pt = p_true(PH_TRUE, PH_PROB)
    expected = np.mean(-((1 - pt) ** 2) * np.log(pt))
    assert value(get_loss("focal", "phases"), PH_TRUE, PH_PROB) == pytest.approx(expected, rel=1e-5)
    confident = np.array([[[0.97, 0.02], [0.99, 0.05]]], dtype="float32")[..., None]
    focal = value(get_loss("focal", "ni"), NI_TRUE, confident)
    ce = value(get_loss("ce", "ni"), NI_TRUE, confident)
    assert 0 < focal < ce / 100


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("task", ["ni", "phases"])
def test_saturated_predictions_stay_finite_and_per_sample(name, task):
    n = 1 if task == "ni" else 3
    truth = np.array([[[0, 1], [1, 0]], [[1, 1], [0, 0]]])
    hard = np.zeros((2, 2, 2, n), dtype="float32")
    hard[..., 0] = 1.0  # certain, and wrong on some pixels
    loss = get_loss(name, task)
    samples = per_sample(loss, truth, hard)
    assert samples.shape == (2,)
    assert np.all(np.isfinite(samples))
    # sum_over_batch_size reduction is the mean of the per-sample values, and honours sample weights.
    assert value(loss, truth, hard) == pytest.approx(samples.mean(), rel=1e-5)
    weighted = value(loss, truth, hard, sample_weight=np.array([1.0, 0.0]))
    assert weighted == pytest.approx(samples[0] / 2, rel=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_losses_serialise(name):
    loss = get_loss(name, "phases")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(clone) is type(loss)
    assert clone.get_config() == loss.get_config()
    assert value(clone, PH_TRUE, PH_PROB) == pytest.approx(value(loss, PH_TRUE, PH_PROB))


def test_ce_dice_keeps_its_smoothing_in_config():
    loss = CEDiceLoss(task="ni", smooth=0.5)
    assert CEDiceLoss.from_config(loss.get_config()).smooth == 0.5
    assert isinstance(loss, DiceLoss)


def test_unknown_name_or_task_lists_valid_ones():
    with pytest.raises(ValueError, match="ce, dice, ce_dice, focal"):
        get_loss("iou", "ni")
    with pytest.raises(ValueError, match="ni, phases"):
        get_loss("ce", "pores")


# --------------------------------------------------------------------------- sparse labels (IGNORE)


def _masked_case(task, seed=0):
    """Truth with unlabelled (IGNORE) pixels, and predictions to compare against."""
    from socseg.data.tasks import IGNORE

    rng = np.random.default_rng(seed)
    n = 2 if task == "ni" else 3
    truth = rng.integers(0, n, size=(2, 8, 8))
    ignored = rng.random((2, 8, 8)) < 0.5
    sparse = np.where(ignored, IGNORE, truth)
    if task == "ni":
        pred = rng.uniform(0.05, 0.95, size=(2, 8, 8, 1)).astype("float32")
    else:
        logits = rng.normal(size=(2, 8, 8, n))
        pred = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype("float32")
    return truth, sparse, ignored, pred


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("task", ["ni", "phases"])
def test_ignored_pixels_do_not_change_any_loss(name, task):
    """Predictions at IGNORE pixels do not move the loss; all-IGNORE samples contribute 0."""
    from socseg.data.tasks import IGNORE

    truth, sparse, ignored, pred = _masked_case(task)
    loss = get_loss(name, task)
    base = per_sample(loss, sparse, pred)
    other = pred.copy()
    other[ignored] = 1 - other[ignored] if task == "ni" else other[ignored][..., ::-1]  # changed where ignored
    assert not np.allclose(per_sample(loss, truth, other), per_sample(loss, truth, pred))  # it would matter if labelled
    assert per_sample(loss, sparse, other) == pytest.approx(base, rel=1e-5, abs=1e-6)
    assert np.all(base > 0)
    nothing = np.full_like(truth, IGNORE)
    assert per_sample(loss, nothing, pred) == pytest.approx([0.0, 0.0], abs=1e-7)
    half = sparse.copy()
    half[1] = IGNORE  # one sample without labels: the batch loss is half the other sample's
    assert value(loss, half, pred) == pytest.approx(base[0] / 2, rel=1e-5)


@pytest.mark.parametrize("task", ["ni", "phases"])
def test_masked_ce_and_dice_are_the_losses_of_the_labelled_pixels(task):
    """CE: the mean over labelled pixels; Dice: soft Dice of the labelled pixels alone."""
    truth, sparse, ignored, pred = _masked_case(task, seed=1)
    probs = np.concatenate([1 - pred, pred], -1) if task == "ni" else pred
    labelled = ~ignored[0]
    p_true_pixels = np.take_along_axis(probs[0], truth[0][..., None], axis=-1)[..., 0][labelled]
    ce = per_sample(get_loss("ce", task), sparse, pred)[0]
    assert ce == pytest.approx(-np.log(p_true_pixels).mean(), rel=1e-5)
    one_hot = np.eye(probs.shape[-1])[truth[0]][labelled]
    kept = probs[0][labelled]
    dice = (2 * (kept * one_hot).sum(0) + 1) / (kept.sum(0) + one_hot.sum(0) + 1)
    assert per_sample(get_loss("dice", task), sparse, pred)[0] == pytest.approx(1 - dice.mean(), rel=1e-5)


def test_fully_labelled_phases_dice_and_ce_dice_are_the_unmasked_values_by_hand():
    """No IGNORE pixel, 3 classes: the masked Dice is the plain soft Dice over all 4 pixels, with the
    sums written out by hand from PH_TRUE / PH_PROB (smooth 1), and ce_dice adds the plain CE."""
    # class 0: p_true 0.7, sum p 0.7+0.1+0.2+0.5 = 1.5, 1 pixel; class 1: 0.8, 0.2+0.8+0.2+0.1 = 1.3, 1 pixel;
    # class 2: 0.6+0.4 = 1.0, 0.1+0.1+0.6+0.4 = 1.2, 2 pixels.
    dice = [(2 * 0.7 + 1) / (1.5 + 1 + 1), (2 * 0.8 + 1) / (1.3 + 1 + 1), (2 * 1.0 + 1) / (1.2 + 2 + 1)]
    expected_dice = 1 - sum(dice) / 3
    assert value(get_loss("dice", "phases"), PH_TRUE, PH_PROB) == pytest.approx(expected_dice, rel=1e-5)
    expected_ce = -(np.log(0.7) + np.log(0.8) + np.log(0.6) + np.log(0.4)) / 4
    assert value(get_loss("ce_dice", "phases"), PH_TRUE, PH_PROB) == pytest.approx(expected_ce + expected_dice, rel=1e-5)


def test_training_metric_skips_ignored_pixels():
    from socseg.data.tasks import IGNORE
    from socseg.model.metrics import ThresholdedIoU

    truth = np.array([[[1, 0], [IGNORE, IGNORE]]])
    right = np.array([[[0.9, 0.1], [0.9, 0.1]]], dtype="float32")[..., None]  # wrong only where ignored
    metric = ThresholdedIoU(task="ni")
    metric.update_state(truth, right)
    assert float(metric.result()) == pytest.approx(1.0)
    assert keras.ops.convert_to_numpy(metric.confusion).sum() == 2


def test_near_boundary_marks_the_pixels_on_both_sides_of_a_label_edge_and_not_an_unlabelled_edge():
    from socseg.data.tasks import IGNORE
    from socseg.model.losses import near_boundary

    truth = np.zeros((1, 5, 6), dtype="int32")
    truth[0, :, 3:] = 2  # a vertical edge between columns 2 and 3
    truth[0, 4, :] = IGNORE  # an unlabelled bottom row: its edge is no boundary
    one_hot = np.eye(3, dtype="float32")[np.where(truth == IGNORE, 0, truth)] * (truth != IGNORE)[..., None]
    near = keras.ops.convert_to_numpy(near_boundary(keras.ops.convert_to_tensor(one_hot)))[0]
    expected = np.zeros((5, 6))
    expected[:, 2:4] = 1  # columns 2 and 3 touch the other class
    assert near.tolist() == expected.tolist()


def test_boundary_ce_dice_weights_the_ce_of_boundary_pixels_by_hand():
    """2x2 phases map: every pixel touches another class, so weights are uniform and the loss is
    ce_dice; on a 1x4 ni row with one edge, the two edge pixels count 1 + w times."""
    assert value(get_loss("boundary_ce_dice", "phases"), PH_TRUE, PH_PROB) == pytest.approx(
        value(get_loss("ce_dice", "phases"), PH_TRUE, PH_PROB), rel=1e-5)
    truth = np.array([[[0, 0, 1, 1, 1]]], dtype="int32")
    prob = np.array([[[0.1, 0.3, 0.6, 0.8, 0.9]]], dtype="float32")[..., None]
    p_true = np.array([0.9, 0.7, 0.6, 0.8, 0.9])
    weights = np.array([1, 5, 5, 1, 1], dtype=float)  # boundary_weight 4 on columns 1 and 2
    ce = -(weights * np.log(p_true)).sum() / weights.sum()
    dice_only = value(get_loss("dice", "ni"), truth, prob)
    assert value(get_loss("boundary_ce_dice", "ni"), truth, prob) == pytest.approx(ce + dice_only, rel=1e-5)
    # the same wrong P(ni) 0.8 at the edge costs more, against the interior, than under plain ce_dice
    edge_wrong = prob.copy(); edge_wrong[0, 0, 1, 0] = 0.8  # noqa: E702
    inner_wrong = prob.copy(); inner_wrong[0, 0, 0, 0] = 0.8  # noqa: E702
    boundary, plain = get_loss("boundary_ce_dice", "ni"), get_loss("ce_dice", "ni")
    gap_boundary = value(boundary, truth, edge_wrong) - value(boundary, truth, inner_wrong)
    gap_plain = value(plain, truth, edge_wrong) - value(plain, truth, inner_wrong)
    assert gap_boundary > gap_plain + 0.1
