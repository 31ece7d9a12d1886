"""``socseg evaluate``: score a logged model on a labelled volume, as the pipeline scores it.

MLflow and the scoring code (Keras) are imported inside the command: ``socseg --help`` and every
other command start without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from socseg.commands.options import param_option, params_file_option
from socseg.data.stacks import labelled_volume
from socseg.data.volumes import load_volume, parse_phase_map, volume_dir
from socseg.params import load_params, typed


@click.command("evaluate")
@click.argument("model_uri")
@click.argument("volume")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (confusion matrix included).")
@click.option("--labels", "labels_path", default=None, metavar="LABELS",
              help="VOLUME is then a grey stack (TIFF, folder, scan.h5:/path, .zarr) and LABELS its label stack (same forms).")
@click.option("--phase-map", default=None, help="With --labels: label value -> phase, e.g. 0=pore,128=ysz,255=ni "
              "[default: recorded in LABELS, else params: data.phase_map].")
@click.option("--slices", default=None, metavar="START:STOP", help="Score only these slices, e.g. 162:200.")
@param_option("train", "task", help="Default: the model's (a phases model can also be scored on ni).")
@click.option("--tta/--no-tta", default=None, help="8-fold flip/rotation test-time augmentation [default: the model's setting].")
@param_option("data", "dir", "--data-dir", "data_dir", help="Where VOLUME is looked up when it is a name.")
@click.option("--tracking-uri", help="Where models:/ and runs:/ URIs resolve [$MLFLOW_TRACKING_URI, params: mlflow.tracking_uri].")
@params_file_option
def evaluate(model_uri: str, volume: str, as_json: bool, labels_path: str | None, phase_map: str | None, slices: str | None,
             task: str | None, tta: bool | None, data_dir: str | None, tracking_uri: str | None, params_file: str | None) -> None:
    """Per-class IoU/Dice, mean IoU, accuracy and Ni fraction error of MODEL_URI on VOLUME.

    MODEL_URI: e.g. runs:/<run_id>/segmenter or models:/socseg-ni@champion; several, comma-separated:
    their ensemble (probabilities averaged). VOLUME: a volume
    folder as `socseg data import` writes it, or the name of one under the data dir; or, with
    --labels, any grey stack (TIFF, folder of TIFFs, scan.h5:/entry/data/data, .zarr). The model
    predicts as it serves (sliding window, its TTA setting, 2.5D context from the whole volume),
    so the numbers are the evaluate stage's for the same slices.
    """
    import mlflow

    from socseg.inference.evaluate import evaluate_model, parse_slices
    from socseg.training.tracking import tracking_uri as resolve_tracking_uri

    params = typed(load_params(params_file))
    mlflow.set_tracking_uri(resolve_tracking_uri(params, tracking_uri))
    if labels_path:
        mapping = parse_phase_map(phase_map) if phase_map else None
        loaded = labelled_volume(volume, labels_path, mapping, params.data.phase_map)
    else:
        path = Path(volume) if Path(volume).is_dir() else volume_dir(volume, data_dir or params.data.dir)
        loaded = load_volume(path)
    z_range = parse_slices(slices, loaded.image.shape[0])
    result = evaluate_model(model_uri, loaded, task, z_range, tta)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    a, b = result["z_range"]
    click.echo(f"{model_uri} on {result['volume']} slices {a}:{b} ({result['n_slices']}), task {result['task']}"
               + (", 8x TTA" if result["tta"] else ""))
    for name in result["class_names"]:
        click.echo(f"  {name:6s} IoU {result[f'iou_{name}']:.4f}  Dice {result[f'dice_{name}']:.4f}")
    click.echo(f"  mean IoU {result['mean_iou']:.4f}  mean Dice {result['mean_dice']:.4f}  accuracy {result['accuracy']:.4f}")
    if "ni_fraction_error" in result:
        click.echo(f"  Ni fraction true {result['ni_fraction_true']:.4f}  predicted {result['ni_fraction_pred']:.4f}"
                   f"  error {result['ni_fraction_error']:.4f}")
    click.echo(f"  {result['seconds_per_slice']:.3f} s per slice (prediction)")
