"""Non-deep baselines a U-Net has to beat: global thresholds and an ilastik-style random forest.

Both work on the same input the U-Nets see: slabs ``(Z, H, W)`` of grey values normalised with
the training slab's :class:`~socseg.data.normalise.Normaliser`, and task class indices as targets
(:meth:`socseg.data.tasks.Task.targets`). Both predict class indices ``(Z, H, W)`` uint8, so the benchmark
scores them with the same confusion-matrix code as the networks.

* :class:`ThresholdBaseline` - the floor: one grey threshold (``ni``) or two (``phases``), chosen
  by an exhaustive sweep over a histogram of the training slab that maximises mean IoU there.
* :class:`RandomForestBaseline` - what many tomography users run today (ilastik's pixel
  classifier): a random forest on multi-scale filter responses. Features are **2-D, per slice**
  (ilastik can do 3-D; 2-D keeps it comparable with the slice-wise U-Nets and cheap).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
from scipy import ndimage as ndi

from socseg.data.tasks import IGNORE

DEFAULT_SIGMAS: tuple[float, ...] = (0.7, 1.0, 1.6, 3.5, 5.0)
Stacks = Union[np.ndarray, Sequence[np.ndarray]]  # one (Z, H, W) stack or several (one per volume)
_PER_SIGMA = ("gauss", "log", "gradmag", "hess_max", "hess_min", "st_max", "st_min")


def _as_stack(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"expected a (Z, H, W) stack or one (H, W) slice, got shape {images.shape}")
    return images


def _slice_pairs(images: Stacks, targets: Stacks) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, target) 2-D slice pairs from one stack or a list of stacks (volumes may differ in size)."""
    image_list = [images] if isinstance(images, np.ndarray) else list(images)
    target_list = [targets] if isinstance(targets, np.ndarray) else list(targets)
    if len(image_list) != len(target_list):
        raise ValueError(f"{len(image_list)} image stacks but {len(target_list)} target stacks")
    pairs = []
    for image, target in zip(image_list, target_list):
        image, target = _as_stack(image), _as_stack(target)
        if image.shape != target.shape:
            raise ValueError(f"images {image.shape} and targets {target.shape} differ in shape")
        pairs.extend(zip(image, target))
    if not pairs or pairs[0][0].size == 0:
        raise ValueError("cannot fit on empty training data")
    return pairs


# --------------------------------------------------------------------------- thresholds


def _plateau_centre(score: np.ndarray) -> list[int]:
    """Index of the best score; where a whole range ties (a gap in the histogram), its centre."""
    best = np.argwhere(score >= score.max() - 1e-12)
    return [int(round(v)) for v in best.mean(axis=0)]


