"""``socseg microstructure``: TPB density, percolation, surfaces, sizes (and, asked for, tortuosity)
of a label volume, or of a probability volume with an interval on every number.

VOLUME (and ``--truth``) is a socseg volume directory (its ``labels.tif``: labels or a
segmentation), or a bare label stack: a multi-page TIFF, a folder of slice TIFFs or a ``.zarr``
store, read with the phase map ``socseg segment`` recorded (e.g. 0=rest,255=ni for an ``ni``
model), else ``--phase-map`` (default: ``data.phase_map`` of params.yaml); a ``--phase-map`` that
contradicts the recorded one is refused. Only the labels are read, never the grey image.

VOLUME may instead hold class probabilities, recognised by what socseg recorded in it (not by its
name): the ``PATH.tif`` of ``socseg segment ... --probabilities PATH.tif`` or a ``.zarr`` store
segmented with ``--probabilities``. Each metric is then that of the argmax labels (what ``socseg
segment`` writes) with an interval (:mod:`socseg.analysis.intervals`: a class-bias sweep over the
model's expected misclassified voxels), and with ``--truth`` whether the interval covers the
truth's value.

Units: lengths in um need a voxel size: ``--voxel-size``, else ``volume.json``, else the scale a
``.zarr`` store records. With none known the command refuses, naming the fix, rather than print
densities per voxel that read like per um; ``--unit voxel`` asks for voxel units explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from socseg.analysis.intervals import (
    BiasSweep,
    IntervalResult,
    ProbabilityVolume,
    holds_probabilities,
    measure_with_intervals,
    recorded_voxel_size_nm,
)
from socseg.analysis.microstructure import (
    TPB_ISOTROPIC_CORRECTION,
    MicrostructureError,
    MicrostructureResult,
    flatten_metrics,
    measure,
    relative_errors,
)
from socseg.commands.options import CommandError
from socseg.data.stacks import LabelVolume, load_labels
from socseg.data.volumes import VolumeError, parse_phase_map
from socseg.params import load_params, typed

UNITS = ("um", "voxel")
DEFAULT_SAMPLES = 12
DEFAULT_SPREAD = 1.0


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    return [] if [n.lower() for n in names] == ["none"] else names


def _voxel_nm(known: list[float | None], voxel_size_nm: float | None) -> float | None:
    """One voxel size for all volumes, so their metrics share units: the given one, else the one
    they record (refused when they record different ones)."""
    if voxel_size_nm is not None:
        return voxel_size_nm
    sizes = {size for size in known if size is not None}
    if len(sizes) > 1:
        raise VolumeError(f"the volumes have different voxel sizes {sorted(sizes)} nm: pass --voxel-size")
    return sizes.pop() if sizes else None


def _length_units(voxel_nm: float | None, unit: str, given_nm: float | None, volume: str) -> dict[str, Any]:
    """``measure``'s ``voxel_size``/``unit``: um from the voxel size, or voxels when asked for."""
    if unit == "voxel":
        if given_nm is not None:
            raise CommandError(f"--voxel-size {given_nm:g} and --unit voxel contradict each other: drop one")
        return {}
    if voxel_nm is None:
        raise CommandError(
            f"the voxel size of {volume} is unknown (no voxel size in volume.json, none recorded): pass "
            "--voxel-size NM for lengths in um, or --unit voxel for lengths in voxels")
    return {"voxel_size": voxel_nm / 1000.0, "unit": "um"}


def _labels_voxel_nm(volume: LabelVolume, path: str) -> float | None:
    return volume.voxel_size_nm if volume.voxel_size_nm is not None else recorded_voxel_size_nm(path)


