"""One fixed colour per phase, wherever labels are drawn: figures, reports, OME-Zarr label
metadata and the napari viewer, so that Ni looks the same in a paper figure and on screen."""

from __future__ import annotations

from typing import Sequence

PHASE_COLOURS = {"pore": "#1f1f1f", "ysz": "#3a7dd8", "ni": "#e8b33a", "rest": "#6b6b6b"}
# Phases without a fixed colour take matplotlib's default cycle (tab10) by their position.
_CYCLE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def phase_colours(class_names: Sequence[str]) -> list[str]:
    """The colour (``#rrggbb``) of each phase name, in order."""
    return [PHASE_COLOURS.get(str(name).lower(), _CYCLE[i % len(_CYCLE)]) for i, name in enumerate(class_names)]


def rgba(colour: str, alpha: int = 255) -> list[int]:
    """``#rrggbb`` -> ``[r, g, b, a]`` in 0..255 (OME-NGFF ``image-label`` colours)."""
    text = colour.lstrip("#")
    return [int(text[i:i + 2], 16) for i in (0, 2, 4)] + [int(alpha)]
