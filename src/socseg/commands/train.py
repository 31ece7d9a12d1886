"""``socseg train``: one MLflow-tracked training run (defaults from params.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from socseg.commands.options import blankable


@click.command()
@click.option("--volume", "volumes", multiple=True, help="Labelled volume name under the data dir (repeatable). Default: data.volumes.")
@click.option("--encoder", type=blankable(click.Choice(["vgg16", "resnet50", "unet"])), help="U-Net encoder.")
@click.option("--task", type=blankable(click.Choice(["ni", "phases"])), help="ni: Ni vs rest; phases: pore/YSZ/Ni.")
@click.option("--epochs", type=blankable(int))
@click.option("--batch-size", type=blankable(int))
@click.option("--learning-rate", "--lr", "learning_rate", type=blankable(float))
@click.option("--dropout", type=blankable(float))
@click.option("--loss", type=blankable(click.Choice(["ce", "dice", "ce_dice", "focal"])))
@click.option("--precision", type=blankable(click.Choice(["auto", "float32", "mixed_bfloat16", "mixed_float16"])))
@click.option("--encoder-weights", type=blankable(str), help="imagenet | none | path to a local weights file.")
@click.option("--encoder-batchnorm", type=blankable(click.Choice(["auto", "true", "false"])),
              help="BatchNorm in the VGG16 encoder (auto: only when training from scratch).")
@click.option("--freeze-encoder", type=blankable(str), help="true/false.")
@click.option("--unfreeze-after", type=blankable(int), help="With --freeze-encoder true: unfreeze after N epochs.")
@click.option("--base-filters", type=blankable(int), help="From-scratch U-Net width.")
@click.option("--context-slices", type=blankable(int),
              help="2.5D: neighbouring slices on each side fed as extra channels (0: 2-D).")
@click.option("--patience", type=blankable(int), help="Early-stopping patience (epochs) on validation mean IoU.")
@click.option("--reduce-lr-patience", type=blankable(int),
              help="Halve the learning rate after N epochs without validation gain (0: constant).")
@click.option("--seed", type=blankable(int))
@click.option("--tile-size", type=blankable(int), help="Crop/tile edge in pixels (multiple of 32).")
@click.option("--steps-per-epoch", type=blankable(int))
@click.option("--data-dir", type=blankable(click.Path(file_okay=False)), help="Default: data.dir.")
@click.option("--params", "params_file", type=click.Path(dir_okay=False, exists=True), help="params.yaml to read.")
@click.option("--run-name", type=blankable(str), help="MLflow run name.")
@click.option("--metrics-out", type=click.Path(dir_okay=False), help="Also write the final metrics as JSON here.")
@click.option("--history-out", type=click.Path(dir_okay=False), help="Also write the per-epoch curves as CSV here.")
def train(volumes, params_file, run_name, metrics_out, history_out, data_dir, tile_size, steps_per_epoch, **train_options) -> None:
    """Train one U-Net on labelled volumes and log it to MLflow."""
    from socseg.params import load_params, override
    from socseg.training.train import train as run_training

    params = load_params(params_file)
    params = override(params, "train", **train_options)
    params = override(params, "tiles", size=tile_size, steps_per_epoch=steps_per_epoch)
    params = override(params, "data", dir=data_dir)
    volume_names = [v for v in volumes if v.strip()] or None
    result = run_training(params, volume_names=volume_names, run_name=run_name)
    summary = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("test_") or k == "val_mean_iou"}
    click.echo(f"run {result.run_id}: model {result.model_uri}")
    click.echo(json.dumps(summary, indent=2))
    if metrics_out:
        path = Path(metrics_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run_id": result.run_id, **result.metrics}, indent=2, sort_keys=True))
    if history_out:
        import pandas as pd

        frame = pd.DataFrame(result.history)
        frame.insert(0, "epoch", range(len(frame)))
        Path(history_out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(history_out, index=False)
