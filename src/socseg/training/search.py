"""Optuna search over encoder and hyperparameters, one nested MLflow run per trial.

The study lives in an Optuna RDB storage (SQLite by default, PostgreSQL to share it between
machines): re-running the same command resumes it, completed trials are kept, and a trial whose
process died (kill -9) is failed by the heartbeat and retried by the next worker. Trials are
selected on the *validation* slab only; the test slab is for the evaluate stage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import keras
import matplotlib.pyplot as plt
import mlflow
import optuna
from optuna.trial import TrialState
from optuna.visualization import matplotlib as optuna_plots
from sqlalchemy.engine import make_url

from socseg.data.prepare import data_fingerprint
from socseg.data.split import check_context_gap
from socseg.inference.evaluate import TPB_ERROR
from socseg.params import set_dotted, typed
from socseg.training import tracking
from socseg.training.runtime import runtime_tags
from socseg.training.study_storage import OutageTolerantStorage
from socseg.training.train import train

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OBJECTIVE = "val_mean_iou"


class OptunaPruning(keras.callbacks.Callback):
    """Report validation mean IoU each epoch; stop the fit when the pruner says so.

    Stopping (instead of raising inside ``fit``) lets the trial's MLflow run close cleanly as PRUNED.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = OBJECTIVE):
        super().__init__()
        self.trial, self.monitor, self.pruned = trial, monitor, False

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            self.pruned = True
            self.model.stop_training = True


def suggest(trial: optuna.Trial, space: Mapping[str, Mapping]) -> dict[str, Any]:
    """Sample one value per entry of the ``search.space`` section."""
    values = {}
    for name, spec in space.items():
        kind = spec["type"]
        if kind == "float":
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)))
        elif kind == "int":
            values[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)))
        elif kind == "categorical":
            values[name] = trial.suggest_categorical(name, list(spec["choices"]))
        else:
            raise ValueError(f"search space entry {name!r}: unknown type {kind!r} (float, int, categorical)")
    return values


# Sampled only where they mean something: an encoder that starts from pretrained weights can be
# frozen; freezing a randomly initialised encoder (or the from-scratch U-Net) only wastes trials.
FREEZE_KEYS = ("train.freeze_encoder", "train.unfreeze_after")


def pretrained(encoder: str, encoder_weights: str) -> bool:
    return encoder != "unet" and str(encoder_weights).strip().lower() not in ("", "none")


def trial_space(space: Mapping[str, Mapping], encoder: str, encoder_weights: str,
                freeze_encoder: bool | None = None) -> dict[str, Mapping]:
    """The part of ``search.space`` that applies to one trial.

    Without pretrained weights the freeze keys go; ``unfreeze_after`` goes too once
    ``freeze_encoder`` is known to be false.
    """
    keep = dict(space)
    if not pretrained(encoder, encoder_weights):
        for key in FREEZE_KEYS:
            keep.pop(key, None)
    elif freeze_encoder is False:
        keep.pop("train.unfreeze_after", None)
    return keep


def trial_params(params: Mapping, encoder: str, trial: optuna.Trial) -> dict:
    """The full params tree for one trial: base params + sampled values (+ encoder when searched)."""
    search = typed(params).search
    tree = copy.deepcopy(dict(params))
    if encoder == "all":
        encoder = trial.suggest_categorical("train.encoder", list(search.encoders))
    tree["train"]["encoder"] = encoder
    space = trial_space(search.space, encoder, tree["train"]["encoder_weights"])
    if "train.freeze_encoder" in space:  # sampled first: unfreeze_after only exists for a frozen encoder
        frozen = suggest(trial, {"train.freeze_encoder": space.pop("train.freeze_encoder")})
        set_dotted(tree, "train.freeze_encoder", frozen["train.freeze_encoder"])
        space = trial_space(space, encoder, tree["train"]["encoder_weights"], bool(frozen["train.freeze_encoder"]))
    elif not pretrained(encoder, tree["train"]["encoder_weights"]):
        tree["train"]["freeze_encoder"] = False
    for name, value in suggest(trial, space).items():
        set_dotted(tree, name, value)
    return tree


