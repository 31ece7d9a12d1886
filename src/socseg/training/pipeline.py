"""The DVC stages after the search: evaluate (test slabs) and register (the champion gate).

Each stage reads params.yaml and the previous stage's small JSON output, so ``dvc repro`` knows
what to rerun (the stage before them, ``search``, is :mod:`socseg.training.search`). The test slab is touched only here, after the search has chosen
on validation.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import mlflow
import numpy as np

from socseg.analysis.microstructure import MicrostructureResult, flatten_metrics, relative_errors
from socseg.analysis.plots import confusion_figure, slab_overlay_figure
from socseg.analysis.report import evaluation_report
from socseg.data.prepare import PreparedData, Slab, load_labelled_volumes, prepare_data, read_json, write_json
from socseg.inference.evaluate import TPB_ERROR, Evaluation, score_slabs, slab_microstructure, tpb_error
from socseg.inference.predictor import Predictor
from socseg.inference.pyfunc import model_config
from socseg.params import Params, typed
from socseg.training import tracking
from socseg.training.promotion_lock import lock_for
from socseg.training.registry import MicrostructureGuard, register_and_promote


def held_out_data(params: Mapping | Params, task: str) -> PreparedData:
    """The configured volumes, split; refused when the split leaves no held-out test slices."""
    p = typed(params)
    data = prepare_data(p, load_labelled_volumes(p), task)
    if not data.slabs["test"]:
        raise ValueError("the split leaves no test slices: set split.test > 0")
    return data


def score_on_test_slabs(model_uri: str, slabs: list[Slab], keep_predictions: bool = False) -> Evaluation:
    """The model's scores on the test slabs, as users would segment them."""
    return score_slabs(Predictor.load(model_uri), slabs, keep_predictions=keep_predictions)


def microstructure_comparison(predicted_result: MicrostructureResult, true_result: MicrostructureResult) -> dict[str, float]:
    """Microstructure numbers of the predicted test slab beside those of its labels.

    An IoU of 0.97 can still bias TPB density or percolation; these are what a study publishes.
    Keys: ``micro_pred.<metric>``, ``micro_true.<metric>``, ``micro_relerr.<metric>`` (voxel units).
    """
    predicted, true = flatten_metrics(predicted_result), flatten_metrics(true_result)
    finite = lambda d: {k: v for k, v in d.items() if np.isfinite(v)}  # noqa: E731  (JSON has no NaN)
    predicted, true = finite(predicted), finite(true)
    return {
        **{f"micro_pred.{k}": v for k, v in predicted.items()},
        **{f"micro_true.{k}": v for k, v in true.items()},
        **{f"micro_relerr.{k}": v for k, v in finite(relative_errors(predicted, true)).items()},
    }


def evaluate_best(params: Mapping | Params, search_json: str | Path, out: str | Path) -> dict:
    """Evaluate the search's best trial on the TEST slabs; log to the search's parent run; write metrics.json."""
    search = read_json(search_json)
    model_uri = search["best_model_uri"]
    tracking.configure_tracking(params)
    task = model_config(model_uri).task
    slabs = held_out_data(params, task).slabs["test"]
    evaluation = score_on_test_slabs(model_uri, slabs, keep_predictions=True)
    slab, predicted = slabs[0], evaluation.predictions[0]
    truth = slab.targets(task)
    metrics = {f"test_{k}": v for k, v in evaluation.scores.items()}
    predicted_result, true_result = slab_microstructure(evaluation, slabs, task)
    metrics.update(microstructure_comparison(predicted_result, true_result))
    with mlflow.start_run(run_id=search["parent_run_id"]):
        mlflow.log_metrics(metrics)
        fig = confusion_figure(evaluation.confusion, evaluation.class_names)
        mlflow.log_figure(fig, "evaluate/test_confusion.png")
        fig2 = slab_overlay_figure(slab, truth, predicted, evaluation.class_names)
        mlflow.log_figure(fig2, "evaluate/test_overlays.png")
        plt.close(fig)
        plt.close(fig2)
        start, stop = slab.z_range
        mlflow.log_text(evaluation_report(slab.volume.image[start:stop], predicted, truth, evaluation.class_names,
                                          predicted_result, true_result, model_uri=model_uri,
                                          slab=f"{slab.name}, slices {start}:{stop}"), "evaluate/test_report.html")
    result = {**metrics, "model_uri": model_uri, "best_trial": search["best_trial"],
              "best_run_id": search["best_run_id"], "study_name": search["study_name"],
              "confusion_matrix": evaluation.confusion.tolist(), "class_names": evaluation.class_names}
    write_json(result, out)
    return result


def logged_model_encoder(model_uri: str) -> str:
    """The encoder a logged segmenter was trained with: read from the model, not from today's
    params.yaml (models logged before it was recorded there: from their run's tags)."""
    encoder = model_config(model_uri).encoder
    if not encoder:  # compatibility, removed in 0.2.0 (CHANGELOG.md, "Deprecated"): the run-tag fallback
        run_id = mlflow.models.get_model_info(model_uri).run_id
        encoder = mlflow.get_run(run_id).data.tags.get("encoder", "") if run_id else ""
    return encoder or "unknown"


def registered_model_name(template: str, task: str) -> str:
    """``registry.model_name`` with ``{task}`` filled in: one registered model per task by default."""
    try:
        return str(template).format(task=task)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"registry.model_name {template!r}: the only placeholder is {{task}} ({error})") from None


def register(params: Mapping | Params, search_json: str | Path, metrics_json: str | Path, out: str | Path) -> dict:
    """Register the evaluated model and move the aliases (see :mod:`socseg.training.registry`)."""
    p = typed(params)
    search = read_json(search_json)
    metrics = read_json(metrics_json)
    metric = p.registry.metric
    tracking.configure_tracking(p)
    model_uri = metrics["model_uri"]
    task = model_config(model_uri).task
    data = held_out_data(p, task)  # loaded once: the champion is re-scored on the same slices
    slabs = data.slabs["test"]
    guarded = p.registry.tpb_tolerance is not None and TPB_ERROR in metrics  # 3-phase models
    # the champion's one evaluation serves the score and the guard
    evaluated = lru_cache(maxsize=1)(lambda uri: score_on_test_slabs(uri, slabs, keep_predictions=guarded))

    def champion_tpb_error(uri: str) -> float:
        error = tpb_error(evaluated(uri), slabs, task)
        return abs(error) if np.isfinite(error) else np.inf

    guard = MicrostructureGuard("TPB density", "test_tpb_abs_relerr", abs(float(metrics[TPB_ERROR])),
                                float(p.registry.tpb_tolerance), champion_tpb_error) if guarded else None
    promotion = register_and_promote(
        model_uri,
        registered_model_name(p.registry.model_name, task),
        score=float(metrics[metric]),
        evaluate=lambda uri: evaluated(uri).scores[metric.removeprefix("test_")],
        guard=guard,
        lock=lock_for(p, mlflow.get_tracking_uri()),
        metric=metric,
        run_id=search["best_run_id"],
        tags={
            "data_md5_dvc": tracking.dvc_data_md5() or "none",
            "data_fingerprint": data.fingerprint,
            "git_commit": tracking.git_commit() or "none",
            "encoder": logged_model_encoder(model_uri),
            "task": task,
            "study_name": search["study_name"],
            "run_id": search["best_run_id"],
            **{k: f"{v:.6f}" for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)},
        },
    )
    write_json(promotion.to_dict(), out)
    return promotion.to_dict()
