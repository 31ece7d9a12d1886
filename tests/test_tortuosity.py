"""Tortuosity factor and effective diffusivity against geometries with an exact answer for the
finite-volume discretisation (straight channels, layers in series and parallel, dead ends,
isolated clusters, 1-voxel zig-zags), anisotropic voxels, sub-volume columns and bad input."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from scipy import ndimage as ndi

import socseg.analysis.tortuosity as tortuosity_module
from socseg.analysis.tortuosity import (
    SolveQueue,
    TortuosityError,
    column_slices,
    effective_diffusivity,
    phase_tortuosity,
    tortuosity,
    tortuosity_field,
)


def straight_channels(shape: tuple[int, int, int], axis: int) -> np.ndarray:
    """Separate straight square rods (2x2 voxels) running the whole length of ``axis``."""
    mask = np.zeros(shape, dtype=bool)
    others = [k for k in range(3) if k != axis]
    grid = np.zeros([shape[k] for k in others], dtype=bool)
    grid[1::4, 1::4] = True
    grid = ndi.binary_dilation(grid, np.ones((2, 2), bool), origin=(-1, -1)) if grid.size else grid
    return mask | np.expand_dims(grid, axis)


def zigzag(layers: int, width: int = 3) -> tuple[np.ndarray, int]:
    """A 1-voxel staircase through ``layers`` z-layers: z-step, y-step, z-step... Each voxel touches
    only its predecessor and successor, so the diffusion is a 1-D chain. Returns (mask, voxels)."""
    mask = np.zeros((layers, layers, width), dtype=bool)
    z = y = 0
    mask[0, 0, 1] = True
    while z < layers - 1:
        z += 1
        mask[z, y, 1] = True
        if z < layers - 1:
            y += 1
            mask[z, y, 1] = True
    return mask, int(mask.sum())


def blurred_mask(shape: tuple[int, int, int], fraction: float, sigma: float = 2.0, seed: int = 0) -> np.ndarray:
    field = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return field < np.quantile(field, fraction)


# --------------------------------------------------------------------------- exact answers


@pytest.mark.parametrize("axis", ["z", "y", "x"])
def test_straight_channels_have_factor_one_and_their_fraction_as_diffusivity(axis):
    k = "zyx".index(axis)
    mask = straight_channels((9, 10, 11), k)
    result = tortuosity(mask, axis)
    assert result.factor == pytest.approx(1.0, abs=1e-12)
    assert result.volume_fraction == pytest.approx(mask.mean())
    assert result.effective_diffusivity_ratio == pytest.approx(mask.mean(), abs=1e-12)
    assert result.method == "fd-cg-amg"


def test_channels_along_z_do_not_percolate_along_y_or_x():
    mask = straight_channels((9, 10, 11), 0)
    for axis in ("y", "x"):
        result = tortuosity(mask, axis)
        assert result.factor is None and result.effective_diffusivity_ratio == 0.0
        assert result.volume_fraction == pytest.approx(mask.mean())


def test_empty_and_full_phases():
    empty = tortuosity(np.zeros((4, 5, 6), bool), "z")
    assert (empty.factor, empty.effective_diffusivity_ratio, empty.volume_fraction) == (None, 0.0, 0.0)
    full = tortuosity(np.ones((4, 5, 6), bool), "x")
    assert full.factor == pytest.approx(1.0) and full.effective_diffusivity_ratio == pytest.approx(1.0)


def test_layers_parallel_to_the_axis_give_the_parallel_value():
    """Slabs normal to y: along z and x each phase conducts as its own fraction (factor 1); the
    mixture with diffusivities 1 and 0.2 conducts as their volume-weighted mean."""
    diffusivity = np.ones((8, 10, 7))
    diffusivity[:, 6:, :] = 0.2
    mask = diffusivity == 1.0
    for axis in ("z", "x"):
        assert tortuosity(mask, axis).factor == pytest.approx(1.0, abs=1e-12)
        assert tortuosity(mask, axis).effective_diffusivity_ratio == pytest.approx(0.6)
        assert effective_diffusivity(diffusivity, axis) == pytest.approx(0.6 * 1.0 + 0.4 * 0.2, rel=1e-10)


def test_layers_across_the_axis_give_the_series_value_and_block_a_single_phase():
    """Slabs normal to y, transport along y: series (harmonic) mean; an insulating slab stops it."""
    diffusivity = np.ones((7, 10, 8))
    diffusivity[:, 6:, :] = 0.2
    assert effective_diffusivity(diffusivity, "y") == pytest.approx(1.0 / (0.6 / 1.0 + 0.4 / 0.2), rel=1e-10)
    three = np.ones((7, 10, 8))
    three[:, 3:5] = 0.5
    three[:, 5:] = 4.0
    assert effective_diffusivity(three, 1) == pytest.approx(10 / (3 / 1.0 + 2 / 0.5 + 5 / 4.0), rel=1e-10)
    assert tortuosity(diffusivity == 1.0, "y").factor is None


def test_dead_ends_and_isolated_clusters_add_volume_but_no_flux():
    """A straight channel with side branches open at one end only, plus an isolated block: the flux
    is the channel's alone, so factor = all phase voxels / channel voxels (total-fraction convention)."""
    mask = np.zeros((12, 9, 9), dtype=bool)
    mask[:, 4, 4] = True  # the channel: 12 voxels
    mask[3, 1:4, 4] = True  # a dead-end branch of 3 voxels
    mask[8, 4, 5:9] = True  # one of 4 voxels reaching the x face: still a dead end along z
    mask[5:7, 0:2, 0:2] = True  # an isolated block of 8 voxels
    result = tortuosity(mask, "z")
    assert result.factor == pytest.approx((12 + 3 + 4 + 8) / 12, rel=1e-10)
    assert result.effective_diffusivity_ratio == pytest.approx(12 / mask.size, rel=1e-10)


