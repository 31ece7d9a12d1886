"""What the viewer's child process sends back: plain data, importable without TensorFlow (the
viewer's process unpickles them, see :mod:`socseg.viewer.jobs`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from socseg.analysis.uncertainty import SliceUncertainty, rank_blocks


@dataclass
class Segmentation:
    """One segmented image layer: label values and uncertainty (uint8, normalised entropy x 255)."""

    labels: np.ndarray
    uncertainty: np.ndarray
    phase_map: dict[int, str]
    model_uri: str
    record: dict[str, Any] = field(default_factory=dict)  # the request's settings, as outputs record them

    def suggested_slices(self, top: int) -> list[SliceUncertainty]:
        """The ``top`` slices ``socseg suggest-slices`` would pick: most uncertain first."""
        return rank_blocks([(0, self.uncertainty)])[:top]


@dataclass
class FinetuneSummary:
    """What the viewer shows of a fine-tune (the child's FinetuneResult, without its objects)."""

    model_uri: str
    run_id: str
    train_slices: list[int]
    test_slices: list[int]
    metrics: dict[str, float]
    verdict: str  # what the registry made of it (socseg.training.finetune.promotion_verdict)
    promotion: dict[str, Any] | None = field(default=None)
