"""``socseg evaluate``: score a logged model on a labelled volume with the training metric code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click


@click.command("evaluate")
@click.argument("model_uri")
@click.argument("volume")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (confusion matrix included).")
@click.option("--slices", default=None, metavar="START:STOP", help="Score only these slices, e.g. 162:200.")
@click.option("--task", type=click.Choice(["ni", "phases"]), default=None, help="Default: the model's (a phases model can be scored on ni).")
@click.option("--tta", is_flag=True, help="Average over the 8 flips/rotations of each tile (8x slower).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--data-dir", default=None, help="Where VOLUME is looked up when it is a name [params: data.dir].")
def evaluate(model_uri: str, volume: str, as_json: bool, slices: str | None, task: str | None, tta: bool,
             batch_size: int, data_dir: str | None) -> None:
    """Per-class IoU/Dice, mean IoU, accuracy and Ni fraction error of MODEL_URI on VOLUME.

    MODEL_URI: e.g. runs:/<run_id>/model or models:/<name>/<version>. VOLUME: a volume folder as
    `socseg data import` writes it, or the name of one under the data dir.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from socseg.commands.data import DataError
    from socseg.params import load_params
    from socseg.inference.evaluate import evaluate_segmenter, load_segmenter, parse_slices
    from socseg.data.volumes import VolumeError, load_volume, volume_dir

    params = load_params()
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or params.get("mlflow", {}).get("tracking_uri", "sqlite:///mlflow.db"))
    try:
        path = Path(volume) if Path(volume).is_dir() else volume_dir(volume, data_dir or params.get("data", {}).get("dir", "data"))
        loaded = load_volume(path)
        z_range = parse_slices(slices, loaded.image.shape[0])
        segmenter = load_segmenter(model_uri)
        result = {"model_uri": model_uri, **evaluate_segmenter(segmenter, loaded, task, z_range, batch_size, tta)}
    except (VolumeError, ValueError, OSError, MlflowException) as exc:
        raise DataError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    a, b = result["z_range"]
    click.echo(f"{model_uri} on {result['volume']} slices {a}:{b} ({result['n_slices']}), task {result['task']}"
               + (", 8x TTA" if tta else ""))
    for name in result["class_names"]:
        click.echo(f"  {name:6s} IoU {result[f'iou_{name}']:.4f}  Dice {result[f'dice_{name}']:.4f}")
    click.echo(f"  mean IoU {result['mean_iou']:.4f}  mean Dice {result['mean_dice']:.4f}  accuracy {result['accuracy']:.4f}")
    if "ni_fraction_error" in result:
        click.echo(f"  Ni fraction true {result['ni_fraction_true']:.4f}  predicted {result['ni_fraction_pred']:.4f}"
                   f"  error {result['ni_fraction_error']:.4f}")
    click.echo(f"  {result['seconds_per_slice']:.3f} s per slice (prediction)")
