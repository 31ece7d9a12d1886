"""``socseg report``: one self-contained HTML page of a label volume (see :mod:`socseg.analysis.report`).

:mod:`socseg.analysis.report` (and matplotlib with it) is imported inside the command, not at
module level: the CLI imports every command module at start-up, and only this one draws.
"""

from __future__ import annotations

import click

from socseg.analysis.intervals import BiasSweep
from socseg.analysis.microstructure import TPB_ISOTROPIC_CORRECTION
from socseg.commands.microstructure import measure_options
from socseg.commands.options import CommandError
from socseg.data.volumes import parse_phase_map
from socseg.params import load_params, typed


@click.command("report")
@click.argument("volume", metavar="VOLUME_OR_STORE", type=click.Path(exists=True))
@click.argument("out", metavar="OUT.html", type=click.Path(dir_okay=False))
@click.option("--truth", type=click.Path(exists=True), default=None,
              help="Labels to compare with (a volume directory or a label stack): adds their metrics and the relative errors.")
@click.option("--image", type=click.Path(exists=True), default=None,
              help="The grey image (any input socseg reads) [default: the volume directory's, else the source "
                   "socseg segment recorded, if it exists].")
@click.option("--probabilities", type=click.Path(exists=True, dir_okay=False), default=None, metavar="PATH.tif",
              help="The probabilities of `socseg segment --probabilities PATH.tif` (a .zarr store keeps its own): "
                   "an interval per metric, and the uncertainty when no --uncertainty is given.")
@click.option("--uncertainty", type=click.Path(exists=True, dir_okay=False), default=None, metavar="PATH.tif",
              help="The uncertainty of `socseg segment --uncertainty PATH.tif` (a .zarr store keeps its own).")
@click.option("--phase-map", default=None,
              help="Label value -> phase, e.g. 0=pore,128=ysz,255=ni (default: volume.json, or the map socseg segment "
                   "recorded, else data.phase_map of params.yaml).")
@click.option("--voxel-size", type=float, default=None,
              help="Voxel size in nm (default: volume.json, the scale a .zarr store records, or the volume.json of the "
                   "volume socseg segment read); lengths in um.")
@click.option("--unit", type=click.Choice(["um", "voxel"]), default="um", show_default=True,
              help="um: lengths in micrometres; refused when no voxel size is known (pass --voxel-size). voxel: "
                   "lengths, areas and densities in voxel units, whatever the voxel size.")
@click.option("--phases", default=None, help="Phase names playing pore,ysz,ni for the TPB (default: pore,ysz,ni).")
@click.option("--size-phases", default=None,
              help="Phases whose size distribution to measure, comma-separated, or 'none' (default: ni).")
@click.option("--tpb-correction", type=float, default=TPB_ISOTROPIC_CORRECTION, show_default=True,
              help="Factor applied to the voxel-edge TPB length.")
@click.option("--tortuosity/--no-tortuosity", default=False, show_default=True,
              help="Also the tortuosity factor and effective diffusivity ratio of each phase along each axis (slow).")
@click.option("--tortuosity-max-voxels", type=click.IntRange(min=4096), default=None,
              help="With --tortuosity: voxels per solve (default: 2^26, a 200x501x501 volume whole, ~240 B per voxel of the phase). "
                   "Larger volumes are solved in columns: less memory, factors biased up.")
@click.option("--samples", type=int, default=None,
              help=f"With probabilities: label volumes measured for the intervals, at least 2 per class (0: none) "
                   f"[default: {BiasSweep.samples}]. Time grows with it.")
@click.option("--spread", type=float, default=None,
              help=f"With probabilities: how many times its expected misclassified voxels each class may gain or lose "
                   f"in the intervals [default: {BiasSweep.spread:g}].")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.html (never an input).")
def report(volume: str, out: str, truth: str | None, image: str | None, probabilities: str | None,
           uncertainty: str | None, phase_map: str | None, voxel_size: float | None, unit: str, phases: str | None,
           size_phases: str | None, tpb_correction: float, tortuosity: bool, tortuosity_max_voxels: int | None,
           samples: int | None, spread: float | None,
           overwrite: bool) -> None:
    """Write OUT.html: identity, orthogonal slices (grey, labels, uncertainty), the metrics per
    phase (with intervals and errors against --truth), size distributions and tortuosity of VOLUME_OR_STORE.

    VOLUME_OR_STORE: a label stack of `socseg segment` (.tif), its Zarr store (.zarr, with the
    probabilities and uncertainty inside when segmented with --probabilities), or a socseg volume
    directory. The page embeds everything: it opens offline, from the file, in any browser.
    """
    from socseg.analysis.report import (  # lazy: matplotlib (see the module docstring)
        MeasureSettings,
        ReportSources,
        check_report_path,
        volume_report,
        write_report,
    )

    sources = ReportSources(volume, truth, image, probabilities, uncertainty)
    try:
        target = check_report_path(out, sources.paths(), overwrite)
        options = measure_options(phases, size_phases, tpb_correction, tortuosity, tortuosity_max_voxels)
        sweep = None
        if samples is not None or spread is not None:
            sweep = BiasSweep(BiasSweep.samples if samples is None else samples,
                              BiasSweep.spread if spread is None else spread)
        settings = MeasureSettings(
            default_phase_map=typed(load_params()).data.phase_map,
            phase_map=parse_phase_map(phase_map) if phase_map is not None else None,
            voxel_size_nm=voxel_size,
            unit=unit,
            options=options,
            sweep=sweep,
        )
        page = volume_report(sources, settings)
        check_report_path(out, sources.paths(), overwrite)  # again: OUT may have appeared while measuring
        write_report(page, target)
    except (ValueError, OSError) as exc:  # bad input (ReportError, VolumeError, MicrostructureError...): one line
        raise CommandError(str(exc)) from None
    click.echo(f"report -> {target}")