@dataclass
class ThresholdBaseline:
    """Global thresholds: class k gets the grey values between threshold k-1 and k.

    Classes are ranked by their mean grey value on the training data (pore < YSZ < Ni in PXCT;
    rest < Ni for the binary task), so no order has to be assumed. ``bins`` sets the resolution
    of the sweep: every pair of histogram edges is tried, which is exact up to one bin and takes
    well under a second for 2 or 3 classes.
    """

    n_classes: int | None = None
    bins: int = 1024
    thresholds: list[float] = field(default_factory=list)
    class_order: list[int] = field(default_factory=list)  # classes from darkest to brightest
    train_mean_iou: float = float("nan")

    def fit(self, images: Stacks, targets: Stacks) -> "ThresholdBaseline":
        pairs = _slice_pairs(images, targets)
        grey = np.concatenate([image.reshape(-1) for image, _ in pairs]).astype(np.float32)
        cls = np.concatenate([target.reshape(-1) for _, target in pairs]).astype(np.intp)
        n = int(self.n_classes or int(cls.max()) + 1)
        if n not in (2, 3):
            raise ValueError(f"ThresholdBaseline handles 2 or 3 classes, got {n}")
        lo, hi = float(grey.min()), float(grey.max())
        if not hi > lo:
            raise ValueError("training grey values are constant: no threshold to tune")
        edges = np.linspace(lo, hi, self.bins + 1)
        index = np.clip(np.searchsorted(edges, grey, side="right") - 1, 0, self.bins - 1)
        hist = np.bincount(cls * self.bins + index, minlength=n * self.bins).reshape(n, self.bins)
        present = hist.sum(axis=1) > 0
        means = np.array([np.average(edges[:-1], weights=h) if h.sum() else np.inf for h in hist])
        order = [int(c) for c in np.argsort(means) if present[c]] + [int(c) for c in range(n) if not present[c]]
        # below[c, i]: pixels of class c in bins < i, i.e. below threshold edges[i].
        below = np.concatenate([np.zeros((n, 1)), np.cumsum(hist, axis=1)], axis=1)[order].astype(np.float64)
        total = below[:, -1]
        all_below = below.sum(axis=0)
        n_pix = all_below[-1]

        def iou(tp, pred, true):
            union = true + pred - tp
            return np.where(union > 0, tp / np.where(union > 0, union, 1), 1.0)

        if n == 2:
            dark = iou(below[0], all_below, total[0])
            bright = iou(total[1] - below[1], n_pix - all_below, total[1])
            score = (dark + bright) / 2
            cuts = [_plateau_centre(score)[0]]
            self.train_mean_iou = float(score.max())
        else:
            i, j = below[:, :, None], below[:, None, :]  # threshold indices t1 = i, t2 = j
            a_i, a_j = all_below[:, None], all_below[None, :]
            dark = iou(i[0], a_i, total[0])
            mid = iou(j[1] - i[1], a_j - a_i, total[1])
            bright = iou(total[2] - j[2], n_pix - a_j, total[2])
            score = (dark + mid + bright) / 3
            score = np.where(np.triu(np.ones_like(score, dtype=bool)), score, -np.inf)  # t1 <= t2
            cuts = _plateau_centre(score)
            self.train_mean_iou = float(score.max())
        self.n_classes = n
        self.thresholds = [float(edges[c]) for c in cuts]
        self.class_order = order
        return self

    def predict(self, images: np.ndarray) -> np.ndarray:
        if not self.thresholds:
            raise RuntimeError("ThresholdBaseline is not fitted")
        images = _as_stack(images)
        rank = np.searchsorted(np.asarray(self.thresholds, np.float32), images.astype(np.float32), side="right")
        return np.asarray(self.class_order, np.uint8)[rank]


# --------------------------------------------------------------------------- random forest


def feature_names(sigmas: Sequence[float] = DEFAULT_SIGMAS) -> list[str]:
    return ["grey"] + [f"{name}_{s:g}" for s in sigmas for name in _PER_SIGMA]


def _eig2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (larger, smaller) of the symmetric 2x2 field [[a, b], [b, c]]."""
    half_trace = (a + c) / 2
    root = np.sqrt(((a - c) / 2) ** 2 + b**2)
    return half_trace + root, half_trace - root


def pixel_features(image: np.ndarray, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> np.ndarray:
    """ilastik's default 2-D filter bank for one slice: ``(H, W, 1 + 7 * len(sigmas))`` float32.

    Per sigma: Gaussian smoothing, Laplacian of Gaussian, Gaussian gradient magnitude, the two
    Hessian eigenvalues, and the two structure-tensor eigenvalues (inner scale sigma/2, outer
    sigma, as ilastik). Plus the grey value itself. Borders are mirrored.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"pixel_features takes one (H, W) slice, got shape {img.shape}")
    out = np.empty(img.shape + (1 + len(_PER_SIGMA) * len(sigmas),), dtype=np.float32)
    out[..., 0] = img
    k = 1
    for s in sigmas:
        out[..., k] = ndi.gaussian_filter(img, s)
        out[..., k + 1] = ndi.gaussian_laplace(img, s)
        out[..., k + 2] = ndi.gaussian_gradient_magnitude(img, s)
        hrr = ndi.gaussian_filter(img, s, order=(2, 0))
        hrc = ndi.gaussian_filter(img, s, order=(1, 1))
        hcc = ndi.gaussian_filter(img, s, order=(0, 2))
        out[..., k + 3], out[..., k + 4] = _eig2(hrr, hrc, hcc)
        gr = ndi.gaussian_filter(img, s / 2, order=(1, 0))
        gc = ndi.gaussian_filter(img, s / 2, order=(0, 1))
        srr, src, scc = (ndi.gaussian_filter(p, s) for p in (gr * gr, gr * gc, gc * gc))
        out[..., k + 5], out[..., k + 6] = _eig2(srr, src, scc)
        k += len(_PER_SIGMA)
    return out


