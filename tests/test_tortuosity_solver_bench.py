"""benchmarks/tortuosity_solver.py: each solve in its own process, the default tolerance against
the tight reference, and an earlier commit's solver read from git."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    # named as its file, so that the spawned workers (sys.path copied from here) import it again by name
    spec = importlib.util.spec_from_file_location("tortuosity_solver", REPO / "benchmarks/tortuosity_solver.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_rows_compare_the_default_with_the_reference_and_a_baseline(bench, tmp_path, monkeypatch):
    """Three phases of a smooth random volume big enough for the multigrid path; the baseline is
    this checkout's last commit (any commit holds a solver with the same interface)."""
    import socseg.analysis.tortuosity as tortuosity_module

    noise = ndi.gaussian_filter(np.random.default_rng(3).random((48, 48, 48)), 2.0)  # each phase above DIRECT_SOLVE_UNKNOWNS
    labels = np.select([noise < np.quantile(noise, 0.35), noise < np.quantile(noise, 0.7)], [0, 128], 255).astype(np.uint8)
    folder = tmp_path / "labels"
    folder.mkdir()
    for z, plane in enumerate(labels):
        tifffile.imwrite(folder / f"slice__{z:03d}.tif", plane)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    bench.main(["--labels", str(folder), "--axes", "z,x", "--baseline", head, "--baseline-axes", "z",
                "--workers", "2", "--out", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out/tortuosity_solver.json").read_text())
    rows = record["rows"]
    assert {(r["phase"], r["axis"], r["solver"].split()[0]) for r in rows} == {
        (p, a, s) for p in ("pore", "ysz", "ni") for a in ("z", "x") for s in ("default", "reference")
    } | {(p, "z", "baseline") for p in ("pore", "ysz", "ni")}
    default = [r for r in rows if r["solver"] == "default" and r["factor"] is not None]
    assert default, "no phase percolated: the volume does not test the solver"
    for row in default:
        assert abs(row["vs_reference"]) <= tortuosity_module.SOLVE_TOLERANCE
        assert row["iterations"] is not None and row["peak_rss_gib"] > 0
    assert record["figures"]["default_max_abs_vs_reference"] <= tortuosity_module.SOLVE_TOLERANCE
    assert record["figures"]["speedup_vs_baseline"] > 0
    assert "| pore | z | default |" in (tmp_path / "out/tortuosity_solver.md").read_text()
