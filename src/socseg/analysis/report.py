"""One self-contained HTML page per volume: what it is, how it looks, and its microstructure.

``socseg report`` (and the evaluate stage, as an MLflow artifact) writes it for a label volume: a
``socseg segment`` output (a ``.tif`` label stack, with the probability / uncertainty ``.tif`` files
written beside it, or a ``.zarr`` store holding them), or a socseg volume directory. The page holds

* the volume's identity: path, shape, voxel size, phase map and what ``socseg segment`` recorded
  (model, source, settings);
* the central z, y and x planes of the grey image, the labels over it (one fixed colour per phase,
  :func:`socseg.data.phases.phase_colours`), the truth's labels and the model's uncertainty
  where they exist;
* the metrics of :func:`socseg.analysis.microstructure.measure` per phase and for the whole volume,
  with an interval per metric when one is given (from the probability volume) and the relative
  error against the truth's metrics when a truth is given;
* the size distributions (local-thickness histograms) and the tortuosity factors, when measured.

Everything is embedded (figures as base64 PNG, CSS inline) so the page opens offline, from a file,
in any browser: no server, no network, no script. Memory: the figures need three planes of each
volume, read plane by plane (:class:`OrthogonalPlanes`); only the metrics hold the label volume.
zarr is imported inside :func:`open_store` only (CLI start-up time, as in :mod:`socseg.data.chunked`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.patches import Patch

from socseg import __version__
from socseg.analysis.intervals import (
    BiasSweep,
    MetricInterval,
    ProbabilityVolume,
    measure_with_intervals,
    recorded_voxel_size_nm,
)
from socseg.analysis.microstructure import AXES, MicrostructureResult, flatten_metrics, measure, relative_errors
from socseg.analysis.uncertainty import (
    PROBABILITIES_CONTENT,
    UNCERTAINTY_CONTENT,
    class_probabilities,
    normalised_entropy,
)
from socseg.data.chunked import ChunkedLabels
from socseg.data.formats import (
    MULTIPAGE_TIFF,
    VOLUME_DIRECTORY,
    ZARR_ARRAY,
    InputFormat,
    detect_format,
    on_disk,
)
from socseg.data.phases import phase_colours
from socseg.data.stacks import (
    LabelVolume,
    SliceReader,
    load_labels,
    read_label_metadata,
    read_probability_metadata,
)
from socseg.data.volumes import VolumeError, format_phase_map, label_lut

REPORT_SUFFIXES = (".html", ".htm")
# How strongly the label colours cover the grey image in the overlays (0: grey only, 1: labels only).
OVERLAY_ALPHA = 0.45
# Grey slices read at once while collecting the y and x planes of a streamed image.
READ_SLICES = 16
FIGURE_DPI = 100


class ReportError(ValueError):
    """Input a report cannot be made from (the message says what and why)."""


# --------------------------------------------------------------------------- planes


@dataclass
class OrthogonalPlanes:
    """The central z, y and x planes of a volume: what the figures draw, instead of the volume."""

    z: np.ndarray  # (Y, X) at z = centre[0]
    y: np.ndarray  # (Z, X) at y = centre[1]
    x: np.ndarray  # (Z, Y) at x = centre[2]
    centre: tuple[int, int, int]

    def plane(self, axis: str) -> np.ndarray:
        return {"z": self.z, "y": self.y, "x": self.x}[axis]

    def map(self, function: Callable[[np.ndarray], np.ndarray]) -> OrthogonalPlanes:
        """The same planes, each passed through ``function`` (e.g. label values -> class indices)."""
        return OrthogonalPlanes(function(self.z), function(self.y), function(self.x), self.centre)

    @staticmethod
    def centre_of(shape: Sequence[int]) -> tuple[int, int, int]:
        return tuple(int(n) // 2 for n in shape[:3])  # type: ignore[return-value]

    @classmethod
    def of_array(cls, volume: Any) -> OrthogonalPlanes:
        """Planes of anything indexed like a numpy array (an array, a memmap, a zarr array): only
        the three planes are read."""
        cz, cy, cx = cls.centre_of(volume.shape)
        return cls(np.asarray(volume[cz]), np.asarray(volume[:, cy]), np.asarray(volume[:, :, cx]), (cz, cy, cx))

    @classmethod
    def streamed(cls, read: Callable[[int, int], np.ndarray], shape: Sequence[int],
                 batch: int = READ_SLICES) -> OrthogonalPlanes:
        """Planes of a volume read ``batch`` z-slices at a time by ``read(start, stop)`` (a
        :class:`~socseg.data.stacks.SliceReader`): one pass, three planes kept."""
        cz, cy, cx = cls.centre_of(shape)
        rows, columns, middle = [], [], None
        for start in range(0, int(shape[0]), batch):
            block = np.asarray(read(start, min(start + batch, int(shape[0]))))
            rows.append(block[:, cy].copy())
            columns.append(block[:, :, cx].copy())
            if start <= cz < start + len(block):
                middle = block[cz - start].copy()
        assert middle is not None
        return cls(middle, np.concatenate(rows), np.concatenate(columns), (cz, cy, cx))


# --------------------------------------------------------------------------- metrics


@dataclass
class ReportMetrics:
    """The measured microstructure of a volume and what it is compared with: intervals (keyed by
    :func:`~socseg.analysis.microstructure.flatten_metrics` names) and the truth's metrics."""

    result: MicrostructureResult
    truth: MicrostructureResult | None = None
    intervals: Mapping[str, MetricInterval] = field(default_factory=dict)
    interval_method: str = ""

    def __post_init__(self) -> None:
        self.flat = with_active_tpb_density(flatten_metrics(self.result))
        self.truth_flat = with_active_tpb_density(flatten_metrics(self.truth)) if self.truth is not None else {}
        self.errors = relative_errors(self.flat, self.truth_flat) if self.truth is not None else {}

    @property
    def unit(self) -> str:
        return self.result.unit