@dataclass
class RandomForestBaseline:
    """Random forest on :func:`pixel_features`, trained on a random pixel subsample.

    ``n_samples`` pixels are drawn evenly from every training slice (so each slice, and each
    class in proportion to its frequency, is represented), as a user's scribbles would spread
    over a volume - but denser. 100 fully grown trees, as ilastik; ``max_depth`` can bound the
    cost of predicting large volumes.
    """

    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    n_estimators: int = 100
    max_depth: int | None = None
    n_samples: int = 150_000
    n_jobs: int = 2
    seed: int = 0
    forest: object | None = None

    def fit(self, images: Stacks, targets: Stacks) -> "RandomForestBaseline":
        from sklearn.ensemble import RandomForestClassifier

        pairs = _slice_pairs(images, targets)
        rng = np.random.default_rng(self.seed)
        per_slice = max(1, -(-self.n_samples // len(pairs)))
        xs, ys = [], []
        for image, target in pairs:
            labelled = np.flatnonzero(target.reshape(-1) != IGNORE)  # sparse labels: unlabelled pixels teach nothing
            if not labelled.size:
                continue
            pick = rng.choice(labelled, min(per_slice, labelled.size), replace=False)
            xs.append(pixel_features(image, self.sigmas).reshape(image.size, -1)[pick])
            ys.append(target.reshape(-1)[pick])
        if not xs:
            raise ValueError("no labelled pixel to train the forest on (every target is IGNORE)")
        self.forest = RandomForestClassifier(
            n_estimators=self.n_estimators, max_depth=self.max_depth, n_jobs=self.n_jobs, random_state=self.seed
        ).fit(np.concatenate(xs), np.concatenate(ys))
        return self

    def predict(self, images: np.ndarray) -> np.ndarray:
        if self.forest is None:
            raise RuntimeError("RandomForestBaseline is not fitted")
        images = _as_stack(images)
        out = np.empty(images.shape, dtype=np.uint8)
        for k, image in enumerate(images):
            features = pixel_features(image, self.sigmas).reshape(image.size, -1)
            out[k] = self.forest.predict(features).reshape(image.shape)  # type: ignore[attr-defined]
        return out

    def probabilities(self, images: np.ndarray, n_classes: int | None = None) -> np.ndarray:
        """``(N, H, W, n_classes)`` float32 class probabilities (the trees' vote shares), for
        intervals on what the forest's labels measure. ``n_classes`` (default: the highest class
        seen in training + 1) keeps a class absent from the training pixels as a zero channel."""
        if self.forest is None:
            raise RuntimeError("RandomForestBaseline is not fitted")
        images = _as_stack(images)
        seen = np.asarray(self.forest.classes_, dtype=int)  # type: ignore[attr-defined]
        width = int(seen.max()) + 1 if n_classes is None else n_classes
        if seen.max() >= width:
            raise ValueError(f"the forest was trained on class {int(seen.max())}, more than n_classes={width} allow")
        out = np.zeros(images.shape + (width,), dtype=np.float32)
        for k, image in enumerate(images):
            features = pixel_features(image, self.sigmas).reshape(image.size, -1)
            out[k][..., seen] = self.forest.predict_proba(features).reshape(image.shape + (seen.size,))  # type: ignore[attr-defined]
        return out
