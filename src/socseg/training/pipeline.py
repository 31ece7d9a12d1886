"""The DVC stages after the data: prepare -> search -> evaluate -> register.

Each stage reads params.yaml and the previous stage's small JSON output, so ``dvc repro`` knows
what to rerun. The test slab is touched only here, after the search has chosen on validation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np

from socseg.training import tracking
from socseg.data.context import halo as context_halo
from socseg.inference.evaluate import segmentation_scores
from socseg.model.metrics import confusion_matrix
from socseg.data.split import split_from_params
from socseg.data.tasks import task_class_names, task_targets
from socseg.training.train import data_fingerprint, load_labelled_volumes, prepare_data
from socseg.data.volumes import label_lut


def _write_json(data: Mapping, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    return json.loads(path.read_text())


def prepare(params: Mapping, out: str | Path) -> dict:
    """Record each volume's slab split, the training-slab normalisation and the data fingerprint.

    Training recomputes the same (deterministic) split and normalisation; this file is what DVC
    tracks, so changing the data or the split/normalise params reruns everything downstream.
    """
    volumes = load_labelled_volumes(params, params["data"]["volumes"])
    data = prepare_data(params, volumes, params["train"]["task"])
    summary = {
        "volumes": {
            name: {"shape": list(v.image.shape), **split.to_dict()}
            for v, (name, split) in zip(volumes, data.splits.items())
        },
        "normalisation": data.normaliser.to_dict(),
        "class_names": data.class_names,
        "phase_map": {str(k): v for k, v in data.phase_map.items()},
        "data_fingerprint": data.fingerprint,
    }
    _write_json(summary, out)
    return summary


class SegmenterPredictor:
    """The registered pyfunc segmenter, scored exactly as it serves: whole slices in, labels out."""

    def __init__(self, model_uri: str):
        self.model = mlflow.pyfunc.load_model(model_uri)
        config = getattr(self.model.unwrap_python_model(), "config", None)
        if config is None:
            raise ValueError(f"{model_uri} is not a socseg segmenter (pyfunc 'segmenter' logged by socseg train)")
        self.task = config.task
        self.class_names = list(config.class_names)
        # Label values the segmenter returns -> task class indices (ni task: 0 rest, 1 ni).
        self._lut = label_lut(config.label_phase_map)
        self.halo = int(config.context_slices)

    def predict_classes(self, images: np.ndarray, slices_per_call: int = 8) -> np.ndarray:
        """Class indices for a stack of adjacent slices, sent in chunks (with 2.5D halo, as a client would)."""
        out = np.empty(images.shape, dtype=np.uint8)
        n = len(images)
        for start in range(0, n, slices_per_call):
            stop = min(start + slices_per_call, n)
            before, after = context_halo(start, stop, n, self.halo)
            params = {"halo_before": before, "halo_after": after} if self.halo else None
            labels = self.model.predict(np.asarray(images[start - before : stop + after]), params=params)
            out[start:stop] = self._lut[np.asarray(labels)]
        return out


def load_predictor(model_uri: str) -> SegmenterPredictor:
    return SegmenterPredictor(model_uri)


def score_on_test_slabs(model_uri: str, params: Mapping) -> tuple[dict[str, float], dict[str, Any]]:
    """Scores of a logged/registered model on the test slabs of the configured volumes.

    Uses the same metric code as training and feeds raw grey values: the model carries its own
    normalisation. Returns the scores and the pieces needed for pictures.
    """
    predictor = load_predictor(model_uri)
    task = predictor.task
    volumes = load_labelled_volumes(params, params["data"]["volumes"])
    phase_names = volumes[0].class_names
    class_names = task_class_names(task, phase_names)
    cm = np.zeros((len(class_names),) * 2, dtype=np.int64)
    examples = None
    for volume in volumes:
        name = volume.meta.name
        start, stop = split_from_params(volume.image.shape[0], params["split"]).test
        if stop <= start:
            continue
        truth = task_targets(volume.class_index(slice(start, stop)), task, phase_names)
        predicted = predictor.predict_classes(volume.image[start:stop])
        cm += confusion_matrix(truth, predicted, len(class_names))
        if examples is None:
            examples = {"volume": name, "z0": start, "image": volume.image[start:stop],
                        "truth": truth, "predicted": predicted}
    if examples is None:
        raise ValueError("the split leaves no test slices: set split.test > 0")
    scores = segmentation_scores(cm, class_names)  # + Ni volume fraction error
    return scores, {"confusion": cm, "class_names": class_names, "examples": examples}


def microstructure_comparison(examples: Mapping[str, Any], class_names: list[str]) -> dict[str, float]:
    """Microstructure numbers of the predicted test slab beside those of its labels.

    An IoU of 0.97 can still bias TPB density or percolation; these are what a study publishes.
    Keys: ``micro_pred.<metric>``, ``micro_true.<metric>``, ``micro_relerr.<metric>`` (voxel units).
    """
    from socseg.analysis.microstructure import flatten_metrics, measure, relative_errors

    phase_map = dict(enumerate(class_names))
    predicted = flatten_metrics(measure(examples["predicted"], phase_map))
    true = flatten_metrics(measure(examples["truth"], phase_map))
    finite = lambda d: {k: v for k, v in d.items() if np.isfinite(v)}  # noqa: E731  (JSON has no NaN)
    predicted, true = finite(predicted), finite(true)
    return {
        **{f"micro_pred.{k}": v for k, v in predicted.items()},
        **{f"micro_true.{k}": v for k, v in true.items()},
        **{f"micro_relerr.{k}": v for k, v in finite(relative_errors(predicted, true)).items()},
    }


def evaluate_best(params: Mapping, search_json: str | Path, out: str | Path) -> dict:
    """Evaluate the search's best trial on the TEST slabs; log to the search's parent run; write metrics.json."""
    from socseg.analysis.plots import confusion_figure, overlay_figure

    search = read_json(search_json)
    model_uri = search["best_segmenter_uri"]
    tracking.configure_tracking(params)
    scores, extra = score_on_test_slabs(model_uri, params)
    metrics = {f"test_{k}": v for k, v in scores.items()}
    metrics.update(microstructure_comparison(extra["examples"], extra["class_names"]))
    with mlflow.start_run(run_id=search["parent_run_id"]):
        mlflow.log_metrics(metrics)
        fig = confusion_figure(extra["confusion"], extra["class_names"])
        mlflow.log_figure(fig, "evaluate/test_confusion.png")
        ex = extra["examples"]
        picks = sorted({0, len(ex["image"]) // 2, len(ex["image"]) - 1})
        fig2 = overlay_figure([ex["image"][k] for k in picks], [ex["truth"][k] for k in picks],
                              [ex["predicted"][k] for k in picks], extra["class_names"],
                              titles=[f"{ex['volume']} z={ex['z0'] + k}" for k in picks])
        mlflow.log_figure(fig2, "evaluate/test_overlays.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
        plt.close(fig2)
    result = {**metrics, "model_uri": model_uri, "best_trial": search["best_trial"],
              "best_run_id": search["best_run_id"], "study_name": search["study_name"],
              "confusion_matrix": extra["confusion"].tolist(), "class_names": extra["class_names"]}
    _write_json(result, out)
    return result


def logged_model_meta(model_uri: str) -> dict[str, Any]:
    """The socseg record stored with a logged segmenter (task, encoder, class names, ...): what a
    registered version is tagged with, read from the model, not from today's params.yaml."""
    info = mlflow.models.get_model_info(model_uri)
    record = (info.metadata or {}).get("socseg")
    if not record:
        raise ValueError(f"{model_uri} is not a socseg segmenter (no 'socseg' metadata in its MLmodel)")
    record = dict(record)
    if not record.get("encoder") and info.run_id:  # logged before the encoder was recorded in the model
        record["encoder"] = mlflow.get_run(info.run_id).data.tags.get("encoder", "")
    return record