def searchable_values(space: Mapping[str, Mapping], key: str, fixed: Any) -> list[Any]:
    """The values a trial may give ``key``: its choices, or low and high, when searched; else ``fixed``."""
    spec = space.get(key)
    if spec is None:
        return [fixed]
    return list(spec["choices"]) if spec.get("type") == "categorical" else [spec["low"], spec["high"]]


def check_search_context_gap(params: Mapping) -> None:
    """Refuse a search in which any trial's 2.5D context would be wider than its split gap
    (:func:`socseg.data.split.check_context_gap`), before any trial runs: a searched
    ``train.context_slices`` counts with its widest choice, a searched ``split.gap`` with its narrowest."""
    p = typed(params)
    space = p.search.space
    context = max(int(v) for v in searchable_values(space, "train.context_slices", p.train.context_slices))
    gap = min(int(v) for v in searchable_values(space, "split.gap", p.split.gap))
    try:
        check_context_gap(gap, context, (p.split.train, p.split.val, p.split.test))
    except ValueError as error:
        searched = [f"{key} {searchable_values(space, key, None)}" for key in ("train.context_slices", "split.gap")
                    if key in space]
        raise ValueError(f"{error}" + (f" (search.space searches {', '.join(searched)}: every choice must "
                                       "fit the gap)" if searched else "")) from None


# --------------------------------------------------------------------------- study identity

CHECKED_IDENTITY = ("task", "encoder", "data_fingerprint")  # an explicit study name must agree on these


def study_identity(params: Mapping, encoder: str, data_fingerprint: str) -> dict[str, Any]:
    """Everything that defines what a study's trials train and are scored on.

    Two invocations with the same identity share one study (the second resumes it and trains
    only the missing trials); change any of it (task, encoder choice, data, search space,
    per-trial budget or any fixed setting) and a new study starts.
    """
    search = typed(params).search
    space = dict(search.space)
    searched = set(space) | ({"train.encoder"} if encoder == "all" else set())
    fixed = {f"{section}.{key}": value for section in ("train", "tiles", "split", "normalise")
             for key, value in sorted(tracking.flat_params(params[section]).items())
             if f"{section}.{key}" not in searched}
    return {
        "task": str(params["train"]["task"]),
        "encoder": encoder,
        "encoders": sorted(search.encoders) if encoder == "all" else [encoder],
        "data_fingerprint": data_fingerprint,
        "space": {k: dict(v) for k, v in sorted(space.items())},
        "fixed": fixed,
    }


def identity_hash(identity: Mapping[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def resolve_study_name(template: str, identity: Mapping[str, Any]) -> str:
    """``socseg-{task}-{encoder}-{identity}`` -> ``socseg-ni-vgg16-3f2a...``; a plain name stays as it is."""
    try:
        return str(template).format(task=identity["task"], encoder=identity["encoder"],
                                    identity=identity_hash(identity))
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"search.study_name {template!r}: placeholders are {{task}}, {{encoder}}, "
                         f"{{identity}} ({error})") from None


class StudyMismatch(ValueError):
    """An explicitly named study was made for another task, encoder or data."""


def check_study_identity(study: optuna.Study, identity: Mapping[str, Any]) -> None:
    """Record the identity in a new study; refuse to mix trials into a study made for something else."""
    recorded = study.user_attrs.get("identity")
    if recorded is None:
        if finished_trials(study):
            raise StudyMismatch(
                f"study {study.study_name!r} holds trials but no recorded task/encoder/data: it was made "
                "by an older socseg; leave search.study_name at its default or name a new study")
        study.set_user_attr("identity", json.loads(json.dumps(identity, default=str)))
        study.set_user_attr("identity_hash", identity_hash(identity))
        return
    differs = [f"{key}: study has {recorded.get(key)!r}, this run has {identity[key]!r}"
               for key in CHECKED_IDENTITY if recorded.get(key) != identity[key]]
    if differs:
        raise StudyMismatch(f"study {study.study_name!r} was made for other inputs ({'; '.join(differs)}): "
                            "use another --study-name, or leave it empty to derive one from the inputs")


def open_study(params: Mapping, study_name: str, storage: str | None = None) -> optuna.Study:
    """Create or load (``load_if_exists``) the study, with heartbeat so dead workers' trials get retried,
    on a storage that rides out a database restart (:mod:`socseg.training.study_storage`)."""
    search = typed(params).search
    url = storage or search.storage
    rdb = OutageTolerantStorage(
        url,
        outage_seconds=search.grace_period,  # as long as the study waits for a silent trial
        redacted_url=_redact(url),
        heartbeat_interval=search.heartbeat_interval,
        grace_period=search.grace_period,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
    )
    return optuna.create_study(
        study_name=study_name,
        storage=rdb,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=search.sampler_seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=search.pruner.n_startup_trials,
            n_warmup_steps=search.pruner.n_warmup_steps,
        ),
    )


