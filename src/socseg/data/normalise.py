"""Intensity normalisation: percentile clip and scale to [0, 1].

The percentiles are computed on the *training slab only* (computing them on the whole volume
would leak test intensities into training) and are stored with the model: the exported model
starts with an :class:`~socseg.model.export.IntensityNormalisation` layer holding the same two numbers, so inference
applies exactly the mapping the network was trained with, on raw uint8/uint16/float32 grey values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

# Percentiles of a few million voxels are as good as of all of them, and far cheaper.
_MAX_SAMPLES = 4_000_000


@dataclass(frozen=True)
class Normaliser:
    low: float
    high: float
    low_percentile: float
    high_percentile: float

    @classmethod
    def fit(
        cls, images: Iterable[np.ndarray], low_percentile: float, high_percentile: float, seed: int = 0
    ) -> "Normaliser":
        """Percentiles of the grey values of ``images`` (the training slabs)."""
        rng = np.random.default_rng(seed)
        samples = []
        arrays = [np.asarray(a) for a in images]
        total = sum(a.size for a in arrays)
        if total == 0:
            raise ValueError("cannot fit intensity normalisation on empty training data")
        for a in arrays:
            flat = a.reshape(-1)
            n = max(1, int(round(_MAX_SAMPLES * a.size / total)))
            samples.append(flat if flat.size <= n else flat[rng.integers(0, flat.size, n)])
        values = np.concatenate(samples).astype(np.float64)
        low, high = np.percentile(values, [low_percentile, high_percentile])
        if not high > low:
            raise ValueError(f"training grey values are constant ({low}): cannot normalise")
        return cls(float(low), float(high), float(low_percentile), float(high_percentile))

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Clip to [low, high] and scale to float32 [0, 1]."""
        scaled = (np.asarray(image, dtype=np.float32) - np.float32(self.low)) / np.float32(self.high - self.low)
        return np.clip(scaled, 0.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Normaliser":
        return cls(**json.loads(Path(path).read_text()))
