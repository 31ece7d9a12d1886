"""Tortuosity: socseg's solver against TauFactor and PoreSpy, its column bias, and its cost on the full labels.

    python benchmarks/tortuosity_bench.py --other-python /tmp/tortvenv/bin/python \
        [--labels ../shared/data/socpristine/labels] [--out benchmarks/results/tortuosity]

``--other-python`` is a second virtual environment holding TauFactor (with CPU PyTorch), PoreSpy
and OpenPNM, so that socseg's own environment is not changed::

    python3 -m venv /tmp/tortvenv
    /tmp/tortvenv/bin/pip install numpy scipy tifffile torch taufactor porespy openpnm

Every solve runs in a fresh subprocess (this script again, with ``--worker SOLVER``: socseg's
solver in this interpreter, TauFactor and PoreSpy in ``--other-python``) on a volume saved as
``.npy`` under ``--work-dir``; the worker prints one JSON line: factor, D_eff, wall time of the
solve call alone (imports, loading and building the mask excluded; TauFactor: ``Solver(...)``
plus ``solve()``), peak RSS of the process (``getrusage(RUSAGE_SELF).ru_maxrss`` at its end, what
the parent's ``RUSAGE_CHILDREN`` reads for that child alone) and the RSS after imports.

What is measured:

1. Known-answer geometries (64^3-96^3): straight channels (factor 1), a 1-voxel zig-zag
   ((N/L)^2 for this discretisation), a channel with dead ends and isolated blocks
   (all phase voxels / channel voxels with the total volume fraction), two-diffusivity layers
   across the axis (series value; socseg ``effective_diffusivity`` against TauFactor's
   ``MultiPhaseSolver``: PoreSpy's ``tortuosity_fd`` is binary only) and a random blurred-noise
   phase (no analytic answer: the solvers are compared with each other).
2. A real sub-volume of the manual labels (slices 145-199, ``slice__145.tif`` ... ``slice__199.tif``,
   centred crops of ``--real-sizes``): each phase along z, and along x where it percolates (x only
   for crops up to ``--real-x-max``).
3. The column bias of socseg's solver: the largest real crop solved whole and in 4 and 16 columns
   (``max_voxels``), each phase along z; and 200 x 256 x 256 (the full length) whole against the
   default ``DEFAULT_MAX_VOXELS`` columns (``--no-bias-full-length`` skips it).
4. socseg's solver on the full 200 x 501 x 501 labels, default ``max_voxels``: each phase along z
   (``--full-axes``), wall time, peak RSS and number of columns.

Conventions: factor = total volume fraction / (D_eff / D_bulk), the definition of socseg and of
TauFactor's ``Solver`` (``tau = VF / D_rel``). PoreSpy divides by the percolating fraction and
puts the boundary conditions on the first and last voxel centres (length L - 1): its rows give
the factor converted to the total fraction (``eps0 / D_eff``), its own value beside it. For the
two-diffusivity layers the factor is ``D_mean / D_eff`` (TauFactor's multi-phase definition).
Writes ``tortuosity.json`` and ``tortuosity.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, run_metadata, write_result  # noqa: E402  (stdlib only: fine in the other venv)

PHASES = {"pore": 0, "ysz": 128, "ni": 255}
AXES = ("z", "y", "x")
RESULT_PREFIX = "RESULT "
MIN_TIMED_SECONDS = 0.2  # speed ratios where socseg's solve took less are start-up noise: left out of the medians
REAL_SLICES = (145, 199)  # file numbers (slice__145.tif ... slice__199.tif) = 0-based indices 144..198
OTHER_PACKAGES = ("torch", "taufactor", "porespy", "openpnm", "pyamg", "scipy", "numpy", "numba", "pypardiso", "mkl")


# --------------------------------------------------------------------------- worker (runs in either venv)


def rss_gib() -> float:
    """Peak resident set of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def load_input(path: Path, phase_value: int | None) -> np.ndarray:
    """The saved volume, or the mask ``volume == phase_value`` of a saved label volume."""
    volume = np.load(path)
    return volume == phase_value if phase_value is not None else volume


