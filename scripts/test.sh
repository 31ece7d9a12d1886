#!/usr/bin/env bash
# Install (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1 TF_CPP_MIN_LOG_LEVEL=2
bash scripts/setup_env.sh
# Both cores (pytest-xdist, one worker per core); a test file stays on one worker, so its
# module-scoped fixtures (a Dask cluster, the lab services) are made once. Files start longest
# first (tests/conftest.py orders them by their slow(seconds=N) marks; --no-loadscope-reorder keeps
# that order instead of xdist's by number of tests). The 25 slowest tests are listed at the end, to
# keep an eye on the suite's time.
# The napari viewer tests need a display: without one, a virtual X server (Xvfb, installed by
# scripts/setup_display.sh) runs the suite.
display=()
if [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ] && command -v xvfb-run >/dev/null 2>&1; then
  display=(xvfb-run -a -s "-screen 0 1280x1024x24")
fi
exec "${display[@]}" .venv/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=25 "$@"
