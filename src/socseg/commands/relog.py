"""``socseg relog``: a logged model again, with this version's serving code (no retraining).

MLflow and the inference code (Keras) are imported inside the command: ``socseg --help`` and every
other command start without them.
"""

from __future__ import annotations

import click

from socseg.commands.options import params_file_option
from socseg.params import load_params, typed


@click.command("relog")
@click.argument("model_uri")
@click.option("--tracking-uri", help="Where MODEL_URI resolves and the new run goes [$MLFLOW_TRACKING_URI, params: mlflow.tracking_uri].")
@params_file_option
def relog(model_uri: str, tracking_uri: str | None, params_file: str | None) -> None:
    """Log MODEL_URI's network and settings as a new segmenter with the socseg code installed now.

    A model carries the code it was logged with, and `mlflow models serve` runs that code: a
    model logged by an older socseg answers the requests of its own version. Relogging gives it
    this version's request parameters (context_before/context_after, describe) without retraining;
    register the printed URI to serve it. The inference settings (window, step, TTA, batch, limits)
    are those of params.yaml's `inference:` section now, e.g. whole-slice passes for a model that
    was logged with the sliding window; the training record (task, classes, normalisation, tile
    size, context) is the model's own.
    """
    import mlflow

    from socseg.inference.predictor import ModelConfig, Predictor
    from socseg.inference.pyfunc import log_segmenter
    from socseg.training import tracking

    params = typed(load_params(params_file))
    mlflow.set_tracking_uri(tracking.tracking_uri(params, tracking_uri))
    predictor = Predictor.load(model_uri)  # an old pickle resolves to this version's class (socseg.pyfunc)
    tracking.configure_tracking(params)
    with mlflow.start_run(run_name=f"relog {model_uri}") as run:
        mlflow.set_tags({"relogged_from": model_uri, "task": predictor.config.task,
                         "encoder": predictor.config.encoder or "unknown", "git_commit": tracking.git_commit() or "none"})
        config = ModelConfig.from_training(predictor.config.to_dict(), params.inference)
        info = log_segmenter(predictor.network, config)
    click.echo(f"run {run.info.run_id}: model {info.model_uri} (from {model_uri})")