def worker_id() -> str:
    """``host:pid`` of this search process: tells apart the workers that share one study."""
    return f"{socket.gethostname()}:{os.getpid()}"


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


@dataclass
class SearchResult:
    study_name: str
    storage: str
    parent_run_id: str
    n_finished: int
    n_trained: int  # trials this invocation ran (0: the study already held n_trials)
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    best_encoder: str
    best_run_id: str
    best_model_uri: str  # the best trial's segmenter

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def choose_best_trial(completed: Sequence[optuna.trial.FrozenTrial],
                      tpb_tolerance: float | None) -> optuna.trial.FrozenTrial:
    """The trial a search hands on (to the register step): the highest validation mean IoU, among
    the trials whose |validation TPB density error| is within ``tpb_tolerance`` of the smallest
    any completed trial reached (``registry.tpb_tolerance``: the champion gate's rule, applied
    among trials, so the search does not pick a model the gate would refuse for its TPB while a
    trial almost as good in IoU gets it right). Trials without a TPB error (the ``ni`` task) or
    ``tpb_tolerance`` None: the highest IoU alone, as Optuna's ``best_trial``. Ties: the earlier."""
    if not completed:
        raise ValueError("no completed trial to choose from")
    key = f"val_{TPB_ERROR}"
    errors = {t.number: abs(float(t.user_attrs[key])) for t in completed
              if key in t.user_attrs and math.isfinite(float(t.user_attrs[key]))}
    eligible = list(completed)
    if tpb_tolerance is not None and errors:
        least = min(errors.values())
        eligible = [t for t in completed if t.number in errors and errors[t.number] <= least + tpb_tolerance]
    return max(sorted(eligible, key=lambda t: t.number), key=lambda t: float(t.value))


def trial_objective(params: Mapping, encoder: str, study_name: str, worker: str,
                    started: list[int]) -> Callable[[optuna.Trial], float]:
    """The study's objective: one nested training run per trial (validation only, pruned by the
    study's pruner), its run, worker, encoder and model recorded on the trial; appends each trial's
    number to ``started``."""

    def objective(trial: optuna.Trial) -> float:
        started.append(trial.number)
        tree = trial_params(params, encoder, trial)
        pruning = OptunaPruning(trial)
        result = train(
            tree,
            run_name=f"trial {trial.number}",
            nested=True,
            extra_callbacks=[pruning],
            evaluate_test=False,
            tags={"optuna_study": study_name, "optuna_trial": str(trial.number), "search_worker": worker},
        )
        trial.set_user_attr("run_id", result.run_id)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("encoder", tree["train"]["encoder"])
        if result.pruned:
            raise optuna.TrialPruned(f"pruned at epoch {len(result.history.get(OBJECTIVE, []))}")
        trial.set_user_attr("model_uri", result.model_uri)
        tpb = float(result.metrics.get(f"val_{TPB_ERROR}", math.nan))
        if math.isfinite(tpb):  # 3-phase: the trials table shows the TPB error beside IoU
            trial.set_user_attr(f"val_{TPB_ERROR}", tpb)
        return result.metrics[OBJECTIVE]

    return objective