@pytest.mark.parametrize("layers", [5, 12, 30])
def test_one_voxel_zigzag_is_a_resistor_chain(layers):
    """N voxels in a chain: N-1 unit links + two half voxels to the faces = resistance N, flux 1/N
    through a cross-section A; D_eff = L / (N A), volume fraction N / (L A), factor (N / L)^2."""
    mask, voxels = zigzag(layers)
    assert voxels == 2 * layers - 2
    assert tortuosity(mask, "z").factor == pytest.approx((voxels / layers) ** 2, rel=1e-10)


def test_anisotropic_voxels_enter_the_conductances():
    """The zig-zag with voxels (hz, hy, hx): z-links conduct hy*hx/hz, y-links hz*hx/hy, the two
    half voxels at the faces 2*hy*hx/hz each; D_eff = flux * L*hz / (cross-section area)."""
    mask, voxels = zigzag(10)
    hz, hy, hx = 2.0, 0.5, 1.5
    z_links, y_links = 10 - 1, voxels - 10
    resistance = z_links * hz / (hy * hx) + y_links * hy / (hz * hx) + 2 * hz / (2 * hy * hx)
    deff = (1 / resistance) * (10 * hz) / (mask.shape[1] * hy * mask.shape[2] * hx)
    result = tortuosity(mask, "z", voxel_size=(hz, hy, hx))
    assert result.effective_diffusivity_ratio == pytest.approx(deff, rel=1e-10)
    assert result.factor == pytest.approx(mask.mean() / deff, rel=1e-10)
    assert tortuosity(straight_channels((6, 8, 9), 2), "x", voxel_size=(1.0, 3.0, 0.2)).factor == pytest.approx(1.0)


def test_transposing_the_volume_and_its_voxel_size_changes_nothing():
    mask = blurred_mask((14, 16, 18), 0.5)
    spacing = (1.0, 2.0, 0.5)
    along_y = tortuosity(mask, "y", voxel_size=spacing)
    moved = np.ascontiguousarray(np.moveaxis(mask, 1, 0))
    along_z = tortuosity(moved, "z", voxel_size=(spacing[1], spacing[0], spacing[2]))
    assert along_y.factor == pytest.approx(along_z.factor, rel=1e-9)


