"""One promotion at a time per registered model, across every process and machine that promotes.

A promotion reads the champion, re-scores it (seconds to minutes), compares and moves the alias.
Two pipelines doing that at once (two encoders registering ``socseg-ni``, or a ``register`` and a
``finetune``) both see the old champion, both win against it, and the last to write the alias wins,
even if it is the worse model. MLflow's registry has no compare-and-set, so the sequence runs under
a lock held in a store all promoters share (``registry.promotion_lock`` in params.yaml):

* **PostgreSQL** (a ``postgresql://`` URL; ``auto``: the tracking store if it is PostgreSQL, else
  the Optuna storage ``search.storage`` if it is, as in the lab setup): a session-level advisory
  lock keyed by the model name. The server releases it when the holder's connection closes, so a
  promoter killed with SIGKILL never leaves it held.
* **A file lock** (``auto`` with a local store: beside the SQLite file or in the ``mlruns``
  folder; or a folder given in the setting): ``flock`` on a file per model name, released by the
  kernel when the holder dies. With a tracking *server* and no PostgreSQL to use, ``auto`` falls
  back to a folder in the user's cache, which only serialises promoters on this machine: it warns.

Waiting shows a line every :data:`REPORT_EVERY` seconds; after ``registry.promotion_lock_timeout``
seconds it gives up with :class:`PromotionLockError` and nothing is registered or moved.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from socseg.params import Params
from socseg.training.registry import LockFactory, RegistryError

log = logging.getLogger(__name__)

AUTO = "auto"
POLL_SECONDS = 0.25
REPORT_EVERY = 30.0


class PromotionLockError(RegistryError):
    """The promotion lock could not be taken (timeout, store unreachable): nothing was promoted."""


def _is_postgres(url: str) -> bool:
    return urlparse(url).scheme.split("+")[0] in ("postgresql", "postgres")


def _local_folder(tracking_uri: str) -> Path | None:
    """The folder of a local tracking store (SQLite file's folder, file store), else None."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        path = tracking_uri.split("sqlite:///", 1)[-1]
        return Path(path).resolve().parent if path and path != ":memory:" else None
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme == "file" else tracking_uri).resolve()
    return None


def _advisory_key(name: str) -> int:
    """A signed 64-bit key for ``pg_try_advisory_lock``, the same for every promoter of ``name``."""
    return int.from_bytes(hashlib.sha256(f"socseg-promotion:{name}".encode()).digest()[:8], "big", signed=True)


def _waiting(name: str, where: str, timeout: float) -> Iterator[None]:
    """Yields once per poll until ``timeout``; reports every REPORT_EVERY seconds; then raises."""
    started = last_report = time.monotonic()
    while True:
        now = time.monotonic()
        if now - started > timeout:
            raise PromotionLockError(
                f"another promotion of {name!r} has held the promotion lock ({where}) for over {timeout:g} s "
                "(registry.promotion_lock_timeout): nothing was registered or moved; run the step again later")
        if now - last_report >= REPORT_EVERY:
            log.warning("waiting for another promotion of %r to finish (lock: %s, %.0f s so far)", name, where, now - started)
            last_report = now
        yield
        time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def postgres_lock(url: str, name: str, timeout: float) -> Iterator[None]:
    """Hold PostgreSQL's session advisory lock for ``name`` on the database at ``url``."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    where = f"PostgreSQL advisory lock on {urlparse(url).hostname}:{urlparse(url).port or 5432}"
    key = _advisory_key(name)
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            for _ in _waiting(name, where, timeout):
                if connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
                    break
            connection.commit()  # the lock is the session's, not the transaction's
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
    except sqlalchemy.exc.SQLAlchemyError as error:
        raise PromotionLockError(f"cannot take the promotion lock of {name!r} ({where}): {error.__class__.__name__}: "
                                 f"{str(error).splitlines()[0]}") from error
    finally:
        engine.dispose()


@contextlib.contextmanager
def file_lock(folder: Path, name: str, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder/.socseg-promotion-<name>.lock``."""
    from filelock import FileLock, Timeout

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    path = Path(folder) / f".socseg-promotion-{safe}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PromotionLockError(f"cannot create the promotion lock folder {path.parent}: {error}") from error
    lock = FileLock(str(path))
    where = f"file lock {path}"
    for _ in _waiting(name, where, timeout):
        try:
            lock.acquire(timeout=0)
            break
        except Timeout:
            continue
    try:
        yield
    finally:
        lock.release()


def lock_factory(setting: str, tracking_uri: str, storage: str, timeout: float,
                 cache_dir: Path | None = None) -> LockFactory:
    """``factory(name)`` -> the context manager holding the promotion lock of registered model ``name``.

    ``setting``: ``auto``, a ``postgresql://`` URL or a folder (see the module docstring);
    ``storage``: the Optuna storage URL (``search.storage``), used by ``auto`` when it is PostgreSQL.
    """
    if setting != AUTO:
        if _is_postgres(setting):
            return lambda name: postgres_lock(setting, name, timeout)
        return lambda name: file_lock(Path(setting), name, timeout)
    for url in (tracking_uri, storage):
        if url and _is_postgres(url):
            return lambda name: postgres_lock(url, name, timeout)
    folder = _local_folder(tracking_uri)
    if folder is not None:
        return lambda name: file_lock(folder, name, timeout)
    fallback = (cache_dir or Path.home() / ".cache" / "socseg") / "promotion-locks" / hashlib.sha256(
        tracking_uri.encode()).hexdigest()[:16]
    warnings.warn(f"promotion lock: the tracking store {tracking_uri} is a server and neither it nor search.storage "
                  "is PostgreSQL, so only promoters on this machine wait for each other; set "
                  "registry.promotion_lock to the lab's PostgreSQL URL", RuntimeWarning, stacklevel=2)
    return lambda name: file_lock(fallback, name, timeout)


def lock_for(params: Params, tracking_uri: str) -> LockFactory:
    """The promotion lock that params.yaml's ``registry`` section names, for the store ``tracking_uri``."""
    registry = params.registry
    return lock_factory(registry.promotion_lock, tracking_uri, params.search.storage, registry.promotion_lock_timeout)
