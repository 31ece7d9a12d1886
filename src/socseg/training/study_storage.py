"""The Optuna study's database, riding out a restart of the server that holds it.

A lab's study lives in PostgreSQL (``search.storage``), which is restarted now and then (an upgrade,
a failover, a node reboot) while searches run for hours. Plain ``optuna.storages.RDBStorage`` is
fragile there in three ways:

* for PostgreSQL it does not set SQLAlchemy's ``pool_pre_ping`` (Optuna does so only for MySQL), so
  the first query after a restart runs on a dead pooled connection and fails;
* any storage call made while the server is down (a trial's intermediate value, its end, a new
  trial) raises ``StorageInternalError`` out of ``study.optimize``: the worker dies and leaves its
  trial ``RUNNING`` until another worker's heartbeat check fails it ``grace_period`` later;
* the heartbeat thread dies on its first failed write, so a trial that outlives ``grace_period``
  after a short outage is failed (and retried) by other workers while it is still training.

:class:`OutageTolerantStorage` pings pooled connections before use and retries a call that failed
because the database could not be reached, for up to ``outage_seconds`` (``search.grace_period``:
the silence after which the study itself gives a trial up), printing one line when it starts
waiting and one when the database answers again. Only connection failures are retried; any other
database error is raised at once. A write is retried only when its connection failed, i.e. before
the statement reached the server, so a retried write is not applied twice; a commit cut off after
the server received it is the one case left to Optuna's own consistency checks.
"""

from __future__ import annotations

import sys
import time
from functools import wraps
from typing import Any, Callable

import optuna
from sqlalchemy import exc as sqlalchemy_exc

# The RDBStorage methods a search calls: every one is a single transaction, safe to run again
# when its connection could not be opened or was lost before the statement was sent.
RETRIED_METHODS = (
    "create_new_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials",
    "get_best_trial", "record_heartbeat", "_get_stale_trial_ids",
)


def unreachable(error: BaseException) -> bool:
    """True when ``error`` (or what Optuna wrapped) says the database could not be reached,
    not that it refused the statement."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, sqlalchemy_exc.DBAPIError) and cause.connection_invalidated:
            return True
        if isinstance(cause, sqlalchemy_exc.OperationalError):
            return True
        if isinstance(cause, sqlalchemy_exc.InterfaceError):  # the driver's connection was closed
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _tolerant(method: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(method)
    def call(self: "OutageTolerantStorage", *args: Any, **kwargs: Any) -> Any:
        deadline: float | None = None
        delay = 1.0
        while True:
            try:
                result = method(self, *args, **kwargs)
            except (optuna.exceptions.StorageInternalError, sqlalchemy_exc.SQLAlchemyError) as error:
                if not unreachable(error):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.outage_seconds
                    print(f"search: the study database {self.redacted_url} is unreachable "
                          f"({_first_line(error)}); retrying {method.__name__} for up to "
                          f"{self.outage_seconds:.0f} s", file=sys.stderr, flush=True)
                if now >= deadline:
                    raise optuna.exceptions.StorageInternalError(
                        f"the study database {self.redacted_url} stayed unreachable for "
                        f"{self.outage_seconds:.0f} s ({_first_line(error)}); the running trial stays RUNNING "
                        "and is failed and retried by the next search after search.grace_period") from error
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, 10.0)
                continue
            if deadline is not None:
                print(f"search: the study database {self.redacted_url} answers again; {method.__name__} done",
                      file=sys.stderr, flush=True)
            return result
    return call


def _first_line(error: BaseException) -> str:
    cause = error.__cause__ or error
    return (str(getattr(cause, "orig", None) or cause).strip().splitlines() or [type(cause).__name__])[0]


class OutageTolerantStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` that survives the database restarting (see the module docstring)."""

    def __init__(self, url: str, *, outage_seconds: float, redacted_url: str = "", **kwargs: Any) -> None:
        self.outage_seconds = float(outage_seconds)
        self.redacted_url = redacted_url or url
        engine_kwargs = dict(kwargs.pop("engine_kwargs", None) or {})
        if not url.startswith("sqlite"):
            engine_kwargs.setdefault("pool_pre_ping", True)
        super().__init__(url, engine_kwargs=engine_kwargs, **kwargs)


for _name in RETRIED_METHODS:
    setattr(OutageTolerantStorage, _name, _tolerant(getattr(optuna.storages.RDBStorage, _name)))
del _name