# --------------------------------------------------------------------------- solver paths and columns


def test_multigrid_path_agrees_with_the_direct_solve(monkeypatch):
    """Above DIRECT_SOLVE_UNKNOWNS the system goes to CG + AMG: same answer as the exact solve
    within the solve tolerance, and straight channels still exactly 1."""
    mask = blurred_mask((24, 24, 24), 0.45)
    direct = tortuosity(mask, "x").factor
    monkeypatch.setattr(tortuosity_module, "DIRECT_SOLVE_UNKNOWNS", 100)
    iterative = tortuosity(mask, "x").factor
    assert direct > 1.2  # a tortuous phase, not a trivial one
    assert iterative == pytest.approx(direct, rel=5 * tortuosity_module.SOLVE_TOLERANCE)
    assert iterative <= direct * (1 + 1e-12)  # the dissipated power bounds the flux from above: the factor from below
    assert tortuosity(straight_channels((20, 24, 24), 0), "z").factor == pytest.approx(1.0, rel=1e-6)


def test_the_tolerance_bounds_the_error_from_one_side_and_a_looser_one_stops_sooner(monkeypatch, caplog):
    """The iterative flux is the dissipated power: never below the exact flux, within the tolerance
    of it, and a looser tolerance takes fewer cycles."""
    mask = blurred_mask((40, 40, 40), 0.45)
    monkeypatch.setattr(tortuosity_module, "DIRECT_SOLVE_UNKNOWNS", mask.size)
    exact = tortuosity(mask, "z").factor  # direct solve
    monkeypatch.setattr(tortuosity_module, "DIRECT_SOLVE_UNKNOWNS", 100)
    iterations = {}
    for tolerance in (1e-2, 1e-3, 1e-6):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger=tortuosity_module.__name__):
            factor = tortuosity(mask, "z", tolerance=tolerance).factor
        assert factor <= exact * (1 + 1e-12)
        assert factor == pytest.approx(exact, rel=tolerance)
        iterations[tolerance] = int(re.search(r"(\d+) iterations", caplog.text).group(1))
    assert iterations[1e-2] < iterations[1e-3] < iterations[1e-6]


