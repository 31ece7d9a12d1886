"""The pipeline's stage commands ``search``, ``evaluate-best`` and ``register``, and ``prepare``,
which writes the split and normalisation they compute for a look before a long search.

MLflow and the training and scoring code (Keras, Optuna) are imported inside the commands: ``socseg
--help`` and every other command start without them.
"""

from __future__ import annotations

import json
import shutil

import click

from socseg.commands.options import load_with, param_option, params_file_option
from socseg.data.prepare import prepare as run_prepare
from socseg.params import ENCODERS

_OUTPUTS = "outputs"


@click.command()
@param_option("train", "encoder", choices=(*ENCODERS, "all"),
              help="Search one encoder, or 'all' to search search.encoders.")
@param_option("train", "task")
@param_option("search", "n_trials")
@param_option("search", "timeout")
@param_option("train", "epochs", help="Epochs per trial.")
@param_option("tiles", "steps_per_epoch")
@param_option("tiles", "size", "--tile-size", "tile_size")
@param_option("train", "precision")
@param_option("train", "encoder_weights",
              help="imagenet | none | path to a local weights file (freezing is searched only with pretrained weights).")
@param_option("search", "study_name",
              help="Default: derived from task, encoder, data and search settings (same inputs resume the same "
                   "study). An explicit name resumes that study if it was made for the same task, encoder and "
                   "data, and stops otherwise.")
@param_option("search", "storage")
@param_option("data", "dir", "--data-dir", "data_dir")
@params_file_option
@click.option("--out", default=f"{_OUTPUTS}/search.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--history-out", type=click.Path(dir_okay=False), help="Copy the best trial's per-epoch curves (CSV) here.")
def search(encoder, task, n_trials, timeout, epochs, steps_per_epoch, tile_size, precision, encoder_weights, study_name,
           storage, data_dir, params_file, out, history_out) -> None:
    """Optuna search over encoder and hyperparameters; one nested MLflow run per trial."""
    from socseg.training.search import run_search, write_result

    params = load_with(params_file, train=dict(task=task, epochs=epochs, precision=precision, encoder_weights=encoder_weights),
                   tiles=dict(steps_per_epoch=steps_per_epoch, size=tile_size), data=dict(dir=data_dir))
    result = run_search(params, encoder=encoder, n_trials=n_trials, timeout=timeout,
                        study_name=study_name, storage=storage)
    write_result(result, out)
    if history_out:
        import mlflow

        shutil.copyfile(mlflow.artifacts.download_artifacts(run_id=result.best_run_id, artifact_path="training/history.csv"),
                        history_out)
    click.echo(f"study {result.study_name}: trained {result.n_trained} trial(s) now, {result.n_finished} finished "
               f"in all; best trial {result.best_trial} "
               f"({result.best_encoder}) val_mean_iou={result.best_value:.4f} -> {out}")


@click.command()
@param_option("train", "task")
@param_option("data", "dir", "--data-dir", "data_dir")
@params_file_option
@click.option("--out", default=f"{_OUTPUTS}/prepare.json", show_default=True, type=click.Path(dir_okay=False))
def prepare(task, data_dir, params_file, out) -> None:
    """Write the slab splits, normalisation and data fingerprint that training computes, to inspect them."""
    summary = run_prepare(load_with(params_file, data=dict(dir=data_dir), train=dict(task=task)), out)
    click.echo(f"prepared {len(summary['volumes'])} volume(s), fingerprint {summary['data_fingerprint'][:12]} -> {out}")


@click.command("evaluate-best")
@click.option("--search", "search_json", default=f"{_OUTPUTS}/search.json", show_default=True)
@param_option("data", "dir", "--data-dir", "data_dir")
@params_file_option
@click.option("--out", default="metrics.json", show_default=True, type=click.Path(dir_okay=False))
def evaluate_best(search_json, data_dir, params_file, out) -> None:
    """Evaluate the search's best model on the held-out TEST slabs; write metrics.json."""
    from socseg.training.pipeline import evaluate_best as run_evaluate

    result = run_evaluate(load_with(params_file, data=dict(dir=data_dir)), search_json, out)
    click.echo(json.dumps({k: round(v, 4) for k, v in result.items() if k.startswith("test_")}, indent=2))


@click.command()
@click.option("--search", "search_json", default=f"{_OUTPUTS}/search.json", show_default=True)
@click.option("--metrics", "metrics_json", default="metrics.json", show_default=True)
@param_option("registry", "model_name")
@param_option("registry", "promotion_lock")
@param_option("search", "storage", help="Optuna storage URL: a PostgreSQL one also holds the promotion lock "
              "(registry.promotion_lock auto)")
@param_option("data", "dir", "--data-dir", "data_dir")
@params_file_option
@click.option("--out", default=f"{_OUTPUTS}/registered.json", show_default=True, type=click.Path(dir_okay=False))
def register(search_json, metrics_json, model_name, promotion_lock, storage, data_dir, params_file, out) -> None:
    """Register the evaluated model; alias challenger, and champion if not worse than the current one
    (one promotion of a model at a time: registry.promotion_lock)."""
    from socseg.training.pipeline import register as run_register

    params = load_with(params_file, data=dict(dir=data_dir), search=dict(storage=storage),
                       registry=dict(model_name=model_name, promotion_lock=promotion_lock))
    promotion = run_register(params, search_json, metrics_json, out)
    if promotion["already_registered"]:
        verdict = "was already registered from this run" + (" and is champion" if promotion["promoted"] else "")
    elif promotion["promoted"]:
        verdict = "is the new champion"
    else:
        verdict = "stays challenger (champion is better)"
    click.echo(f"{promotion['name']} v{promotion['version']} ({promotion['score']:.4f}) {verdict}")