def registered_model_name(template: str, task: str) -> str:
    """``registry.model_name`` with ``{task}`` filled in: one registered model per task by default."""
    try:
        return str(template).format(task=task)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"registry.model_name {template!r}: the only placeholder is {{task}} ({error})") from None


def register(params: Mapping, search_json: str | Path, metrics_json: str | Path, out: str | Path) -> dict:
    """Register the evaluated model and move the aliases (see :mod:`socseg.training.registry`)."""
    from socseg.training.registry import register_and_promote

    search = read_json(search_json)
    metrics = read_json(metrics_json)
    metric = params["registry"]["metric"]
    tracking.configure_tracking(params)
    meta = logged_model_meta(metrics["model_uri"])
    promotion = register_and_promote(
        metrics["model_uri"],
        registered_model_name(params["registry"]["model_name"], meta["task"]),
        score=float(metrics[metric]),
        evaluate=lambda uri: score_on_test_slabs(uri, params)[0][metric.removeprefix("test_")],
        metric=metric,
        run_id=search["best_run_id"],
        tags={
            "data_md5_dvc": tracking.dvc_data_md5() or "none",
            "data_fingerprint": data_fingerprint(params),
            "git_commit": tracking.git_commit() or "none",
            "encoder": meta.get("encoder") or "unknown",
            "task": meta["task"],
            "study_name": search["study_name"],
            "run_id": search["best_run_id"],
            **{k: f"{v:.6f}" for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)},
        },
    )
    _write_json(promotion.to_dict(), out)
    return promotion.to_dict()