def test_the_w_cycle_is_pyamgs():
    """The hand-rolled cycle (pyamg's without its residual norms) applies the same operator as
    pyamg's own W-cycle preconditioner, on a hierarchy of several levels."""
    import pyamg

    mask = blurred_mask((30, 30, 30), 0.5)
    keep = tortuosity_module._spanning(mask)
    matrix, rhs, *_ = tortuosity_module._system(mask, keep, (1.0, 1.0, 1.0))
    hierarchy = pyamg.smoothed_aggregation_solver(matrix, symmetry="hermitian", smooth=None, strength=None, max_coarse=50)
    assert len(hierarchy.levels) >= 3
    vector = np.random.default_rng(0).standard_normal(matrix.shape[0])
    expected = hierarchy.aspreconditioner(cycle="W") @ vector
    ours = np.zeros_like(vector)
    tortuosity_module._w_cycle(hierarchy, 0, ours, vector)
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def iterations_of(caplog, call) -> int:
    """CG iterations of the one iterative solve ``call`` makes (from the debug log)."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=tortuosity_module.__name__):
        call()
    return int(re.search(r"(\d+) iterations", caplog.text).group(1))


def test_the_concentration_field_falls_from_inlet_to_outlet_and_is_nan_where_no_flux_goes():
    channels = straight_channels((10, 12, 12), 0)
    channels[:, 0, 0] = True
    channels[5, 0, 0] = False  # a rod cut in two: dead ends touching one face each, no flux
    result, field = tortuosity_field(channels, "z")
    assert result.factor is not None and field.dtype == np.float32 and field.shape == channels.shape
    rods = straight_channels((10, 12, 12), 0)
    profile = 1.0 - (np.arange(10) + 0.5) / 10  # linear between the faces half a voxel beyond
    np.testing.assert_allclose(field[:, 1, 1], profile, atol=1e-6)
    assert np.isnan(field[~rods]).all() and not np.isnan(field[rods]).any()
    along_y = tortuosity_field(np.moveaxis(channels, 0, 1), "y")[1]
    np.testing.assert_allclose(np.moveaxis(along_y, 1, 0), field, atol=1e-6, equal_nan=True)
    assert tortuosity_field(channels, "z", keep_field=False)[1] is None


def test_a_warm_start_from_a_similar_volume_gives_the_same_factor_in_fewer_iterations(monkeypatch, caplog):
    """A sweep volume's solve started from the argmax's field: the answer within the tolerance
    (from the same side), in fewer CG iterations than from a straight channel's profile."""
    monkeypatch.setattr(tortuosity_module, "DIRECT_SOLVE_UNKNOWNS", 100)
    mask = blurred_mask((40, 40, 40), 0.45)
    rim = ndi.binary_dilation(mask) & ~mask
    grown = mask | (rim & (np.random.default_rng(1).random(mask.shape) < 0.3))  # ~a sweep volume's gain
    shrunk = mask & ~(ndi.binary_dilation(~mask) & (np.random.default_rng(2).random(mask.shape) < 0.3))
    _, field = tortuosity_field(mask, "z")
    for changed in (grown, shrunk):
        monkeypatch.setattr(tortuosity_module, "DIRECT_SOLVE_UNKNOWNS", changed.size)
        exact = tortuosity(changed, "z").factor
        monkeypatch.setattr(tortuosity_module, "DIRECT_SOLVE_UNKNOWNS", 100)
        cold = iterations_of(caplog, lambda: tortuosity(changed, "z"))
        warm = iterations_of(caplog, lambda: tortuosity(changed, "z", start=field))
        factor = tortuosity(changed, "z", start=field).factor
        assert factor == pytest.approx(exact, rel=tortuosity_module.SOLVE_TOLERANCE)
        assert factor <= exact * (1 + 1e-12)
        assert warm < cold
    with pytest.raises(TortuosityError, match=r"the start field has shape \(40, 40, 40\), the volume \(40, 40, 39\)"):
        tortuosity(mask[:, :, :-1], "z", start=field)


def test_the_warm_start_fills_voxels_the_field_lacks_from_their_neighbours():
    keep = np.ones((1, 1, 6), bool)
    field = np.array([[[1.0, np.nan, 0.5, np.nan, np.nan, np.nan]]], np.float32)
    profile = np.full(6, -1.0)
    start = tortuosity_module._warm_start(profile, keep, field)
    # voxel 1: mean of 1 and 0.5; voxels 3, 4, 5 grow from voxel 2, one per pass (3 passes)
    np.testing.assert_allclose(start, [1.0, 0.75, 0.5, 0.5, 0.5, 0.5])
    monkey = tortuosity_module.WARM_START_FILL_PASSES
    try:
        tortuosity_module.WARM_START_FILL_PASSES = 1
        np.testing.assert_allclose(tortuosity_module._warm_start(profile, keep, field), [1.0, 0.75, 0.5, 0.5, -1.0, -1.0])
    finally:
        tortuosity_module.WARM_START_FILL_PASSES = monkey


