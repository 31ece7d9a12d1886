"""Training samples: random augmented crops from the training slabs, as a Keras ``PyDataset``.

Pure NumPy, so it feeds any Keras backend (TensorFlow here, JAX on a GPU machine). Each batch is
drawn from a generator seeded by ``(seed, epoch, batch index)``: runs are reproducible and
workers (if enabled) do not repeat each other's crops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import keras
import numpy as np

from socseg.data.context import n_channels, neighbour_indices
from socseg.data.tasks import IGNORE
from socseg.params import AugmentParams


@dataclass(frozen=True)
class Augmentation:
    flips: bool
    rot90: bool
    intensity_jitter: float  # +- relative scale and offset on [0, 1] grey values

    @classmethod
    def from_params(cls, augment: AugmentParams) -> "Augmentation":
        return cls(flips=augment.flips, rot90=augment.rot90, intensity_jitter=augment.intensity_jitter)

    def __call__(self, image: np.ndarray, target: np.ndarray, rng: np.random.Generator):
        """Augment one crop pair, image (H, W) or (H, W, C); geometric transforms hit both, intensity only the image."""
        if self.flips:
            if rng.random() < 0.5:
                image, target = image[::-1], target[::-1]
            if rng.random() < 0.5:
                image, target = image[:, ::-1], target[:, ::-1]
        if self.rot90 and image.shape[0] == image.shape[1]:
            k = int(rng.integers(0, 4))
            image, target = np.rot90(image, k), np.rot90(target, k)
        if self.intensity_jitter > 0:
            scale = 1.0 + rng.uniform(-self.intensity_jitter, self.intensity_jitter)
            offset = rng.uniform(-self.intensity_jitter, self.intensity_jitter)
            image = image * np.float32(scale) + np.float32(offset)
        return image, target


class RandomCrops(keras.utils.PyDataset):
    """Batches ``(x, y)``: x ``(B, size, size, 2k + 1)`` float32, y ``(B, size, size)`` uint8 class indices.

    ``images`` are normalised training slabs ``(Z, H, W)`` (several volumes allowed), ``targets``
    the matching class-index slabs. A slab is picked with probability proportional to its voxel count.
    ``context_slices`` (k) adds the k neighbouring slices on each side as channels (2.5D), taken
    from the same slab only (:mod:`socseg.data.context`).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        targets: Sequence[np.ndarray],
        size: int,
        batch_size: int,
        steps: int,
        augmentation: Augmentation | None = None,
        seed: int = 0,
        context_slices: int = 0,
        **kwargs,
    ):
        """Sparse labels (targets holding :data:`~socseg.data.tasks.IGNORE`): every crop contains a
        labelled pixel, drawn from a :data:`CELL` x :data:`CELL` cell picked with probability
        proportional to its labelled pixels (a slab by its labelled pixel count), so no step is
        spent on crops without a label. Fully labelled targets: crops uniform over the slabs."""
        super().__init__(**kwargs)
        self.channels = n_channels(context_slices)
        self.context_slices = int(context_slices)
        if not images or len(images) != len(targets):
            raise ValueError("need one target slab per image slab, and at least one slab")
        for image, target in zip(images, targets):
            if image.shape != target.shape or image.ndim != 3 or image.shape[0] == 0:
                raise ValueError(f"bad training slab: image {image.shape}, target {target.shape}")
        self.images = [self._pad(np.asarray(i, np.float32), size) for i in images]
        self.targets = [self._pad(np.asarray(t, np.uint8), size) for t in targets]
        self.size = size
        self.batch_size = batch_size
        self.steps = steps
        self.augmentation = augmentation or Augmentation(False, False, 0.0)
        self.seed = seed
        self.epoch = 0
        sizes = np.array([i.size for i in self.images], dtype=np.float64)
        # Per slab: None (fully labelled) or the (z, cell row, cell column) of cells holding labels
        # and the cumulative labelled-pixel counts to draw them from.
        self.cells = [labelled_cells(t) for t in self.targets]
        if any(c is not None for c in self.cells):
            sizes = np.array([t.size if c is None else c[1][-1] for t, c in zip(self.targets, self.cells)], np.float64)
            if not sizes.sum():
                raise ValueError("the training targets hold no labelled pixel (all are unlabelled)")
        self.slab_probabilities = sizes / sizes.sum()

    @staticmethod
    def _pad(stack: np.ndarray, size: int) -> np.ndarray:
        pad_y, pad_x = max(0, size - stack.shape[1]), max(0, size - stack.shape[2])
        if pad_y or pad_x:
            stack = np.pad(stack, [(0, 0), (0, pad_y), (0, pad_x)], mode="symmetric")
        return stack

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        # Separate streams: where crops come from does not depend on which augmentations are on.
        rng = np.random.default_rng((self.seed, self.epoch, index, 0))
        aug_rng = np.random.default_rng((self.seed, self.epoch, index, 1))
        x = np.empty((self.batch_size, self.size, self.size, self.channels), np.float32)
        y = np.empty((self.batch_size, self.size, self.size), np.uint8)
        for b in range(self.batch_size):
            slab = int(rng.choice(len(self.images), p=self.slab_probabilities))
            image, target = self.images[slab], self.targets[slab]
            if self.cells[slab] is None:
                z = int(rng.integers(0, image.shape[0]))
                top = int(rng.integers(0, image.shape[1] - self.size + 1))
                left = int(rng.integers(0, image.shape[2] - self.size + 1))
            else:
                z, top, left = self._labelled_crop(slab, rng)
            rows, cols = np.s_[top : top + self.size], np.s_[left : left + self.size]
            planes = neighbour_indices(z, self.context_slices, 0, image.shape[0])
            crop, label = self.augmentation(np.moveaxis(image[planes, rows, cols], 0, -1), target[z, rows, cols], aug_rng)
            x[b] = crop
            y[b] = label
        return x, y

    def _labelled_crop(self, slab: int, rng: np.random.Generator) -> tuple[int, int, int]:
        """(z, top, left) of a crop that contains a random labelled pixel of a labelled cell of ``slab``."""
        coordinates, cumulative = self.cells[slab]
        k = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        z, row, column = (int(v) for v in coordinates[min(k, len(coordinates) - 1)])
        height, width = self.images[slab].shape[1:]
        cell = self.targets[slab][z, row * CELL : (row + 1) * CELL, column * CELL : (column + 1) * CELL]
        ys, xs = np.nonzero(cell != IGNORE)
        pick = int(rng.integers(0, len(ys)))
        y, x = row * CELL + int(ys[pick]), column * CELL + int(xs[pick])
        top = min(max(y - int(rng.integers(0, self.size)), 0), height - self.size)
        left = min(max(x - int(rng.integers(0, self.size)), 0), width - self.size)
        return z, top, left

    def on_epoch_end(self) -> None:
        self.epoch += 1


