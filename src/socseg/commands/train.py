"""``socseg train``: one MLflow-tracked training run (every option overrides params.yaml).

The training stack (Keras, MLflow) and pandas are imported inside the command, so that
``socseg --help`` and the other commands start without them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from socseg.commands.options import blankable, load_with, param_option, params_file_option, section_options
from socseg.params import TrainParams

TRAIN_OPTIONS = [f.name for f in dataclasses.fields(TrainParams)]


@click.command()
@click.option("--volume", "volumes", multiple=True, help="Labelled volume name under the data dir (repeatable). Default: data.volumes.")
@section_options("train", TRAIN_OPTIONS)
@param_option("tiles", "size", "--tile-size", "tile_size")
@param_option("tiles", "steps_per_epoch")
@param_option("data", "dir", "--data-dir", "data_dir")
@params_file_option
@click.option("--run-name", type=blankable(str), help="MLflow run name.")
@click.option("--metrics-out", type=click.Path(dir_okay=False), help="Also write the final metrics as JSON here.")
@click.option("--history-out", type=click.Path(dir_okay=False), help="Also write the per-epoch curves as CSV here.")
def train(volumes, params_file, run_name, metrics_out, history_out, data_dir, tile_size, steps_per_epoch, **train_options) -> None:
    """Train one U-Net on labelled volumes and log it to MLflow."""
    from socseg.training.train import train as run_training

    params = load_with(params_file, train=train_options, tiles=dict(size=tile_size, steps_per_epoch=steps_per_epoch),
                       data=dict(dir=data_dir))
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