def test_the_solve_queue_runs_warm_starts_in_workers_as_in_this_process(monkeypatch):
    # A Dask nanny started in this process leaves OPENBLAS_NUM_THREADS=1 in its environment: the
    # spawned workers then start with single-threaded BLAS while this process keeps its threads
    # (a full CI run once gave factors differing in the last digit). The results must not care.
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    mask = blurred_mask((40, 40, 40), 0.45)  # above DIRECT_SOLVE_UNKNOWNS: iterative in the spawned workers too
    assert mask.sum() > tortuosity_module.DIRECT_SOLVE_UNKNOWNS
    grown = mask | ndi.binary_dilation(mask) & (np.random.default_rng(3).random(mask.shape) < 0.2)
    found = {}
    for workers in (1, 2):
        with SolveQueue(workers=workers) as queue:
            queue.add_mask("argmax", mask)
            queue.add_mask("grown", grown)
            for axis in ("z", "x"):
                queue.submit(("argmax", axis), "argmax", axis, keep_field=True)
            for axis in ("z", "x"):
                queue.submit(("grown", axis), "grown", axis, start_from=("argmax", axis))
            found[workers] = {task: queue.result(task) for task in
                              [("argmax", "z"), ("argmax", "x"), ("grown", "z"), ("grown", "x")]}
            with pytest.raises(ValueError, match=r"tortuosity task \('grown', 'z'\) keeps no field to start \('again', 'z'\) from"):
                queue.submit(("again", "z"), "grown", "z", start_from=("grown", "z"))
            with pytest.raises(ValueError, match=r"submitted twice"):
                queue.submit(("grown", "z"), "grown", "z")
    assert found[1] == found[2]
    assert found[1][("argmax", "z")] == tortuosity(mask, "z")
    assert found[2][("argmax", "x")] == tortuosity(mask, "x")  # a worker's solve, bit for bit this process's
    assert found[1][("grown", "x")].factor == pytest.approx(tortuosity(grown, "x").factor, rel=tortuosity_module.SOLVE_TOLERANCE)


def test_columns_cover_the_cross_section_once_and_respect_the_voxel_budget():
    shape = (20, 70, 45)
    columns = column_slices(shape, 0, 20 * 40 * 40)
    covered = np.zeros(shape, dtype=int)
    for window in columns:
        assert covered[window].size <= 20 * 40 * 40 and covered[window].shape[0] == 20
        covered[window] += 1
    assert (covered == 1).all() and len(columns) == 2  # 20 x 35 x 45 fits
    (whole,) = column_slices(shape, 1, 10**9)
    assert np.zeros(shape)[whole].shape == shape


def test_columns_are_exact_for_channels_and_a_lower_bound_of_diffusivity_otherwise():
    """Cuts between columns are no-flux walls: channels along the axis are not cut (exact), a
    tortuous phase loses the paths that cross a cut (D_eff lower, factor higher: Rayleigh)."""
    channels = straight_channels((16, 40, 40), 0)
    split = tortuosity(channels, "z", max_voxels=16 * 20 * 20)
    assert split.factor == pytest.approx(1.0) and split.method == "fd-cg-amg, 4 columns"
    mask = blurred_mask((16, 40, 40), 0.5)
    whole = tortuosity(mask, "z")
    columns = tortuosity(mask, "z", max_voxels=16 * 20 * 20)
    assert columns.effective_diffusivity_ratio < whole.effective_diffusivity_ratio
    assert columns.factor > whole.factor


def test_a_volume_too_long_for_the_voxel_budget_is_refused():
    with pytest.raises(TortuosityError, match=r"too long along axis z for 1000 voxels per solve.*raise max_voxels"):
        tortuosity(np.ones((100, 40, 40), bool), "z", max_voxels=1000)


# --------------------------------------------------------------------------- label volumes and bad input


def test_phase_tortuosity_of_a_label_volume():
    labels = np.zeros((6, 8, 10), dtype=np.uint8)
    labels[:, 4:, :] = 255
    labels[:, 4:, 5:] = 128  # Ni and YSZ share the upper half, split along x
    result = phase_tortuosity(labels, {0: "Pore", 128: "YSZ", 255: "Ni"}, phases=["ni", "pore"], axes=["z", "x"])
    assert list(result) == ["Ni", "Pore"] and list(result["Ni"]) == ["z", "x"]
    assert result["Ni"]["z"].factor == pytest.approx(1.0) and result["Ni"]["x"].factor is None
    assert result["Pore"]["x"].effective_diffusivity_ratio == pytest.approx(0.5)
    assert list(phase_tortuosity(labels, {0: "pore", 128: "ysz", 255: "ni"})) == ["pore", "ysz", "ni"]