def run_search(
    params: Mapping,
    encoder: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    study_name: str | None = None,
    storage: str | None = None,
) -> SearchResult:
    """Run trials until the study holds ``n_trials`` finished ones (or ``timeout`` seconds pass)."""
    p = typed(params)
    check_search_context_gap(params)  # before the study, the data or MLflow are touched
    search = p.search
    encoder = encoder or p.train.encoder
    n_trials = int(n_trials if n_trials is not None else search.n_trials)
    timeout = float(timeout if timeout is not None else search.timeout) or None
    storage = storage or search.storage
    identity = study_identity(params, encoder, data_fingerprint(p))
    study = open_study(params, resolve_study_name(study_name or search.study_name, identity), storage)
    check_study_identity(study, identity)
    tracking.configure_tracking(params)
    worker = worker_id()
    started: list[int] = []  # the trials this invocation ran
    objective = trial_objective(params, encoder, study.study_name, worker, started)
    # One parent run per worker (named and tagged with host:pid): N workers on one study show as
    # N parents in the MLflow UI, each holding the trials it ran; tags.optuna_study finds them all.
    with mlflow.start_run(run_name=f"search {study.study_name} @ {worker}") as parent:
        mlflow.set_tags({**runtime_tags(p.train.precision), "optuna_study": study.study_name,
                         "search_encoder": encoder, "search_worker": worker,
                         "git_commit": tracking.git_commit() or "none"})
        mlflow.log_params({"search.encoder": encoder, "search.n_trials": n_trials, "search.study_name": study.study_name,
                           "search.storage": _redact(storage), "search.timeout": timeout or 0})
        remaining = n_trials - len(finished_trials(study))
        if remaining > 0:
            study.optimize(
                objective,
                timeout=timeout,
                callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)],
                gc_after_trial=True,
                show_progress_bar=False,
            )
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not completed:
            raise RuntimeError(f"study {study.study_name!r} has no completed trial (all pruned or failed)")
        best = choose_best_trial(completed, p.registry.tpb_tolerance)
        if best.number != study.best_trial.number:
            mlflow.set_tag("best_trial_rule", f"trial {study.best_trial.number} has the highest IoU but its |val TPB "
                                              f"error| is more than registry.tpb_tolerance above the least; trial {best.number} chosen")
        mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
        mlflow.log_metrics({"best_val_mean_iou": best.value, "best_trial": best.number,
                            "n_finished_trials": len(finished_trials(study)), "n_trained_trials": len(started)})
        _log_study_artifacts(study)
        return SearchResult(
            study_name=study.study_name,
            storage=_redact(storage),
            parent_run_id=parent.info.run_id,
            n_finished=len(finished_trials(study)),
            n_trained=len(started),
            best_trial=best.number,
            best_value=float(best.value),
            best_params=dict(best.params),
            best_encoder=best.user_attrs.get("encoder", encoder),
            best_run_id=best.user_attrs.get("run_id", ""),
            best_model_uri=best.user_attrs.get("model_uri", ""),
        )


def _redact(url: str) -> str:
    """Drop a password from a storage URL before it is logged."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _log_study_artifacts(study: optuna.Study) -> None:
    """Trials table (CSV) and Optuna's optimisation-history and importance plots."""
    with tempfile.TemporaryDirectory() as tmp:
        table = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
        table.to_csv(Path(tmp) / "trials.csv", index=False)
        mlflow.log_artifact(str(Path(tmp) / "trials.csv"), "search")
    for name, plot in (("optimization_history", optuna_plots.plot_optimization_history),
                       ("param_importances", optuna_plots.plot_param_importances)):
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as error:  # e.g. importances need >= 2 completed trials
            mlflow.log_text(f"{name} not available: {error}\n", f"search/{name}.txt")
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        mlflow.log_figure(figure, f"search/{name}.png")
        plt.close(figure)


def write_result(result: SearchResult, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str))