def solve_socseg(volume: np.ndarray, axis: int, args: argparse.Namespace) -> dict[str, Any]:
    from socseg.analysis.tortuosity import DEFAULT_MAX_VOXELS, effective_diffusivity, tortuosity

    max_voxels = args.max_voxels or DEFAULT_MAX_VOXELS
    start = time.perf_counter()
    if volume.dtype == bool:
        result = tortuosity(volume, axis, max_voxels=max_voxels)
        seconds = time.perf_counter() - start
        return {"factor": result.factor, "d_eff": result.effective_diffusivity_ratio, "seconds": seconds,
                "volume_fraction": result.volume_fraction, "method": result.method, "converged": True}
    deff = effective_diffusivity(volume, axis, max_voxels=max_voxels)  # a diffusivity field
    seconds = time.perf_counter() - start
    d_mean = float(volume.mean())
    return {"factor": d_mean / deff if deff > 0 else None, "d_eff": deff, "seconds": seconds, "d_mean": d_mean,
            "converged": True}


def solve_taufactor(volume: np.ndarray, axis: int, args: argparse.Namespace) -> dict[str, Any]:
    import taufactor
    import torch

    image = np.ascontiguousarray(np.moveaxis(volume, axis, 0))  # TauFactor solves along the first axis
    start = time.perf_counter()
    if volume.dtype == bool:
        solver = taufactor.Solver(image.astype(np.uint8), device="cpu")
    else:  # integer labels 1, 2 ... with their diffusivities
        cond = {int(k): float(v) for k, v in json.loads(args.cond).items()}
        solver = taufactor.MultiPhaseSolver(image.astype(np.int64), cond=cond, device="cpu")
    tau = solver.solve(iter_limit=args.iter_limit, verbose=False, conv_crit=args.conv_crit)
    seconds = time.perf_counter() - start
    factor = float(np.asarray(tau).ravel()[0])
    deff = float(np.asarray(solver.D_eff).ravel()[0])
    return {"factor": factor if math.isfinite(factor) and factor > 0 else None, "d_eff": deff, "seconds": seconds,
            "converged": bool(solver.converged), "iterations": int(solver.iter), "torch_threads": torch.get_num_threads()}


def solve_porespy(volume: np.ndarray, axis: int, args: argparse.Namespace) -> dict[str, Any]:
    import porespy

    start = time.perf_counter()
    try:
        result = porespy.simulations.tortuosity_fd(volume, axis=axis)
    except Exception as error:  # e.g. "No pores remain after trimming floating pores": not percolating
        return {"factor": None, "d_eff": 0.0, "seconds": time.perf_counter() - start, "error": f"{type(error).__name__}: {error}"}
    seconds = time.perf_counter() - start
    deff = 1.0 / float(result.formation_factor)
    return {"factor": float(result.original_porosity) / deff, "factor_own": float(result.tortuosity), "d_eff": deff,
            "seconds": seconds, "solve_seconds_own": float(result.time), "converged": bool(result.converged),
            "effective_porosity": float(result.effective_porosity)}


SOLVERS: dict[str, Callable[[np.ndarray, int, argparse.Namespace], dict[str, Any]]] = {
    "socseg": solve_socseg, "taufactor": solve_taufactor, "porespy": solve_porespy}


def preimport(solver: str) -> None:
    """Import what the solve needs before the clock starts (socseg and PoreSpy import pyamg/OpenPNM inside)."""
    if solver == "socseg":
        import pyamg  # noqa: F401

        import socseg.analysis.tortuosity  # noqa: F401
    elif solver == "taufactor":
        import taufactor  # noqa: F401
        import torch  # noqa: F401
    else:
        import openpnm  # noqa: F401
        import porespy  # noqa: F401
        import pyamg  # noqa: F401