def _sweep(samples: int | None, spread: float | None, probabilities: bool) -> BiasSweep | None:
    if not probabilities:
        if samples is not None or spread is not None:
            raise CommandError("--samples/--spread set the intervals of a probability volume; VOLUME holds labels")
        return None
    try:
        return BiasSweep(DEFAULT_SAMPLES if samples is None else samples, DEFAULT_SPREAD if spread is None else spread)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _check_plan(sweep: BiasSweep, n_classes: int) -> None:
    """Refuse a sample count the classes cannot share (e.g. 5 for 3 classes) before any slow work."""
    try:
        sweep.plan(n_classes)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _format_rows(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _footer(pred: MicrostructureResult, truth: MicrostructureResult | None) -> list[str]:
    unit = pred.unit
    lines = ["", f"units: lengths in {unit}; tpb.* in {unit}^-2, ssa.*/iface.* in {unit}^-1, size.* in {unit}; "
             f"vf/perc/tpb.active are fractions (perc: 6-connected, spanning both faces along the axis)."]
    if pred.tpb is not None:
        lines.append(f"tpb.density = voxel-edge length x {pred.tpb.correction:.4g} (isotropic-orientation correction "
                     "for the staircase bias, Jorgensen et al. 2014); tpb.density_edges is uncorrected.")
    lines.append(f"ssa/iface: voxel-face counting x {pred.surface_correction:.4g} (same isotropic correction); "
                 "*_faces uncorrected. size: local-thickness diameters (volume-weighted), porespy.")
    for label, result in (("", pred), ("truth: ", truth)):
        for note in result.notes if result is not None else []:
            lines.append(f"note: {label}{note}")
    return lines


def _table(pred: MicrostructureResult, names: list[str], truth: MicrostructureResult | None) -> str:
    flat = flatten_metrics(pred)
    true_flat = flatten_metrics(truth) if truth is not None else {}
    errors = relative_errors(flat, true_flat)
    rows = [["metric", names[0]] + ([names[1], "rel. err"] if truth is not None else [])]
    for key in list(flat) + [k for k in true_flat if k not in flat]:
        row = [key, f"{flat[key]:.4g}" if key in flat else "-"]
        if truth is not None:
            row.append(f"{true_flat[key]:.4g}" if key in true_flat else "-")
            row.append(f"{100 * errors[key]:+.1f}%" if key in errors else "n/a")
        rows.append(row)
    return "\n".join(_format_rows(rows) + _footer(pred, truth))


def _interval_table(intervals: IntervalResult, truth_name: str | None, truth: MicrostructureResult | None) -> str:
    """metric, value, low, high (and the truth, the value's relative error, whether the interval covers it)."""
    true_flat = flatten_metrics(truth) if truth is not None else {}
    value = {k: v.value for k, v in intervals.intervals.items()}
    errors = relative_errors(value, true_flat)
    rows = [["metric", "value", "low", "high"] + ([truth_name or "truth", "rel. err", "covered"] if truth else [])]
    for key, interval in intervals.intervals.items():
        row = [key] + [f"{v:.4g}" for v in (interval.value, interval.low, interval.high)]
        if truth is not None:
            row.append(f"{true_flat[key]:.4g}" if key in true_flat else "-")
            row.append(f"{100 * errors[key]:+.1f}%" if key in errors else "n/a")
            row.append(("yes" if interval.covers(true_flat[key]) else "NO") if key in true_flat else "-")
        rows.append(row)
    sweep = intervals.sweep
    expected = ", ".join(f"{name} {fraction:.4g}" for name, fraction in intervals.expected_volume_fraction.items())
    lines = _format_rows(rows) + _footer(intervals.result, truth)
    lines.insert(len(rows) + 2, (
        f"value: argmax of the probabilities. low-high: range over {len(intervals.samples)} label volumes in which "
        f"each class gains or loses up to {sweep.spread:g} x its expected misclassified voxels where the model is "
        f"least sure (socseg.analysis.intervals); segmentation uncertainty only, not sampling of the electrode. "
        f"Probability-weighted volume fractions: {expected}."))
    lines.extend(f"note: intervals: {note}" for note in intervals.notes)
    return "\n".join(lines)


def _report(volume: str, name: str, kind: str, pred: MicrostructureResult, truth_path: str | None,
            reference: LabelVolume | None, true_result: MicrostructureResult | None,
            intervals: IntervalResult | None) -> dict[str, Any]:
    """The JSON of ``--json``/``--output``: both volumes' metrics, errors, intervals and coverage."""
    flat = flatten_metrics(pred)
    report: dict[str, Any] = {
        "volume": {"path": str(volume), "name": name, "kind": kind, "metrics": pred.to_dict(), "flat": flat},
        "truth": None, "relative_error": {}, "intervals": {}, "interval_method": None, "covered": {},
    }
    if intervals is not None:
        record = intervals.to_dict()
        report["intervals"] = record.pop("intervals")
        report["interval_method"] = record
    if true_result is not None and reference is not None:
        true_flat = flatten_metrics(true_result)
        report["truth"] = {"path": str(truth_path), "name": reference.name, "metrics": true_result.to_dict(),
                           "flat": true_flat}
        report["relative_error"] = relative_errors(flat, true_flat)
        if intervals is not None:
            report["covered"] = {k: v.covers(true_flat[k]) for k, v in intervals.intervals.items() if k in true_flat}
    return report


def measure_options(phases: str | None, size_phases: str | None, tpb_correction: float, tortuosity: bool,
             tortuosity_max_voxels: int | None = None, tortuosity_workers: int | None = None) -> dict[str, Any]:
    """``measure``'s options from the command's flags (shared with ``socseg report``)."""
    options: dict[str, Any] = dict(tpb_phases=_names(phases), size_phases=_names(size_phases),
                                   tpb_correction=tpb_correction)
    if tortuosity:
        options["tortuosity"] = True
        if tortuosity_max_voxels is not None:
            options["tortuosity_max_voxels"] = tortuosity_max_voxels
        if tortuosity_workers is not None:
            options["tortuosity_workers"] = tortuosity_workers
    return options


@click.command("microstructure")
@click.argument("volume", type=click.Path(exists=True))
@click.option("--truth", type=click.Path(exists=True), default=None, help="Labelled volume to compare against.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Also write the JSON to this file.")
@click.option(
    "--phase-map",
    default=None,
    help="Label value -> phase of the label volumes, e.g. 0=pore,128=ysz,255=ni (default: volume.json, or the map "
    "socseg segment recorded, else that). A probability volume's classes are the ones it records.",
)
@click.option("--voxel-size", type=float, default=None,
              help="Voxel size in nm (default: volume.json, or the scale a .zarr store records); lengths in um.")
@click.option("--unit", type=click.Choice(UNITS), default="um", show_default=True,
              help="um: lengths in micrometres; refused when no voxel size is known (pass --voxel-size). "
              "voxel: lengths, areas and densities in voxel units, whatever the voxel size.")
@click.option("--phases", default=None, help="Phase names playing pore,ysz,ni for the TPB (default: pore,ysz,ni).")
@click.option("--size-phases", default=None, help="Phases whose size distribution to measure, comma-separated, or 'none' (default: ni).")
@click.option("--tpb-correction", type=float, default=TPB_ISOTROPIC_CORRECTION, show_default=True, help="Factor applied to the voxel-edge TPB length.")
@click.option("--tortuosity/--no-tortuosity", default=False, show_default=True,
              help="Also the tortuosity factor and effective diffusivity ratio of each phase along each axis (slow).")
@click.option("--tortuosity-max-voxels", type=click.IntRange(min=4096), default=None,
              help="With --tortuosity: voxels per solve (default: 2^26, a 200x501x501 volume whole, ~240 B per "
                   "voxel of the phase). Larger volumes are solved in columns: less memory, factors biased up.")
@click.option("--tortuosity-workers", type=click.IntRange(min=1), default=None,
              help="With --tortuosity: solves (phase x axis) run at once in worker processes [default: as many as "
                   "the cores and the available memory allow].")
@click.option("--samples", type=int, default=None,
              help=f"Probability volume: label volumes measured for the intervals, at least 2 per class "
              f"(0: the argmax only) [default: {DEFAULT_SAMPLES}]. Time grows with it.")
@click.option("--spread", type=float, default=None,
              help="Probability volume: how many times its expected misclassified voxels each class may gain or "
              f"lose in the intervals (1: the probabilities' own expectation; more for an overconfident model) "
              f"[default: {DEFAULT_SPREAD:g}].")
def microstructure(
    volume: str, truth: str | None, as_json: bool, output: str | None, phase_map: str | None,
    voxel_size: float | None, unit: str, phases: str | None, size_phases: str | None, tpb_correction: float,
    tortuosity: bool, tortuosity_max_voxels: int | None, tortuosity_workers: int | None, samples: int | None,
    spread: float | None,
) -> None:
    """Microstructure metrics of VOLUME (and of --truth, with the relative error of VOLUME).

    VOLUME: labels (a volume directory, a label TIFF or folder, a .zarr store), or class
    probabilities (segment --probabilities: the PATH.tif, or the .zarr store): then every metric
    comes with an interval, and with --truth whether it covers the truth's value.
    """
    try:
        kind = "probabilities" if holds_probabilities(volume) else "labels"
        sweep = _sweep(samples, spread, kind == "probabilities")
        mapping = parse_phase_map(phase_map) if phase_map is not None else None
        default = typed(load_params()).data.phase_map
        reference = load_labels(truth, mapping, default) if truth is not None else None
        options = measure_options(phases, size_phases, tpb_correction, tortuosity, tortuosity_max_voxels,
                                  tortuosity_workers)
        if sweep is not None:
            probabilities = ProbabilityVolume.open(volume)
            _check_plan(sweep, probabilities.n_classes)
            name, pred, known = probabilities.name, None, probabilities.voxel_size_nm
        else:
            pred = load_labels(volume, mapping, default)
            name, known = pred.name, _labels_voxel_nm(pred, volume)
        truth_nm = _labels_voxel_nm(reference, truth) if reference is not None and truth is not None else None
        units = _length_units(_voxel_nm([known, truth_nm], voxel_size), unit, voxel_size, volume)
        intervals = None
        if pred is None:
            intervals = measure_with_intervals(probabilities, sweep, **units, **options)
            pred_result = intervals.result
        else:
            pred_result = measure(pred.labels, pred.phase_map, **units, **options)
        true_result = None if reference is None else measure(reference.labels, reference.phase_map, **units, **options)
    except (VolumeError, MicrostructureError, OSError) as exc:  # VolumeError/MicrostructureError: bad input
        raise CommandError(str(exc)) from None
    _show(volume, name, kind, pred_result, truth, reference, true_result, intervals, as_json, output)


def _show(volume: str, name: str, kind: str, pred_result: MicrostructureResult, truth: str | None,
          reference: LabelVolume | None, true_result: MicrostructureResult | None,
          intervals: IntervalResult | None, as_json: bool, output: str | None) -> None:
    """Print the table or the JSON (and write the JSON to ``output``)."""
    if true_result is not None and true_result.shape != pred_result.shape:
        pred_result.notes.append(f"shapes differ: {pred_result.shape} vs truth {true_result.shape}")
    text = json.dumps(_report(volume, name, kind, pred_result, truth, reference, true_result, intervals), indent=2)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    if as_json:
        click.echo(text)
        return
    names = [name] + ([reference.name] if reference is not None else [])
    if len(names) == 2 and names[0] == names[1]:
        names = ["volume", "truth"]
    if intervals is not None:
        click.echo(_interval_table(intervals, names[1] if len(names) == 2 else None, true_result))
    else:
        click.echo(_table(pred_result, names, true_result))
