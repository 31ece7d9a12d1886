"""``socseg microstructure``: TPB density, percolation, surfaces, sizes of a label volume.

VOLUME (and ``--truth``) is a socseg volume directory (its ``labels.tif``: labels or a
segmentation), or a bare label stack: a multi-page TIFF or a folder of slice TIFFs, read
with the phase map ``socseg segment`` recorded in the TIFF (e.g. 0=rest,255=ni for an ``ni``
model), else ``--phase-map`` (default: ``data.phase_map`` of params.yaml); a ``--phase-map`` that
contradicts the recorded one is refused. Only the labels are read, never the grey image, so
memory stays at the metrics' own needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

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


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    return [] if [n.lower() for n in names] == ["none"] else names


def _voxel(pred: LabelVolume, truth: LabelVolume | None, voxel_size_nm: float | None) -> float | None:
    """One voxel size for both volumes, so their metrics share units."""
    if voxel_size_nm is not None:
        return voxel_size_nm
    sizes = {v.voxel_size_nm for v in (pred, truth) if v is not None and v.voxel_size_nm is not None}
    if len(sizes) > 1:
        raise VolumeError(f"the volumes have different voxel sizes {sorted(sizes)} nm: pass --voxel-size")
    return sizes.pop() if sizes else None


def _measure(volume: LabelVolume, voxel_size_nm: float | None, **options: Any) -> MicrostructureResult:
    if voxel_size_nm is None:
        return measure(volume.labels, volume.phase_map, **options)
    return measure(volume.labels, volume.phase_map, voxel_size=voxel_size_nm / 1000.0, unit="um", **options)


def _table(pred: MicrostructureResult, names: list[str], truth: MicrostructureResult | None) -> str:
    flat = flatten_metrics(pred)
    true_flat = flatten_metrics(truth) if truth is not None else {}
    errors = relative_errors(flat, true_flat)
    header = ["metric", names[0]] + ([names[1], "rel. err"] if truth is not None else [])
    rows = [header]
    for key in list(flat) + [k for k in true_flat if k not in flat]:
        row = [key, f"{flat[key]:.4g}" if key in flat else "-"]
        if truth is not None:
            row.append(f"{true_flat[key]:.4g}" if key in true_flat else "-")
            row.append(f"{100 * errors[key]:+.1f}%" if key in errors else "n/a")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    unit = pred.unit
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append(
        f"units: lengths in {unit}; tpb.* in {unit}^-2, ssa.*/iface.* in {unit}^-1, size.* in {unit}; "
        f"vf/perc/tpb.active are fractions (perc: 6-connected, spanning both faces along the axis)."
    )
    if pred.tpb is not None:
        lines.append(
            f"tpb.density = voxel-edge length x {pred.tpb.correction:.4g} (isotropic-orientation correction for "
            f"the staircase bias, Jorgensen et al. 2014); tpb.density_edges is uncorrected."
        )
    lines.append(
        f"ssa/iface: voxel-face counting x {pred.surface_correction:.4g} (same isotropic correction); "
        "*_faces uncorrected. size: local-thickness diameters (volume-weighted), porespy."
    )
    for label, result in (("", pred), ("truth: ", truth)):
        for note in result.notes if result is not None else []:
            lines.append(f"note: {label}{note}")
    return "\n".join(lines)


@click.command("microstructure")
@click.argument("volume", type=click.Path(exists=True))
@click.option("--truth", type=click.Path(exists=True), default=None, help="Labelled volume to compare against.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Also write the JSON to this file.")
@click.option(
    "--phase-map",
    default=None,
    help="Label value -> phase, e.g. 0=pore,128=ysz,255=ni (default: volume.json, or the map socseg segment "
    "recorded in the TIFF, else that).",
)
@click.option("--voxel-size", type=float, default=None, help="Voxel size in nm (default: volume.json); lengths then in um, else in voxels.")
@click.option("--phases", default=None, help="Phase names playing pore,ysz,ni for the TPB (default: pore,ysz,ni).")
@click.option("--size-phases", default=None, help="Phases whose size distribution to measure, comma-separated, or 'none' (default: ni).")
@click.option("--tpb-correction", type=float, default=TPB_ISOTROPIC_CORRECTION, show_default=True, help="Factor applied to the voxel-edge TPB length.")
def microstructure(
    volume: str,
    truth: str | None,
    as_json: bool,
    output: str | None,
    phase_map: str | None,
    voxel_size: float | None,
    phases: str | None,
    size_phases: str | None,
    tpb_correction: float,
) -> None:
    """Microstructure metrics of VOLUME (and of --truth, with the relative error of VOLUME)."""
    try:
        mapping = parse_phase_map(phase_map) if phase_map is not None else None
        default = typed(load_params()).data.phase_map
        pred = load_labels(volume, mapping, default)
        reference = load_labels(truth, mapping, default) if truth is not None else None
        voxel_nm = _voxel(pred, reference, voxel_size)
        options: dict[str, Any] = dict(
            tpb_phases=_names(phases), size_phases=_names(size_phases), tpb_correction=tpb_correction
        )
        pred_result = _measure(pred, voxel_nm, **options)
        true_result = _measure(reference, voxel_nm, **options) if reference is not None else None
    except (VolumeError, MicrostructureError, OSError) as exc:  # VolumeError/MicrostructureError: bad input
        raise CommandError(str(exc)) from None

    if true_result is not None and true_result.shape != pred_result.shape:
        pred_result.notes.append(f"shapes differ: {pred_result.shape} vs truth {true_result.shape}")
    flat = flatten_metrics(pred_result)
    report: dict[str, Any] = {
        "volume": {"path": str(volume), "name": pred.name, "metrics": pred_result.to_dict(), "flat": flat},
        "truth": None,
        "relative_error": {},
    }
    if true_result is not None and reference is not None:
        true_flat = flatten_metrics(true_result)
        report["truth"] = {"path": str(truth), "name": reference.name, "metrics": true_result.to_dict(), "flat": true_flat}
        report["relative_error"] = relative_errors(flat, true_flat)
    text = json.dumps(report, indent=2)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    if as_json:
        click.echo(text)
    else:
        names = [pred.name] + ([reference.name] if reference is not None else [])
        if len(names) == 2 and names[0] == names[1]:
            names = ["volume", "truth"]
        click.echo(_table(pred_result, names, true_result))