def worker(args: argparse.Namespace) -> None:
    """One solve; prints ``RESULT {json}`` as its last line."""
    start = time.perf_counter()
    preimport(args.worker)
    out: dict[str, Any] = {"import_seconds": time.perf_counter() - start, "rss_after_import_gib": rss_gib()}
    volume = load_input(Path(args.input), args.phase_value)
    try:
        out.update(SOLVERS[args.worker](volume, AXES.index(args.axis), args))
    except Exception as error:
        out.update({"factor": None, "error": f"{type(error).__name__}: {error}"})
    out["peak_rss_gib"] = rss_gib()
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- geometries


def straight_channels(n: int) -> np.ndarray:
    """4 x 4 voxel square rods along z, pitch 8 (fraction 0.25): factor 1 along z."""
    mask = np.zeros((n, n, n), dtype=bool)
    for y in range(2, n - 3, 8):
        for x in range(2, n - 3, 8):
            mask[:, y:y + 4, x:x + 4] = True
    return mask


def zigzag(layers: int, width: int = 3) -> tuple[np.ndarray, float]:
    """A 1-voxel staircase (z-step, y-step ...) through ``layers`` z-layers: factor (N/L)^2."""
    mask = np.zeros((layers, layers, width), dtype=bool)
    z = y = 0
    mask[0, 0, 1] = True
    while z < layers - 1:
        z += 1
        mask[z, y, 1] = True
        if z < layers - 1:
            y += 1
            mask[z, y, 1] = True
    return mask, (mask.sum() / layers) ** 2


def dead_ends(n: int) -> tuple[np.ndarray, float]:
    """Straight 2 x 2 rods along z with side branches (dead ends) and isolated blocks: factor =
    all phase voxels / rod voxels (total fraction); PoreSpy's own value excludes the isolated blocks."""
    mask = np.zeros((n, n, n), dtype=bool)
    rods = np.zeros((n, n, n), dtype=bool)
    for c in range(4, n - 4, 16):
        rods[:, c:c + 2, 4:6] = True
    mask |= rods
    for z in range(3, n - 3, 6):
        for c in range(4, n - 4, 16):
            mask[z, c, 6:14] = True  # a branch along x, open at one end only
    for z in range(8, n - 8, 16):
        mask[z:z + 3, 2:5 if n > 40 else 3, 30:33] = True  # isolated blocks away from the rods
    return mask, mask.sum() / rods.sum()


