"""``socseg stats``: a volume's grey range, as a per_volume model maps it (and the ``--grey-range`` option).

MLflow and the model-reading code (Keras) are imported only when ``--model`` is given: ``socseg
--help`` and every other command start without them.
"""

from __future__ import annotations

import json

import click

from socseg.commands.options import CommandError
from socseg.data.normalise import GreyRangeEstimateError, parse_grey_range, sampled_grey_range
from socseg.data.stacks import SliceReader
from socseg.data.volumes import VolumeError
from socseg.params import load_params, typed


def _grey_range(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, float] | None:
    if value is None or not str(value).strip():
        return None
    try:
        return parse_grey_range(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


grey_range_option = click.option(
    "--grey-range", "grey_range", callback=_grey_range, metavar="LOW,HIGH",
    help="The input's grey values mapped onto the model's normalisation range (e.g. from `socseg stats INPUT "
         "--model URI`) [default: a per_volume model estimates the whole input's; a fixed model takes raw values].",
)


@click.command()
@click.argument("input_path", metavar="INPUT")
@click.option("--model", "model_uri", default=None, help="Use this model's normalisation percentiles (read from its MLmodel).")
@click.option("--percentiles", default=None, metavar="LOW,HIGH",
              help="Percentiles to estimate, e.g. 0.5,99.5 [params: normalise.low_percentile, normalise.high_percentile].")
@click.option("--tracking-uri", help="Where models:/ and runs:/ URIs resolve [$MLFLOW_TRACKING_URI, params: mlflow.tracking_uri].")
def stats(input_path: str, model_uri: str | None, percentiles: str | None, tracking_uri: str | None) -> None:
    """Print INPUT's grey range as JSON: {low, high, low_percentile, high_percentile, source, n_sampled}.

    The range a per_volume model maps to 0..1, estimated as `socseg segment` and the REST client
    do (evenly spaced slices, a fixed random pixel subset, NaN ignored); pass it on with
    `--grey-range LOW,HIGH` or the request params grey_low / grey_high when a volume is sent in
    pieces. INPUT: any volume `socseg segment` reads.
    """
    if model_uri and percentiles:
        raise CommandError("give --model or --percentiles, not both")
    try:
        if model_uri:
            import mlflow

            from socseg.inference.pyfunc import model_config
            from socseg.training.tracking import tracking_uri as resolve_tracking_uri

            mlflow.set_tracking_uri(resolve_tracking_uri(typed(load_params()), tracking_uri))
            low_p, high_p = model_config(model_uri).normalisation.percentiles
        elif percentiles:
            parts = percentiles.split(",")
            try:
                low_p, high_p = (float(v) for v in parts)
            except ValueError:
                raise CommandError(f"--percentiles {percentiles!r}: expected LOW,HIGH, e.g. 0.5,99.5") from None
            if not 0.0 <= low_p < high_p <= 100.0:
                raise CommandError(f"--percentiles {percentiles!r}: need 0 <= LOW < HIGH <= 100")
        else:
            normalise = typed(load_params()).normalise
            low_p, high_p = normalise.low_percentile, normalise.high_percentile
        with SliceReader(input_path) as reader:
            found, n_sampled = sampled_grey_range(reader, low_p, high_p)
    except (VolumeError, GreyRangeEstimateError, OSError) as exc:
        raise CommandError(str(exc)) from None
    click.echo(json.dumps({"low": found.low, "high": found.high, "low_percentile": found.low_percentile,
                           "high_percentile": found.high_percentile, "source": str(input_path), "n_sampled": n_sampled}))