def with_active_tpb_density(flat: dict[str, float]) -> dict[str, float]:
    """``flat`` plus ``tpb.active_density.<axis>`` (TPB density x active share): the active TPB
    length per volume papers quote, next to the share ``tpb.active.<axis>`` that ``measure`` gives."""
    out = dict(flat)
    if "tpb.density" in flat:
        for axis in AXES:
            if f"tpb.active.{axis}" in flat:
                out[f"tpb.active_density.{axis}"] = flat["tpb.density"] * flat[f"tpb.active.{axis}"]
    return out


# (flat-name template, what it is, unit template): {p} is the phase, {u} the length unit.
PHASE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("vf.{p}", "volume fraction", ""),
    ("ssa.{p}", "specific surface area", "{u}^-1"),
    *((f"perc.{{p}}.{a}", f"percolating fraction along {a}", "") for a in AXES),
    ("perc.{p}.isolated", "isolated fraction", ""),
    ("perc.{p}.largest", "largest component's share", ""),
    *((f"size.{{p}}.{k}", f"local-thickness diameter {k.removeprefix('d_')}", "{u}") for k in ("d10", "d50", "d90", "d_mean")),
    ("size.{p}.feature_d_mean", "equivalent-sphere diameter of components (mean)", "{u}"),
    *((f"tau.{{p}}.{a}", f"tortuosity factor along {a}", "") for a in AXES),
    *((f"deff.{{p}}.{a}", f"D_eff / D_bulk along {a}", "") for a in AXES),
)
VOLUME_ROWS: tuple[tuple[str, str, str], ...] = (
    ("tpb.density", "TPB density (corrected)", "{u}^-2"),
    ("tpb.density_edges", "TPB density (voxel edges, uncorrected)", "{u}^-2"),
    *((f"tpb.active_density.{a}", f"active TPB density (percolating along {a})", "{u}^-2") for a in AXES),
    *((f"tpb.active.{a}", f"active share of TPB along {a}", "") for a in AXES),
)


# --------------------------------------------------------------------------- figures


