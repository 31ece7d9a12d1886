"""``socseg segment``: whole-volume segmentation with a logged model: a TIFF label stack, or a
chunked Zarr store written by this process or by a Dask cluster.

The command builds the call's :class:`~socseg.inference.request.InferenceOptions` once from its
options; MLflow and the inference stack are imported inside it, so that ``socseg --help`` and
the other commands start without them."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import click

from socseg.commands.options import CommandError, param_option
from socseg.commands.stats import grey_range_option
from socseg.data.normalise import GreyRangeEstimateError
from socseg.data.volumes import VolumeError
from socseg.inference.predictor import GreyRangeError
from socseg.inference.request import InferenceOptions
from socseg.params import RUNTIMES, WINDOWS, load_params, typed

IN_STORE = "<in the .zarr store>"  # --probabilities / --uncertainty given without a path


def inference_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The per-call inference settings as click options, handed to ``command`` as one checked
    :class:`~socseg.inference.request.InferenceOptions` (``options``)."""

    @functools.wraps(command)
    def with_options(*args: Any, tta: bool | None, window: str | None, step_fraction: float | None,
                     smoothing_sigma: float | None, planes: str | None, allow_out_of_range: bool,
                     grey_range: tuple[float, float] | None, **kwargs: Any) -> Any:
        try:
            options = InferenceOptions(tta=tta, step_fraction=step_fraction, window=window, grey_range=grey_range,
                                       smoothing_sigma=smoothing_sigma, planes=planes, allow_out_of_range=allow_out_of_range)
        except ValueError as error:
            raise CommandError(str(error)) from None
        return command(*args, options=options, **kwargs)

    decorators = [
        click.option("--tta/--no-tta", default=None,
                     help="8-fold flip/rotation test-time augmentation [default: the model's setting]."),
        click.option("--window", type=click.Choice(WINDOWS),
                     help="whole_slice: one pass per slice; sliding: overlapping tiles [default: the model's]."),
        click.option("--step-fraction", type=float,
                     help="Sliding window: tile step / tile size, in (0, 1] [default: the model's]."),
        click.option("--smoothing-sigma", type=float,
                     help="Gaussian sigma (pixels) of the in-plane smoothing of the class probabilities before the "
                          "argmax; 0: none [default: the model's, params: inference.smoothing_sigma]."),
        click.option("--planes", metavar="z|zyx",
                     help="Planes each voxel is predicted in, probabilities averaged: zyx (multi-axis fusion, the most "
                          "accurate) or z (slice by slice, ~3.5x faster); any of z, y, x [default: the model's, "
                          "params: inference.planes]."),
        click.option("--allow-out-of-range", is_flag=True,
                     help="Segment even when most grey values lie outside the model's training range (refused by default)."),
        grey_range_option,
    ]
    for decorator in reversed(decorators):
        with_options = decorator(with_options)
    return with_options



