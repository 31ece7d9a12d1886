"""Segmentation losses for both tasks, from integer class maps (backend-agnostic Keras 3).

``y_true`` is a class-index map ``(batch, H, W)`` (any dtype; a trailing channel of 1 is also
accepted). ``y_pred`` is P(ni) ``(batch, H, W, 1)`` for ``ni`` or softmax probabilities
``(batch, H, W, C)`` for ``phases``. The binary case (:attr:`Task.binary`) is expanded to two classes ``[1 - p, p]`` so
both tasks share one implementation: categorical CE on ``[1 - p, p]`` *is* binary CE, and Dice
then covers the rest class as well as nickel. Every loss returns one value per sample, so Keras'
reduction and sample weights work as usual.

Sparse labels: pixels whose class index is :data:`~socseg.data.tasks.IGNORE` (unlabelled) have
zero weight: CE is the mean over labelled pixels, Dice counts labelled pixels only, and a sample
without any labelled pixel contributes 0. Fully labelled maps give exactly the unmasked values.
"""

from __future__ import annotations

import keras
from keras import ops

from socseg.data.tasks import IGNORE, Task, get_task
from socseg.params import LOSSES


def _class_probabilities(y_true, y_pred, task: Task):
    """Return (probabilities, one-hot truth, labelled): ``(batch, H, W, C)`` twice, C = 2 for a
    binary task (ni), and the ``(batch, H, W)`` weight of each pixel (0 where the truth is IGNORE, else 1).

    IGNORE pixels get an all-zero one-hot row (index 0, masked), whatever the backend's one_hot
    does with an index out of range.
    """
    if task.binary:  # one channel P(class 1): expand to [1 - p, p]
        p = ops.clip(y_pred[..., 0], 0.0, 1.0)
        probs = ops.stack([1.0 - p, p], axis=-1)
    else:
        probs = y_pred
    if len(y_true.shape) == len(probs.shape):  # (batch, H, W, 1) labels
        y_true = ops.squeeze(y_true, axis=-1)
    y_true = ops.cast(y_true, "int32")
    ignored = ops.equal(y_true, IGNORE)
    labelled = ops.cast(ops.logical_not(ignored), probs.dtype)
    one_hot = ops.one_hot(ops.where(ignored, 0, y_true), probs.shape[-1], dtype=probs.dtype)
    return probs, one_hot * labelled[..., None], labelled


def _pixel_mean(values, labelled):
    """Mean over the labelled pixels of each sample (0 for a sample without any): one value per sample."""
    axes = tuple(range(1, len(values.shape)))
    return ops.sum(values * labelled, axis=axes) / ops.maximum(ops.sum(labelled, axis=axes), 1.0)


class _SegmentationLoss(keras.losses.Loss):
    """Common constructor/config: every loss knows its task."""

    def __init__(self, task: str | Task = "ni", name: str | None = None, **kwargs):
        self.task = get_task(task)
        super().__init__(name=name, **kwargs)

    def get_config(self):
        config = super().get_config()
        config["task"] = self.task.name
        return config


def _cross_entropy(probs, one_hot, labelled, gamma: float = 0.0):
    """Per-sample mean over labelled pixels of -(1 - p_true)^gamma log p_true (gamma 0: plain CE)."""
    eps = keras.config.epsilon()
    probs = ops.clip(probs, eps, 1.0 - eps)
    per_class = -one_hot * ops.log(probs)
    if gamma:
        per_class = per_class * ops.power(1.0 - probs, gamma)
    return _pixel_mean(ops.sum(per_class, axis=-1), labelled)


def _dice(probs, one_hot, labelled, smooth: float):
    """Per-sample 1 - soft Dice over the labelled pixels, averaged over classes (0 with none labelled:
    both sums are 0, so every class scores smooth / smooth = 1)."""
    axes = tuple(range(1, len(probs.shape) - 1))
    probs = probs * labelled[..., None]
    intersection = ops.sum(probs * one_hot, axis=axes)
    total = ops.sum(probs, axis=axes) + ops.sum(one_hot, axis=axes)
    dice = (2.0 * intersection + smooth) / (total + smooth)
    return 1.0 - ops.mean(dice, axis=-1)