def test_parallel_workers_give_the_serial_results():
    """Solves in spawned worker processes: the same factors as one after another, in the same order."""
    rng = np.random.default_rng(5)
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(rng.normal(size=(24, 28, 30)), 2.0)
    labels = np.digitize(smooth, np.quantile(smooth, [0.35, 0.7])).astype(np.uint8)
    phase_map = {0: "pore", 1: "ysz", 2: "ni"}
    serial = phase_tortuosity(labels, phase_map, workers=1)
    parallel = phase_tortuosity(labels, phase_map, workers=2)
    assert list(parallel) == list(serial) == ["pore", "ysz", "ni"]
    for phase in serial:
        assert list(parallel[phase]) == ["z", "y", "x"]
        for axis, result in serial[phase].items():
            assert parallel[phase][axis] == result
    assert any(r.factor is not None and r.factor > 1.2 for by_axis in serial.values() for r in by_axis.values())


def test_workers_follow_the_cores_and_the_memory(monkeypatch):
    from socseg.analysis.tortuosity import parallel_workers, solve_peak_bytes

    gib = 2**30
    assert parallel_workers([4 * gib] * 9, available=24 * gib, cores=2) == 2
    assert parallel_workers([4 * gib] * 9, available=24 * gib, cores=16) == 4  # 5 x 4 GiB > 80 % of 24 GiB
    assert parallel_workers([12 * gib, 4 * gib], available=16 * gib, cores=8) == 1
    assert parallel_workers([4 * gib] * 2, available=24 * gib, cores=16) == 2  # no more workers than solves
    monkeypatch.setattr(tortuosity_module, "available_memory_bytes", lambda: None)
    assert parallel_workers([4 * gib] * 9, cores=2) == 1  # unknown memory (no /proc/meminfo): one at a time
    mask = np.zeros((10, 10, 10), bool)
    mask[:5] = True
    assert solve_peak_bytes(mask) == 500 * tortuosity_module.PEAK_BYTES_PER_UNKNOWN + 1000 * tortuosity_module.PEAK_BYTES_PER_VOXEL


@pytest.mark.parametrize("call, message", [
    (lambda: phase_tortuosity(np.zeros((3, 3, 3), np.uint8), {0: "pore"}, workers=0), r"workers must be a whole number >= 1, got 0"),
    (lambda: tortuosity(np.ones((3, 3, 3), bool), "w"), r"axis must be one of \['z', 'y', 'x'\] or 0, 1, 2; got 'w'"),
    (lambda: tortuosity(np.ones((3, 3, 3), bool), 3), r"axis must be one of .* got 3"),
    (lambda: tortuosity(np.ones((3, 3, 3), np.uint8), 0), r"the phase mask must be boolean, got dtype uint8"),
    (lambda: tortuosity(np.ones((3, 3, 3), bool), 0, tolerance=0), r"tolerance must be a number between 0 and 1, got 0"),
    (lambda: tortuosity(np.ones((3, 3), bool), 0), r"the volume must be 3-D \(Z, Y, X\), got shape \(3, 3\)"),
    (lambda: tortuosity(np.ones((3, 3, 3), bool), 0, voxel_size=(1.0, -1.0, 1.0)),
     r"voxel size must be one or three positive numbers \(z, y, x\), got \(1.0, -1.0, 1.0\)"),
    (lambda: effective_diffusivity(-np.ones((3, 3, 3)), 0), r"diffusivities must be finite numbers >= 0"),
    (lambda: phase_tortuosity(np.full((3, 3, 3), 7, np.uint8), {0: "pore"}), r"label values \[7\] are not in the phase map"),
    (lambda: phase_tortuosity(np.zeros((3, 3, 3), np.uint8), {0: "pore"}, phases=["lsm"]),
     r"tortuosity: phases \['lsm'\] not in the phase map \(phases: \['pore'\]\)"),
])
def test_bad_input_is_refused_with_a_message_naming_it(call, message):
    with pytest.raises(TortuosityError, match=message):
        call()
