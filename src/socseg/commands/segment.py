"""``socseg segment``: whole-volume segmentation with a logged pyfunc segmenter, no server."""

from __future__ import annotations

import click

from socseg.commands.options import CommandError, param_option


@click.command()
@click.argument("model_uri")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT (never INPUT).")
@param_option("inference", "slice_batch")
@click.option("--tta/--no-tta", default=None, help="8-fold flip/rotation test-time augmentation [default: the model's setting].")
@click.option(
    "--step-fraction", type=click.FloatRange(0.0, 1.0, min_open=True), help="Tile step / tile size [default: the model's]."
)
@click.option("--multi-axis", is_flag=True, help="Average predictions along z, y and x (holds the volume in memory).")
@click.option(
    "--allow-out-of-range",
    is_flag=True,
    help="Segment even when most grey values lie outside the model's training range (refused by default).",
)
@click.option("--tracking-uri", help="Where models:/ and runs:/ URIs resolve [$MLFLOW_TRACKING_URI, params: mlflow.tracking_uri].")
def segment(
    model_uri, input_path, output, overwrite, slice_batch, tta, step_fraction, multi_axis, allow_out_of_range, tracking_uri
) -> None:
    """Segment INPUT (multi-page TIFF, folder of slice TIFFs or volume directory) with MODEL_URI
    (e.g. models:/socseg-ni@champion, runs:/<id>/segmenter) into the label stack OUTPUT (.tif)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from socseg.data.volumes import VolumeError
    from socseg.inference.predictor import GreyRangeError
    from socseg.inference.segment import segment as run_segment
    from socseg.params import load_params, typed
    from socseg.training.tracking import tracking_uri as resolve_tracking_uri

    try:
        params = typed(load_params())
        mlflow.set_tracking_uri(resolve_tracking_uri(params, tracking_uri))
        result = run_segment(
            model_uri,
            input_path,
            output,
            overwrite=overwrite,
            slice_batch=slice_batch or params.inference.slice_batch,
            tta=tta,
            step_fraction=step_fraction,
            multi_axis=multi_axis,
            allow_out_of_range=allow_out_of_range,
        )
    except (VolumeError, GreyRangeError, OSError, MlflowException) as exc:
        raise CommandError(getattr(exc, "message", None) or str(exc)) from None
    z, h, w = result.shape
    click.echo(f"segmented {z}x{h}x{w} in {result.seconds:.1f} s ({result.slices_per_second:.2f} slices/s) -> {result.output}")
