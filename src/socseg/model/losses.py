"""Segmentation losses for both tasks, from integer class maps (backend-agnostic Keras 3).

``y_true`` is a class-index map ``(batch, H, W)`` (any dtype; a trailing channel of 1 is also
accepted). ``y_pred`` is P(ni) ``(batch, H, W, 1)`` for ``ni`` or softmax probabilities
``(batch, H, W, C)`` for ``phases``. The binary case is expanded to two classes ``[1 - p, p]`` so
both tasks share one implementation: categorical CE on ``[1 - p, p]`` *is* binary CE, and Dice
then covers the rest class as well as nickel. Every loss returns one value per sample, so Keras'
reduction and sample weights work as usual.
"""

from __future__ import annotations

import keras
from keras import ops

from socseg.data.tasks import check_task
from socseg.params import LOSSES



def _class_probabilities(y_true, y_pred, task: str):
    """Return (probabilities, one-hot truth), both ``(batch, H, W, C)``, C = 2 for ni."""
    if task == "ni":
        p = ops.clip(y_pred[..., 0], 0.0, 1.0)
        probs = ops.stack([1.0 - p, p], axis=-1)
    else:
        probs = y_pred
    if len(y_true.shape) == len(probs.shape):  # (batch, H, W, 1) labels
        y_true = ops.squeeze(y_true, axis=-1)
    one_hot = ops.one_hot(ops.cast(y_true, "int32"), probs.shape[-1], dtype=probs.dtype)
    return probs, one_hot


def _pixel_mean(values):
    """Mean over every axis but the batch axis: one value per sample."""
    return ops.mean(values, axis=tuple(range(1, len(values.shape))))


class _SegmentationLoss(keras.losses.Loss):
    """Common constructor/config: every loss knows its task."""

    def __init__(self, task: str = "ni", name: str | None = None, **kwargs):
        self.task = check_task(task)
        super().__init__(name=name, **kwargs)

    def get_config(self):
        config = super().get_config()
        config["task"] = self.task
        return config


def _cross_entropy(probs, one_hot, gamma: float = 0.0):
    """Per-sample mean of -(1 - p_true)^gamma log p_true (gamma 0: plain CE)."""
    eps = keras.config.epsilon()
    probs = ops.clip(probs, eps, 1.0 - eps)
    per_class = -one_hot * ops.log(probs)
    if gamma:
        per_class = per_class * ops.power(1.0 - probs, gamma)
    return _pixel_mean(ops.sum(per_class, axis=-1))


def _dice(probs, one_hot, smooth: float):
    """Per-sample 1 - soft Dice, averaged over classes."""
    axes = tuple(range(1, len(probs.shape) - 1))
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

    def __init__(self, task: str = "ni", gamma: float = 2.0, **kwargs):
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

    def __init__(self, task: str = "ni", smooth: float = 1.0, **kwargs):
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
        probs, one_hot = _class_probabilities(y_true, y_pred, self.task)
        return _cross_entropy(probs, one_hot) + _dice(probs, one_hot, self.smooth)


_LOSS_CLASSES = {"ce": CrossEntropyLoss, "dice": DiceLoss, "ce_dice": CEDiceLoss, "focal": FocalLoss}


def get_loss(name: str, task: str) -> keras.losses.Loss:
    """The loss called ``name`` (one of :data:`LOSSES`) for ``task``."""
    if name not in _LOSS_CLASSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    return _LOSS_CLASSES[name](task=check_task(task), name=name)
