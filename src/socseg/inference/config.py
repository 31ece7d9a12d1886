"""What a trained network needs besides its weights: :class:`ModelConfig`, stored with the model.

The config is written once, as the pyfunc's ``model_config`` (and so in the MLmodel file), and read
back by everything that segments or scores with the model: the predictor, the Dask client (which
never loads the network), the REST client (``describe``) and fine-tuning. The task and the
normalisation are objects (:class:`~socseg.data.tasks.Task`,
:class:`~socseg.data.normalise.Normalisation`), so no caller branches on their names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from socseg.data.normalise import Normalisation
from socseg.data.tasks import Task, get_task
from socseg.params import InferenceParams, check_planes, parse_bool

# Compatibility (CHANGELOG.md, "Deprecated"): what models logged by earlier socseg versions did not
# record yet, and the value they behaved with (the sliding window; whole-slice passes on request,
# up to the bound they were introduced with). `socseg relog` re-logs such a model with every field.
_RECORDED_LATER = {"max_clipped_fraction": 0.5, "context_slices": 0, "encoder": "", "window": "sliding",
                   "whole_slice_max_pixels": 4096 * 1024, "smoothing_sigma": 0.0, "runtime": "keras",
                   "planes": "z", "fusion_depth": 64, "fusion_halo": 16}


@dataclass(frozen=True)
class ModelConfig:
    """What a trained network needs besides its weights to segment raw slices."""

    task: Task
    encoder: str  # vgg16 | resnet50 | unet ("" in models logged before it was recorded)
    class_names: list[str]
    phase_map: dict[int, str]
    tile_size: int
    context_slices: int  # 2.5D: neighbouring slices on each side the network sees (socseg.data.context)
    normalisation: Normalisation  # how raw grey values reach the network (socseg.data.normalise)
    window: str  # whole_slice | sliding (socseg.inference.window)
    whole_slice_max_pixels: int  # larger slices take the sliding window
    step_fraction: float
    tta: bool
    smoothing_sigma: float  # in-plane Gaussian on the probabilities (socseg.inference.window.smooth_probabilities)
    planes: str  # planes predicted and averaged: "z", or "zyx" (multi-axis fusion; Predictor.probabilities)
    fusion_depth: int  # with y or x in planes: slices per chunk (segment, REST client)
    fusion_halo: int  # with y or x in planes: grey slices read on either side of a chunk
    batch_size: int
    max_slice_pixels: int
    max_clipped_fraction: float  # see Predictor.check_grey_range
    runtime: str  # auto | keras | openvino: what runs the forward passes (socseg.inference.runtime)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", get_task(self.task))  # a task name is accepted where a Task is meant
        if not isinstance(self.normalisation, Normalisation):
            raise TypeError(f"normalisation must be a socseg.data.normalise.Normalisation, got {self.normalisation!r}")

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "ModelConfig":
        """From the stored record (:meth:`to_dict`, or a record of an earlier version: the
        normalisation mode beside the normalisation as ``normalisation_mode``, or not at all)."""
        record = {**_RECORDED_LATER, **dict(record)}
        normalisation = record["normalisation"]
        if not isinstance(normalisation, Normalisation):
            normalisation = Normalisation.from_dict(dict(normalisation or {}), record.get("normalisation_mode"))
        return cls(
            task=get_task(record["task"]),
            encoder=str(record["encoder"]),
            class_names=[str(c) for c in record["class_names"]],
            phase_map={int(k): str(v) for k, v in dict(record["phase_map"]).items()},
            tile_size=int(record["tile_size"]),
            context_slices=int(record["context_slices"]),
            normalisation=normalisation,
            window=str(record["window"]),
            whole_slice_max_pixels=int(record["whole_slice_max_pixels"]),
            step_fraction=float(record["step_fraction"]),
            tta=parse_bool(record["tta"]),
            smoothing_sigma=float(record["smoothing_sigma"]),
            planes=check_planes(record["planes"]),
            fusion_depth=int(record["fusion_depth"]),
            fusion_halo=int(record["fusion_halo"]),
            batch_size=int(record["batch_size"]),
            max_slice_pixels=int(record["max_slice_pixels"]),
            max_clipped_fraction=float(record["max_clipped_fraction"]),
            runtime=str(record["runtime"]),
        )

    @classmethod
    def from_training(cls, trained: Mapping[str, Any], inference: InferenceParams) -> "ModelConfig":
        """Training's record (task, encoder, classes, phase map, normalisation, tile size, context)
        with the ``inference:`` settings of params.yaml."""
        return cls.from_dict({
            **dict(trained),
            "window": inference.window,
            "whole_slice_max_pixels": inference.whole_slice_max_pixels,
            "step_fraction": inference.step_fraction,
            "tta": inference.tta,
            "smoothing_sigma": inference.smoothing_sigma,
            "planes": inference.planes,
            "fusion_depth": inference.fusion_depth,
            "fusion_halo": inference.fusion_halo,
            "batch_size": inference.batch_size,
            "max_slice_pixels": inference.max_slice_pixels,
            "max_clipped_fraction": inference.max_clipped_fraction,
            "runtime": inference.runtime,
        })

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML values: the task by name, the normalisation as its one dict."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["task"] = self.task.name
        record["class_names"] = list(self.class_names)
        record["normalisation"] = self.normalisation.to_dict()
        record["phase_map"] = {str(k): v for k, v in sorted(self.phase_map.items())}  # YAML/JSON keys
        return record

    @property
    def label_phase_map(self) -> dict[int, str]:
        """Label value -> class name of what the model outputs (ni task: 0 is 'rest', not a phase)."""
        return self.task.label_phase_map(self.phase_map)
