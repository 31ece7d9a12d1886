"""Pictures people would rather look at than numbers: training curves and test overlays."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

_PHASE_COLOURS = {"pore": "#1f1f1f", "ysz": "#3a7dd8", "ni": "#e8b33a", "rest": "#6b6b6b"}


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
    cmap = ListedColormap([_PHASE_COLOURS.get(name, f"C{i}") for i, name in enumerate(class_names)])
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
