"""Configuration: one ``params.yaml`` read by DVC and by socseg.

Lookup order: an explicit path, ``$SOCSEG_PARAMS``, ``./params.yaml``, then the copy shipped
inside the package (so an installed ``socseg`` works outside the repository).
Values given on the command line override single keys via :func:`override`.
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

PARAMS_ENV = "SOCSEG_PARAMS"


def params_path(path: str | os.PathLike | None = None) -> Path | None:
    """Where params come from; ``None`` means the packaged defaults."""
    if path is not None:
        return Path(path)
    if os.environ.get(PARAMS_ENV):
        return Path(os.environ[PARAMS_ENV])
    local = Path.cwd() / "params.yaml"
    return local if local.is_file() else None


def load_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load the parameter tree (a plain nested dict)."""
    source = params_path(path)
    if source is None:
        text = resources.files("socseg").joinpath("defaults/params.yaml").read_text()
    else:
        if not source.is_file():
            raise FileNotFoundError(f"params file not found: {source}")
        text = source.read_text()
    params = yaml.safe_load(text) or {}
    if not isinstance(params, dict):
        raise ValueError(f"params file {source} must hold a mapping at top level")
    return params


def override(params: Mapping[str, Any], section: str, **values: Any) -> dict[str, Any]:
    """Return a copy of ``params`` with ``params[section][key] = value`` for each non-None value."""
    updated = copy.deepcopy(dict(params))
    target = updated.setdefault(section, {})
    for key, value in values.items():
        if value is not None:
            target[key] = value
    return updated


def set_dotted(params: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(p, "tiles.augment.intensity_jitter", 0.1)``: set a nested value in place.

    The first part must name an existing section, so a typo fails instead of adding a section nobody reads.
    """
    *parents, leaf = dotted.split(".")
    if not parents or not leaf or parents[0] not in params:
        raise KeyError(f"{dotted!r}: expected SECTION.KEY with SECTION one of {', '.join(params)} (KEY may be dotted)")
    node = params
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def parse_bool(value: Any) -> bool:
    """Accept the spellings MLflow/DVC parameters arrive in ("true", "False", 1, ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "y", "on"}:
        return True
    if text in {"0", "false", "no", "n", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")
