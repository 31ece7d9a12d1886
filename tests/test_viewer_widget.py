"""Runs the napari GUI tests (tests/napari_gui/) in a pytest process of their own: one that has
loaded TensorFlow, as this suite's workers have, cannot open an OpenGL viewer on Mesa's software
renderer (socseg.viewer.jobs says why). Needs a display: scripts/test.sh starts Xvfb when there
is none."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow(seconds=150)
def test_the_napari_gui_tests_pass_in_a_viewer_process_of_their_own(repo_root):
    assert os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"), (
        "the napari GUI tests need a display: run the suite with scripts/test.sh (it starts Xvfb) or under xvfb-run")
    env = {**os.environ, "SOCSEG_GUI_TESTS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-rA",
                          "tests/napari_gui"], cwd=repo_root, env=env, capture_output=True, text=True, timeout=1500)
    tail = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, tail
    assert "4 passed" in run.stdout, tail