# Edge in pixels of the cells sparse-label crops are drawn from (see RandomCrops).
CELL = 16


def labelled_cells(target: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Where a class-index slab ``(Z, H, W)`` holds labels: None when every pixel is labelled, else
    ``(coordinates, cumulative)``: the (z, row, column) of each :data:`CELL`-pixel cell with a
    labelled pixel, and the running total of their labelled pixel counts (empty when none).

    One pass, slice by slice: a slab's labelled cells take a few bytes per cell, not a mask.
    """
    if not np.any(target == IGNORE):
        return None
    depth, height, width = target.shape
    rows, columns = -(-height // CELL), -(-width // CELL)
    coordinates, counts = [], []
    for z in range(depth):
        labelled = target[z] != IGNORE
        if not labelled.any():
            continue
        padded = np.zeros((rows * CELL, columns * CELL), np.int32)
        padded[:height, :width] = labelled
        per_cell = padded.reshape(rows, CELL, columns, CELL).sum(axis=(1, 3))
        row, column = np.nonzero(per_cell)
        coordinates.append(np.stack([np.full_like(row, z), row, column], axis=1))
        counts.append(per_cell[row, column])
    if not coordinates:
        return np.zeros((0, 3), np.int64), np.zeros(1, np.float64)
    return np.concatenate(coordinates), np.cumsum(np.concatenate(counts)).astype(np.float64)
