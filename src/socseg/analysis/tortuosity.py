"""Tortuosity factor and effective diffusivity of each phase of a label volume, along each axis.

The tortuosity factor says how much a phase's shape slows transport through it beyond what its
volume fraction alone explains: ``D_eff / D_bulk = volume_fraction / factor`` (Holzer et al. 2011;
the definition TauFactor uses, Cooper et al., SoftwareX 5 (2016) 203-210). It is computed, for one
phase and one axis, from the steady-state diffusion through the phase's voxels:

* **Boundary conditions**: concentration 1 on the outer face at the low end of the axis, 0 on the
  one at the high end (Dirichlet on the volume's faces, half a voxel beyond the first and last
  voxel centres, as in TauFactor), no flux through the four other faces or into other phases.
* **Discretisation**: finite volumes on the voxel grid, 6-connected. Between two neighbouring
  voxels of diffusivity ``a`` and ``b`` the conductance is their harmonic mean ``2ab/(a+b)`` times
  face area over centre distance, so a stack of layers reproduces the series value exactly and a
  set of parallel layers the parallel value. Voxel spacings enter the conductances, so anisotropic
  voxels are handled (face area / distance per axis).
* **Solve**: only the clusters touching both end faces carry flux (the others are dropped: they
  would make the system singular); conjugate gradients on ``scipy.sparse`` with an aggregation
  algebraic multigrid preconditioner (pyamg, the multigrid PoreSpy's solver uses),
  until the flux, read as the power the potential dissipates, is within :data:`SOLVE_TOLERANCE`
  (relative; :func:`_solve`).
* **Outputs**: ``effective_diffusivity_ratio`` = flux x length / (cross-section x concentration
  drop) with ``D_bulk = 1``; ``factor = volume_fraction / effective_diffusivity_ratio`` with the
  phase's *total* volume fraction (isolated clusters and dead ends count: they hold volume that
  carries no flux, which is what the factor is there to show; PoreSpy divides by the percolating
  fraction instead). A phase that does not connect the two end faces has ``factor`` None and ratio 0.

Known answers (``tests/test_tortuosity.py``): straight channels 1; layers along the axis 1 and the
parallel value; layers across it the series value (or None for an insulating layer); a channel
with dead-end branches ``1 + dead volume / channel volume``; a 1-voxel zig-zag ``(N/L)^2`` for a
path of ``N`` voxels across ``L`` layers (exact for this discretisation, not for a continuum).

Volumes larger than :data:`DEFAULT_MAX_VOXELS` (64 Mi voxels: a 200x501x501 volume is solved
whole) are solved as **columns**: the full length along the axis, the cross-section cut into
near-square tiles, each column solved on its own and their fluxes added (columns side by side
conduct in parallel). A cut is a no-flux wall, so by Rayleigh's monotonicity the columns' ``D_eff``
is a lower bound of the whole volume's (the factor an upper bound), and a phase that percolates
only through paths crossing a cut reads as not percolating in that column. The bias is large for
long, thin columns (``benchmarks/results/tortuosity/``, SOCPristine labels along z): 4 columns of
55x256x256 raise the factor by 3-5 %, 16 columns by 12-27 %, 4 columns of 200x256x256 by 9 % (YSZ)
to 96 % (pore, which percolates along z through few long paths). Columns are therefore a last
resort: the ``method`` of each result names their number, and a larger ``max_voxels`` is worth its
memory (see "Cost" below).

Library choice (``benchmarks/tortuosity_bench.py``, 2 CPU cores, each solver single-threaded in its
own process; known geometries, random blobs and crops of the SOCPristine labels):

* TauFactor 1.2.1 (CPU PyTorch) uses the same discretisation and definition; its factors differ
  from these by a median 1e-4 (at most 2.4e-3 at its default ``conv_crit`` 1e-2), it takes 0.3-2x
  this solver's time (0.4-2.6x at ``conv_crit`` 1e-3; faster along short axes, slower along long
  ones: its over-relaxation needs more iterations the longer the axis), but it does not notice a
  phase that does not percolate (it iterates to its limit) and it needs PyTorch.
* PoreSpy 3.2.0 ``tortuosity_fd`` needs OpenPNM, which pulls pypardiso + MKL (~0.7 GB, unused by
  this solve), takes 1.4-2.1x the time and 2.3-2.6x the memory, puts the boundary conditions on
  the first/last voxel centres (length ``L-1``) and divides by the percolating fraction; converted
  to the total fraction its factors differ from these by -0.8 to +0.6 % on the real crops.
* This solver reproduces the known answers to ~1e-6, detects non-percolating phases before any
  solve, and needs scipy + pyamg (9 MB): hence the choice. Both others remain useful cross-checks.

Cost: time, CG iterations and peak memory of each solve of a 200x501x501 volume are in
``benchmarks/results/tortuosity_solver`` (against a tight reference tolerance and the solver
before this one). The choices behind them: plain aggregation (``smooth=None``), whose hierarchy
builds several times faster than pyamg's default smoothed aggregation and ~40 % smaller, with a
W-cycle (a V-cycle needs over twice the iterations with plain aggregation); the matrix itself as
the strength of connection; coarse levels in CSR; the flux read as dissipated power with its own
stopping rule (:func:`_solve`). The solves of different phases and axes are independent and each
runs on one core, so they run in parallel worker processes (:class:`SolveQueue`), as many as the
cores and the available memory allow (:func:`parallel_workers`). A solve may start from the
concentration field of a similar volume (:func:`tortuosity_field`): the interval sweep's volumes
differ from the argmax by a few percent of the voxels and start from its field.

pyamg is imported inside the solve: a ~1 s import that CLI start-up should not pay.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import warnings
import tempfile
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse import linalg as sparse_linalg
from threadpoolctl import threadpool_limits

AXES: tuple[str, str, str] = ("z", "y", "x")
# Voxels per solve: a 200x501x501 volume in one piece (the column bias is large; see the module
# docstring). Peak memory of one solve ~PEAK_BYTES_PER_UNKNOWN per conducting voxel.
DEFAULT_MAX_VOXELS = 1 << 26
# Peak RSS of one solve per conducting voxel (matrix + hierarchy + CG vectors), plus the volume's own
# arrays per voxel: a little above the peaks of benchmarks/results/tortuosity_solver (the three
# phases of a 200x501x501 volume, 13-22 M unknowns), so that parallel_workers errs on the safe side.
PEAK_BYTES_PER_UNKNOWN = 240
PEAK_BYTES_PER_VOXEL = 4
# Relative accuracy of a solve's flux (D_eff), estimated as described in _solve: a tenth of a percent,
# well below what the segmentation moves a factor by (intervals of percents; TauFactor's default is 1e-2).
SOLVE_TOLERANCE = 1e-3
MAX_ITERATIONS = 300
# Passes of neighbour averaging that carry a warm start's field onto voxels it lacks (_warm_start).
WARM_START_FILL_PASSES = 3
# Systems up to this many unknowns are solved directly (exact, and faster than building a hierarchy).
DIRECT_SOLVE_UNKNOWNS = 20_000
# Columns narrower than this would make the no-flux walls between them dominate the answer.
MIN_COLUMN_WIDTH = 16
METHOD = "fd-cg-amg"

_SIX_CONNECTED = ndi.generate_binary_structure(3, 1)
_log = logging.getLogger(__name__)


class TortuosityError(ValueError):
    """Input the tortuosity cannot be computed from (the message says why)."""


@dataclass
class TortuosityResult:
    """One phase along one axis. ``factor`` None: the phase does not connect the two end faces."""

    factor: float | None
    effective_diffusivity_ratio: float  # D_eff / D_bulk = volume_fraction / factor; 0.0 when not percolating
    volume_fraction: float  # of the whole volume, isolated clusters included
    method: str


def axis_number(axis: int | str) -> int:
    """``"z"/"y"/"x"`` or 0/1/2 -> 0/1/2."""
    if isinstance(axis, str) and axis.lower() in AXES:
        return AXES.index(axis.lower())
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and 0 <= axis < 3:
        return int(axis)
    raise TortuosityError(f"axis must be one of {list(AXES)} or 0, 1, 2; got {axis!r}")


def voxel_spacing(voxel_size: float | Sequence[float] | None) -> tuple[float, float, float]:
    """(z, y, x) spacing; None: isotropic. Only ratios matter: the factor is dimensionless."""
    if voxel_size is None:
        return (1.0, 1.0, 1.0)
    sizes = (float(voxel_size),) * 3 if np.isscalar(voxel_size) else tuple(float(v) for v in voxel_size)  # type: ignore[union-attr, arg-type]
    if len(sizes) != 3 or not all(math.isfinite(v) and v > 0 for v in sizes):
        raise TortuosityError(f"voxel size must be one or three positive numbers (z, y, x), got {voxel_size!r}")
    return sizes  # type: ignore[return-value]


def column_slices(shape: Sequence[int], axis: int, max_voxels: int) -> list[tuple[slice, slice, slice]]:
    """Sub-volumes of at most ``max_voxels``: full length along ``axis``, the cross-section cut into
    near-square tiles (the longer tile side is halved first)."""
    others = [k for k in range(3) if k != axis]
    pieces = [1, 1]

    def widths() -> list[int]:
        return [math.ceil(shape[k] / p) for k, p in zip(others, pieces)]

    while shape[axis] * math.prod(widths()) > max_voxels:
        wider = int(np.argmax(widths()))
        if widths()[wider] <= MIN_COLUMN_WIDTH:
            raise TortuosityError(
                f"a volume {tuple(shape)} is too long along axis {AXES[axis]} for {max_voxels} voxels per solve:"
                f" columns would be narrower than {MIN_COLUMN_WIDTH} voxels; raise max_voxels"
            )
        pieces[wider] += 1
    edges = [np.linspace(0, shape[k], p + 1).round().astype(int) for k, p in zip(others, pieces)]
    out = []
    for a0, a1 in zip(edges[0][:-1], edges[0][1:]):
        for b0, b1 in zip(edges[1][:-1], edges[1][1:]):
            window = [slice(None)] * 3
            window[others[0]], window[others[1]] = slice(int(a0), int(a1)), slice(int(b0), int(b1))
            out.append(tuple(window))
    return out  # type: ignore[return-value]


def _spanning(conducting: np.ndarray) -> np.ndarray | None:
    """The voxels of the 6-connected clusters touching both faces normal to axis 0 (None: none do)."""
    components, count = ndi.label(conducting, structure=_SIX_CONNECTED)
    both = np.intersect1d(np.unique(components[0]), np.unique(components[-1]))
    both = both[both > 0]
    if both.size == 0:
        return None
    keep = np.zeros(count + 1, dtype=bool)
    keep[both] = True
    return keep[components]


def _system(values: np.ndarray, keep: np.ndarray, spacing: tuple[float, float, float]) -> tuple:
    """(matrix, right-hand side, start, (inlet unknowns, conductances), (outlet ditto)) of the
    finite-volume diffusion along axis 0 on the voxels ``keep``.

    Unknowns are numbered in C order, so a voxel's neighbours -z, -y, -x, itself, +x, +y, +z have
    ascending numbers: the table (n, 7) of columns and values *is* the CSR arrays, seven slots a
    row; an absent neighbour's slot holds the row's own column and the value 0, and
    ``eliminate_zeros`` drops it in place (no masked copy of the table, no COO).
    """
    n = int(np.count_nonzero(keep))
    index = np.full(keep.shape, -1, dtype=np.int64 if 7 * n + 1 >= 2**31 else np.int32)
    index[keep] = np.arange(n, dtype=index.dtype)
    value = values[keep].astype(np.float64)
    cell = math.prod(spacing)
    weight = [cell / h**2 for h in spacing]  # face area / centre distance along each axis
    columns = np.repeat(np.arange(n, dtype=index.dtype), 7).reshape(n, 7)
    entries = np.zeros((n, 7))
    diagonal = np.zeros(n)
    for k in range(3):
        low, high = [slice(None)] * 3, [slice(None)] * 3
        low[k], high[k] = slice(0, -1), slice(1, None)
        both = keep[tuple(low)] & keep[tuple(high)]
        a, b = index[tuple(low)][both], index[tuple(high)][both]  # a < b, each unique along this axis
        del both
        if values.dtype == bool:  # one phase: every conductance along the axis is the same
            g = np.full(a.size, weight[k])
        else:
            g = weight[k] * 2.0 * value[a] * value[b] / (value[a] + value[b])  # harmonic mean
        columns[a, 6 - k], entries[a, 6 - k] = b, -g
        columns[b, k], entries[b, k] = a, -g
        diagonal[a] += g
        diagonal[b] += g
        del a, b, g
    inlet, outlet = index[0][keep[0]], index[-1][keep[-1]]
    del index
    g_in, g_out = 2.0 * weight[0] * value[inlet], 2.0 * weight[0] * value[outlet]  # half a voxel to the face
    diagonal[inlet] += g_in
    diagonal[outlet] += g_out
    entries[:, 3] = diagonal  # > 0: a voxel of a spanning cluster has a neighbour or a face
    row_starts = np.arange(0, 7 * n + 1, 7, dtype=columns.dtype)
    matrix = sparse.csr_matrix((entries.reshape(-1), columns.reshape(-1), row_starts), shape=(n, n))
    matrix.eliminate_zeros()  # the absent neighbours' slots
    del columns, entries
    rhs = np.zeros(n)
    rhs[inlet] = g_in
    layer_sizes = np.count_nonzero(keep.reshape(keep.shape[0], -1), axis=1)
    start = np.repeat(1.0 - (np.arange(keep.shape[0]) + 0.5) / keep.shape[0], layer_sizes)  # a straight channel's profile
    return matrix, rhs, start, (inlet, g_in), (outlet, g_out)


def _power(matrix: sparse.csr_matrix, rhs: np.ndarray, face_term: float, solution: np.ndarray,
           residual: np.ndarray) -> float:
    """Power dissipated by the potential ``solution`` with both faces held (``x.Ax - 2 b.x + c``,
    written with the residual ``b - Ax`` so that it costs two dot products). It equals the flux at
    the exact solution and exceeds it by ``|error|_A^2`` elsewhere (Dirichlet's principle)."""
    return face_term - float(rhs @ solution) - float(solution @ residual)


def _solve(matrix: sparse.csr_matrix, rhs: np.ndarray, start: np.ndarray, face_term: float,
           tolerance: float) -> tuple[float, np.ndarray]:
    """The flux through the system (drop 1 between the faces), to ``tolerance`` relative, and the
    concentration it was read from.

    Preconditioned conjugate gradients, written out because the stopping rule needs the residual
    (scipy's ``cg`` hands its callback only the iterate). The flux is read as the dissipated power
    (:func:`_power`), not from the face currents: its error is the *square* of the solution's
    energy-norm error, so it reaches a given accuracy in fewer cycles than the currents do
    (``benchmarks/results/tortuosity_solver``), and it errs on one side only. CG lowers the power
    monotonically; the remaining excess is estimated from the last two decrements (geometric
    convergence, rate at least 0.5) and the solve stops when twice that estimate is within the
    tolerance. The preconditioner is a plain-aggregation AMG W-cycle with a forward Gauss-Seidel
    sweep before and a backward one after (symmetric, as CG needs, at half the cost of pyamg's
    default symmetric sweeps on both sides)."""
    if matrix.shape[0] <= DIRECT_SOLVE_UNKNOWNS:
        solution = sparse_linalg.spsolve(matrix.tocsc(), rhs)
        return _power(matrix, rhs, face_term, solution, rhs - matrix @ solution), solution
    import pyamg  # lazy: see the module docstring

    # strength=None: the matrix itself as the strength of connection. pyamg's default (symmetric,
    # theta 0) keeps every connection too and the aggregation reads only the pattern, so the
    # aggregates are the same, without building and scaling a copy of the matrix on every level.
    hierarchy = pyamg.smoothed_aggregation_solver(
        matrix, symmetry="hermitian", smooth=None, strength=None, max_coarse=DIRECT_SOLVE_UNKNOWNS // 10,
        presmoother=("gauss_seidel", {"sweep": "forward"}), postsmoother=("gauss_seidel", {"sweep": "backward"}))
    for level in hierarchy.levels:  # pyamg leaves the coarse levels in BSR (1x1 blocks): CSR relaxes faster
        level.A = level.A.tocsr()
        if hasattr(level, "P"):
            level.P, level.R = level.P.tocsr(), level.R.tocsr()

    def preconditioner(vector: np.ndarray) -> np.ndarray:
        correction = np.zeros_like(vector)
        _w_cycle(hierarchy, 0, correction, vector)
        return correction

    solution = start.astype(np.float64, copy=True)
    residual = rhs - matrix @ solution
    power = _power(matrix, rhs, face_term, solution, residual)
    direction = preconditioner(residual)
    along = float(residual @ direction)
    decrements: list[float] = []
    for _ in range(MAX_ITERATIONS):
        if along <= 0.0:  # the start is the exact solution (straight channels) or the residual vanished
            return power, solution
        image = matrix @ direction
        step = along / float(direction @ image)
        solution += step * direction
        residual -= step * image
        previous, power = power, _power(matrix, rhs, face_term, solution, residual)
        decrements.append(max(previous - power, 0.0))
        if len(decrements) >= 2:
            rate = min(max(decrements[-1] / decrements[-2], 0.5) if decrements[-2] > 0 else 0.5, 0.95)
            if 2.0 * decrements[-1] * rate / (1.0 - rate) <= tolerance * power:
                _log.debug("tortuosity solve: %d unknowns, %d iterations, flux %.9g", matrix.shape[0], len(decrements), power)
                return power, solution
        smoothed = preconditioner(residual)
        along, previous_along = float(residual @ smoothed), along
        direction = smoothed + (along / previous_along) * direction
    warnings.warn(f"tortuosity: no convergence to {tolerance:g} in {MAX_ITERATIONS} iterations", RuntimeWarning, stacklevel=3)
    return power, solution


def _w_cycle(hierarchy, level: int, solution: np.ndarray, rhs: np.ndarray) -> None:
    """One multigrid W-cycle on ``level`` of a pyamg hierarchy, in place: the cycle of pyamg's
    ``MultilevelSolver`` (``aspreconditioner(cycle="W")``) without the two residual norms its
    ``solve`` computes around every cycle, each a product with the finest matrix."""
    levels = hierarchy.levels
    here = levels[level]
    here.presmoother(here.A, solution, rhs)
    coarse_rhs = here.R @ (rhs - here.A @ solution)
    coarse = np.zeros_like(coarse_rhs)
    if level == len(levels) - 2:
        coarse[:] = hierarchy.coarse_solver(levels[-1].A, coarse_rhs)
    else:
        _w_cycle(hierarchy, level + 1, coarse, coarse_rhs)
        _w_cycle(hierarchy, level + 1, coarse, coarse_rhs)
    solution += here.P @ coarse
    here.postsmoother(here.A, solution, rhs)


def _warm_start(profile: np.ndarray, keep: np.ndarray, field: np.ndarray) -> np.ndarray:
    """The CG start on the unknowns ``keep`` from ``field``, the concentration of a similar volume
    (NaN where it had none): its value where it has one; at a voxel it lacks, the mean of the
    neighbours it has, over :data:`WARM_START_FILL_PASSES` growing passes; ``profile`` (a straight
    channel's) where still unknown. The voxels a sweep volume gains sit on the phase's boundary,
    next to known ones, so one or two passes reach nearly all of them."""
    guess = np.array(field, dtype=np.float32)  # a copy: the field may be a read-only memory map
    flat = guess.reshape(-1)
    holes = np.flatnonzero(keep.reshape(-1) & np.isnan(flat))
    strides = [int(np.prod(keep.shape[k + 1:])) for k in range(3)]
    for _ in range(WARM_START_FILL_PASSES):
        if holes.size == 0:
            break
        where = np.unravel_index(holes, keep.shape)
        total, count = np.zeros(holes.size), np.zeros(holes.size)
        for k in range(3):
            for step in (-1, 1):
                inside = np.flatnonzero((where[k] + step >= 0) & (where[k] + step < keep.shape[k]))
                values = flat[holes[inside] + step * strides[k]]
                known = ~np.isnan(values)
                total[inside[known]] += values[known]
                count[inside[known]] += 1
        filled = count > 0
        flat[holes[filled]] = total[filled] / count[filled]  # after the pass: each pass grows one voxel
        holes = holes[~filled]
    start = guess[keep].astype(np.float64)
    unknown = np.isnan(start)
    start[unknown] = profile[unknown]
    return start


def _column_flux(diffusivity: np.ndarray, spacing: tuple[float, float, float], tolerance: float,
                 field: np.ndarray | None = None) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """(flux, conducting voxels, their concentration) of a sub-volume (transport along axis 0,
    concentration drop 1, no-flux sides); ``field``: a warm start (:func:`_warm_start`)."""
    keep = _spanning(diffusivity > 0)
    if keep is None:
        return 0.0, None, None
    matrix, rhs, start, (_, g_in), _ = _system(diffusivity, keep, spacing)
    if field is not None:
        start = _warm_start(start, keep, field)
    # BLAS on one thread, whatever this process started with: a threaded dot product sums in
    # another order, so a solve in a worker started with OPENBLAS_NUM_THREADS=1 (a Dask nanny
    # leaves it in the environment of the process that started it) would otherwise differ from
    # the same solve here in the last digits. A solve is meant for one core (SolveQueue).
    with threadpool_limits(limits=1, user_api="blas"):
        flux, solution = _solve(matrix, rhs, start, float(g_in.sum()), tolerance)
    return flux, keep, solution


def _effective(values: np.ndarray, axis: int, spacing: tuple[float, float, float], max_voxels: int,
               tolerance: float = SOLVE_TOLERANCE, start: np.ndarray | None = None,
               keep_field: bool = False) -> tuple[float, int, np.ndarray | None]:
    """(D_eff / D_ref along ``axis``, number of columns solved, concentration field or None) of a
    diffusivity (or 0/1 mask) volume. ``start``: the field of a similar volume along the same axis
    (a warm start); ``keep_field``: return this solve's field, float32 (Z, Y, X), NaN outside the
    clusters that connect the two faces."""
    if values.ndim != 3 or min(values.shape) < 1:
        raise TortuosityError(f"the volume must be 3-D (Z, Y, X), got shape {values.shape}")
    if start is not None and tuple(start.shape) != tuple(values.shape):
        raise TortuosityError(f"the start field has shape {tuple(start.shape)}, the volume {tuple(values.shape)}")
    columns = column_slices(values.shape, axis, max_voxels)
    ordered = (spacing[axis], *(spacing[k] for k in range(3) if k != axis))
    field = np.full(values.shape, np.nan, dtype=np.float32) if keep_field else None
    flux = 0.0
    for window in columns:
        column = np.ascontiguousarray(np.moveaxis(values[window], axis, 0))  # a mask stays 1 B/voxel
        guess = None if start is None else np.moveaxis(start[window], axis, 0)
        part, keep, solution = _column_flux(column, ordered, tolerance, guess)
        flux += part  # columns side by side conduct in parallel
        if field is not None and keep is not None:
            np.moveaxis(field[window], axis, 0)[keep] = solution  # a view: writes into field
    length = values.shape[axis] * spacing[axis]
    area = math.prod(values.shape[k] * spacing[k] for k in range(3) if k != axis)
    return flux * length / area, len(columns), field


def effective_diffusivity(
    diffusivity: np.ndarray,
    axis: int | str,
    voxel_size: float | Sequence[float] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> float:
    """``D_eff`` along ``axis`` of a volume whose voxels have the (relative) diffusivities given,
    0 for voxels that do not conduct. In the units of ``diffusivity``; see the module docstring."""
    values = np.asarray(diffusivity)
    if values.dtype.kind not in "biuf" or (values.size and (not np.isfinite(values).all() or values.min() < 0)):
        raise TortuosityError("diffusivities must be finite numbers >= 0")
    return _effective(values, axis_number(axis), voxel_spacing(voxel_size), max_voxels)[0]


def tortuosity(
    mask: np.ndarray,
    axis: int | str,
    voxel_size: float | Sequence[float] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    tolerance: float = SOLVE_TOLERANCE,
    start: np.ndarray | None = None,
) -> TortuosityResult:
    """Tortuosity factor of the phase ``mask`` (True: the phase) along ``axis`` (``"z"``/0 ...);
    ``tolerance``: relative accuracy of the iterative solve (see :data:`SOLVE_TOLERANCE`);
    ``start``: see :func:`tortuosity_field`."""
    return tortuosity_field(mask, axis, voxel_size, max_voxels, tolerance, start, keep_field=False)[0]


def tortuosity_field(
    mask: np.ndarray,
    axis: int | str,
    voxel_size: float | Sequence[float] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    tolerance: float = SOLVE_TOLERANCE,
    start: np.ndarray | None = None,
    keep_field: bool = True,
) -> tuple[TortuosityResult, np.ndarray | None]:
    """:func:`tortuosity` and the concentration field it was read from: float32 (Z, Y, X), 1 at
    the inlet face of ``axis`` and 0 at the outlet, NaN where no flux goes (``keep_field=False``:
    None, nothing kept).

    ``start``: the field of a *similar* mask along the same axis, e.g. the argmax phase for a
    volume that moved a few percent of its boundary voxels (a class-bias sweep): CG starts from
    it (:func:`_warm_start`) instead of a straight channel's profile, about half the iterations
    there (``benchmarks/results/microstructure_volume``). The answer is the same to the solve
    tolerance: the stopping rule reads the flux, wherever the iterations began."""
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TortuosityError(f"the phase mask must be boolean, got dtype {mask.dtype}")
    if not (isinstance(tolerance, (float, int)) and 0 < tolerance < 1):
        raise TortuosityError(f"tolerance must be a number between 0 and 1, got {tolerance!r}")
    deff, columns, field = _effective(mask, axis_number(axis), voxel_spacing(voxel_size), max_voxels,
                                      float(tolerance), start, keep_field)
    fraction = float(np.count_nonzero(mask) / mask.size) if mask.size else 0.0
    method = METHOD if columns == 1 else f"{METHOD}, {columns} columns"
    if deff <= 0.0:
        return TortuosityResult(None, 0.0, fraction, method), field
    return TortuosityResult(fraction / deff, deff, fraction, method), field


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none: then one worker unless asked)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def solve_peak_bytes(mask: np.ndarray) -> int:
    """Estimated peak memory of one tortuosity solve of ``mask`` (see PEAK_BYTES_PER_UNKNOWN)."""
    return PEAK_BYTES_PER_UNKNOWN * int(np.count_nonzero(mask)) + PEAK_BYTES_PER_VOXEL * int(mask.size)


def parallel_workers(peak_bytes: Sequence[int], available: int | None = None, cores: int | None = None) -> int:
    """How many solves to run at once: at most one per core and per solve, and only as many as
    fit in 80 % of the available memory with the largest solves side by side (1 when unknown)."""
    if not peak_bytes:
        return 1
    available = available_memory_bytes() if available is None else available
    cores = usable_cores() if cores is None else cores
    if available is None:
        return 1
    largest = sorted(peak_bytes, reverse=True)
    workers = 1
    while workers < min(cores, len(largest)) and sum(largest[: workers + 1]) <= 0.8 * available:
        workers += 1
    return workers


def solve_workers(peak_bytes: Sequence[int], workers: int | None = None) -> int:
    """Worker processes for solves of these peaks: ``workers`` when given (validated), else
    :func:`parallel_workers`; never more than the solves."""
    if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
        raise TortuosityError(f"workers must be a whole number >= 1, got {workers!r}")
    count = parallel_workers(peak_bytes) if workers is None else int(workers)
    return max(1, min(count, len(peak_bytes)))


def _solve_files(mask_path: str, axis: int, spacing: tuple[float, float, float], max_voxels: int,
                 tolerance: float, start_path: str | None, field_path: str | None) -> TortuosityResult:
    """One (mask, axis) solve, in a worker process or this one: mask and fields travel as .npy
    files (a field is 4 B/voxel: pickled through a pipe it would sit in both processes at once)."""
    start = np.load(start_path, mmap_mode="r") if start_path else None
    result, field = tortuosity_field(np.load(mask_path), axis, spacing, max_voxels, tolerance, start,
                                     keep_field=field_path is not None)
    if field_path is not None:
        np.save(field_path, field)
    return result


class SolveQueue:
    """Tortuosity solves of any number of masks in one set of worker processes, fed as they come.

    Each (mask, axis) is a task on one core; the tasks of several volumes (the argmax and the
    sweep volumes of :mod:`socseg.analysis.intervals`) share the workers, so none idles while
    another volume's last axis runs, and the caller keeps working (measuring the next volume) while
    they solve. A task may start from the concentration field of an earlier one
    (``start_from``: a warm start, :func:`tortuosity_field`); that one must keep its field
    (``keep_field``), and :meth:`submit` waits for it before it queues the new task.

    Masks and fields go through a scratch folder (removed on close): 1 B per voxel per mask,
    4 B per voxel per kept field (a 200x501x501 volume: 50 MB and 200 MB). ``workers`` 1: each
    task runs in this process when submitted. The results do not depend on ``workers``.
    """

    def __init__(self, voxel_size: float | Sequence[float] | None = None, max_voxels: int = DEFAULT_MAX_VOXELS,
                 workers: int = 1, tolerance: float = SOLVE_TOLERANCE) -> None:
        self._spacing = voxel_spacing(voxel_size)
        self._max_voxels, self._tolerance = int(max_voxels), float(tolerance)
        self._scratch = tempfile.TemporaryDirectory(prefix="socseg-tortuosity-")
        # spawn: a forked copy of a process that has started TensorFlow or Dask threads can hang
        self._pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                      if workers > 1 else None)
        self._masks: dict[Hashable, str] = {}
        self._tasks: dict[Hashable, Future] = {}
        self._fields: dict[Hashable, str] = {}

    def __enter__(self) -> "SolveQueue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (cancelling what has not started) and remove the scratch files."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._scratch.cleanup()

    def add_mask(self, name: Hashable, mask: np.ndarray) -> None:
        """Store a boolean phase mask under ``name`` for :meth:`submit`."""
        mask = np.asarray(mask)
        if mask.dtype != bool:
            raise TortuosityError(f"the phase mask must be boolean, got dtype {mask.dtype}")
        path = os.path.join(self._scratch.name, f"mask-{len(self._masks)}.npy")
        np.save(path, mask)
        self._masks[name] = path

    def submit(self, task: Hashable, mask: Hashable, axis: int | str, start_from: Hashable | None = None,
               keep_field: bool = False) -> None:
        """Queue the solve ``task`` of the stored mask ``mask`` along ``axis``."""
        if task in self._tasks:
            raise ValueError(f"tortuosity task {task!r} submitted twice")
        start = None
        if start_from is not None:
            if start_from not in self._fields:
                raise ValueError(f"tortuosity task {start_from!r} keeps no field to start {task!r} from")
            self._tasks[start_from].result()  # its field is written when it ends
            start = self._fields[start_from]
        field = os.path.join(self._scratch.name, f"field-{len(self._tasks)}.npy") if keep_field else None
        args = (self._masks[mask], axis_number(axis), self._spacing, self._max_voxels, self._tolerance, start, field)
        if self._pool is None:
            done: Future = Future()
            done.set_result(_solve_files(*args))
            self._tasks[task] = done
        else:
            self._tasks[task] = self._pool.submit(_solve_files, *args)
        if field is not None:
            self._fields[task] = field

    def result(self, task: Hashable) -> TortuosityResult:
        """The result of ``task``, waiting for it."""
        return self._tasks[task].result()