def figure_png(fig: plt.Figure) -> str:
    """A figure as a base64 PNG (then closed): what an ``<img src="data:...">`` embeds."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def grey_rgb(plane: np.ndarray) -> np.ndarray:
    """A grey plane as RGB in 0..1, its 1-99 percentile range stretched (as the overlays of plots.py)."""
    values = np.asarray(plane, dtype=np.float32)
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    scaled = np.clip((values - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    return np.repeat(scaled[..., np.newaxis], 3, axis=-1)


def label_overlay(classes: np.ndarray, names: Sequence[str], grey: np.ndarray | None) -> np.ndarray:
    """Class indices coloured per phase, blended over the grey plane when there is one."""
    palette = np.array([to_rgb(colour) for colour in phase_colours(names)], dtype=np.float32)
    coloured = palette[np.clip(classes, 0, len(palette) - 1)]
    if grey is None:
        return coloured
    return (1.0 - OVERLAY_ALPHA) * grey_rgb(grey) + OVERLAY_ALPHA * coloured


@dataclass
class SlicePlanes:
    """The planes the slice figures draw: labels and truth as class indices, uncertainty in 0..1."""

    labels: OrthogonalPlanes
    names: list[str]
    image: OrthogonalPlanes | None = None
    truth: OrthogonalPlanes | None = None
    truth_names: list[str] = field(default_factory=list)
    uncertainty: OrthogonalPlanes | None = None


def slice_figure(planes: SlicePlanes, axis: str) -> plt.Figure:
    """One plane through the volume's centre: grey, labels over grey, truth over grey, uncertainty."""
    index = AXES.index(axis)
    grey = planes.image.plane(axis) if planes.image is not None else None
    panels: list[tuple[str, np.ndarray, dict[str, Any]]] = []
    if grey is not None:
        panels.append(("grey image", grey, {"cmap": "gray"}))
    panels.append(("labels" + (" over grey" if grey is not None else ""),
                   label_overlay(planes.labels.plane(axis), planes.names, grey), {}))
    if planes.truth is not None:
        panels.append(("truth", label_overlay(planes.truth.plane(axis), planes.truth_names, grey), {}))
    if planes.uncertainty is not None:
        panels.append(("uncertainty (0 sure, 1 uniform)", planes.uncertainty.plane(axis),
                       {"cmap": "magma", "vmin": 0.0, "vmax": 1.0}))
    height, width = planes.labels.plane(axis).shape
    panel_width = 3.6
    panel_height = float(np.clip(panel_width * height / max(width, 1), 0.8, 4.5))
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), panel_height + 0.9), squeeze=False)
    rows, columns = [a for a in AXES if a != axis]
    for ax, (title, data, style) in zip(axes[0], panels):
        image = ax.imshow(data, interpolation="nearest", **style)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(columns, fontsize=8)
        ax.set_ylabel(rows, fontsize=8)
        ax.tick_params(labelsize=7)
        if "vmax" in style:
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    names = list(dict.fromkeys(planes.names + planes.truth_names))  # the truth may name other phases
    handles = [Patch(color=c, label=n) for c, n in zip(phase_colours(names), names)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"{axis} = {planes.labels.centre[index]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def size_figure(metrics: ReportMetrics) -> plt.Figure | None:
    """Local-thickness diameter distributions (volume-weighted) per sized phase, the truth's as a line."""
    sized = [name for name in metrics.result.phases if metrics.result.sizes.get(name) and metrics.result.sizes[name].histogram]
    if not sized:
        return None
    colours = dict(zip(metrics.result.phases, phase_colours(metrics.result.phases)))
    fig, axes = plt.subplots(1, len(sized), figsize=(5.0 * len(sized), 3.4), squeeze=False)
    for ax, name in zip(axes[0], sized):
        size = metrics.result.sizes[name]
        diameters = np.array([float(d) for d in size.histogram])
        fractions = np.array(list(size.histogram.values()))
        width = 0.8 * (float(np.min(np.diff(diameters))) if diameters.size > 1 else max(float(diameters[0]), 1.0))
        ax.bar(diameters, fractions, width=width, color=colours[name], edgecolor="black", linewidth=0.4, label="volume")
        ax.axvline(size.d50, color="black", linestyle="--", linewidth=1, label=f"d50 = {size.d50:.3g}")
        truth = metrics.truth.sizes.get(name) if metrics.truth is not None else None
        if truth is not None and truth.histogram:
            ax.plot([float(d) for d in truth.histogram], list(truth.histogram.values()), "o-", color="crimson",
                    markersize=3, linewidth=1, label=f"truth (d50 = {truth.d50:.3g})")
        ax.set(xlabel=f"diameter ({metrics.unit})", ylabel="share of the phase's volume", title=f"{name}: local thickness")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tortuosity_axes(flat: Mapping[str, float]) -> list[tuple[str, str]]:
    """(phase, axis) pairs whose tortuosity was measured: ``deff.*`` is there for every measured
    pair, ``tau.*`` only where the phase percolates."""
    return [tuple(key.split(".")[1:3]) for key in flat if key.startswith("deff.")]  # type: ignore[misc]


def tortuosity_panel(ax: plt.Axes, metrics: ReportMetrics, prefix: str, phases: list[str], axes: list[str]) -> None:
    """Bars of metric ``prefix`` (``tau`` or ``deff``) per phase, one per axis, with the intervals
    as whiskers (an arrow where the interval is unbounded: the phase may not percolate) and the
    truth's values as crosses. A tortuosity factor that is not there (no percolation) has no bar."""
    width = 0.8 / len(axes)
    for k, axis in enumerate(axes):
        keys = [(i, f"{prefix}.{phase}.{axis}") for i, phase in enumerate(phases)]
        keys = [(i, key) for i, key in keys if key in metrics.flat]
        xs = [i + (k - (len(axes) - 1) / 2) * width for i, _ in keys]
        values = [metrics.flat[key] for _, key in keys]
        intervals = [metrics.intervals.get(key) for _, key in keys]
        low = [v - iv.low if iv is not None else np.nan for v, iv in zip(values, intervals)]
        high = [(iv.high - v if np.isfinite(iv.high) else 0.0) if iv is not None else np.nan  # inf: the arrow below
                for v, iv in zip(values, intervals)]
        ax.bar(xs, values, width=width, color=f"C{k}", label=axis)
        ax.errorbar(xs, values, yerr=[np.maximum(low, 0), np.maximum(high, 0)], fmt="none", ecolor="black", capsize=3)
        for x, value, interval in zip(xs, values, intervals):
            if interval is not None and np.isinf(interval.high):
                ax.annotate("", xy=(x, value * 1.25), xytext=(x, value), arrowprops={"arrowstyle": "->"})
        if metrics.truth is not None:
            truths = [metrics.truth_flat.get(key, np.nan) for _, key in keys]
            ax.plot(xs, truths, "kx", markersize=7, label="truth" if k == 0 else None)
    ax.set_xticks(range(len(phases)), phases)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def tortuosity_figure(metrics: ReportMetrics) -> plt.Figure | None:
    """Tortuosity factor and D_eff / D_bulk per phase and axis (None when not measured)."""
    pairs = tortuosity_axes(metrics.flat)
    if not pairs:
        return None
    measured = {phase for phase, _ in pairs}
    phases = [name.lower() for name in metrics.result.phases if name.lower() in measured]
    axes = [axis for axis in AXES if any(a == axis for _, a in pairs)]
    fig, panels = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, prefix, label in ((panels[0], "tau", "tortuosity factor"), (panels[1], "deff", "D_eff / D_bulk")):
        tortuosity_panel(ax, metrics, prefix, phases, axes)
        ax.set(ylabel=label, title=label + " per phase and axis")
    panels[0].axhline(1.0, color="grey", linewidth=0.8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f3f3f3; }
tbody.phase th[scope=rowgroup] { background: #fafafa; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption, .note { color: #555; font-size: 0.85em; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #888; vertical-align: middle; }
.outside { color: #b00; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(value: float | None) -> str:
    if value is None or np.isnan(value):
        return "n/a"
    if np.isinf(value):
        return "unbounded" if value > 0 else "-unbounded"
    return f"{value:.4g}"


def img(png: str, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{png}">'


def figure_html(element_id: str, fig: plt.Figure, caption: str) -> str:
    return (f'<figure id="{esc(element_id)}">{img(figure_png(fig), caption)}'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def metric_columns(metrics: ReportMetrics) -> list[str]:
    columns = ["value"]
    if metrics.intervals:
        columns += ["interval low", "interval high"]
    if metrics.truth is not None:
        columns += ["truth", "rel. error"]
    if metrics.intervals and metrics.truth is not None:
        columns.append("truth in interval")
    return columns


def metric_cells(metrics: ReportMetrics, key: str) -> list[str]:
    """The ``<td>`` cells of one metric, in :func:`metric_columns` order."""
    value = metrics.flat.get(key)
    missing = "not percolating" if key.startswith("tau.") and "deff." + key[4:] in metrics.flat else "-"
    cells = [number(value) if value is not None else missing]
    interval = metrics.intervals.get(key)
    if metrics.intervals:
        cells += [number(interval.low), number(interval.high)] if interval is not None else ["-", "-"]
    truth = metrics.truth_flat.get(key)
    if metrics.truth is not None:
        error = metrics.errors.get(key)
        cells += [number(truth) if truth is not None else "-", f"{100 * error:+.2f} %" if error is not None else "n/a"]
    if metrics.intervals and metrics.truth is not None:
        covered = interval is not None and truth is not None and interval.covers(truth)
        cells.append("-" if interval is None or truth is None else ("yes" if covered else '<span class="outside">no</span>'))
    return [f'<td class="number">{c}</td>' for c in cells]


def metric_table(element_id: str, groups: Sequence[tuple[str | None, list[tuple[str, str, str]]]],
                 metrics: ReportMetrics) -> str:
    """A table of (group heading, rows of (flat key, what, unit)); a group heading spans its rows."""
    grouped = any(name is not None for name, _ in groups)
    head = (["phase"] if grouped else []) + ["metric", "unit"] + metric_columns(metrics)
    parts = [f'<table id="{esc(element_id)}"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead>"]
    for name, rows in groups:
        if not rows:
            continue
        parts.append(f'<tbody class="phase" data-phase="{esc(name)}">' if name is not None else "<tbody>")
        for i, (key, what, unit) in enumerate(rows):
            lead = f'<th scope="rowgroup" rowspan="{len(rows)}">{esc(name)}</th>' if name is not None and i == 0 else ""
            parts.append(f'<tr data-metric="{esc(key)}">{lead}<td>{esc(what)}</td><td>{esc(unit)}</td>'
                         + "".join(metric_cells(metrics, key)) + "</tr>")
        parts.append("</tbody>")
    parts.append("</table>")
    return "".join(parts)


def present_rows(templates: Iterable[tuple[str, str, str]], metrics: ReportMetrics, unit: str,
                 phase: str = "") -> list[tuple[str, str, str]]:
    """The rows whose metric the volume or its truth has (a ``tau`` row also when only ``deff`` is
    there: the phase does not percolate, which the row says)."""
    rows = []
    for key, what, unit_template in templates:
        key = key.format(p=phase)
        known = key in metrics.flat or key in metrics.truth_flat
        if known or (key.startswith("tau.") and "deff." + key[4:] in metrics.flat):
            rows.append((key, what, unit_template.format(u=unit)))
    return rows


def length_unit(unit: str) -> str:
    return "voxel units" if unit == "voxel" else unit


def flat_unit(key: str, unit: str) -> str:
    """The unit of a flat metric name (fractions and ratios have none)."""
    kind = key.split(".")[0]
    if kind.startswith(("ssa", "iface")):
        return f"{unit}^-1"
    if kind == "tpb" and key.split(".")[1] in ("density", "density_edges", "active_density"):
        return f"{unit}^-2"
    return unit if kind == "size" else ""


def metrics_section(metrics: ReportMetrics) -> str:
    """Per-phase table (phases as row groups), whole-volume table (TPB, interfaces), all metrics, notes."""
    result, unit = metrics.result, metrics.unit
    phase_groups = [(name, present_rows(PHASE_ROWS, metrics, unit, name.lower())) for name in result.phases]
    volume_rows = present_rows(VOLUME_ROWS, metrics, unit)
    pairs = sorted({k for k in list(metrics.flat) + list(metrics.truth_flat) if k.startswith("iface.")})
    volume_rows += [(key, f"interface density {key.removeprefix('iface.')}", f"{unit}^-1") for key in pairs]
    every = sorted(set(metrics.flat) | set(metrics.truth_flat))
    notes = [f"Lengths in {length_unit(unit)}. Volume fractions, percolating fractions and active shares are fractions of 1."]
    if result.tpb is not None:
        notes.append(f"TPB: voxel-edge length x {result.tpb.correction:.4g} (isotropic-orientation correction); "
                     "active TPB: edges whose three phases all percolate along the axis.")
    notes.append(f"Surfaces: voxel-face counting x {result.surface_correction:.4g}. Percolation: 6-connected "
                 "components touching both faces normal to the axis. Sizes: local-thickness diameters, volume-weighted.")
    if metrics.intervals:
        notes.append("Intervals: " + (metrics.interval_method or "from the probability volume") + ".")
    if metrics.truth is not None:
        notes.append("rel. error = (value - truth) / |truth|; n/a where the truth's value is 0.")
    notes += [f"note: {n}" for n in result.notes] + ([f"note (truth): {n}" for n in metrics.truth.notes] if metrics.truth else [])
    return (
        '<section id="metrics"><h2>Microstructure</h2><h3>Per phase</h3>'
        + metric_table("phase-metrics", phase_groups, metrics)
        + "<h3>Whole volume</h3>" + metric_table("volume-metrics", [(None, volume_rows)], metrics)
        + "<details><summary>All metrics (flat names, as <code>socseg microstructure --json</code>)</summary>"
        + metric_table("all-metrics", [(None, [(k, k, flat_unit(k, unit)) for k in every])], metrics) + "</details>"
        + "".join(f'<p class="note">{esc(n)}</p>' for n in notes) + "</section>"
    )


def identity_section(identity: Sequence[tuple[str, str]], names: Sequence[str]) -> str:
    swatches = " ".join(f'<span class="swatch" style="background:{c}"></span> {esc(n)}'
                        for c, n in zip(phase_colours(names), names))
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in identity)
    return (f'<section id="identity"><h2>Volume</h2><table id="volume-identity">{rows}'
            f"<tr><th>colours</th><td>{swatches}</td></tr></table></section>")


def render_html(title: str, identity: Sequence[tuple[str, str]], planes: SlicePlanes, metrics: ReportMetrics) -> str:
    """The whole page as one string: identity, the three orthogonal slices, metrics, sizes, tortuosity."""
    slices = "".join(
        figure_html(f"slice-{axis}", slice_figure(planes, axis),
                    f"central {axis} plane ({axis} = {planes.labels.centre[AXES.index(axis)]})")
        for axis in AXES)
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>",
        identity_section(identity, list(dict.fromkeys(planes.names + planes.truth_names))),
        f'<section id="slices"><h2>Orthogonal slices</h2>{slices}</section>',
        metrics_section(metrics),
    ]
    sizes = size_figure(metrics)
    if sizes is not None:
        parts.append('<section id="sizes"><h2>Size distributions</h2>'
                     + figure_html("size-distributions", sizes, "local-thickness diameter distributions") + "</section>")
    tortuosity = tortuosity_figure(metrics)
    if tortuosity is not None:
        parts.append('<section id="tortuosity"><h2>Tortuosity</h2>'
                     + figure_html("tortuosity-factors", tortuosity, "tortuosity factor and D_eff / D_bulk per axis")
                     + "</section>")
    parts.append(f'<p class="note">Written by socseg {esc(__version__)}.</p></body></html>\n')
    return "".join(parts)


# --------------------------------------------------------------------------- writing


def check_report_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], overwrite: bool) -> Path:
    """OUT must be a new ``.html`` file (or ``overwrite``), never an input nor inside an input folder."""
    out = Path(out)
    if out.suffix.lower() not in REPORT_SUFFIXES:
        raise ReportError(f"{out}: the report is an HTML page: name it .html")
    resolved = out.resolve()
    for source in inputs:
        if source is None:
            continue
        source = on_disk(source)  # scan.h5:/entry/data -> scan.h5
        if resolved == source.resolve() or (source.is_dir() and resolved.is_relative_to(source.resolve())):
            raise ReportError(f"{out} is, or lies inside, the input {source}: write the report elsewhere")
    if out.is_dir():
        raise ReportError(f"{out} is a directory")
    if out.exists() and not overwrite:
        raise ReportError(f"{out} already exists (use --overwrite to replace it)")
    return out


def write_report(text: str, out: str | os.PathLike) -> Path:
    """Write the page through a hidden partial file renamed into place: it appears whole or not at all."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, out)
    finally:
        if partial.exists():
            partial.unlink()
    return out


# --------------------------------------------------------------------------- the evaluate stage


def evaluation_report(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray, class_names: Sequence[str],
                      predicted_result: MicrostructureResult, truth_result: MicrostructureResult, *,
                      model_uri: str, slab: str) -> str:
    """The page of a test slab's prediction beside its labels: the evaluate stage's MLflow artifact.

    ``image``: the slab's grey slices; ``predicted`` / ``truth``: its class indices ``(Z, Y, X)`` in
    ``class_names`` order; the results: their microstructure, measured once by the caller (which
    logs the same numbers as metrics); ``slab`` says which slices of which volume these are.
    """
    names = list(class_names)
    planes = SlicePlanes(labels=OrthogonalPlanes.of_array(predicted), names=names,
                         image=OrthogonalPlanes.of_array(image), truth=OrthogonalPlanes.of_array(truth),
                         truth_names=names)
    z, y, x = predicted.shape
    identity = [("test slab", slab), ("shape", f"{z} x {y} x {x} voxels (z, y, x)"),
                ("voxel size", f"lengths in {length_unit(predicted_result.unit)}, as the evaluate stage's metrics"),
                ("classes", ", ".join(names)), ("model", model_uri), ("truth", "the slab's labels")]
    return render_html("socseg report: test slab prediction", identity, planes, ReportMetrics(predicted_result, truth_result))


def describe_record(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Identity rows from what ``socseg segment`` recorded with its labels (model first)."""
    rows = [("model", str(record.get("model_uri") or "not recorded"))]
    for key in ("task", "source"):
        if record.get(key):
            rows.append((key, str(record[key])))
    skip = {"model_uri", "task", "source", "phase_map", "shape", "axes", "socseg_version", "content", "values"}
    settings = {k: v for k, v in record.items() if k not in skip}
    if settings:
        rows.append(("segment settings", json.dumps(settings, sort_keys=True, default=str)))
    if record.get("socseg_version"):
        rows.append(("segmented by", f"socseg {record['socseg_version']}"))
    return rows


def phase_map_text(phase_map: Mapping[int, str]) -> str:
    return format_phase_map(dict(phase_map)).replace(",", ", ")


def class_planes(planes: OrthogonalPlanes, phase_map: Mapping[int, str]) -> OrthogonalPlanes:
    """Label-value planes as class indices (label-value order), what the overlays colour."""
    lut = label_lut(phase_map)
    return planes.map(lambda plane: lut[np.asarray(plane, dtype=np.uint8)])


def uncertainty_planes(probabilities: OrthogonalPlanes) -> OrthogonalPlanes:
    """Normalised entropy (0..1) of uint8 class-probability planes ``(..., C)`` (P x 255)."""
    return probabilities.map(lambda p: normalised_entropy(class_probabilities(np.asarray(p, np.float32) / 255.0)))


# --------------------------------------------------------------------------- reading the inputs


@dataclass
class ReportSources:
    """What one report reads: VOLUME (labels), and where given, the truth, grey image, probabilities
    (a ``.tif`` of ``socseg segment --probabilities``) and uncertainty (``--uncertainty``)."""

    volume: str
    truth: str | None = None
    image: str | None = None
    probabilities: str | None = None
    uncertainty: str | None = None

    def paths(self) -> list[str | None]:
        return [self.volume, self.truth, self.image, self.probabilities, self.uncertainty]


@dataclass
class LabelInput:
    """A label volume read for a report, with what was recorded about it."""

    path: str
    kind: str
    volume: LabelVolume
    record: dict[str, Any]
    store: ChunkedLabels | None = None  # a .zarr store of socseg segment (probabilities inside)


def open_store(path: str) -> ChunkedLabels | None:
    """A finished ``socseg segment`` Zarr store, opened read-only (a report never writes its input);
    None for another Zarr array or group (read as a bare label stack)."""
    import zarr  # lazy: see the module docstring

    try:
        node = zarr.open(str(path), mode="r")
        store = ChunkedLabels(node) if isinstance(node, zarr.Group) else None
    except KeyError:  # no labels or completion flags: not a store of socseg segment
        return None
    except Exception as exc:  # zarr raises many types for missing or unreadable stores
        raise ReportError(f"{path}: not a readable Zarr store ({type(exc).__name__}: {exc})") from None
    if store is None:
        return None
    if store.pending():
        raise ReportError(f"{path} is not finished (chunks {store.pending()} missing): run its segment command again")
    return store


def recorded(input_format: InputFormat, path: str) -> dict[str, Any]:
    """What ``socseg segment`` recorded with the labels; empty for a stack it did not write."""
    try:
        return dict(input_format.socseg_record(path))
    except Exception:  # a bare Zarr array, a TIFF without a JSON description: nothing recorded
        return {}


def open_labels(path: str, phase_map: dict[int, str] | None, default_phase_map: Mapping[int, str]) -> LabelInput:
    """VOLUME's labels: a socseg volume directory, a ``socseg segment`` output (``.tif`` or
    ``.zarr``) or any label stack :func:`~socseg.data.stacks.load_labels` reads."""
    input_format = detect_format(path)
    if input_format is MULTIPAGE_TIFF and read_probability_metadata(path).get("content") == PROBABILITIES_CONTENT:
        raise ReportError(f"{path} holds class probabilities, not labels: report on the label stack and pass this "
                          "file with --probabilities")
    store = open_store(path) if input_format is ZARR_ARRAY else None
    record = recorded(input_format, path) if input_format in (MULTIPAGE_TIFF, ZARR_ARRAY) else {}
    if record.get("content") == UNCERTAINTY_CONTENT:
        raise ReportError(f"{path} holds the uncertainty, not labels: report on the label stack and pass this file "
                          "with --uncertainty")
    volume = load_labels(path, phase_map, default_phase_map)
    if volume.labels.ndim != 3:
        raise ReportError(f"{path}: expected a 3-D (Z, Y, X) label volume, got shape {volume.labels.shape}")
    if input_format is VOLUME_DIRECTORY:
        kind = "socseg volume directory"
    elif store is not None:
        kind = "Zarr store of socseg segment"
    else:
        kind = "label stack of socseg segment" if record.get("phase_map") else f"label stack ({input_format.name})"
    return LabelInput(path, kind, volume, dict(record), store)


def voxel_size(labels: LabelInput, given_nm: float | None) -> tuple[float | None, str]:
    """(voxel size in nm or None, where it comes from): ``--voxel-size``, the volume's own record
    (volume.json, a store's OME scale), else the ``volume.json`` of the volume it was segmented from."""
    if given_nm is not None:
        if not given_nm > 0:
            raise ReportError(f"--voxel-size {given_nm}: must be a positive size in nm")
        return given_nm, "--voxel-size"
    if labels.volume.voxel_size_nm is not None:
        return labels.volume.voxel_size_nm, "volume.json"
    if labels.store is not None and recorded_voxel_size_nm(labels.path) is not None:
        return recorded_voxel_size_nm(labels.path), "the store's OME scale"
    source = labels.record.get("source")
    if source and Path(source).is_dir():
        try:
            meta = detect_format(source).volume_meta(source)
        except (VolumeError, OSError):
            meta = None
        if meta is not None and meta.voxel_size_nm is not None:
            return meta.voxel_size_nm, f"volume.json of the segmented volume {source}"
    return None, "unknown"


def check_shape(path: str, shape: Sequence[int], expected: Sequence[int], what: str) -> None:
    if tuple(shape) != tuple(expected):
        raise ReportError(f"{path}: {what} of shape {tuple(shape)} for labels of shape {tuple(expected)}")


def grey_planes(labels: LabelInput, image: str | None) -> tuple[OrthogonalPlanes | None, str]:
    """The grey image's planes and where they come from: ``--image``, the volume directory's own
    image, or the source ``socseg segment`` recorded, when it still exists."""
    candidates = [(image, "--image")] if image is not None else []
    if labels.kind == "socseg volume directory":
        candidates.append((labels.path, "the volume directory"))
    recorded = labels.record.get("source")
    if image is None and recorded:
        candidates.append((str(recorded), "the recorded source"))
    for path, origin in candidates:
        if origin == "the recorded source" and not on_disk(path).exists():
            return None, f"none: the recorded source {path} does not exist here (pass --image)"
        with SliceReader(path) as reader:
            check_shape(path, reader.shape, labels.volume.labels.shape, "a grey image")
            return OrthogonalPlanes.streamed(reader.read, reader.shape), f"{path} ({origin})"
    return None, "none (pass --image)"


def open_probabilities(labels: LabelInput, path: str | None) -> tuple[ProbabilityVolume | None, Any | None, str]:
    """(the class probabilities for the intervals, the same as a ``(Z, Y, X, C)`` uint8 array
    indexed lazily for the planes, where they come from): the store's, or a ``--probabilities``
    TIFF (memory-mapped: only the planes drawn are read)."""
    if labels.store is not None:
        if path is not None:
            raise ReportError(f"--probabilities {path}: a .zarr store keeps its probabilities inside; drop the option")
        if labels.store.probabilities is None:
            return None, None, "none (segmented without --probabilities)"
        volume, planes, origin = ProbabilityVolume.open(labels.path), labels.store.probabilities, "in the store"
    elif path is None:
        return None, None, "none"
    else:
        try:
            volume = ProbabilityVolume.open(path)
        except VolumeError as exc:
            raise ReportError(f"--probabilities {exc}") from None
        planes, origin = np.moveaxis(volume.read(0, volume.shape[0]), volume.channel_axis, -1), str(Path(path).resolve())
    check_shape(origin, volume.shape, labels.volume.labels.shape, "probabilities")
    names = [labels.volume.phase_map[v] for v in sorted(labels.volume.phase_map)]
    if [n.lower() for n in volume.class_names] != [n.lower() for n in names]:
        raise ReportError(f"{origin}: probabilities of the classes {volume.class_names} for labels of the phases {names}")
    return volume, planes, origin


def uncertainty_source(labels: LabelInput, path: str | None, probabilities: Any | None) -> tuple[OrthogonalPlanes | None, str]:
    """Uncertainty planes (0..1): the store's, a ``--uncertainty`` TIFF's, or the entropy of the probabilities."""
    if labels.store is not None and path is not None:
        raise ReportError(f"--uncertainty {path}: a .zarr store keeps its uncertainty inside; drop the option")
    scale = lambda plane: np.asarray(plane, dtype=np.float32) / 255.0  # noqa: E731
    if labels.store is not None and labels.store.uncertainty is not None:
        return OrthogonalPlanes.of_array(labels.store.uncertainty).map(scale), "in the store"
    if path is not None:
        if read_label_metadata(path).get("content") != UNCERTAINTY_CONTENT:
            raise ReportError(f"--uncertainty {path}: not an uncertainty map of socseg segment --uncertainty")
        with SliceReader(path) as reader:
            check_shape(path, reader.shape, labels.volume.labels.shape, "uncertainty")
            return OrthogonalPlanes.streamed(reader.read, reader.shape).map(scale), str(Path(path).resolve())
    if probabilities is not None:
        return uncertainty_planes(OrthogonalPlanes.of_array(probabilities)), "entropy of the probabilities"
    return None, "none"


# --------------------------------------------------------------------------- a report of files


@dataclass
class MeasureSettings:
    """How the volumes are read and measured: phase map (None: recorded / volume.json / default),
    voxel size in nm (None: recorded), and :func:`~socseg.analysis.microstructure.measure` options."""

    default_phase_map: Mapping[int, str]
    phase_map: dict[int, str] | None = None
    voxel_size_nm: float | None = None
    unit: str = "um"  # or "voxel": lengths in voxels whatever the voxel size
    options: dict[str, Any] = field(default_factory=dict)
    sweep: BiasSweep | None = None  # how the intervals are made (None: the default sweep); needs probabilities


def measured_voxel_size(voxel_nm: float | None, origin: str, settings: MeasureSettings,
                        volume: str) -> tuple[float | None, str]:
    """(the voxel size lengths are measured with, None for voxel units; the identity's text).
    Lengths in um need a known voxel size: none known is refused rather than densities per voxel
    that read like per um (as ``socseg microstructure`` does)."""
    if settings.unit == "voxel":
        if settings.voxel_size_nm is not None:
            raise ReportError(f"--voxel-size {settings.voxel_size_nm:g} and --unit voxel contradict each other: drop one")
        known = f"{voxel_nm:g} nm (from {origin}); " if voxel_nm is not None else ""
        return None, known + "lengths in voxels (--unit voxel)"
    if voxel_nm is None:
        raise ReportError(f"the voxel size of {volume} is unknown (none in volume.json, none recorded): pass "
                          "--voxel-size NM for lengths in um, or --unit voxel for lengths in voxels")
    return voxel_nm, f"{voxel_nm:g} nm (from {origin})"


def measure_labels(volume: LabelVolume, voxel_size_nm: float | None, options: Mapping[str, Any]) -> MicrostructureResult:
    """The metrics of a label volume, lengths in um when the voxel size is known (else in voxels)."""
    if voxel_size_nm is None:
        return measure(volume.labels, volume.phase_map, **options)
    return measure(volume.labels, volume.phase_map, voxel_size=voxel_size_nm / 1000.0, unit="um", **options)


def open_truth(path: str, labels: LabelInput, voxel_size_nm: float | None, settings: MeasureSettings) -> LabelVolume:
    """The truth's labels, refused when they cannot be compared voxel for voxel with VOLUME's."""
    truth = load_labels(path, settings.phase_map, settings.default_phase_map)
    check_shape(path, truth.labels.shape, labels.volume.labels.shape, "truth labels")
    if settings.voxel_size_nm is None and truth.voxel_size_nm is not None and voxel_size_nm is not None \
            and truth.voxel_size_nm != voxel_size_nm:
        raise ReportError(f"--truth {path}: voxel size {truth.voxel_size_nm} nm, the volume's is {voxel_size_nm} nm: "
                          "pass --voxel-size")
    return truth


def volume_report(sources: ReportSources, settings: MeasureSettings) -> str:
    """The HTML page of VOLUME (see the module docstring); every input is checked before measuring."""
    labels = open_labels(sources.volume, settings.phase_map, settings.default_phase_map)
    voxel_nm, voxel_origin = voxel_size(labels, settings.voxel_size_nm)
    if voxel_nm is None and sources.truth is not None:
        voxel_nm, voxel_origin = truth_voxel_size(sources.truth, voxel_nm, voxel_origin)
    truth = open_truth(sources.truth, labels, voxel_nm, settings) if sources.truth is not None else None
    voxel_nm, voxel_text = measured_voxel_size(voxel_nm, voxel_origin, settings, sources.volume)
    image, image_origin = grey_planes(labels, sources.image)
    probabilities, probability_planes, probability_origin = open_probabilities(labels, sources.probabilities)
    if probabilities is None and settings.sweep is not None:
        raise ReportError("--samples/--spread set the intervals, which need the class probabilities: pass "
                          "--probabilities PATH.tif, or a .zarr store segmented with --probabilities")
    if probabilities is not None:
        (settings.sweep or BiasSweep()).plan(probabilities.n_classes)  # a bad sample count: refused before measuring
    uncertainty, uncertainty_origin = uncertainty_source(labels, sources.uncertainty, probability_planes)

    result = measure_labels(labels.volume, voxel_nm, settings.options)
    truth_result = measure_labels(truth, voxel_nm, settings.options) if truth is not None else None
    intervals, method = ({}, "")
    if probabilities is not None:
        intervals, method = probability_intervals(probabilities, voxel_nm, settings)

    names = [labels.volume.phase_map[v] for v in sorted(labels.volume.phase_map)]
    planes = SlicePlanes(class_planes(OrthogonalPlanes.of_array(labels.volume.labels), labels.volume.phase_map), names,
                         image=image, uncertainty=uncertainty)
    if truth is not None:
        planes.truth = class_planes(OrthogonalPlanes.of_array(truth.labels), truth.phase_map)
        planes.truth_names = [truth.phase_map[v] for v in sorted(truth.phase_map)]
    z, y, x = labels.volume.labels.shape
    identity = [
        ("path", str(Path(sources.volume).resolve())),
        ("kind", labels.kind),
        ("shape", f"{z} x {y} x {x} voxels (z, y, x)"),
        ("voxel size", voxel_text),
        ("phase map", phase_map_text(labels.volume.phase_map)),
        *describe_record(labels.record),
        ("grey image", image_origin),
        ("probabilities", probability_origin),
        ("uncertainty", uncertainty_origin),
    ]
    if truth is not None:
        identity.append(("truth", f"{Path(str(sources.truth)).resolve()} (phase map {phase_map_text(truth.phase_map)})"))
    metrics = ReportMetrics(result, truth_result, intervals, method)
    return render_html(f"socseg report: {labels.volume.name}", identity, planes, metrics)


def truth_voxel_size(path: str, voxel_nm: float | None, origin: str) -> tuple[float | None, str]:
    """The truth's recorded voxel size, when VOLUME records none (a ``.tif`` of a scan imported
    with one): both volumes are then measured in um."""
    try:
        meta = detect_format(path).volume_meta(path)
    except (VolumeError, OSError):
        return voxel_nm, origin
    if meta is not None and meta.voxel_size_nm is not None:
        return meta.voxel_size_nm, "the truth's volume.json"
    return voxel_nm, origin


def probability_intervals(probabilities: ProbabilityVolume, voxel_size_nm: float | None,
                          settings: MeasureSettings) -> tuple[dict[str, MetricInterval], str]:
    """An interval per metric from the class probabilities (:mod:`socseg.analysis.intervals`) and
    how it was made, for the page's notes."""
    units = {} if voxel_size_nm is None else {"voxel_size": voxel_size_nm / 1000.0, "unit": "um"}
    found = measure_with_intervals(probabilities, settings.sweep or BiasSweep(), **units, **settings.options)
    method = found.sweep.describe()
    text = (f"{method['method']} ({method['samples']} label volumes, spread {method['spread']:g}; see "
            "socseg.analysis.intervals): each metric's range over label volumes decided from the probabilities, "
            "each class's threshold moved until it gains or loses its expected misclassified voxels. The range "
            "always holds the value of the probabilities' argmax, which equals the labels' but where two classes "
            "tie within the stored 1/255")
    return found.intervals, "; ".join([text, *found.notes])
