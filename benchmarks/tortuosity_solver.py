"""The tortuosity solve on a whole 200 x 501 x 501 label volume: accuracy at the default tolerance, time, memory.

    python benchmarks/tortuosity_solver.py [--labels ../shared/data/socpristine/labels] \\
        [--baseline 7e2782e] [--baseline-axes z] [--workers 2] [--out benchmarks/results/tortuosity_solver]

For each phase of the manual labels (pore, YSZ, Ni) and each axis, ``socseg.analysis.tortuosity``
solves the diffusion system

- at a tight tolerance (``--reference-tolerance``, 1e-7): the reference value;
- at its default tolerance (``SOLVE_TOLERANCE``): what ``socseg microstructure --tortuosity`` and
  the interval sweep run;
- with ``--baseline REF``: with the solver of an earlier commit (its ``tortuosity.py`` read from git
  and imported on its own), along ``--baseline-axes``: the speed-up on the same machine.

Each solve runs in a fresh spawned worker process (a pool of ``--workers``, one task per process, so
each peak RSS is one solve's); ``--workers 2`` runs two solves at once, as ``phase_tortuosity`` does
on two cores, so the seconds include that sharing of memory bandwidth. Per solve: factor, D_eff,
relative difference of the factor from the reference, CG iterations (from the solver's debug log;
not available for a baseline), seconds of the ``tortuosity()`` call (mask built beforehand), peak RSS.
Writes ``tortuosity_solver.json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import multiprocessing
import re
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, run_metadata, write_result  # noqa: E402
from tortuosity_bench import read_labels  # noqa: E402

PHASES = {"pore": 0, "ysz": 128, "ni": 255}
AXES = ("z", "y", "x")
SOLVER_MODULE = "src/socseg/analysis/tortuosity.py"
ITERATIONS = re.compile(r"(\d+) iterations")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=Path, default=REPO.parent / "shared" / "data" / "socpristine" / "labels",
                   help="folder of label slices (0 pore, 128 YSZ, 255 Ni)")
    p.add_argument("--slices", type=int, default=None, help="use the slices numbered up to N only (slice__N.tif) [all]")
    p.add_argument("--axes", default="z,y,x", help="comma list of axes")
    p.add_argument("--reference-tolerance", type=float, default=1e-7)
    p.add_argument("--baseline", default=None, help="git ref of an earlier solver to time on the same machine")
    p.add_argument("--baseline-axes", default="z", help="comma list of axes the baseline solves")
    p.add_argument("--workers", type=int, default=2, help="solves at once")
    p.add_argument("--note", default="", help="free text for the result header")
    p.add_argument("--out", type=Path, default=RESULTS / "tortuosity_solver")
    return p.parse_args(argv)


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def solve(labels_path: str, phase_value: int, axis: str, solver: str, tolerance: float | None,
          baseline_path: str | None) -> dict[str, Any]:
    """One solve in a worker process: the mask is built first, then only ``tortuosity()`` is timed."""
    labels = np.load(labels_path, mmap_mode="r")
    mask = np.asarray(labels == phase_value)
    del labels
    if baseline_path is not None:
        module = load_module(Path(baseline_path), "tortuosity_baseline")
        kwargs: dict[str, Any] = {}
    else:
        from socseg.analysis import tortuosity as module  # type: ignore[no-redef]

        kwargs = {"tolerance": tolerance}
    log = _capture(module.__name__)
    start = time.perf_counter()
    result = module.tortuosity(mask, axis, **kwargs)
    seconds = time.perf_counter() - start
    found = ITERATIONS.findall(log.getvalue())
    return {"solver": solver, "axis": axis, "factor": result.factor, "d_eff": result.effective_diffusivity_ratio,
            "volume_fraction": result.volume_fraction, "method": result.method, "seconds": seconds,
            "iterations": sum(int(n) for n in found) if found else None, "tolerance": tolerance,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def _capture(logger_name: str):
    import io

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return stream


def baseline_source(ref: str, work: Path) -> Path:
    text = subprocess.run(["git", "show", f"{ref}:{SOLVER_MODULE}"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout
    path = work / "tortuosity_baseline.py"
    path.write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    metadata = run_metadata(__file__, argv)
    from socseg.analysis.tortuosity import SOLVE_TOLERANCE

    if not any(args.labels.glob("slice__*.tif")):
        raise SystemExit(f"no slice__*.tif label slices in {args.labels}")
    labels = read_labels(args.labels, 0, args.slices)
    axes = [a for a in args.axes.split(",") if a]
    baseline_axes = [a for a in args.baseline_axes.split(",") if a] if args.baseline else []
    with tempfile.TemporaryDirectory(prefix="socseg-tortuosity-solver-") as tmp:
        work = Path(tmp)
        labels_path = work / "labels.npy"
        np.save(labels_path, labels)
        baseline = str(baseline_source(args.baseline, work)) if args.baseline else None
        tasks: list[tuple[str, str, str, float | None, str | None]] = []
        for phase in PHASES:
            for axis in axes:
                tasks.append((phase, axis, "default", SOLVE_TOLERANCE, None))
                tasks.append((phase, axis, "reference", args.reference_tolerance, None))
                if axis in baseline_axes:
                    tasks.append((phase, axis, f"baseline {args.baseline}", None, baseline))
        rows: list[dict[str, Any]] = []
        started = time.perf_counter()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=context, max_tasks_per_child=1) as pool:
            futures = [(phase, pool.submit(solve, str(labels_path), PHASES[phase], axis, solver, tolerance, path))
                       for phase, axis, solver, tolerance, path in tasks]
            for phase, future in futures:
                row = {"phase": phase, **future.result()}
                rows.append(row)
                print(f"[{time.perf_counter() - started:7.0f} s] {phase} {row['axis']} {row['solver']}: "
                      f"factor {row['factor']} in {row['seconds']:.0f} s, {row['iterations']} iterations", flush=True)
        wall = time.perf_counter() - started
    reference = {(r["phase"], r["axis"]): r["factor"] for r in rows if r["solver"] == "reference"}
    for row in rows:
        ref = reference.get((row["phase"], row["axis"]))
        row["vs_reference"] = (row["factor"] / ref - 1.0) if row["factor"] and ref else None
    figures = summary(rows, args.baseline)
    figures["wall_seconds"] = wall
    columns = [("phase", "phase"), ("axis", "axis"), ("solver", "solver"), ("tolerance", "tolerance", ".0e"),
               ("factor", "factor", ".5f"), ("vs_reference", "vs reference", "+.2e"), ("iterations", "CG iterations"),
               ("seconds", "seconds", ".1f"), ("peak_rss_gib", "peak RSS GiB", ".2f"), ("method", "method")]
    notes = [f"Note: {args.note}"] if args.note else []
    settings = {"labels": f"{args.labels} ({labels.shape[0]} slices, shape {tuple(labels.shape)})",
                "default tolerance": SOLVE_TOLERANCE, "reference tolerance": args.reference_tolerance,
                "baseline": args.baseline, "baseline axes": baseline_axes, "workers": args.workers,
                "timing": "seconds of the tortuosity() call in a fresh spawned process, "
                          f"{args.workers} solves at once; peak RSS of that process"}
    json_path, md_path = write_result(args.out, "tortuosity_solver", "Tortuosity solve on a whole label volume",
                                      metadata, settings, figures, columns, rows, notes)
    print(md_path.read_text())


def summary(rows: Sequence[dict[str, Any]], baseline: str | None) -> dict[str, Any]:
    """Worst and median factor difference of the default solves from the reference; time against the baseline."""
    default = [r for r in rows if r["solver"] == "default"]
    differences = [abs(r["vs_reference"]) for r in default if r["vs_reference"] is not None]
    figures: dict[str, Any] = {
        "default_max_abs_vs_reference": max(differences) if differences else None,
        "default_median_abs_vs_reference": float(np.median(differences)) if differences else None,
        "default_seconds_total": sum(r["seconds"] for r in default),
        "default_iterations_median": float(np.median([r["iterations"] for r in default if r["iterations"]])) if default else None,
        "default_peak_rss_gib_max": max((r["peak_rss_gib"] for r in default), default=None),
    }
    if baseline:
        old = {(r["phase"], r["axis"]): r for r in rows if r["solver"].startswith("baseline")}
        pairs = [(r, old[(r["phase"], r["axis"])]) for r in default if (r["phase"], r["axis"]) in old]
        if pairs:
            figures["baseline_seconds"] = sum(o["seconds"] for _, o in pairs)
            figures["default_seconds_same_solves"] = sum(n["seconds"] for n, _ in pairs)
            figures["speedup_vs_baseline"] = figures["baseline_seconds"] / figures["default_seconds_same_solves"]
            figures["baseline_max_abs_vs_reference"] = max(abs(o["vs_reference"]) for _, o in pairs if o["vs_reference"] is not None)
    return figures


if __name__ == "__main__":
    main()