def phase_tortuosity(
    labels: np.ndarray,
    phase_map: Mapping[int, str],
    phases: Sequence[str] | None = None,
    axes: Sequence[str] = AXES,
    voxel_size: float | Sequence[float] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    workers: int | None = None,
) -> dict[str, dict[str, TortuosityResult]]:
    """``{phase name: {axis: TortuosityResult}}`` for the phases named (default: every phase of
    ``phase_map``, names case-insensitive) of a (Z, Y, X) label volume.

    ``workers``: solves run at once in separate processes (None: :func:`parallel_workers`, from
    the cores and the available memory; 1: one after another in this process). The results do
    not depend on it."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise TortuosityError(f"labels must be 3-D (Z, Y, X), got shape {labels.shape}")
    solve_workers([], workers)  # refuses a bad count before any slow work
    unknown = sorted(set(np.unique(labels).tolist()) - set(phase_map))
    if unknown:
        raise TortuosityError(f"label values {unknown} are not in the phase map {dict(phase_map)}")
    by_name = {str(name).lower(): (value, str(name)) for value, name in phase_map.items()}
    wanted = [name for _, name in sorted(phase_map.items())] if phases is None else list(phases)
    missing = [p for p in wanted if p.lower() not in by_name]
    if missing:
        raise TortuosityError(f"tortuosity: phases {missing} not in the phase map (phases: {list(phase_map.values())})")
    axis_ids = [axis_number(a) for a in axes]
    spacing = voxel_spacing(voxel_size)
    masks = {by_name[p.lower()][1]: labels == by_name[p.lower()][0] for p in wanted}
    with phase_solves(masks, axis_ids, spacing, max_voxels, workers) as queue:
        return {name: {AXES[a]: queue.result((None, name, a)) for a in axis_ids} for name in masks}


def phase_solves(masks: Mapping[str, np.ndarray], axes: Sequence[int | str],
                 voxel_size: float | Sequence[float] | None = None, max_voxels: int = DEFAULT_MAX_VOXELS,
                 workers: int | None = None, tag: Hashable = None, keep_field: bool = False) -> SolveQueue:
    """A :class:`SolveQueue` with every (phase mask, axis) of ``masks`` submitted, the largest
    phases first (the last solve to finish is then a short one): masks stored as ``(tag, name)``,
    tasks as ``(tag, name, axis)``. ``workers`` None: :func:`parallel_workers` for these solves."""
    peaks = {name: solve_peak_bytes(mask) for name, mask in masks.items()}
    queue = SolveQueue(voxel_size, max_voxels, solve_workers([peaks[name] for name in masks for _ in axes], workers))
    try:
        for name, mask in masks.items():
            queue.add_mask((tag, name), mask)
        for name in sorted(masks, key=lambda n: -peaks[n]):
            for axis in axes:
                queue.submit((tag, name, axis), (tag, name), axis, keep_field=keep_field)
    except BaseException:
        queue.close()
        raise
    return queue
