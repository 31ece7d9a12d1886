"""Pictures people would rather look at than numbers: training curves and test overlays."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from socseg.data.phases import phase_colours  # noqa: E402


def training_curves_figure(history: Mapping[str, Sequence[float]]) -> plt.Figure:
    """Loss (left) and validation IoU curves (right) per epoch."""
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(11, 4))
    for key, values in history.items():
        epochs = np.arange(1, len(values) + 1)
        if key.endswith("loss"):
            ax_loss.plot(epochs, values, marker="o", label=key)
        elif "iou" in key:
            ax_iou.plot(epochs, values, marker="o", label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_iou.set(xlabel="epoch", ylabel="IoU", title="IoU (thresholded)")
    for ax in (ax_loss, ax_iou):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def overlay_figure(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    class_names: Sequence[str],
    titles: Sequence[str] | None = None,
) -> plt.Figure:
    """One row per slice: grey image, truth, prediction, error map (wrong pixels in red on grey)."""
    n = len(images)
    cmap = ListedColormap(phase_colours(class_names))
    fig, axes = plt.subplots(n, 4, figsize=(14, 3.6 * n), squeeze=False)
    for row, (image, truth, pred) in enumerate(zip(images, truths, predictions)):
        wrong = truth != pred
        error = np.dstack([image] * 3)
        lo, hi = np.percentile(error, [1, 99])
        error = np.clip((error - lo) / max(hi - lo, 1e-6), 0, 1) * 0.6
        error[wrong] = [1.0, 0.1, 0.1]
        panels = [
            (image, dict(cmap="gray"), "image"),
            (truth, dict(cmap=cmap, vmin=0, vmax=len(class_names) - 1, interpolation="nearest"), "truth"),
            (pred, dict(cmap=cmap, vmin=0, vmax=len(class_names) - 1, interpolation="nearest"), "prediction"),
            (error, dict(interpolation="nearest"), f"errors: {wrong.mean():.2%} of pixels"),
        ]
        for ax, (data, style, title) in zip(axes[row], panels):
            ax.imshow(data, **style)
            prefix = f"{titles[row]}: " if titles else ""
            ax.set_title(prefix + title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    return fig


def slab_overlay_figure(slab, truth: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]) -> plt.Figure:
    """:func:`overlay_figure` of the first, middle and last slice of a slab
    (:class:`socseg.data.prepare.Slab`); ``truth`` and ``predicted`` are its class maps."""
    start, _ = slab.z_range
    picks = sorted({0, len(predicted) // 2, len(predicted) - 1})
    return overlay_figure([slab.volume.image[start + k] for k in picks], [truth[k] for k in picks],
                          [predicted[k] for k in picks], class_names,
                          titles=[f"{slab.name} z={start + k}" for k in picks])


def confusion_figure(cm: np.ndarray, class_names: Sequence[str]) -> plt.Figure:
    """Confusion matrix, rows = truth, normalised per row, with the pixel counts printed."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(class_names) + 2, 1.4 * len(class_names) + 1.5))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(j, i, f"{rows[i, j]:.3f}\n{int(cm[i, j])}", ha="center", va="center",
                    color="white" if rows[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="truth", title="test confusion (row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
