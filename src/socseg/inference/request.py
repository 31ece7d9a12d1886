"""One inference call's settings: what a user asks for, and the same resolved against a model.

Every entry point builds its request once and hands it whole to the
:class:`~socseg.inference.predictor.Predictor`:

* ``socseg segment`` (CLI options) and the library call :func:`socseg.inference.segment.segment`;
* the Dask client of :func:`socseg.inference.distributed.segment_to_zarr` (resolved on the
  client, sent to every task inside the ``ChunkJob``);
* a served request (:meth:`socseg.inference.pyfunc.Segmenter.predict`, from its params);
* scoring (:mod:`socseg.inference.evaluate`: each slab with its volume's grey range).

:class:`InferenceOptions` are the user's per-call overrides (None: the model's own), checked when
they are made; :class:`InferenceRequest` is what the predictor runs: the window settings, whether
to refuse out-of-range input, and the grey range of the source mapped onto the model's layer,
resolved by the model's :class:`~socseg.data.normalise.Normalisation` (given, the volume's own
estimate, or none) so that no caller decides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from socseg.data.normalise import GreyRange, check_grey_range_values
from socseg.inference.config import ModelConfig
from socseg.inference.window import WindowSettings
from socseg.params import check_planes, check_smoothing_sigma, check_step_fraction, check_window


@dataclass(frozen=True)
class InferenceOptions:
    """Per-call overrides of a model's inference settings; None: the model's own."""

    tta: bool | None = None
    step_fraction: float | None = None  # sliding window: tile step / tile size, (0, 1]
    window: str | None = None  # whole_slice | sliding
    smoothing_sigma: float | None = None  # in-plane Gaussian sigma (pixels) on the probabilities, >= 0
    grey_range: GreyRange | None = None  # the source volume's grey range (e.g. `socseg stats`)
    allow_out_of_range: bool = False  # segment input mostly outside the model's grey range anyway
    planes: str | None = None  # planes predicted and averaged: "z" | "zyx" (any of z, y, x)

    def __post_init__(self) -> None:
        if self.step_fraction is not None:
            object.__setattr__(self, "step_fraction", check_step_fraction(self.step_fraction))
        if self.window is not None:
            check_window(self.window)
        if self.smoothing_sigma is not None:
            object.__setattr__(self, "smoothing_sigma", check_smoothing_sigma(self.smoothing_sigma))
        if self.grey_range is not None:
            object.__setattr__(self, "grey_range", check_grey_range_values(*self.grey_range))
        if self.tta is not None:
            object.__setattr__(self, "tta", bool(self.tta))
        if self.planes is not None:
            object.__setattr__(self, "planes", check_planes(self.planes))

    def record(self) -> dict[str, Any]:
        """The overrides as given, for an output's run record (a resumed run must ask the same).
        ``smoothing_sigma`` and ``planes`` only when given: stores written before they existed still resume."""
        given = {} if self.smoothing_sigma is None else {"smoothing_sigma": self.smoothing_sigma}
        if self.planes is not None:
            given["planes"] = self.planes
        return {"tta": self.tta, "step_fraction": self.step_fraction, "window": self.window, **given}


@dataclass(frozen=True)
class InferenceRequest:
    """What the predictor runs: options resolved against one model and one source volume."""

    window: WindowSettings
    grey_range: GreyRange | None  # mapped onto the model's normalisation layer; None: raw values
    check_range: bool  # refuse input mostly outside the model's range (Predictor.check_grey_range)
    planes: str  # planes predicted and averaged, in zyx order ("z": slice by slice)
    fusion_depth: int  # with y or x in planes: slices per chunk
    fusion_halo: int  # with y or x in planes: grey slices read on either side of a chunk

    @property
    def fuses(self) -> bool:
        """Whether y or x planes are predicted too (multi-axis fusion)."""
        return self.planes != "z"

    def context(self, context_slices: int) -> int:
        """Slices to read on either side of a chunk: the model's 2.5D context, and with fusion
        the halo the y and x planes need to extend beyond the chunk as they do in the volume."""
        return max(int(context_slices), self.fusion_halo) if self.fuses else int(context_slices)

    def chunk_slices(self, slice_batch: int) -> int:
        """Slices per streamed chunk or REST request: ``slice_batch``; with fusion ``fusion_depth``
        (each chunk carries ``2 x fusion_halo`` extra slices through the y and x passes)."""
        return self.fusion_depth if self.fuses else int(slice_batch)

    @classmethod
    def resolve(cls, config: ModelConfig, options: InferenceOptions = InferenceOptions(), source: Any = None,
                check_range: bool | None = None) -> "InferenceRequest":
        """``options`` against ``config``; the grey range from ``source`` (an array ``(Z, H, W)`` or
        an open SliceReader: the whole volume) where the model's normalisation needs one and none
        was given. ``check_range`` None: refuse out-of-range input unless the options allow it."""
        window = WindowSettings(
            tile_size=config.tile_size,
            step_fraction=config.step_fraction if options.step_fraction is None else options.step_fraction,
            tta=config.tta if options.tta is None else options.tta,
            batch_size=config.batch_size,
            window=config.window if options.window is None else options.window,
            whole_slice_max_pixels=config.whole_slice_max_pixels,
            smoothing_sigma=config.smoothing_sigma if options.smoothing_sigma is None else options.smoothing_sigma,
        )
        grey_range = config.normalisation.source_range(source, options.grey_range)
        if grey_range is not None:
            grey_range = (float(grey_range[0]), float(grey_range[1]))
        checked = not options.allow_out_of_range if check_range is None else check_range
        planes = config.planes if options.planes is None else options.planes
        return cls(window, grey_range, checked, planes, config.fusion_depth, config.fusion_halo)

    def record(self) -> dict[str, Any]:
        """The resolved settings, for an output's metadata."""
        return {"tta": self.window.tta, "step_fraction": self.window.step_fraction, "window": self.window.window,
                "smoothing_sigma": self.window.smoothing_sigma, "planes": self.planes,
                "allow_out_of_range": not self.check_range,
                "grey_range": None if self.grey_range is None else [float(v) for v in self.grey_range]}
