"""Segmentation metrics: exact NumPy counts for whole-slab evaluation, a Keras metric for training.

Both score *hard* predictions (the task's: threshold 0.5 for ni, argmax for phases) from one
confusion matrix, so the number on the training progress bar is the same quantity evaluation reports.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from socseg.data.tasks import IGNORE, NI_PHASE, Task, get_task


# Pixels per bincount call: bounds the int64 temporaries when counting whole slabs.
_CHUNK = 1 << 22


def confusion_matrix(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """Pixel counts, rows = true class, columns = predicted class (int64).

    Every pixel (or every pixel where ``mask`` is True) is counted exactly once. Works in chunks,
    so a whole slab needs no full-size int64 copy.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != y_true.shape:
            raise ValueError(f"mask {mask.shape} does not match labels {y_true.shape}")
        y_true, y_pred = y_true[mask], y_pred[mask]
    y_true, y_pred = y_true.reshape(-1), y_pred.reshape(-1)
    counts = np.zeros(n_classes * n_classes, dtype=np.int64)
    for start in range(0, y_true.size, _CHUNK):
        t = y_true[start : start + _CHUNK].astype(np.int64)
        p = y_pred[start : start + _CHUNK].astype(np.int64)
        if min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n_classes:
            raise ValueError(f"class indices outside 0..{n_classes - 1}")
        counts += np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 1.0 where the denominator is 0 (class absent from truth and prediction)."""
    safe = np.where(denominator > 0, denominator, 1)
    return np.where(denominator > 0, numerator / safe, 1.0)


def segmentation_scores(cm: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Everything socseg reports about a segmentation, from one confusion matrix.

    Per-class and mean IoU and Dice, pixel accuracy and, where a class is ``ni``, the true and
    predicted Ni volume fractions and their absolute error (what a microstructure study derived
    from the segmentation would get wrong, whatever the IoU). IoU = TP / (TP + FP + FN),
    Dice = 2TP / (2TP + FP + FN). A class absent from both truth and prediction scores 1.0
    (nothing to get wrong), so it neither drags the mean down nor makes it NaN. Accuracy of an
    empty matrix is NaN. Fractions come from the matrix (row sums are the truth, column sums the
    prediction), so they cover exactly the pixels that were scored.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix {cm.shape} does not fit {len(class_names)} class names")
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    iou = _ratio(tp, tp + fp + fn)
    dice = _ratio(2 * tp, 2 * tp + fp + fn)
    scores: dict[str, float] = {}
    for name, i, d in zip(class_names, iou, dice):
        scores[f"iou_{name}"] = float(i)
        scores[f"dice_{name}"] = float(d)
    scores["mean_iou"] = float(iou.mean())
    scores["mean_dice"] = float(dice.mean())
    total = cm.sum()
    scores["accuracy"] = float(tp.sum() / total) if total else float("nan")
    if NI_PHASE in class_names and total:
        k = list(class_names).index(NI_PHASE)
        true, pred = cm[k].sum() / total, cm[:, k].sum() / total
        scores.update(ni_fraction_true=float(true), ni_fraction_pred=float(pred), ni_fraction_error=float(abs(pred - true)))
    return scores


@keras.saving.register_keras_serializable(package="socseg")
class ThresholdedIoU(keras.metrics.Metric):
    """IoU or Dice of hard predictions, accumulated as a confusion matrix over the epoch.

    Unlike a batch-averaged soft IoU, this equals :func:`segmentation_scores` on the same
    pixels. ``class_id`` None gives the mean over classes (for ni: rest and ni). The default name
    matches the evaluation keys: ``mean_iou``, ``iou_ni``, ``dice_ysz``... Unlabelled pixels
    (:data:`~socseg.data.tasks.IGNORE`) are not counted, as in scoring.
    """

    def __init__(
        self,
        task: str | Task = "ni",
        n_classes: int = 3,
        class_id: int | None = None,
        metric: str = "iou",
        name: str | None = None,
        dtype=None,
    ):
        task = get_task(task)
        n = task.n_classes(n_classes)
        if metric not in ("iou", "dice"):
            raise ValueError(f"unknown metric {metric!r}; valid: iou, dice")
        if class_id is not None and not 0 <= class_id < n:
            raise ValueError(f"class_id {class_id} outside 0..{n - 1} for task {task.name!r}")
        if name is None:
            name = f"mean_{metric}" if class_id is None else f"{metric}_{task.default_class_names(n)[class_id]}"
        super().__init__(name=name, dtype=dtype)
        self.task, self.n_classes, self.class_id, self.metric = task, int(n_classes), class_id, metric
        self._n = n
        # float32 counts are exact up to 2**24 per cell; ample for one epoch's progress bar.
        self.confusion = self.add_variable(shape=(n, n), initializer="zeros", name="confusion", dtype=self.dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.convert_to_tensor(y_pred)
        if self.task.binary:  # one channel, P(class 1)
            pred = ops.cast(y_pred[..., 0] > 0.5, "int32")
        else:
            pred = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        y_true = ops.convert_to_tensor(y_true)
        if len(y_true.shape) == len(y_pred.shape):
            y_true = ops.squeeze(y_true, axis=-1)
        true = ops.cast(y_true, "int32")
        labelled = ops.reshape(ops.cast(ops.not_equal(true, IGNORE), self.dtype), (-1, 1))
        true = ops.where(ops.equal(true, IGNORE), 0, true)
        # One-hot of the flat (true, pred) cell index, summed: a jit-friendly bincount.
        cells = ops.one_hot(ops.reshape(true * self._n + pred, (-1,)), self._n * self._n, dtype=self.dtype)
        cells = cells * labelled
        if sample_weight is not None:
            weight = ops.cast(sample_weight, self.dtype)
            while len(weight.shape) < len(true.shape):
                weight = ops.expand_dims(weight, -1)
            weight = ops.reshape(ops.broadcast_to(weight, ops.shape(true)), (-1, 1))
            cells = cells * weight
        self.confusion.assign_add(ops.reshape(ops.sum(cells, axis=0), (self._n, self._n)))

    def result(self):
        cm = ops.convert_to_tensor(self.confusion)
        tp = ops.diagonal(cm)
        wrong = ops.sum(cm, axis=0) + ops.sum(cm, axis=1) - 2.0 * tp  # FP + FN
        numerator = tp if self.metric == "iou" else 2.0 * tp
        denominator = numerator + wrong
        score = ops.where(
            denominator > 0, numerator / ops.maximum(denominator, keras.config.epsilon()), 1.0
        )
        return ops.mean(score) if self.class_id is None else score[self.class_id]

    def get_config(self):
        return {
            **super().get_config(),
            "task": self.task.name,
            "n_classes": self.n_classes,
            "class_id": self.class_id,
            "metric": self.metric,
        }
