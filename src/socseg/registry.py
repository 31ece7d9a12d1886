"""MLflow model registry: register the search winner and promote it with aliases.

Every new version gets the alias ``challenger``. It takes ``champion`` only if its test score is at
least the current champion's *measured on the same test data now* (the champion is re-evaluated,
not trusted from an old tag, since the data may have changed since it was promoted). A worse
model never replaces the champion. Only the single ``register`` step decides, after the search has
finished, so concurrent search workers never race on the alias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"

Evaluate = Callable[[str], float]


@dataclass
class Promotion:
    name: str
    version: str
    score: float
    champion_version_before: str | None
    champion_score_before: float | None
    promoted: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def champion_version(name: str, client: MlflowClient | None = None) -> str | None:
    client = client or MlflowClient()
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def register_and_promote(
    model_uri: str,
    name: str,
    score: float,
    evaluate: Evaluate,
    tags: Mapping[str, str] | None = None,
    metric: str = "test_mean_iou",
) -> Promotion:
    """Register ``model_uri`` as a new version of ``name`` and decide the champion.

    ``score`` is the new model's ``metric`` on the test data; ``evaluate(model_uri)`` scores the
    current champion on the same data.
    """
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="socseg segmentation models (PXCT Ni/YSZ)")
    previous = champion_version(name, client)
    previous_score = evaluate(f"models:/{name}@{CHAMPION}") if previous is not None else None
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()}).version
    client.set_model_version_tag(name, version, metric, f"{score:.6f}")
    client.set_registered_model_alias(name, CHALLENGER, version)
    promoted = previous_score is None or score >= previous_score
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion", CHAMPION if promoted else "rejected")
    if previous is not None:
        client.set_model_version_tag(
            name, version, "champion_compared", f"v{previous} {metric}={previous_score:.6f} (re-evaluated)"
        )
    return Promotion(name, str(version), float(score), previous, previous_score, promoted)
