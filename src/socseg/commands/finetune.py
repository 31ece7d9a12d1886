"""``socseg finetune``: train a registered model further on sparse labels of a new scan.

The training stack (Keras, MLflow) is imported inside the command, so that ``socseg --help`` and
the other commands start without it.
"""

from __future__ import annotations

import json

import click

from socseg.commands.options import CommandError, blankable, load_with, param_option, params_file_option
from socseg.data.prepare import write_json
from socseg.data.sparse import parse_slice_list
from socseg.data.volumes import VolumeError, parse_phase_map


@click.command("finetune")
@click.argument("model_uri")
@click.argument("volume")
@click.option("--labels", "labels_path", type=blankable(str), metavar="LABELS",
              help="VOLUME is then a grey stack (TIFF, folder, scan.h5:/path, .zarr) and LABELS its sparse label stack.")
@click.option("--phase-map", type=blankable(str), help="Label value -> phase, e.g. 0=pore,128=ysz,255=ni "
              "[default: recorded in LABELS or VOLUME, else params: data.phase_map].")
@param_option("finetune", "ignore_value")
@click.option("--labelled-slices", type=blankable(str), metavar="LIST",
              help="The labelled slices, e.g. 3,17,40 or 10-14; every other slice is unlabelled "
                   "[default: every slice with a pixel that is not the ignore value].")
@param_option("train", "task", help="The task the model must have (refused otherwise) [default: the model's].")
@param_option("finetune", "epochs")
@param_option("finetune", "steps_per_epoch")
@param_option("finetune", "learning_rate")
@param_option("finetune", "freeze_encoder")
@param_option("finetune", "test_fraction")
@param_option("finetune", "max_minutes")
@param_option("train", "batch_size")
@param_option("train", "loss")
@param_option("train", "seed")
@param_option("data", "dir", "--data-dir", "data_dir", help="Where VOLUME is looked up when it is a name.")
@param_option("registry", "promotion_lock")
@click.option("--no-register", is_flag=True, help="Log the run and the model only; register nothing.")
@click.option("--run-name", type=blankable(str), help="MLflow run name.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the result (scores, lineage, promotion) as JSON here.")
@params_file_option
def finetune(model_uri, volume, labels_path, phase_map, ignore_value, labelled_slices, task, epochs, steps_per_epoch,
             learning_rate, freeze_encoder, test_fraction, max_minutes, batch_size, loss, seed, data_dir, promotion_lock,
             no_register, run_name, out, params_file) -> None:
    """Fine-tune MODEL_URI on the labelled pixels of VOLUME; register it as challenger.

    MODEL_URI: e.g. models:/socseg-ni@champion. VOLUME: a socseg volume folder (or the name of one
    under the data dir) whose labels mark unlabelled pixels with the ignore value, or any grey
    stack with --labels. The model's task, classes, tile size, context and normalisation are kept.
    The last labelled slices (finetune.test_fraction) are held out: the run's test scores and the
    champion gate (the champion is scored on them too) come from them; with one labelled slice
    there is nothing to gate on and the result is challenger only.
    """
    from socseg.training.finetune import FinetuneError, finetune as run_finetune, promotion_verdict

    params = load_with(
        params_file,
        finetune=dict(ignore_value=ignore_value, epochs=epochs, steps_per_epoch=steps_per_epoch, learning_rate=learning_rate,
                      freeze_encoder=freeze_encoder, test_fraction=test_fraction, max_minutes=max_minutes),
        train=dict(batch_size=batch_size, loss=loss, seed=seed),
        data=dict(dir=data_dir),
        registry=dict(promotion_lock=promotion_lock),
    )
    try:
        result = run_finetune(
            params, model_uri, volume,
            labelled=parse_slice_list(labelled_slices),
            labels=labels_path,
            phase_map=parse_phase_map(phase_map) if phase_map else None,
            task=task,
            register=not no_register,
            run_name=run_name,
        )
    except (FinetuneError, VolumeError) as error:
        raise CommandError(" ".join(str(error).split())) from error
    click.echo(f"run {result.run_id}: model {result.model_uri} (fine-tuned from {result.lineage['socseg.lineage']}, "
               f"trained on slices {result.train_slices}, held out {result.test_slices or 'none'})")
    scores = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("test_")}
    if scores:
        click.echo(json.dumps(scores, indent=2))
    verdict = promotion_verdict(result)
    if verdict:
        click.echo(verdict)
    if out:
        write_json({"run_id": result.run_id, "model_uri": result.model_uri, "parent_model_uri": result.parent_model_uri,
                    "lineage": result.lineage, "train_slices": result.train_slices, "test_slices": result.test_slices,
                    "metrics": result.metrics, "promotion": result.promotion}, out)