@keras.saving.register_keras_serializable(package="socseg")
class CrossEntropyLoss(_SegmentationLoss):
    """Binary CE for ni, categorical CE from integer labels for phases; mean over pixels."""

    def call(self, y_true, y_pred):
        return _cross_entropy(*_class_probabilities(y_true, y_pred, self.task))


@keras.saving.register_keras_serializable(package="socseg")
class FocalLoss(_SegmentationLoss):
    """Focal loss: CE down-weighted by (1 - p_true)^gamma so easy pixels count less."""

    def __init__(self, task: str | Task = "ni", gamma: float = 2.0, **kwargs):
        super().__init__(task, **kwargs)
        self.gamma = float(gamma)

    def call(self, y_true, y_pred):
        return _cross_entropy(*_class_probabilities(y_true, y_pred, self.task), gamma=self.gamma)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="socseg")
class DiceLoss(_SegmentationLoss):
    """1 - soft Dice per sample, mean over classes (for ni: rest and nickel).

    ``smooth`` (added to numerator and denominator) makes a class absent from both truth and
    prediction score Dice 1 instead of 0/0; at 128x128 crops it is negligible otherwise.
    """

    def __init__(self, task: str | Task = "ni", smooth: float = 1.0, **kwargs):
        super().__init__(task, **kwargs)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        return _dice(*_class_probabilities(y_true, y_pred, self.task), smooth=self.smooth)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="socseg")
class CEDiceLoss(DiceLoss):
    """CE + Dice: CE gives well-behaved pixel gradients, Dice counters class imbalance."""

    def call(self, y_true, y_pred):
        probs, one_hot, labelled = _class_probabilities(y_true, y_pred, self.task)
        return _cross_entropy(probs, one_hot, labelled) + _dice(probs, one_hot, labelled, self.smooth)


def near_boundary(one_hot):
    """``(batch, H, W)``: 1 where a pixel's 3x3 neighbourhood holds labelled pixels of two or more
    classes (the pixels on either side of a label boundary), else 0.

    Max-pooling each class's one-hot map dilates it by one pixel; where the dilated maps of two
    classes overlap, a boundary runs. IGNORE pixels (all-zero rows) add no class, so the edge of an
    unlabelled region is not a boundary.
    """
    present = ops.max_pool(one_hot, pool_size=3, strides=1, padding="same")
    return ops.cast(ops.sum(present, axis=-1) > 1.5, one_hot.dtype)


@keras.saving.register_keras_serializable(package="socseg")
class BoundaryCEDiceLoss(DiceLoss):
    """CE weighted ``1 + boundary_weight`` on pixels next to a label boundary, plus Dice.

    Almost all of a good model's errors lie within a pixel of a phase boundary, and there they
    decide the microstructure (a one-pixel speck of YSZ between pore and Ni adds a TPB) far more
    than IoU; plain CE spends most of its gradient on interior pixels that are already right. The
    weighted CE is normalised by the summed weights, so its scale stays that of plain CE.
    """

    def __init__(self, task: str | Task = "ni", smooth: float = 1.0, boundary_weight: float = 4.0, **kwargs):
        super().__init__(task, smooth=smooth, **kwargs)
        self.boundary_weight = float(boundary_weight)

    def call(self, y_true, y_pred):
        probs, one_hot, labelled = _class_probabilities(y_true, y_pred, self.task)
        weight = labelled * (1.0 + self.boundary_weight * near_boundary(one_hot))
        return _cross_entropy(probs, one_hot, weight) + _dice(probs, one_hot, labelled, self.smooth)

    def get_config(self):
        return {**super().get_config(), "boundary_weight": self.boundary_weight}


_LOSS_CLASSES = {"ce": CrossEntropyLoss, "dice": DiceLoss, "ce_dice": CEDiceLoss, "focal": FocalLoss,
                 "boundary_ce_dice": BoundaryCEDiceLoss}


def get_loss(name: str, task: str | Task) -> keras.losses.Loss:
    """The loss called ``name`` (one of :data:`LOSSES`) for ``task``."""
    if name not in _LOSS_CLASSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    return _LOSS_CLASSES[name](task=get_task(task), name=name)
