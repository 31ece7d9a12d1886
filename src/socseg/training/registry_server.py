"""The lab's tracking server app: MLflow's basic-auth plus one rule, only maintainers move ``champion``.

``mlflow server --app-name socseg-lab`` (what ``scripts/lab_services.sh`` starts) serves MLflow's
``basic-auth`` app (users, passwords, per-experiment and per-registered-model permissions READ /
EDIT / MANAGE) with one more check. In MLflow, setting any alias needs EDIT on the registered model,
the same permission as registering a version; so anyone allowed to register a challenger could also
move ``champion``, the alias every batch segmentation of the lab loads. Here, setting or deleting
the alias ``champion`` needs MANAGE on the registered model (admins pass, as everywhere in
basic-auth). The roles of a lab then are:

* **reader**: READ (the default permission): loads ``models:/socseg-ni@champion``, segments;
* **member**: EDIT on the experiments and the registered models: logs runs, registers versions,
  moves ``challenger``;
* **maintainer**: MANAGE on a registered model: moves its ``champion``.

The check runs in Flask's request chain after basic-auth's own (which authenticates the user and
answers 401/403 first) and before the request reaches the registry. It uses basic-auth's own
permission lookup, so grants, the default permission and admin status mean what they mean there.
"""

from __future__ import annotations

from typing import Any

CHAMPION_ALIAS = "champion"  # socseg.training.registry.CHAMPION (not imported: the server needs no socseg training stack)
ALIAS_PATH = "/mlflow/registered-models/alias"


def champion_rule() -> Any:
    """Flask ``before_request`` hook: 403 unless the user may MANAGE the registered model whose
    ``champion`` alias the request sets or deletes; None (go on) for every other request."""
    from flask import request
    from mlflow.server import auth

    if request.method not in ("POST", "DELETE") or not request.path.endswith(ALIAS_PATH):
        return None
    if auth._get_request_param("alias") != CHAMPION_ALIAS:
        return None
    username = auth.authenticate_request().username
    if auth.store.get_user(username).is_admin or auth._get_permission_from_registered_model_name().can_manage:
        return None
    name = auth._get_request_param("name")
    response = auth.make_forbidden_response()
    response.set_data(f"Permission denied: moving the '{CHAMPION_ALIAS}' alias of registered model '{name}' needs "
                      f"MANAGE permission on it; user '{username}' lacks it (socseg lab rule)")
    return response


def create_app() -> Any:
    """MLflow's basic-auth app with :func:`champion_rule` added (an ``mlflow.app`` entry point).

    The admin user is created first, as ``mlflow server --app-name basic-auth`` does before it
    starts its workers, so that several workers do not race to create it."""
    from mlflow.server import app as flask_app
    from mlflow.server.auth import bootstrap_admin_user, create_app as basic_auth_app

    bootstrap_admin_user()
    served = basic_auth_app(flask_app)  # registers basic-auth's before_request first
    flask_app.before_request(champion_rule)
    return served
