"""MLflow model registry: register the search winner and promote it with aliases.

Every new version gets the alias ``challenger``. It takes ``champion`` only if its test score is at
least the current champion's *measured on the same test data now* (the champion is re-evaluated,
not trusted from an old tag, since the data may have changed since it was promoted). A worse
model never replaces the champion. Only the single ``register`` step decides, after the search has
finished, so the workers of one search never race on the alias; ``socseg finetune`` decides the same
way for its one model, on the new scan's held-out labelled slices (:mod:`socseg.training.finetune`).

A 3-phase model can also be held to the champion's microstructure (a :class:`MicrostructureGuard`,
``registry.tpb_tolerance``): a higher IoU does not promote a version whose TPB density is further
from the test labels' than the champion's by more than the tolerance. IoU is a pixel count; the
one-voxel specks that add triple-phase contacts barely move it (benchmarks/results/cv_postprocess:
smoothing that halves the TPB error changes mean IoU by 1e-4), so the metric alone can crown a
model whose TPB density, the number a paper reports, is worse.

Promoters of *different* pipelines can run at once (two encoders registering ``socseg-ni``, a
``register`` and a ``finetune``): the whole read-score-compare-set sequence runs under the model's
promotion lock (:mod:`socseg.training.promotion_lock`), re-reading the champion once it is held.
The new version's score is tagged when it is registered, and ``promotion`` last: a version without
a ``promotion`` tag is a promotion that was interrupted (process killed), and the next run of the
same pipeline (same training run) completes it instead of registering a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

# ``lock(name)``: held while one promotion of registered model ``name`` runs
# (:mod:`socseg.training.promotion_lock` makes them).
LockFactory = Callable[[str], ContextManager[None]]

CHAMPION = "champion"
CHALLENGER = "challenger"

Evaluate = Callable[[str], float]


@dataclass(frozen=True)
class MicrostructureGuard:
    """A second condition of the champion gate, on a microstructure error.

    ``error`` is the new version's absolute relative error of ``name`` against the test labels;
    ``measure(model_uri)`` gives the champion's on the same test data, re-measured now like its
    score. The new version is promoted only if its error is at most the champion's plus
    ``tolerance``. ``tag`` names the version tag that records ``error``.
    """

    name: str
    tag: str
    error: float
    tolerance: float
    measure: Callable[[str], float]

    def allows(self, champion_error: float) -> bool:
        return self.error <= champion_error + self.tolerance

    def comparison(self, champion_error: float) -> str:
        return (f"|{self.name} error| {self.error:.4f} {'<=' if self.allows(champion_error) else '>'} "
                f"champion's {champion_error:.4f} + {self.tolerance:g}")


class RegistryError(RuntimeError):
    """The registry could not be read or written: nothing is promoted."""


class PromotionDenied(RegistryError):
    """The new version won the gate but this user may not move ``champion``: it stays challenger."""


@dataclass
class Promotion:
    name: str
    version: str
    score: float
    champion_version_before: str | None
    champion_score_before: float | None
    promoted: bool
    already_registered: bool = False  # the same trained model was registered before: no new version
    guard: str = ""  # the microstructure guard's comparison, where one decided alongside the score

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _move_champion(client: MlflowClient, name: str, version: str, why: str) -> None:
    """Point ``champion`` at ``version``; a server that refuses (the lab's rule: only MANAGE on the
    registered model moves it, :mod:`socseg.training.registry_server`) leaves the version challenger,
    tagged ``promotion=denied``, and raises :class:`PromotionDenied` naming the missing permission."""
    try:
        client.set_registered_model_alias(name, CHAMPION, version)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(PERMISSION_DENIED) and "403" not in error.message:
            raise
        client.set_model_version_tag(name, version, "promotion", "denied")
        refused = error.message.split("Response body:", 1)[-1].strip(" '\"") or "permission denied"
        raise PromotionDenied(f"{name} v{version} earned champion ({why}) but the server refused to move the alias: "
                              f"{refused}; v{version} stays challenger (tag promotion=denied) until a maintainer "
                              f"sets it: MlflowClient().set_registered_model_alias({name!r}, {CHAMPION!r}, {version!r})"
                              ) from None


def _missing(error: MlflowException) -> bool:
    """Only "no such model / alias" means absent; a server that is down or refuses is an error."""
    return error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def champion_version(name: str, client: MlflowClient | None = None) -> str | None:
    """The champion's version, ``None`` when the model does not exist or has no champion alias.

    Read from the registered model's alias map, so that only "no such model" counts as absent;
    any other failure (server down, permission denied) raises :class:`RegistryError`: treating it
    as "no champion" would promote the next model unconditionally.
    """
    client = client or MlflowClient()
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as error:
        if _missing(error):
            return None
        raise RegistryError(f"cannot read the champion of {name!r} from the registry: {error.message}") from error
    version = aliases.get(CHAMPION)
    return None if version is None else str(version)


def _registered_model(name: str, client: MlflowClient):
    """The registered model ``name``, created when (and only when) it does not exist."""
    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if not _missing(error):
            raise RegistryError(f"cannot read registered model {name!r}: {error.message}") from error
        return client.create_registered_model(name, description="socseg segmentation models (PXCT Ni/YSZ)")


def _version_of_run(name: str, run_id: str, client: MlflowClient):
    """The version of ``name`` already registered from ``run_id`` (re-running the same pipeline
    finds the same best trial: it is not registered twice), or None."""
    if not run_id:
        return None
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version), default=None)


def register_and_promote(
    model_uri: str,
    name: str,
    score: float,
    evaluate: Evaluate,
    lock: "LockFactory",
    tags: Mapping[str, str] | None = None,
    metric: str = "test_mean_iou",
    run_id: str = "",
    gate: bool = True,
    guard: MicrostructureGuard | None = None,
) -> Promotion:
    """Register ``model_uri`` as a new version of ``name`` and decide the champion, holding
    ``lock(name)`` (:func:`socseg.training.promotion_lock.lock_factory`) throughout.

    ``score`` is the new model's ``metric`` on the test data; ``evaluate(model_uri)`` scores the
    current champion on the same data. ``run_id`` (the training run) lets a re-run of the same
    pipeline find its earlier version instead of registering a duplicate, and finish its promotion
    if that was interrupted. ``gate=False`` (no test data to decide on, e.g. a fine-tune with a
    single labelled slice): the new version becomes challenger only, the champion is neither scored
    nor moved, and ``score`` is not recorded. ``guard``: a microstructure error the new version
    must also not worsen beyond its tolerance (checked only when the score would promote it).
    """
    client = MlflowClient()
    with lock(name):
        champion = (_registered_model(name, client).aliases or {}).get(CHAMPION)  # read under the lock
        previous = None if champion is None else str(champion)
        existing = _version_of_run(name, run_id, client)
        if existing is not None and "promotion" in (existing.tags or {}):
            return Promotion(name, str(existing.version), float(score), previous, None, previous == str(existing.version),
                             already_registered=True)
        scored = {metric: f"{score:.6f}", **({guard.tag: f"{guard.error:.6f}"} if guard else {})} if gate else {}
        if existing is None:
            all_tags = {**{k: str(v) for k, v in (tags or {}).items()}, **scored}
            version = str(mlflow.register_model(model_uri, name, tags=all_tags).version)
        else:  # registered by an earlier run of this pipeline that was interrupted before deciding
            version = str(existing.version)
            for key, value in scored.items():
                client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, CHALLENGER, version)
        if not gate:
            client.set_model_version_tag(name, version, "promotion", "ungated")
            return Promotion(name, version, float(score), previous, None, False)
        if previous == version:  # the interrupted run had already moved the alias: only the tag is missing
            previous = None
        previous_score = evaluate(f"models:/{name}@{CHAMPION}") if previous is not None else None
        promoted = previous_score is None or score >= previous_score
        compared = ""
        if promoted and previous is not None and guard is not None:
            champion_error = guard.measure(f"models:/{name}@{CHAMPION}")
            promoted, compared = guard.allows(champion_error), guard.comparison(champion_error)
        if promoted:
            _move_champion(client, name, version, f"{metric} {score:.4f}"
                           + ("" if previous_score is None else f" >= v{previous} {previous_score:.4f}")
                           + (f", {compared}" if compared else ""))
        if previous is not None:
            client.set_model_version_tag(
                name, version, "champion_compared", f"v{previous} {metric}={previous_score:.6f} (re-evaluated)"
                + (f"; {compared}" if compared else "")
            )
        client.set_model_version_tag(name, version, "promotion", CHAMPION if promoted else "rejected")  # last: done
        return Promotion(name, version, float(score), previous, previous_score, promoted, guard=compared)