@click.command()
@click.argument("model_uri")
@click.argument("input_path", metavar="INPUT")
@click.argument("output", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT (never INPUT); a .zarr OUTPUT is otherwise resumed.")
@param_option("inference", "slice_batch")
@param_option("inference", "chunk_depth")
@click.option("--scheduler", default=None, metavar="local[:N] | tcp://HOST:PORT",
              help="Segment a .zarr OUTPUT on a Dask cluster: N local worker processes, or the scheduler at an address.")
@click.option("--probabilities", is_flag=False, flag_value=IN_STORE, default=None, metavar="[PATH.tif]",
              help="Also write the class probabilities, uint8 (P x 255). .tif OUTPUT: to PATH.tif, an ImageJ hyperstack "
                   "(Z, C, Y, X), one channel per class (Fiji: a multi-channel stack; tifffile/napari: (Z, C, H, W)). "
                   ".zarr OUTPUT: no PATH; kept in the store, with the uncertainty.")
@click.option("--uncertainty", is_flag=False, flag_value=IN_STORE, default=None, metavar="[PATH.tif]",
              help="Also write the uncertainty: normalised entropy of the probabilities x 255 (0 sure, 255 every class "
                   "equally likely), uint8. .tif OUTPUT: to PATH.tif (Z, Y, X). .zarr OUTPUT: no PATH; kept in the "
                   "store, with the probabilities. `socseg suggest-slices` ranks either.")
@click.option("--multi-axis", is_flag=True, hidden=True, help="Deprecated (removed in 0.2.0): --planes zyx, now the default.")
@click.option("--runtime", type=click.Choice(RUNTIMES),
              help="What runs the forward passes: auto (OpenVINO on a CPU where installed, else Keras), keras or openvino "
                   "[default: the model's, params: inference.runtime]. Recorded in the output.")
@inference_options
@click.option("--tracking-uri", help="Where models:/ and runs:/ URIs resolve [$MLFLOW_TRACKING_URI, params: mlflow.tracking_uri].")
def segment(
    model_uri: str, input_path: str, output: str, overwrite: bool, slice_batch: int | None, chunk_depth: int | None,
    scheduler: str | None, probabilities: str | None, uncertainty: str | None, multi_axis: bool,
    runtime: str | None, options: InferenceOptions, tracking_uri: str | None,
) -> None:
    """Segment INPUT with MODEL_URI (e.g. models:/socseg-ni@champion, runs:/<id>/segmenter; several
    models of one task and input, comma-separated: their ensemble, probabilities averaged, .tif OUTPUT).

    INPUT: a multi-page TIFF, a folder of slice TIFFs, a socseg volume directory, an HDF5 dataset
    (scan.h5:/entry/data/data) or a Zarr / OME-Zarr array. OUTPUT: a label stack (.tif), or a
    chunked OME-Zarr store (.zarr), resumable, written here or on a Dask cluster (--scheduler).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from socseg.training.tracking import tracking_uri as resolve_tracking_uri

    zarr_output = Path(output).suffix.lower() == ".zarr"
    check_output_options(zarr_output, scheduler, probabilities, uncertainty)
    if multi_axis:  # deprecated spelling of --planes zyx (CHANGELOG.md)
        if options.planes not in (None, "zyx"):
            raise CommandError(f"--multi-axis means --planes zyx, not --planes {options.planes}: give one of them")
        options = replace(options, planes="zyx")
    try:
        params = typed(load_params())
        uri = resolve_tracking_uri(params, tracking_uri)
        mlflow.set_tracking_uri(uri)
        if zarr_output:
            from socseg.inference.distributed import ZarrTarget, describe, segment_to_zarr

            depth = chunk_depth or params.inference.chunk_depth
            target = ZarrTarget(output, depth, overwrite, probabilities=bool(probabilities or uncertainty))
            try:
                result = segment_to_zarr(model_uri, input_path, target, options, tracking_uri=uri, scheduler=scheduler,
                                         runtime=runtime)
            except ValueError as exc:  # the store's settings (one model, chunk depth), refused before any chunk
                raise CommandError(str(exc)) from None
        else:
            from socseg.inference.segment import SegmentOutputs
            from socseg.inference.segment import segment as run_segment

            outputs = SegmentOutputs.check(input_path, output, probabilities, uncertainty, overwrite)
            result = run_segment(model_uri, input_path, outputs, options,
                                 slice_batch=slice_batch or params.inference.slice_batch, runtime=runtime)
    except (VolumeError, GreyRangeError, GreyRangeEstimateError, OSError, MlflowException) as exc:
        raise CommandError(getattr(exc, "message", None) or str(exc)) from None
    z, h, w = result.shape
    click.echo(f"segmented {z}x{h}x{w} in {result.seconds:.1f} s ({result.slices_per_second:.2f} slices/s) -> {result.output}")
    if zarr_output:
        click.echo(f"{result.n_chunks} chunk(s) of {depth} slices, {result.n_skipped} already finished by an earlier run")
        click.echo(describe(result))
    else:
        click.echo(f"runtime: {result.runtime}")
        for what, path in (("probabilities", result.probabilities), ("uncertainty", result.uncertainty)):
            if path is not None:
                click.echo(f"{what} -> {path}")


def check_output_options(zarr_output: bool, scheduler: str | None, probabilities: str | None,
                         uncertainty: str | None) -> None:
    """Refuse option combinations the OUTPUT kind cannot take, before anything is loaded."""
    if scheduler and not zarr_output:
        raise CommandError("--scheduler writes a chunked .zarr OUTPUT; name one (e.g. labels.zarr)")
    for option, value in (("--probabilities", probabilities), ("--uncertainty", uncertainty)):
        if zarr_output and value not in (None, IN_STORE):
            raise CommandError(f"{option} {value}: a .zarr OUTPUT keeps probabilities and uncertainty inside the store; "
                               f"give {option} without a path")
        if not zarr_output and value == IN_STORE:
            raise CommandError(f"{option} needs a path for a .tif OUTPUT, e.g. {option} {option[2:]}.tif")
