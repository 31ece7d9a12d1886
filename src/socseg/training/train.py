"""``socseg train``'s run: volumes -> slab split -> normalisation -> U-Net -> MLflow.

Used by ``socseg train`` and the ``train`` MLproject entry point, and (with a trial's params,
``nested=True`` and a pruning callback) by the hyperparameter search. The run itself (seed, crops,
compile, tags, fit, keep the best epoch, log the model) is :class:`socseg.training.trainer.TrainingRun`;
:class:`TrainRun` supplies its data (labelled volumes split into slabs), a new U-Net, validation
every epoch and the final validation and test scores.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import keras
import matplotlib.pyplot as plt
import mlflow

from socseg.analysis.plots import slab_overlay_figure
from socseg.data.dataset import Augmentation
from socseg.data.prepare import PreparedData, Slab, load_labelled_volumes, prepare_data
from socseg.data.split import check_split_context
from socseg.inference.evaluate import TPB_ERROR, Evaluation, has_tpb, score_slabs, tpb_error
from socseg.inference.request import InferenceOptions
from socseg.inference.predictor import ModelConfig, Predictor
from socseg.model.export import export_model
from socseg.model.precision import resolve_precision
from socseg.model.unet import build_model
from socseg.params import Params, TrainParams, typed
from socseg.training import tracking
from socseg.training.runtime import set_precision
from socseg.training.trainer import Phase, RunData, Schedule, TrainingRun, TrainResult

# Validation after every epoch scores the whole validation slabs through the predictor users get,
# one pass per z-slice without TTA or multi-axis fusion: the cheapest inference, whatever the served
# settings, for the epoch-to-epoch comparison that early stopping and the search need. Final scores
# use the served settings.
VALIDATION_INFERENCE = InferenceOptions(window="whole_slice", tta=False, planes="z")


class SlabValidation(keras.callbacks.Callback):
    """Adds ``val_<score>`` for the whole validation slabs to the epoch logs.

    The scores come from :func:`socseg.inference.evaluate.score_slabs` with the predictor of the
    exported model (which shares the training network's weights), so early stopping optimises
    what the evaluate stage reports, with :data:`VALIDATION_INFERENCE`. A per_volume model's volume
    grey ranges do not change between epochs: ``grey_ranges`` (volume name -> range, what
    :meth:`PreparedData.grey_ranges` estimated once) are used every epoch.
    """

    def __init__(self, predictor: Predictor, slabs: Sequence[Slab],
                 grey_ranges: Mapping[str, tuple[float, float]] | None = None):
        super().__init__()
        self.predictor, self.slabs, self.grey_ranges = predictor, slabs, grey_ranges

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        scores = score_slabs(self.predictor, self.slabs, grey_ranges=self.grey_ranges, options=VALIDATION_INFERENCE).scores
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in scores.items() if k.startswith(("iou", "mean_iou", "mean_dice"))})


def train(
    params: Mapping | Params,
    volume_names: Sequence[str] | None = None,
    run_name: str | None = None,
    nested: bool = False,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    log_model: bool = True,
    evaluate_test: bool = True,
    tags: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train one U-Net with ``params`` and track everything in one MLflow run.

    ``evaluate_test=False`` is for search trials: the test slab must not influence selection, so
    trials never even compute it. A callback in ``extra_callbacks`` with ``pruned = True`` after
    fitting (the Optuna pruner) marks the run pruned: no final evaluation, no model.
    """
    p = typed(params)
    check_split_context(p.split, p.train.context_slices)  # before anything is loaded, trained or logged
    precision = resolve_precision(p.train.precision)
    run = TrainRun(p, list(volume_names or p.data.volumes), precision, evaluate_test=evaluate_test, tags=tags,
                   run_name=run_name, nested=nested, extra_callbacks=extra_callbacks, log_model=log_model)
    set_precision(precision)  # the global Keras policy the new U-Net is built under
    try:
        return run.run()
    finally:
        set_precision("float32")


class TrainRun(TrainingRun):
    """The run of :func:`train`: the configured volumes split into slabs, a new U-Net."""

    def __init__(self, params: Params, volume_names: list[str], precision: str, evaluate_test: bool = True,
                 tags: Mapping[str, str] | None = None, **run_options: Any):
        super().__init__(params, train_schedule(params), **run_options)
        self.volume_names, self.precision = volume_names, precision
        self.evaluate_test, self.tags = evaluate_test, dict(tags or {})
        self.data: PreparedData | None = None  # by prepare()

    def prepare(self) -> RunData:
        p, t = self.params, self.params.train
        data = self.data = prepare_data(p, load_labelled_volumes(p, self.volume_names), t.task)
        model = build_model(
            t.encoder,
            t.task,
            n_classes=len(data.class_names),
            dropout=t.dropout,
            encoder_weights=t.encoder_weights,
            freeze_encoder=t.freeze_encoder,
            base_filters=t.base_filters,
            encoder_batchnorm=t.encoder_batchnorm,
            bn_momentum=t.bn_momentum,
            context_slices=t.context_slices,
        )
        # The served model from the start: it shares the network's layers, so validation and the
        # final scores see exactly what will be logged.
        predictor = Predictor(export_model(model, data.normaliser), model_config(data, p))
        slabs = data.slabs["train"]
        return RunData(
            network=model, predictor=predictor,
            images=[data.normalised(slab) for slab in slabs], targets=[slab.targets(t.task) for slab in slabs],
            task=t.task, n_classes=len(data.class_names), precision=self.precision, encoder=t.encoder,
            fingerprint=data.fingerprint, volumes=",".join(self.volume_names),
            data_md5_dvc=tracking.dvc_data_md5() or "none",
        )

    def validation(self, data: RunData) -> list[keras.callbacks.Callback]:
        slabs = self.data.slabs
        return [SlabValidation(data.predictor, slabs["val"] or slabs["train"], self.data.grey_ranges())]

    def run_tags(self) -> dict[str, str]:
        return self.tags

    def run_params(self, data: RunData) -> dict[str, Any]:
        p, prepared = self.params, self.data
        # Section-prefixed names ("train.epochs"): `mlflow run` already logs its own entry-point
        # parameters under the bare names, and MLflow params cannot be logged twice.
        return {
            **tracking.flat_params({"train": {**asdict(p.train), "precision": self.precision}, "tiles": asdict(p.tiles),
                                    "split": asdict(p.split), "normalise": asdict(p.normalise)}),
            "data.volumes": ",".join(self.volume_names),
            **{f"split_{name}_{subset}": f"{a}-{b}" for name, sp in prepared.splits.items()
               for subset, (a, b) in (("train", sp.train), ("val", sp.val), ("test", sp.test))},
            "normalise.low": prepared.normaliser.low,
            "normalise.high": prepared.normaliser.high,
        }

    def artifacts(self) -> dict[str, str]:
        return {"split.json": json.dumps({k: v.to_dict() for k, v in self.data.splits.items()}, indent=2),
                "normalisation.json": json.dumps(self.data.normaliser.to_dict(), indent=2)}

    def final_scores(self, data: RunData) -> dict[str, float]:
        """Validation and (unless a search trial) test scores with the served settings; the test
        slab's overlays. A 3-phase model also gets its TPB density error on the first slab of each
        (``val_micro_relerr.tpb.density``): IoU barely sees the specks that add TPB, so a search
        trial's table shows both."""
        prepared, scores = self.data, {}
        served = data.predictor.as_served()
        tpb = has_tpb(prepared.class_names)
        for subset in ("val", "test") if self.evaluate_test else ("val",):
            if prepared.slabs[subset]:
                evaluation = score_slabs(served, prepared.slabs[subset], keep_predictions=subset == "test" or tpb,
                                         grey_ranges=prepared.grey_ranges())
                scores.update({f"{subset}_{k}": v for k, v in evaluation.scores.items()})
                if tpb:
                    scores[f"{subset}_{TPB_ERROR}"] = tpb_error(evaluation, prepared.slabs[subset], prepared.task)
                if subset == "test":
                    _log_overlays(prepared, evaluation)
        return scores


def train_schedule(params: Params) -> Schedule:
    """The ``train`` and ``tiles`` settings as the trainer's schedule."""
    t, tiles = params.train, params.tiles
    return Schedule(seed=t.seed, loss=t.loss, tile_size=tiles.size, batch_size=t.batch_size,
                    steps_per_epoch=tiles.steps_per_epoch, context_slices=t.context_slices,
                    augmentation=Augmentation.from_params(tiles.augment), phases=encoder_phases(t),
                    eager_max_steps=t.eager_max_steps, max_minutes=t.max_minutes, patience=t.patience,
                    reduce_lr_patience=t.reduce_lr_patience, reduce_lr_factor=t.reduce_lr_factor)


def encoder_phases(t: TrainParams) -> tuple[Phase, ...]:
    """One phase; or, with a frozen (pretrained) encoder and ``unfreeze_after`` inside the epochs,
    the frozen encoder first, then everything at ``fine_tune_lr_factor`` times the rate."""
    unfreeze_after = t.unfreeze_after if t.freeze_encoder else 0
    if 0 < unfreeze_after < t.epochs:
        return (Phase(0, unfreeze_after, t.learning_rate),
                Phase(unfreeze_after, t.epochs, t.learning_rate * t.fine_tune_lr_factor, unfreeze_encoder=True))
    return (Phase(0, t.epochs, t.learning_rate),)


def model_config(data: PreparedData, params: Params) -> ModelConfig:
    """What the logged model records about its training (and the ``inference:`` settings it serves with)."""
    t = params.train
    return ModelConfig.from_training(
        {
            "task": data.task,
            "encoder": t.encoder,
            "class_names": data.class_names,
            "phase_map": data.phase_map,
            "normalisation": data.normalisation,  # its one encoding in the config (socseg.data.normalise)
            "tile_size": params.tiles.size,
            "context_slices": t.context_slices,
        },
        params.inference,
    )


def _log_overlays(data: PreparedData, evaluation: Evaluation) -> None:
    """Test-slab overlays (first, middle and last slice of the first test slab)."""
    slab = data.slabs["test"][0]
    fig = slab_overlay_figure(slab, slab.targets(data.task), evaluation.predictions[0], data.class_names)
    mlflow.log_figure(fig, "plots/test_overlays.png")
    plt.close(fig)
