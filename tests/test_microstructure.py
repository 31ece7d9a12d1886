"""Microstructure metrics against volumes with an analytically known answer, cross-checks
against porespy / scikit-image, the real SOCPristine labels and the ``microstructure`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from scipy import ndimage as ndi

import socseg.analysis.microstructure as ms
from socseg.commands.microstructure import microstructure
from socseg.analysis.microstructure import MicrostructureError, flatten_metrics, measure, relative_errors

PHASES = {0: "pore", 128: "ysz", 255: "ni"}
PORE, YSZ, NI = 0, 128, 255


def three_slabs(shape: tuple[int, int, int] = (10, 12, 14)) -> np.ndarray:
    """Pore for y < 6; YSZ for y >= 6, z < 5; Ni for y >= 6, z >= 5: one triple line along x."""
    labels = np.full(shape, PORE, dtype=np.uint8)
    labels[:, 6:, :] = YSZ
    labels[5:, 6:, :] = NI
    return labels


def blurred_phantom(shape: tuple[int, int, int], sigma: float = 2.0, seed: int = 0) -> np.ndarray:
    field = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    low, high = np.quantile(field, [0.3, 0.7])
    return np.where(field < low, PORE, np.where(field < high, YSZ, NI)).astype(np.uint8)


def wedges(n: int, direction: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Three 120-degree wedges around a straight line through the centre; returns labels and
    the line's length inside the box of voxel centres [0, n-1]^3 (where interior edges lie)."""
    u = direction / np.linalg.norm(direction)
    centre = (n - 1) / 2 + rng.uniform(-0.5, 0.5, 3)
    a = np.cross(u, [1.0, 0, 0] if abs(u[0]) < 0.9 else [0, 1.0, 0])
    a /= np.linalg.norm(a)
    b = np.cross(u, a)
    d = np.stack(np.meshgrid(*(np.arange(n, dtype=float),) * 3, indexing="ij"), -1) - centre
    angle = (np.arctan2(d @ b, d @ a) + rng.uniform(0, 2 * np.pi)) % (2 * np.pi)
    labels = np.array([PORE, YSZ, NI], dtype=np.uint8)[(angle // (2 * np.pi / 3)).astype(int)]
    t_low, t_high = -np.inf, np.inf
    for k in range(3):
        if abs(u[k]) > 1e-12:
            t1, t2 = (0 - centre[k]) / u[k], (n - 1 - centre[k]) / u[k]
            t_low, t_high = max(t_low, min(t1, t2)), min(t_high, max(t1, t2))
    return labels, t_high - t_low


def naive_tpb(labels: np.ndarray, active: dict[int, np.ndarray] | None = None) -> list[np.ndarray]:
    """Reference TPB per edge axis, written differently: the set of phases among the four
    shifted voxel views. With ``active`` ({value: mask}), a phase counts only where its mask is set."""
    result = []
    for edge_axis in range(3):
        a, b = [k for k in range(3) if k != edge_axis]
        views = []
        for da in (0, 1):
            for db in (0, 1):
                index = [slice(None)] * 3
                index[a] = slice(da, labels.shape[a] - 1 + da)
                index[b] = slice(db, labels.shape[b] - 1 + db)
                views.append(tuple(index))
        present = [
            np.any([(labels[v] == value) & (active[value][v] if active else True) for v in views], axis=0)
            for value in (PORE, YSZ, NI)
        ]
        result.append(np.logical_and.reduce(present))
    return result


# --------------------------------------------------------------------------- fractions


def test_volume_fractions_exact_and_unknown_label_rejected():
    labels = three_slabs()
    result = measure(labels, PHASES, size_phases=[])
    assert result.volume_fraction == pytest.approx({"pore": 0.5, "ysz": 0.25, "ni": 0.25})
    labels[0, 0, 0] = 7
    with pytest.raises(MicrostructureError, match=r"\[7\]"):
        measure(labels, PHASES)
    with pytest.raises(MicrostructureError, match="3-D"):
        measure(labels[0], PHASES)


def test_volume_fractions_match_porespy():
    import porespy

    labels = blurred_phantom((20, 30, 40))
    expected = porespy.metrics.phase_fraction(labels)
    got = measure(labels, PHASES, size_phases=[]).volume_fraction
    assert [got[n] for n in ("pore", "ysz", "ni")] == pytest.approx([expected[v] for v in (PORE, YSZ, NI)])


# --------------------------------------------------------------------------- TPB


def test_tpb_three_slabs_meet_along_one_line_of_known_length():
    voxel = (2.0, 3.0, 5.0)  # z, y, x: the line runs along x, so its length is 14 x 5
    result = measure(three_slabs(), PHASES, voxel_size=voxel, unit="um", size_phases=[])
    tpb = result.tpb
    assert tpb is not None and tpb.edges == {"z": 0, "y": 0, "x": 14}
    assert tpb.length == pytest.approx(70.0)
    volume = 10 * 12 * 14 * 2.0 * 3.0 * 5.0
    assert tpb.density_edges == pytest.approx(70.0 / volume)
    assert tpb.density == pytest.approx(70.0 / volume * 2 / 3)
    # all three phases span x; along y and z at least one of them does not
    assert tpb.active_fraction == {"z": 0.0, "y": 0.0, "x": 1.0}


def test_tpb_isolated_ni_block_is_inactive_and_adds_z_edges():
    labels = three_slabs()
    labels[5:, 6:, :] = YSZ
    labels[5:, 6:, 3:10] = NI  # Ni only for x in 3..9: a 7-edge line along x, 2 x 5 edges along z
    tpb = measure(labels, PHASES, size_phases=[]).tpb
    assert tpb is not None and tpb.edges == {"z": 10, "y": 0, "x": 7}
    assert tpb.active_fraction["x"] == 0.0  # Ni no longer spans x


def test_tpb_diagonal_line_reads_l1_length_and_isotropic_correction_removes_bias_on_average():
    rng = np.random.default_rng(3)
    labels, true_length = wedges(48, np.array([1.0, 1.0, 1.0]), rng)
    tpb = measure(labels, PHASES, size_phases=[]).tpb
    # the staircase along (1,1,1) is sqrt(3) longer than the line
    assert tpb.length / true_length == pytest.approx(math.sqrt(3), rel=0.06)
    ratios = []
    for _ in range(24):
        labels, true_length = wedges(40, rng.standard_normal(3), rng)
        ratios.append(measure(labels, PHASES, size_phases=[]).tpb.length / true_length)
    assert np.mean(ratios) == pytest.approx(1.5, abs=0.08)
    assert np.mean(ratios) * ms.TPB_ISOTROPIC_CORRECTION == pytest.approx(1.0, abs=0.06)


def tilted_lines(shape: tuple[int, int, int], pore_below: int, crossings: list[float], slope: float) -> np.ndarray:
    """Pore for y < ``pore_below``; above it, bands of YSZ and Ni parted by the planes
    ``z - slope * x = c`` (c in ``crossings``; coordinates in voxels, voxel i spans [i, i + 1]).
    Each plane meets the pore face y = ``pore_below`` in one straight triple line, of direction
    (dz, dy, dx) = (slope, 0, 1)."""
    z, y, x = np.meshgrid(*(np.arange(n) + 0.5 for n in shape), indexing="ij")
    band = np.digitize(z - slope * x, crossings)
    labels = np.where(band % 2 == 0, YSZ, NI).astype(np.uint8)
    labels[y < pore_below] = PORE
    return labels


def test_tpb_density_of_parallel_triple_lines_in_um_is_exact():
    """Five straight triple lines along x in a 1.2 x 0.64 x 2.0 um box (voxels 0.05 x 0.04 x 0.1 um):
    analytic density = 5 lines x 2.0 um / 1.536 um^3 = 6.5104 um^-2. Axis-aligned lines lie on voxel
    edges, so the edge count is exact: every x-edge of each line counts once (20 per line), no other."""
    voxel = (0.05, 0.04, 0.1)
    labels = tilted_lines((24, 16, 20), pore_below=8, crossings=[4, 8, 12, 16, 20], slope=0.0)
    tpb = measure(labels, PHASES, voxel_size=voxel, unit="um", size_phases=[]).tpb
    assert tpb.edges == {"z": 0, "y": 0, "x": 5 * 20}
    assert tpb.length == pytest.approx(5 * 2.0, rel=1e-12)
    assert tpb.density_edges == pytest.approx(5 * 2.0 / (1.2 * 0.64 * 2.0), rel=1e-12)  # 6.5104 um^-2
    assert tpb.density == pytest.approx(6.5104 * 2 / 3, rel=1e-4)


def test_tpb_density_of_tilted_triple_lines_in_um_reads_their_l1_length():
    """Two straight triple lines of slope dz/dx = 1/2 (in voxels), each crossing the whole box
    along x and staying inside it along z, in a 4.8 x 2.4 x 2.0 um box of 0.1 x 0.2 x 0.05 um voxels
    (z, y, x). Each line runs 2.0 um along x and rises 2.0 um along z: true length sqrt(8) = 2.83 um.
    Discretisation: the x-edges are exact (one per voxel column, 40 x 0.05 = 2.0 um per line); the
    z-edges lie between voxel centres, so a line's z-steps count its rise between the first and
    last column centres, 39 x 0.5 = 19.5 voxels, rounded down or up (19 or 20 steps of 0.1 um).
    Staircase (L1) length: 2 x (2.0 + 1.95) = 7.9 um, +- 0.05 um per line."""
    voxel = (0.1, 0.2, 0.05)
    labels = tilted_lines((48, 12, 40), pore_below=6, crossings=[8.5, 24.5], slope=0.5)
    tpb = measure(labels, PHASES, voxel_size=voxel, unit="um", size_phases=[]).tpb
    assert tpb.edges["x"] == 2 * 40 and tpb.edges["y"] == 0
    assert 2 * 19 <= tpb.edges["z"] <= 2 * 20
    volume = 4.8 * 2.4 * 2.0
    tolerance = 2 * 0.05 + 1e-9  # um: half a z-step per line, both ways (the bound is reached)
    assert tpb.length == pytest.approx(7.9, abs=tolerance)
    assert tpb.density_edges == pytest.approx(7.9 / volume, abs=tolerance / volume)  # 0.343 +- 0.004 um^-2
    true_density = 2 * math.sqrt(2.0**2 + 2.0**2) / volume  # the staircase over-reads a tilted line
    assert tpb.density_edges / true_density == pytest.approx(7.9 / (2 * math.sqrt(8)), abs=tolerance / (2 * math.sqrt(8)))


def test_tpb_and_active_tpb_match_reference_across_chunks(monkeypatch):
    import porespy

    labels = blurred_phantom((23, 30, 34), sigma=1.5, seed=4)
    monkeypatch.setattr(ms, "CHUNK_VOXELS", 3 * 30 * 34 + 5)  # 3-slice chunks: exercises the overlaps
    result = measure(labels, PHASES, size_phases=[])
    reference = naive_tpb(labels)
    assert result.tpb.edges == {axis: int(reference[k].sum()) for k, axis in enumerate(ms.AXES)}
    assert result.tpb.edges["x"] > 50
    for k, axis in enumerate(ms.AXES):
        spanning = {v: porespy.filters.trim_nonpercolating_paths(labels == v, axis=k) for v in (PORE, YSZ, NI)}
        active = sum(int(e.sum()) for e in naive_tpb(labels, spanning))
        assert result.tpb.active_fraction[axis] == pytest.approx(active / sum(int(e.sum()) for e in reference))
    monkeypatch.setattr(ms, "CHUNK_VOXELS", 1 << 24)
    assert measure(labels, PHASES, size_phases=[]).tpb == result.tpb


def test_tpb_phase_names_case_insensitive_mapping_or_clear_error():
    labels = three_slabs()
    assert measure(labels, {0: "Pore", 128: "YSZ", 255: "Ni"}, size_phases=[]).tpb.edges["x"] == 14
    other = {0: "void", 128: "ceramic", 255: "metal"}
    skipped = measure(labels, other, size_phases=[])
    assert skipped.tpb is None and "TPB skipped" in skipped.notes[0]
    assert measure(labels, other, tpb_phases=["void", "ceramic", "metal"]).tpb.edges["x"] == 14
    with pytest.raises(MicrostructureError, match="not in the phase map"):
        measure(labels, other, tpb_phases=["pore", "ysz", "ni"])


# --------------------------------------------------------------------------- percolation


def test_percolation_spanning_isolated_and_six_connectivity():
    labels = np.full((12, 12, 12), YSZ, dtype=np.uint8)
    labels[5:7, 8:10, :] = NI  # a rod along x: 48 voxels spanning x only
    labels[1:3, 1:3, 2:4] = NI  # an isolated 8-voxel blob
    for k in range(12):  # a pore staircase touching only along edges: spans nothing with 6-connectivity
        labels[k, k, 10] = PORE
    perc = measure(labels, PHASES, size_phases=[]).percolation
    assert perc["ni"].spanning == pytest.approx({"z": 0.0, "y": 0.0, "x": 48 / 56})
    assert perc["ni"].isolated == pytest.approx(8 / 56)
    assert perc["ni"].components == 2 and perc["ni"].largest == pytest.approx(48 / 56)
    assert perc["pore"].spanning == {"z": 0.0, "y": 0.0, "x": 0.0}
    assert perc["pore"].components == 12
    assert perc["ysz"].spanning == {"z": 1.0, "y": 1.0, "x": 1.0}


def test_percolation_matches_porespy():
    import porespy

    labels = blurred_phantom((30, 36, 40), sigma=1.2, seed=7)
    perc = measure(labels, PHASES, size_phases=[]).percolation
    for value, name in PHASES.items():
        mask = labels == value
        for k, axis in enumerate(ms.AXES):
            expected = porespy.filters.trim_nonpercolating_paths(mask, axis=k).sum() / mask.sum()
            assert perc[name].spanning[axis] == pytest.approx(expected)
    assert 0 < perc["ni"].spanning["x"] < 1  # a phantom where percolation is partial


# --------------------------------------------------------------------------- surfaces


def test_interface_areas_of_slabs_are_exact_face_counts():
    voxel = (2.0, 3.0, 5.0)
    result = measure(three_slabs(), PHASES, voxel_size=voxel, size_phases=[])
    volume = 10 * 12 * 14 * 30.0
    # pore|solid plane normal to y: faces of area dz*dx; YSZ|Ni plane normal to z: dy*dx
    expected = {"pore-ysz": 5 * 14 * 10.0, "pore-ni": 5 * 14 * 10.0, "ysz-ni": 6 * 14 * 15.0}
    assert result.interface_density_faces == pytest.approx({k: v / volume for k, v in expected.items()})
    assert result.interface_density["ysz-ni"] == pytest.approx(expected["ysz-ni"] / volume * 2 / 3)
    faces = result.specific_surface_faces
    assert faces["pore"] == pytest.approx((expected["pore-ysz"] + expected["pore-ni"]) / volume)
    assert faces["ni"] == pytest.approx((expected["pore-ni"] + expected["ysz-ni"]) / volume)


@pytest.mark.parametrize("radius", [8.0, 15.3])
def test_sphere_surface_area(radius):
    from skimage.measure import marching_cubes, mesh_surface_area

    n = int(2 * radius + 6)
    centre = (n - 1) / 2 + 0.21
    z, y, x = np.ogrid[:n, :n, :n]
    sphere = (z - centre) ** 2 + (y - centre) ** 2 + (x - centre) ** 2 <= radius**2
    result = measure(np.where(sphere, NI, PORE).astype(np.uint8), {0: "pore", 255: "ni"}, size_phases=[])
    area = result.specific_surface["ni"] * n**3
    assert area == pytest.approx(4 * math.pi * radius**2, rel=0.01)
    assert result.specific_surface_faces["ni"] * n**3 == pytest.approx(1.5 * area)
    # scikit-image marching cubes on the lightly smoothed mask agrees
    verts, faces, _, _ = marching_cubes(ndi.gaussian_filter(np.pad(sphere, 2).astype(np.float32), 1.0), 0.5)
    assert mesh_surface_area(verts, faces) == pytest.approx(area, rel=0.04)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("thickness, expected", [(6, 6.0), (7, 8.0), (10, 10.0)])
def test_local_thickness_of_a_slab(thickness, expected):
    labels = np.full((30, 24, 24), PORE, dtype=np.uint8)
    labels[8 : 8 + thickness] = NI
    size = measure(labels, PHASES, size_phases=["ni"]).sizes["ni"]
    assert size.d10 == size.d50 == size.d90 == expected  # even t reads t, odd t reads t + 1
    assert size.features == 1


def test_local_thickness_of_a_sphere_and_equivalent_diameter_of_features():
    n, radius = 32, 10
    z, y, x = np.ogrid[:n, :n, :n]
    labels = np.full((n, n, n), PORE, dtype=np.uint8)
    labels[(z - 15) ** 2 + (y - 15) ** 2 + (x - 15) ** 2 <= radius**2] = NI
    labels[27:31, 27:31, 27:31] = YSZ  # a 4^3 cube, away from the sphere
    result = measure(labels, PHASES, size_phases=["ni", "ysz"])
    sphere = result.sizes["ni"]
    assert sphere.d50 == pytest.approx(2 * radius)
    assert sphere.d_mean == pytest.approx(2 * radius, rel=0.1)
    assert sphere.feature_d_mean == pytest.approx(2 * radius, rel=0.02)
    assert sum(sphere.histogram.values()) == pytest.approx(1.0)
    cube = result.sizes["ysz"]
    assert cube.feature_d_mean == pytest.approx((6 * 64 / math.pi) ** (1 / 3))
    assert 2 <= cube.d50 <= 4


def test_sizes_skipped_for_anisotropic_voxels():
    result = measure(three_slabs(), PHASES, voxel_size=(1.0, 1.0, 2.0))
    assert result.sizes == {} and any("isotropic" in note for note in result.notes)


# --------------------------------------------------------------------------- reporting


def test_flatten_metrics_and_relative_errors():
    result = measure(three_slabs(), PHASES, size_phases=["ni"])
    flat = flatten_metrics(result, prefix="test.")
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())
    assert flat["test.vf.pore"] == 0.5 and flat["test.perc.ni.x"] == 1.0 and flat["test.tpb.active.x"] == 1.0
    assert {"test.tpb.density", "test.iface.ysz-ni", "test.ssa.ni", "test.size.ni.d50"} <= set(flat)
    json.dumps(result.to_dict())
    errors = relative_errors({"a": 1.1, "b": 0.0, "c": 2.0}, {"a": 1.0, "b": 0.0, "c": 0.0, "d": 1.0})
    assert errors == pytest.approx({"a": 0.1, "b": 0.0})


# --------------------------------------------------------------------------- real data


def test_real_socpristine_labels(shared_data: Path):
    files = [shared_data / "labels" / f"slice__{i:03d}.tif" for i in range(1, 201)]
    labels = np.stack([tifffile.imread(f) for f in files])
    assert labels.shape == (200, 501, 501)
    result = measure(labels, PHASES)  # no voxel size is known for this data: voxel units
    # PROVENANCE.md: pore 0.2914, YSZ 0.4320, Ni 0.2766 for slices 1-200
    assert result.volume_fraction == pytest.approx({"pore": 0.2914, "ysz": 0.4320, "ni": 0.2766}, abs=5e-4)
    tpb = result.tpb
    assert tpb.length == sum(tpb.edges.values())
    # Edge counts of the independent reference naive_tpb on these 200 slices (counted once: 19 s on
    # 2 cores, too slow to repeat here); the labels are fixed data, so the counts are exact.
    assert tpb.edges == {"z": 23954, "y": 22383, "x": 23913}
    assert tpb.density_edges == pytest.approx((23954 + 22383 + 23913) / (200 * 501 * 501), rel=1e-12)  # 1.40e-3 voxel^-2
    assert tpb.density == pytest.approx(tpb.density_edges * 2 / 3)
    for name in ("pore", "ysz", "ni"):  # all three phases percolate through this block
        assert min(result.percolation[name].spanning.values()) > 0.85
    assert 0.5 < min(tpb.active_fraction.values()) <= 1.0
    assert 10 < result.sizes["ni"].d50 < 60


# --------------------------------------------------------------------------- command


def _run(args: list[str]):
    return CliRunner().invoke(microstructure, args, catch_exceptions=False)


def test_command_bare_multipage_tiff_with_phase_map(tmp_path):
    labels = np.where(three_slabs((10, 12, 14)) == NI, 2, np.where(three_slabs() == YSZ, 1, 0)).astype(np.uint8)
    stack = tmp_path / "labels.tif"
    tifffile.imwrite(stack, labels)
    result = _run([str(stack), "--phase-map", "0=pore,1=ysz,2=ni", "--json", "--size-phases", "none", "--unit", "voxel"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    flat = report["volume"]["flat"]
    assert flat["vf.pore"] == 0.5 and flat["tpb.density_edges"] == pytest.approx(14 / (10 * 12 * 14))
    assert report["volume"]["metrics"]["unit"] == "voxel" and report["truth"] is None
    bad = CliRunner().invoke(microstructure, [str(stack), "--unit", "voxel"])  # default map 0/128/255 lacks 1 and 2
    assert bad.exit_code == 2 and "not in the phase map" in bad.output


def test_command_volume_dirs_with_truth_table_and_json(tmp_path):
    from socseg.data.volumes import Volume, VolumeMeta, save_volume

    def save(name: str, labels: np.ndarray) -> Path:
        meta = VolumeMeta(name, labels.shape, "uint8", dict(PHASES), voxel_size_nm=50.0, has_labels=True)
        return save_volume(Volume(np.zeros(labels.shape, np.uint8), labels, meta), tmp_path / name)

    truth = three_slabs()
    pred = truth.copy()
    pred[:5, 5, :], pred[5:, 5, :] = YSZ, NI  # the pore slab one voxel thinner: the line moves
    pred_dir, truth_dir = save("pred", pred), save("truth", truth)
    out = tmp_path / "report.json"
    result = _run([str(pred_dir), "--truth", str(truth_dir), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "rel. err" in result.output and "vf.pore" in result.output and "um^-2" in result.output
    report = json.loads(out.read_text())
    assert report["relative_error"]["vf.pore"] == pytest.approx((5 / 12 - 6 / 12) / (6 / 12))
    voxel_um = 0.05
    assert report["truth"]["flat"]["tpb.density_edges"] == pytest.approx(14 * voxel_um / (1680 * voxel_um**3))
    assert report["relative_error"]["tpb.density"] == pytest.approx(0.0)  # the line only moved


def test_command_folder_of_slices_and_errors(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for z, page in enumerate(three_slabs()):
        tifffile.imwrite(folder / f"slice__{z + 1:03d}.tif", page)
    result = _run([str(folder), "--json", "--size-phases", "none", "--unit", "voxel"])
    assert json.loads(result.output)["volume"]["flat"]["vf.ni"] == 0.25
    missing = CliRunner().invoke(microstructure, [str(folder), "--phases", "a,b,c", "--unit", "voxel"])
    assert missing.exit_code == 2 and "not in the phase map" in missing.output


def _ni_segment_output(path: Path) -> np.ndarray:
    """A label stack as `socseg segment` writes it for an `ni` model: 0 = rest, 255 = Ni, map recorded."""
    from socseg.data.stacks import LabelStackWriter

    labels = np.where(three_slabs() == NI, 255, 0).astype(np.uint8)
    with LabelStackWriter(path, labels.shape, {"phase_map": {"0": "rest", "255": "ni"}, "task": "ni"}) as writer:
        writer.write(labels)
    return labels


def test_command_uses_the_phase_map_segment_recorded(tmp_path):
    stack = tmp_path / "ni_labels.tif"
    _ni_segment_output(stack)
    result = _run([str(stack), "--json", "--size-phases", "none", "--unit", "voxel"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["volume"]["metrics"]["volume_fraction"] == {"rest": 0.75, "ni": 0.25}
    flat = report["volume"]["flat"]
    assert "vf.pore" not in flat and "vf.ysz" not in flat  # not counted as pore / YSZ / Ni
    assert any("TPB skipped" in note for note in report["volume"]["metrics"]["notes"])
    same = _run([str(stack), "--json", "--size-phases", "none", "--phase-map", "255=ni,0=rest", "--unit", "voxel"])
    assert same.exit_code == 0 and json.loads(same.output)["volume"]["flat"] == flat


def test_command_refuses_a_phase_map_that_contradicts_the_recorded_one(tmp_path):
    stack = tmp_path / "ni_labels.tif"
    _ni_segment_output(stack)
    result = CliRunner().invoke(microstructure, [str(stack), "--phase-map", "0=pore,128=ysz,255=ni"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "--phase-map 0=pore,128=ysz,255=ni contradicts" in result.output and "0=rest,255=ni" in result.output
    # --truth shares --phase-map, so a recorded map there is checked the same way.
    truth = tmp_path / "truth.tif"
    tifffile.imwrite(truth, three_slabs())
    ok = _run([str(truth), "--truth", str(stack), "--json", "--size-phases", "none", "--unit", "voxel"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["truth"]["metrics"]["volume_fraction"] == {"rest": 0.75, "ni": 0.25}


@pytest.mark.parametrize("channels, kind", [(3, "RGB"), (4, "RGBA")])
def test_command_refuses_a_colour_image(tmp_path, channels, kind):
    photo = tmp_path / "photo.tif"
    tifffile.imwrite(photo, np.zeros((20, 30, channels), np.uint8), photometric="rgb")
    result = CliRunner().invoke(microstructure, [str(photo), "--phase-map", "0=pore"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {photo}: an {kind} image (20, 30, {channels}), not a grey-value slice stack")
    assert result.output.count("\n") == 1


def test_a_phase_filling_the_whole_volume_has_no_sizes_instead_of_failing():
    """What a badly trained model predicts (all one phase) must not crash the evaluate stage."""
    from socseg.analysis.microstructure import local_thickness_diameters

    diameters, counts = local_thickness_diameters(np.ones((4, 8, 8), dtype=bool), 1.0)
    assert diameters.size == 0 and counts.size == 0
    diameters, counts = local_thickness_diameters(np.pad(np.ones((4, 8, 8), bool), 1), 1.0)
    assert counts.sum() == 4 * 8 * 8 and diameters.max() > 0


def test_porespy_kernels_are_compiled_once_per_machine_not_per_process():
    """Every `socseg evaluate` process and DVC stage sizes phases: porespy's numba kernels are cached on disk."""
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    from socseg.analysis.microstructure import _porespy

    _porespy()
    from porespy.filters import _lt_methods

    kernels = [k for k in vars(_lt_methods).values() if isinstance(k, Dispatcher)]
    assert kernels and all(not isinstance(k._cache, NullCache) for k in kernels)


# --------------------------------------------------------------------------- full output, pinned


def pinned_volume() -> np.ndarray:
    """Every part of :func:`measure` non-trivial: partial percolation, isolated components, TPB
    along all three axes with part of it inactive, and sizes of two phases."""
    labels = np.full((10, 12, 14), YSZ, dtype=np.uint8)
    labels[:, :5, :] = PORE  # a pore slab spanning z and x
    labels[2:5, 5:7, :] = NI  # a Ni rod along x on the pore slab: TPB along x
    labels[:, 5:7, 10:12] = NI  # a Ni pillar along z on the pore slab: TPB along z
    labels[7:9, 8:11, 5:9] = NI  # an isolated Ni block inside the YSZ
    labels[6:8, 9:11, 8:12] = PORE  # an isolated pore touching the block: inactive TPB
    for k in range(6):  # a Ni staircase rising in z and y
        labels[k + 3, k + 2 : k + 4, 1] = NI
    return labels


PINNED_TPB_SIZES = {
    "shape": (10, 12, 14), "voxel_size": (0.5, 0.5, 0.5), "unit": "um", "phases": ["pore", "ysz", "ni"],
    "volume_fraction": {"pore": 0.4232142857142857, "ysz": 0.48988095238095236, "ni": 0.0869047619047619},
    "specific_surface": {"pore": 0.15714285714285714, "ysz": 0.25555555555555554, "ni": 0.22698412698412698},
    "specific_surface_faces": {"pore": 0.2357142857142857, "ysz": 0.3833333333333333, "ni": 0.3404761904761905},
    "interface_density": {"pore-ysz": 0.09285714285714286, "pore-ni": 0.06428571428571428,
                          "ysz-ni": 0.16269841269841268},
    "interface_density_faces": {"pore-ysz": 0.1392857142857143, "pore-ni": 0.09642857142857143,
                                "ysz-ni": 0.24404761904761904},
    "surface_correction": 0.6666666666666666,
    "percolation": {
        "pore": {"spanning": {"z": 0.9774964838255977, "y": 0.0, "x": 0.9774964838255977},
                 "isolated": 0.02250351617440225, "largest": 0.9774964838255977, "components": 2},
        "ysz": {"spanning": {"z": 1.0, "y": 0.0, "x": 1.0}, "isolated": 0.0, "largest": 1.0, "components": 1},
        "ni": {"spanning": {"z": 0.8493150684931506, "y": 0.0, "x": 0.8493150684931506},
               "isolated": 0.1506849315068493, "largest": 0.8493150684931506, "components": 2},
    },
    "tpb": {"phases": ("pore", "ysz", "ni"), "edges": {"z": 20, "y": 4, "x": 26}, "length": 25.0,
            "density_edges": 0.11904761904761904, "correction": 0.7, "density": 0.08333333333333333,
            "active_fraction": {"z": 0.84, "y": 0.0, "x": 0.84}},
    "sizes": {
        "pore": {"d_mean": 4.8115330520393815, "d10": 5.0, "d50": 5.0, "d90": 5.0,
                 "histogram": {"1": 0.02812939521800281, "3": 0.026722925457102673, "4": 0.02250351617440225,
                               "5": 0.9226441631504922},
                 "features": 2, "feature_d_mean": 3.529078101787617, "feature_d_volume_mean": 5.406491918318947},
        "ni": {"d_mean": 1.0, "d10": 1.0, "d50": 1.0, "d90": 1.0, "histogram": {"1": 1.0}, "features": 2,
               "feature_d_mean": 2.415852716723441, "feature_d_volume_mean": 2.8892488586964444},
    },
    "notes": [],
}

PINNED_SKIPS = {
    "shape": (10, 12, 14), "voxel_size": (1.0, 1.0, 2.0), "unit": "unit", "phases": ["void", "ceramic", "Ni"],
    "volume_fraction": {"void": 0.4232142857142857, "ceramic": 0.48988095238095236, "Ni": 0.0869047619047619},
    "specific_surface": {"void": 0.07499999999999998, "ceramic": 0.11626984126984126, "Ni": 0.10079365079365078},
    "specific_surface_faces": {"void": 0.11249999999999999, "ceramic": 0.1744047619047619, "Ni": 0.15119047619047618},
    "interface_density": {"void-ceramic": 0.04523809523809523, "void-Ni": 0.02976190476190476,
                          "ceramic-Ni": 0.07103174603174603},
    "interface_density_faces": {"void-ceramic": 0.06785714285714285, "void-Ni": 0.044642857142857144,
                                "ceramic-Ni": 0.10654761904761904},
    "surface_correction": 0.6666666666666666,
    "percolation": {
        "void": {"spanning": {"z": 0.9774964838255977, "y": 0.0, "x": 0.9774964838255977},
                 "isolated": 0.02250351617440225, "largest": 0.9774964838255977, "components": 2},
        "ceramic": {"spanning": {"z": 1.0, "y": 0.0, "x": 1.0}, "isolated": 0.0, "largest": 1.0, "components": 1},
        "Ni": {"spanning": {"z": 0.8493150684931506, "y": 0.0, "x": 0.8493150684931506},
               "isolated": 0.1506849315068493, "largest": 0.8493150684931506, "components": 2},
    },
    "tpb": None,
    "sizes": {},
    "notes": ["TPB skipped: phases ['pore', 'ysz', 'ni'] not all in ['void', 'ceramic', 'Ni']"
              " (name them with tpb_phases)",
              "sizes skipped: local thickness assumes isotropic voxels"],
}


def _leaves(value, path: str = ""):
    """(path, type, leaf) in output order: pins the keys, their order and the container types."""
    if isinstance(value, dict):
        yield path, dict, None
        for key, item in value.items():
            yield from _leaves(item, f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        yield path, type(value), len(value)
        for k, item in enumerate(value):
            yield from _leaves(item, f"{path}[{k}]")
    else:
        yield path, type(value), value


@pytest.mark.parametrize("phase_map, kwargs, expected", [
    (PHASES, dict(voxel_size=0.5, unit="um", size_phases=["ni", "pore"], tpb_correction=0.7), PINNED_TPB_SIZES),
    ({0: "void", 128: "ceramic", 255: "Ni"}, dict(voxel_size=(1.0, 1.0, 2.0)), PINNED_SKIPS),
], ids=["tpb-and-sizes", "tpb-and-sizes-skipped"])
def test_measure_full_output_is_pinned(phase_map, kwargs, expected):
    """The whole result dict of a fixed volume (keys, order, types, values), so a restructuring of
    :func:`measure` cannot change any number or the order a report lists them in."""
    got = list(_leaves(measure(pinned_volume(), phase_map, **kwargs).to_dict()))
    want = list(_leaves(expected))
    assert [(path, kind) for path, kind, _ in got] == [(path, kind) for path, kind, _ in want]
    for (path, _, value), (_, _, reference) in zip(got, want):
        if isinstance(reference, float):
            assert value == pytest.approx(reference, rel=1e-12, abs=1e-15), path
        else:
            assert value == reference, path


@pytest.mark.parametrize("kwargs, message", [
    (dict(tpb_phases=["pore", "ysz", "Pore"]), r"TPB needs three distinct phases, got \['pore', 'ysz', 'Pore'\]"),
    (dict(tpb_phases=["pore", "ysz"]), r"TPB needs three distinct phases, got \['pore', 'ysz'\]"),
    (dict(size_phases=["ni", "lsm"]),
     r"sizes: phases \['lsm'\] not in the phase map \(phases: \['pore', 'ysz', 'ni'\]\)"),
    (dict(voxel_size=(1.0, 0.0, 1.0)),
     r"voxel size must be one or three positive numbers \(z, y, x\), got \(1.0, 0.0, 1.0\)"),
    (dict(voxel_size=(1.0, 1.0)), r"voxel size must be one or three positive numbers"),
])
def test_measure_rejects_bad_settings_with_a_message_naming_them(kwargs, message):
    with pytest.raises(MicrostructureError, match=message):
        measure(pinned_volume(), PHASES, **kwargs)


# --------------------------------------------------------------------------- probabilities, units, tortuosity


def _probabilities(shape: tuple[int, int, int] = (12, 20, 20)) -> np.ndarray:
    """Softmax of smooth random scores: (Z, Y, X, 3) float32 probabilities of pore, YSZ, Ni."""
    rng = np.random.default_rng(3)
    scores = np.stack([ndi.gaussian_filter(rng.standard_normal(shape), 2.0) for _ in range(3)], -1)
    weights = np.exp(scores / scores.std() / 0.2)
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float32)


def _segment_outputs(folder: Path, probabilities: np.ndarray) -> tuple[Path, Path]:
    """The label stack and probability TIFF as `socseg segment OUT.tif --probabilities P.tif` writes them."""
    from socseg.inference.segment import OutputWriters, SegmentOutputs

    labels = np.array([PORE, YSZ, NI], np.uint8)[np.argmax(probabilities, -1)]
    outputs = SegmentOutputs(folder / "labels.tif", probabilities=folder / "probabilities.tif")
    metadata = {"phase_map": {str(k): v for k, v in PHASES.items()}, "task": "phases"}
    with OutputWriters(outputs, labels.shape, metadata, ["pore", "ysz", "ni"]) as writers:
        writers.write(labels, probabilities)
    return outputs.labels, outputs.probabilities


def _zarr_store(path: Path, probabilities: np.ndarray | None, labels: np.ndarray, voxel_size_nm: float | None) -> Path:
    """A store as `socseg segment OUT.zarr [--probabilities]` writes it (uint8 P x 255 beside the labels)."""
    from socseg.analysis.uncertainty import quantise
    from socseg.data.chunked import ChunkedLabels

    metadata = {"phase_map": {str(k): v for k, v in PHASES.items()}}
    store = ChunkedLabels.create_or_resume(path, labels.shape, 5, {}, metadata,
                                           voxel_size_nm, n_classes=0 if probabilities is None else 3)
    for index in range(store.n_chunks):
        start, stop = store.chunk(index)
        extra = () if probabilities is None else (quantise(probabilities[start:stop]),
                                                  np.zeros(labels[start:stop].shape, np.uint8))
        store.write(index, labels[start:stop], *extra)
    return path


def test_command_probability_tiff_reports_intervals_and_whether_they_cover_the_truth(tmp_path):
    labels, probabilities = _segment_outputs(tmp_path, _probabilities())
    result = _run([str(probabilities), "--truth", str(labels), "--voxel-size", "50", "--json", "--size-phases", "none"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["volume"]["kind"] == "probabilities" and report["volume"]["metrics"]["unit"] == "um"
    stored = np.moveaxis(tifffile.imread(probabilities), 1, -1)  # (Z, C, Y, X) uint8 -> channels last
    argmax = np.array([PORE, YSZ, NI], np.uint8)[np.argmax(stored, -1)]
    assert 0 < np.sum(argmax != tifffile.imread(labels)) <= 1  # segment's labels but for a tie within 1/255
    value = flatten_metrics(measure(argmax, PHASES, voxel_size=0.05, unit="um", size_phases=[]))
    assert report["volume"]["flat"] == pytest.approx(value, rel=1e-12)
    intervals = report["intervals"]
    assert set(intervals) == set(report["volume"]["flat"])
    assert all(i["low"] <= i["value"] <= i["high"] for i in intervals.values())
    assert intervals["vf.ni"]["high"] - intervals["vf.ni"]["low"] > 0.01
    assert report["covered"] == {key: True for key in intervals}
    method = report["interval_method"]
    assert len(method["samples"]) == 12 and method["method"]["spread"] == 1.0
    assert set(method["expected_volume_fraction"]) == {"pore", "ysz", "ni"}
    table = _run([str(probabilities), "--truth", str(labels), "--voxel-size", "50", "--size-phases", "none"]).output
    assert table.splitlines()[0].split() == ["metric", "value", "low", "high", "labels", "rel.", "err", "covered"]
    assert "least sure" in table and " NO" not in table
    refused = CliRunner().invoke(microstructure, [str(probabilities), "--size-phases", "none"])  # no voxel size known
    assert refused.exit_code == 2 and "voxel size of" in refused.output and "--voxel-size NM" in refused.output


def test_command_zarr_probabilities_use_the_recorded_voxel_size_and_match_the_tiff(tmp_path):
    probabilities = _probabilities()
    labels, tif = _segment_outputs(tmp_path, probabilities)
    store = _zarr_store(tmp_path / "labels.zarr", probabilities, tifffile.imread(labels), 50.0)
    from_zarr = _run([str(store), "--json", "--size-phases", "none", "--samples", "6", "--spread", "2"])
    assert from_zarr.exit_code == 0, from_zarr.output
    zarr_report = json.loads(from_zarr.output)
    assert zarr_report["volume"]["kind"] == "probabilities"
    assert zarr_report["volume"]["metrics"]["voxel_size"] == [0.05] * 3
    assert len(zarr_report["interval_method"]["samples"]) == 6
    tif_report = json.loads(_run([str(tif), "--json", "--size-phases", "none", "--samples", "6", "--spread", "2",
                                  "--voxel-size", "50"]).output)
    assert zarr_report["intervals"] == tif_report["intervals"]
    argmax_only = json.loads(_run([str(store), "--json", "--size-phases", "none", "--samples", "0"]).output)
    assert all(i["low"] == i["value"] == i["high"] for i in argmax_only["intervals"].values())
    assert argmax_only["interval_method"]["samples"] == []


def test_command_refuses_um_densities_without_a_voxel_size_and_takes_the_override(tmp_path):
    stack = tmp_path / "labels.tif"
    tifffile.imwrite(stack, three_slabs())
    refused = CliRunner().invoke(microstructure, [str(stack), "--size-phases", "none"])
    assert refused.exit_code == 2 and refused.output.count("\n") == 1
    assert refused.output.startswith(f"error: the voxel size of {stack} is unknown")
    assert "pass --voxel-size NM for lengths in um, or --unit voxel for lengths in voxels" in refused.output
    in_um = json.loads(_run([str(stack), "--size-phases", "none", "--json", "--voxel-size", "50"]).output)["volume"]
    in_voxels = json.loads(_run([str(stack), "--size-phases", "none", "--json", "--unit", "voxel"]).output)["volume"]
    assert in_um["metrics"]["unit"] == "um" and in_voxels["metrics"]["unit"] == "voxel"
    assert in_um["flat"]["tpb.density_edges"] == pytest.approx(in_voxels["flat"]["tpb.density_edges"] / 0.05**2)
    assert in_um["flat"]["ssa.ni"] == pytest.approx(in_voxels["flat"]["ssa.ni"] / 0.05)
    both = CliRunner().invoke(microstructure, [str(stack), "--unit", "voxel", "--voxel-size", "50"])
    assert both.exit_code == 2 and "--voxel-size 50 and --unit voxel contradict each other" in both.output
    store = _zarr_store(tmp_path / "labels.zarr", None, three_slabs(), 50.0)  # the store records its scale
    from_store = json.loads(_run([str(store), "--size-phases", "none", "--json"]).output)["volume"]
    assert from_store["kind"] == "labels" and from_store["flat"] == pytest.approx(in_um["flat"])


def test_command_refuses_interval_options_that_do_not_apply(tmp_path):
    stack = tmp_path / "labels.tif"
    tifffile.imwrite(stack, three_slabs())
    on_labels = CliRunner().invoke(microstructure, [str(stack), "--unit", "voxel", "--samples", "4"])
    assert on_labels.exit_code == 2
    assert "--samples/--spread set the intervals of a probability volume" in on_labels.output
    _, probabilities = _segment_outputs(tmp_path, _probabilities())
    too_few = CliRunner().invoke(microstructure, [str(probabilities), "--unit", "voxel", "--samples", "5"])
    assert too_few.exit_code == 2 and "5 samples cannot sweep 3 classes: at least 6" in too_few.output


def test_command_tortuosity_flag_asks_measure_for_it(tmp_path, monkeypatch):
    import socseg.commands.microstructure as command

    calls: list[dict] = []

    def recording_measure(labels, phase_map, **kwargs):
        calls.append(kwargs)  # what tortuosity=True computes is measure's own test; here: the command asks for it
        return measure(labels, phase_map, **{k: v for k, v in kwargs.items() if k != "tortuosity"})

    monkeypatch.setattr(command, "measure", recording_measure)
    stack = tmp_path / "labels.tif"
    tifffile.imwrite(stack, three_slabs())
    for flags, expected in (([], None), (["--tortuosity"], True), (["--no-tortuosity"], None)):
        assert _run([str(stack), "--unit", "voxel", "--size-phases", "none", *flags]).exit_code == 0
        assert calls.pop().get("tortuosity") == expected, flags
    assert _run([str(stack), "--unit", "voxel", "--size-phases", "none", "--tortuosity",
                 "--tortuosity-max-voxels", "5000"]).exit_code == 0
    assert calls.pop()["tortuosity_max_voxels"] == 5000
    refused = _run([str(stack), "--unit", "voxel", "--tortuosity", "--tortuosity-max-voxels", "10"])
    assert refused.exit_code == 2 and "--tortuosity-max-voxels" in refused.output
    assert _run([str(stack), "--unit", "voxel", "--size-phases", "none", "--tortuosity",
                 "--tortuosity-workers", "1"]).exit_code == 0
    assert calls.pop()["tortuosity_workers"] == 1
    refused = _run([str(stack), "--unit", "voxel", "--tortuosity", "--tortuosity-workers", "0"])
    assert refused.exit_code == 2 and "--tortuosity-workers" in refused.output


def test_tortuosity_max_voxels_solves_in_columns():
    labels = np.zeros((32, 32, 32), np.uint8)
    labels[:, :, 16:] = 1  # two slabs along z: each phase straight, factor 1
    whole = measure(labels, {0: "pore", 1: "ni"}, size_phases=[], tortuosity=True)
    columns = measure(labels, {0: "pore", 1: "ni"}, size_phases=[], tortuosity=True, tortuosity_max_voxels=32 * 32 * 17)
    assert whole.tortuosity["ni"]["z"].method == "fd-cg-amg"
    assert columns.tortuosity["ni"]["z"].method == "fd-cg-amg, 2 columns"
    assert columns.tortuosity["ni"]["z"].factor == pytest.approx(1.0, abs=1e-6)  # straight: no bias to see here
