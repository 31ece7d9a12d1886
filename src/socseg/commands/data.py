"""``socseg data``: import TIFF slices or generate the synthetic phantom into DATA_DIR/NAME."""

from __future__ import annotations

from pathlib import Path

import click

from socseg.commands.options import CommandError
from socseg.data.synth import BUILTIN_SAMPLE, materialise_sample, synth_from_params
from socseg.data.volumes import Volume, VolumeError, import_slices, load_volume, parse_phase_map, save_volume, volume_dir
from socseg.params import load_params, typed


def _target(name: str, data_dir: str | None, params: dict, overwrite: bool) -> Path:
    """Resolve DATA_DIR/NAME and refuse an existing one before any slow reading."""
    target = volume_dir(name, data_dir or typed(params).data.dir)
    if target.exists() and not overwrite:
        raise VolumeError(f"{target} already exists (use --overwrite to replace it)")
    return target


def _summary(volume: Volume, target: Path) -> str:
    meta = volume.meta
    text = f"{meta.name}: {'x'.join(map(str, meta.shape))} {meta.image_dtype}"
    if volume.labels is not None:
        fractions = ", ".join(f"{k} {v:.3f}" for k, v in volume.phase_fractions().items())
        text += f", labels ({fractions})"
    else:
        text += ", no labels"
    return f"{text} -> {target}"


def _parse_shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise VolumeError(f"bad --shape {text!r}: expected Z,Y,X, e.g. 48,192,192") from None
    if len(shape) != 3 or min(shape) < 1:
        raise VolumeError(f"bad --shape {text!r}: expected three positive integers Z,Y,X")
    return shape  # type: ignore[return-value]


@click.group("data")
def data() -> None:
    """Bring volumes into DATA_DIR/NAME (image.tif, labels.tif, volume.json) for DVC to track."""


@data.command("import")
@click.argument("name")
@click.option("--images", required=True, help="Glob of grey-value TIFF slices, e.g. 'raw/SOCprist*.tiff'.")
@click.option("--labels", default=None, help="Glob of label TIFF slices, paired by the last number in the file name.")
@click.option(
    "--phase-map", default=None, help="Label value -> phase, e.g. 0=pore,128=ysz,255=ni [params: data.phase_map]."
)
@click.option("--voxel-size", type=float, default=None, help="Voxel size in nm, if known.")
@click.option("--data-dir", default=None, help="Where volumes live [params: data.dir].")
@click.option("--overwrite", is_flag=True, help="Replace an existing volume of the same name.")
def import_(
    name: str,
    images: str,
    labels: str | None,
    phase_map: str | None,
    voxel_size: float | None,
    data_dir: str | None,
    overwrite: bool,
) -> None:
    """Import TIFF slices as volume NAME (validated first; nothing is written on error)."""
    try:
        params = load_params()
        target = _target(name, data_dir, params, overwrite)
        mapping = parse_phase_map(phase_map) if phase_map is not None else typed(params).data.phase_map
        volume = import_slices(name, images, labels, phase_map=mapping, voxel_size_nm=voxel_size)
        save_volume(volume, target, overwrite=overwrite)
    except (VolumeError, OSError) as exc:  # OSError: params file or disk problems
        raise CommandError(str(exc)) from None
    click.echo(f"imported {_summary(volume, target)}")


@data.command("synth")
@click.argument("name")
@click.option("--shape", default=None, help="Z,Y,X [params: synth.shape].")
@click.option("--seed", type=int, default=None, help="Random seed [params: synth.seed].")
@click.option("--data-dir", default=None, help="Where volumes live [params: data.dir].")
@click.option("--overwrite", is_flag=True, help="Replace an existing volume of the same name.")
def synth(name: str, shape: str | None, seed: int | None, data_dir: str | None, overwrite: bool) -> None:
    """Generate the labelled synthetic PXCT phantom as volume NAME."""
    try:
        params = load_params()
        target = _target(name, data_dir, params, overwrite)
        if name == BUILTIN_SAMPLE and shape is None and seed is None:
            # The built-in sample: checked against the md5 that synth.check_against (data.dvc) records.
            materialise_sample(params, target)
            volume = load_volume(target)
        else:
            volume = synth_from_params(params, name, shape=_parse_shape(shape), seed=seed)
            save_volume(volume, target, overwrite=overwrite)
    except (VolumeError, OSError) as exc:  # OSError: params file or disk problems
        raise CommandError(str(exc)) from None
    click.echo(f"synthesised {_summary(volume, target)}")
