"""Where socseg keeps what it works out once per machine (converted networks, the measured precision).

One root for all of it, so that a user can move or clear it in one place: ``$SOCSEG_CACHE``, or
``~/.cache/socseg`` when that is unset. The benchmarks keep their data copies under it too.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SOCSEG_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "socseg")