def series_layers(n: int, thickness: int = 8, low: float = 0.1) -> tuple[np.ndarray, np.ndarray, float]:
    """Layers across z of diffusivity 1 and ``low``: (diffusivity, labels 1/2, expected D_mean / D_series)."""
    labels = np.where((np.arange(n) // thickness) % 2 == 0, 1, 2)[:, None, None] * np.ones((1, n, n), dtype=np.int64)
    diffusivity = np.where(labels == 1, 1.0, low)
    series = n / np.sum(1.0 / diffusivity[:, 0, 0])
    return diffusivity, labels, float(diffusivity.mean() / series)


def blob(n: int, fraction: float = 0.4, sigma: float = 2.0, seed: int = 0) -> np.ndarray:
    """Thresholded Gaussian-blurred noise: a random phase with no analytic factor."""
    from scipy import ndimage as ndi

    field = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal((n, n, n)), sigma)
    return field < np.quantile(field, fraction)


def read_labels(folder: Path, first: int = 1, last: int | None = None) -> np.ndarray:
    """Label slices ``slice__<first>.tif`` ... ``slice__<last>.tif`` (1-based file numbers, sorted names)."""
    import tifffile

    files = sorted(folder.glob("slice__*.tif"))
    numbers = [int(f.stem.split("__")[-1]) for f in files]
    chosen = [f for f, k in zip(files, numbers) if first <= k <= (last if last is not None else max(numbers))]
    return np.stack([tifffile.imread(f) for f in chosen])


def centre_crop(labels: np.ndarray, size: int) -> np.ndarray:
    y0, x0 = (labels.shape[1] - size) // 2, (labels.shape[2] - size) // 2
    return np.ascontiguousarray(labels[:, y0:y0 + size, x0:x0 + size])


def percolates(mask: np.ndarray, axis: int) -> bool:
    """Whether a 6-connected cluster touches both faces normal to ``axis``."""
    from scipy import ndimage as ndi

    components, _ = ndi.label(mask, structure=ndi.generate_binary_structure(3, 1))
    ends = np.moveaxis(components, axis, 0)
    both = np.intersect1d(np.unique(ends[0]), np.unique(ends[-1]))
    return bool((both > 0).any())


# --------------------------------------------------------------------------- running the workers


class Runner:
    """Runs one solve per subprocess and keeps the rows."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = args.work_dir
        self.work.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []

    def save(self, name: str, volume: np.ndarray) -> Path:
        path = self.work / f"{name}.npy"
        np.save(path, volume)
        return path

    def solve(self, solver: str, path: Path, axis: str, phase_value: int | None = None, max_voxels: int | None = None,
              cond: str | None = None) -> dict[str, Any]:
        """``solver``: socseg, porespy, or ``taufactor`` / ``taufactor conv 1e-3`` (its conv_crit)."""
        python = sys.executable if solver == "socseg" else str(self.args.other_python)
        conv_crit = solver.split("conv ")[-1] if "conv " in solver else "1e-2"
        cmd = [python, str(Path(__file__).resolve()), "--worker", solver.split()[0], "--input", str(path), "--axis", axis,
               "--iter-limit", str(self.args.iter_limit), "--conv-crit", conv_crit]
        cmd += ["--phase-value", str(phase_value)] if phase_value is not None else []
        cmd += ["--max-voxels", str(max_voxels)] if max_voxels else []
        cmd += ["--cond", cond] if cond else []
        threads = str(self.args.threads)
        env = {**os.environ, "PYTHONPATH": str(REPO / "src") if solver == "socseg" else "", "OMP_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads}
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=self.args.timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"factor": None, "error": f"timed out after {self.args.timeout} s", "seconds": None}
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if not lines:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return {"factor": None, "error": f"worker exit {done.returncode}: {' | '.join(tail)}"[:500], "seconds": None}
        out = json.loads(lines[-1][len(RESULT_PREFIX):])
        out["process_seconds"] = time.perf_counter() - start
        return out

    def record(self, geometry: str, phase: str, axis: str, solver: str, result: dict[str, Any],
               expected: float | None = None, **extra: Any) -> dict[str, Any]:
        row = {"geometry": geometry, "phase": phase, "axis": axis, "solver": solver, "expected": expected,
               **{k: result.get(k) for k in ("factor", "factor_own", "d_eff", "seconds", "peak_rss_gib",
                                              "rss_after_import_gib", "converged", "iterations", "method", "error")},
               **extra}
        if expected is not None and row["factor"] is not None:
            row["rel_err_expected"] = row["factor"] / expected - 1.0
        self.rows.append(row)
        shown = f"{row['factor']:.5f}" if row["factor"] is not None else "None"
        seconds = f"{row['seconds']:.2f} s" if row["seconds"] is not None else "-"
        print(f"{geometry:24s} {phase:6s} {axis} {solver:10s} factor {shown}  {seconds}"
              f"  peak {row['peak_rss_gib'] or 0:.2f} GiB {row['error'] or ''}", flush=True)
        return row

    def compare(self, geometry: str, phase: str, axis: str, path: Path, phase_value: int | None = None,
                expected: float | None = None) -> None:
        """The same volume through each solver; differences relative to socseg's factor."""
        ours = None
        for solver in ["socseg", *[f"taufactor conv {c}" if c != "1e-2" else "taufactor" for c in self.args.conv_crits], "porespy"]:
            if ours and ours["factor"] is None and solver != "socseg":
                # TauFactor does not notice a phase that does not percolate: its float32 fluxes never reach
                # exactly 0, so it iterates to iter_limit (599 s at 55x32x32 in a trial); not run.
                self.record(geometry, phase, axis, solver, {"factor": None, "error": "skipped: not percolating"}, expected)
                continue
            row = self.record(geometry, phase, axis, solver, self.solve(solver, path, axis, phase_value), expected)
            if solver == "socseg":
                ours = row
            elif ours and ours["factor"] and row["factor"]:
                row["rel_diff_socseg"] = row["factor"] / ours["factor"] - 1.0
                row["socseg_seconds"] = ours["seconds"]
                if row["seconds"] and ours["seconds"]:
                    row["speed_ratio"] = row["seconds"] / ours["seconds"]
                if row["peak_rss_gib"] and ours["peak_rss_gib"]:
                    row["rss_ratio"] = row["peak_rss_gib"] / ours["peak_rss_gib"]
                    ours_net = ours["peak_rss_gib"] - ours["rss_after_import_gib"]
                    if ours_net >= 0.05:  # smaller: the ratio of two noise figures
                        row["net_rss_ratio"] = (row["peak_rss_gib"] - row["rss_after_import_gib"]) / ours_net


# --------------------------------------------------------------------------- the four parts


def known_answers(runner: Runner, n: int) -> None:
    channels = straight_channels(n)
    runner.compare(f"channels {n}^3", "rods", "z", runner.save("channels", channels), expected=1.0)
    mask, expected = zigzag(n)
    runner.compare(f"zig-zag {n}x{n}x3", "path", "z", runner.save("zigzag", mask), expected=float(expected))
    mask, expected = dead_ends(n)
    runner.compare(f"dead ends {n}^3", "rods", "z", runner.save("dead_ends", mask), expected=float(expected))
    diffusivity, labels, expected = series_layers(n)
    geometry = f"series layers {n}^3 (D 1 / 0.1)"
    ours = runner.record(geometry, "both", "z", "socseg", runner.solve("socseg", runner.save("series_d", diffusivity), "z"), expected)
    theirs = runner.record(geometry, "both", "z", "taufactor", runner.solve(
        "taufactor", runner.save("series_labels", labels), "z", cond=json.dumps({1: 1.0, 2: 0.1})), expected)
    if ours["factor"] and theirs["factor"]:
        theirs["rel_diff_socseg"] = theirs["factor"] / ours["factor"] - 1.0
        theirs["socseg_seconds"], theirs["speed_ratio"] = ours["seconds"], theirs["seconds"] / ours["seconds"]
    for size in runner.args.blob_sizes:
        path = runner.save(f"blob{size}", blob(size))
        for axis in ("z", "x"):
            runner.compare(f"blob {size}^3 (fraction 0.4)", "blob", axis, path)


def real_subvolumes(runner: Runner, labels: np.ndarray) -> None:
    for size in runner.args.real_sizes:
        crop = centre_crop(labels, size)
        path = runner.save(f"real{size}", crop)
        geometry = f"labels {crop.shape[0]}x{size}x{size}"
        for phase, value in PHASES.items():
            for axis in ("z", "x"):
                if axis == "x" and (size > runner.args.real_x_max or not percolates(crop == value, 2)):
                    continue
                runner.compare(geometry, phase, axis, path, value)


def column_bias(runner: Runner, labels: np.ndarray, full: np.ndarray | None) -> dict[str, float]:
    """Whole vs columns, socseg only; figures ``column_bias_<phase>_<n>col`` (relative factor difference)."""
    figures: dict[str, float] = {}
    size = max(runner.args.real_sizes)
    cases = [(f"labels {labels.shape[0]}x{size}x{size}", runner.save(f"real{size}", centre_crop(labels, size)),
              {"whole": 1 << 40, "4 columns": labels.shape[0] * (size // 2) ** 2,
               "16 columns": labels.shape[0] * (size // 4) ** 2}, "")]
    if full is not None:
        crop = centre_crop(full, 256)
        cases.append((f"labels {crop.shape[0]}x256x256", runner.save("full_length256", crop),
                       {"whole": 1 << 40, "default columns": None}, "_full_length"))
    for geometry, path, settings, tag in cases:
        for phase, value in PHASES.items():
            whole = None
            for label, max_voxels in settings.items():
                result = runner.solve("socseg", path, "z", value, max_voxels)
                row = runner.record(f"{geometry}, {label}", phase, "z", "socseg", result, part="column bias")
                if label == "whole":
                    whole = row
                elif whole and whole["factor"] and row["factor"]:
                    row["rel_diff_whole"] = row["factor"] / whole["factor"] - 1.0
                    columns = (row["method"] or "").split(", ")[-1].split()[0]
                    figures[f"column_bias_{phase}_{columns}col{tag}"] = row["rel_diff_whole"]
    return figures


def full_volume(runner: Runner, full: np.ndarray) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    path = runner.save("full", full)
    geometry = "labels {}x{}x{} (full)".format(*full.shape)
    for phase, value in PHASES.items():
        for axis in runner.args.full_axes.get(phase, ()):
            row = runner.record(geometry, phase, axis, "socseg", runner.solve("socseg", path, axis, value), part="full volume")
            columns = (row["method"] or "").split(", ")
            row["columns"] = int(columns[1].split()[0]) if len(columns) > 1 else 1
            key = f"full_volume_{phase}_{axis}"
            figures.update({f"{key}_factor": row["factor"], f"{key}_seconds": row["seconds"],
                            f"{key}_peak_rss_gib": row["peak_rss_gib"], f"{key}_columns": row["columns"]})
    return figures


# --------------------------------------------------------------------------- summary and output


def median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if values else None


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Speed and memory ratios (other / socseg) and the largest factor differences, per other solver."""
    figures: dict[str, Any] = {}
    for name in sorted({r["solver"] for r in rows} - {"socseg"}):
        mine = [r for r in rows if r["solver"] == name and r.get("rel_diff_socseg") is not None]
        solver = name.replace(" conv ", "_conv")  # figure keys without spaces
        real = [r for r in mine if r["geometry"].startswith("labels")]
        known = [r for r in mine if not r["geometry"].startswith("labels")]
        timed = [r["speed_ratio"] for r in mine if r.get("speed_ratio") and r["socseg_seconds"] >= MIN_TIMED_SECONDS]
        figures[f"{solver}_speed_ratio_median"] = median(timed)
        figures[f"{solver}_speed_ratio_range"] = [min(timed, default=None), max(timed, default=None)]
        figures[f"{solver}_speed_ratio_median_real"] = median([r["speed_ratio"] for r in real if r.get("speed_ratio")])
        figures[f"{solver}_rss_ratio_median"] = median([r["rss_ratio"] for r in mine if r.get("rss_ratio")])
        figures[f"{solver}_net_rss_ratio_median_real"] = median([r["net_rss_ratio"] for r in real if r.get("net_rss_ratio")])
        figures[f"max_rel_diff_{solver}"] = max((abs(r["rel_diff_socseg"]) for r in mine), default=None)
        figures[f"max_rel_diff_{solver}_real"] = max((abs(r["rel_diff_socseg"]) for r in real), default=None)
        figures[f"median_rel_diff_{solver}_real"] = median([r["rel_diff_socseg"] for r in real])
        figures[f"rel_diff_{solver}_range_real"] = [min((r["rel_diff_socseg"] for r in real), default=None),
                                                   max((r["rel_diff_socseg"] for r in real), default=None)]
        figures[f"rel_diff_{solver}_range_known_geometries"] = [min((r["rel_diff_socseg"] for r in known), default=None),
                                                               max((r["rel_diff_socseg"] for r in known), default=None)]
        figures[f"max_rel_diff_{solver}_known_geometries"] = max((abs(r["rel_diff_socseg"]) for r in known), default=None)
        figures[f"{solver}_failures"] = sum(1 for r in rows if r["solver"] == name and r.get("error")
                                            and not r["error"].startswith("skipped"))
    errors = [abs(r["rel_err_expected"]) for r in rows if r["solver"] == "socseg" and r.get("rel_err_expected") is not None]
    figures["socseg_max_rel_err_known_answers"] = max(errors, default=None)
    return figures


def other_versions(python: Path) -> dict[str, Any]:
    code = ("import importlib.metadata as m, json, platform; v = {'python': platform.python_version()}\n"
            f"for p in {list(OTHER_PACKAGES)!r}:\n"
            "    try: v[p] = m.version(p)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(v))")
    try:
        return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        return {"error": str(error)}


COLUMNS = [("geometry", "geometry"), ("phase", "phase"), ("axis", "axis"), ("solver", "solver"),
           ("factor", "factor", ".5f"), ("expected", "expected", ".5f"), ("rel_err_expected", "vs expected", "+.2e"),
           ("rel_diff_socseg", "vs socseg", "+.2e"), ("rel_diff_whole", "vs whole", "+.2e"),
           ("factor_own", "PoreSpy own factor", ".5f"), ("seconds", "solve s", ".2f"), ("speed_ratio", "time / socseg", ".2f"),
           ("peak_rss_gib", "peak RSS GiB", ".3f"), ("rss_ratio", "RSS / socseg", ".2f"), ("iterations", "SOR iter"),
           ("method", "socseg method"), ("error", "error")]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other-python", type=Path, default=Path("/tmp/tortvenv/bin/python"),
                   help="interpreter of the venv with taufactor, torch, porespy, openpnm")
    p.add_argument("--labels", type=Path, default=Path(os.environ.get("SOCSEG_SHARED_DATA", REPO.parent / "shared/data/socpristine")) / "labels")
    p.add_argument("--out", type=Path, default=RESULTS / "tortuosity")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/tortuosity_bench"), help="where the .npy inputs go")
    p.add_argument("--known-size", type=int, default=64, help="edge of the known-answer geometries")
    p.add_argument("--blob-sizes", type=lambda t: [int(v) for v in t.split(",")], default=[64, 96])
    p.add_argument("--real-sizes", type=lambda t: [int(v) for v in t.split(",")], default=[128, 256])
    p.add_argument("--real-x-max", type=int, default=128, help="solve along x only for crops up to this size")
    p.add_argument("--full-axes", type=json.loads, default={"pore": ["z"], "ysz": ["z", "x"], "ni": ["z"]},
                   help='JSON {phase: [axes]} for the full volume; {} skips it')
    p.add_argument("--no-bias-full-length", action="store_true", help="skip 200x256x256 whole vs default columns")
    p.add_argument("--parts", default="known,real,bias,full")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per solve")
    p.add_argument("--conv-crits", type=lambda t: t.split(","), default=["1e-2", "1e-3"],
                   help="TauFactor conv_crit values, one row each (1e-2: its default)")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL/OpenBLAS threads of every worker (torch follows OMP)")
    p.add_argument("--conv-crit", type=float, default=1e-2, help=argparse.SUPPRESS)
    p.add_argument("--iter-limit", type=int, default=200_000, help="TauFactor's iteration limit")
    p.add_argument("--note", default="")
    # worker mode (internal)
    p.add_argument("--worker", choices=sorted(SOLVERS), help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--axis", default="z", help=argparse.SUPPRESS)
    p.add_argument("--phase-value", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-voxels", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cond", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def notes(args: argparse.Namespace, versions: dict[str, Any]) -> list[str]:
    return [
        "Factor convention: total volume fraction / (D_eff / D_bulk) for socseg and TauFactor's `Solver` (its "
        "`tau = VF / D_rel`, VF the mean of the whole mask, isolated clusters included; BCs on the outer faces, "
        "half a voxel beyond the end centres, as in socseg). PoreSpy's `tortuosity_fd` divides by the percolating "
        "fraction and puts the BCs on the first/last voxel centres (D_eff with L - 1): the `factor` of its rows is "
        "converted to the total fraction (`original_porosity / D_eff`), its own value is in `PoreSpy own factor`.",
        "Series layers: factor = D_mean / D_eff (TauFactor's `MultiPhaseSolver` definition); its BCs sit one voxel "
        "beyond the end centres (`D_eff = flux (Nx + 1) / A`), socseg's half a voxel. PoreSpy has no multi-diffusivity solve.",
        f"TauFactor: CPU, float32, `solve(conv_crit=..., iter_limit={args.iter_limit})`, rows `taufactor` at its default "
        f"conv_crit 1e-2, `taufactor conv C` at conv_crit C (run: {', '.join(args.conv_crits)}; conv_crit: max-min layer "
        "flux / max; it also waits for tau to change < 2e-3 between checks every 100 iterations). socseg: flux in/out "
        "mismatch < 1e-4. PoreSpy 3.2 default ftol 1e-3 (Ruge-Stuben AMG from pyamg).",
        "Times: the solve call only, in a fresh process per solve (imports excluded). Peak RSS: the worker process's "
        "ru_maxrss, imports included (torch ~0.3-0.4 GiB, OpenPNM/PoreSpy more); `rss_after_import_gib` in the JSON rows "
        "gives the baseline. All runs under `nice -n 19` on a 2-core machine shared with other jobs (see 'what else ran'): "
        f"times are noisy. Every worker runs with {args.threads} thread(s) (OMP/MKL/OpenBLAS/Numba; torch follows OMP): "
        "socseg's CG + pyamg is single-threaded anyway, and in a trial on this shared machine TauFactor with torch's "
        "default 2 threads took 38.9 s for a solve that took 2.9 s with 1 thread (same 1600 iterations; its threads "
        f"wait on each other when one is descheduled). Speed-ratio medians leave out solves where socseg took < {MIN_TIMED_SECONDS} s.",
        f"Other venv: {', '.join(f'{k} {v}' for k, v in versions.items())}.",
        "Phases that do not percolate (socseg: factor None) are not given to the other solvers: TauFactor does not "
        "detect them (its float32 layer fluxes never reach exactly 0) and iterated to iter_limit=200000 in 599 s on a "
        "55x32x32 Ni crop in a trial; PoreSpy raises 'No pores remain after trimming floating pores'.",
        "Column bias rows: the same sub-volume solved by socseg whole (max_voxels 2^40) and in columns (max_voxels "
        "giving 4 or 16 columns, or DEFAULT_MAX_VOXELS): `vs whole` = factor(columns) / factor(whole) - 1.",
    ] + ([args.note] if args.note else [])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    metadata = run_metadata(__file__, argv)
    versions = other_versions(args.other_python)
    runner = Runner(args)
    parts = set(args.parts.split(","))
    figures: dict[str, Any] = {}
    started = time.perf_counter()
    real = read_labels(args.labels, *REAL_SLICES) if parts & {"real", "bias"} else None
    full = read_labels(args.labels) if parts & {"bias", "full"} else None
    if "known" in parts:
        known_answers(runner, args.known_size)
    if "real" in parts:
        real_subvolumes(runner, real)
    if "bias" in parts:
        figures.update(column_bias(runner, real, None if args.no_bias_full_length else full))
    if "full" in parts:
        figures.update(full_volume(runner, full))
    figures = {**summary(runner.rows), **figures, "bench_minutes": (time.perf_counter() - started) / 60}
    settings = {"other_venv": versions, "real_slices": f"slice__{REAL_SLICES[0]}..{REAL_SLICES[1]}.tif",
                "real_sizes": args.real_sizes, "known_size": args.known_size, "blob_sizes": args.blob_sizes,
                "taufactor_conv_crits": args.conv_crits, "threads_per_solve": args.threads, "taufactor_iter_limit": args.iter_limit,
                "full_axes": args.full_axes, "timeout_s": args.timeout}
    json_path, md_path = write_result(args.out, "tortuosity", "Tortuosity: socseg's solver vs TauFactor and PoreSpy",
                                      metadata, settings, figures, COLUMNS, runner.rows, notes(args, versions))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
