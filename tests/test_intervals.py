"""Intervals on the microstructure metrics from class probabilities (socseg.analysis.intervals):
they contain the argmax value, vanish for one-hot probabilities, cover the truth where the
probabilities are calibrated, and read the same from an array, a probability TIFF and a Zarr store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from scipy.special import softmax

import socseg.analysis.tortuosity as tortuosity_module
from socseg.analysis.intervals import (
    LOG_SCALE,
    BiasSweep,
    MetricInterval,
    ProbabilityVolume,
    class_margins,
    decide,
    holds_probabilities,
    measure_with_intervals,
    metric_intervals,
    recorded_voxel_size_nm,
    sweep_intervals,
)
from socseg.analysis.microstructure import flatten_metrics, measure
from socseg.analysis.tortuosity import tortuosity
from socseg.analysis.uncertainty import PROBABILITIES_CONTENT
from socseg.data.chunked import ChunkedLabels
from socseg.data.stacks import LabelStackWriter, ProbabilityStackWriter
from socseg.data.volumes import VolumeError

NAMES = ["pore", "ysz", "ni"]
SHAPE = (24, 40, 40)


def smooth_fields(shape: tuple[int, int, int] = SHAPE, seed: int = 0, sigma: float = 3.0) -> np.ndarray:
    """(Z, Y, X, 3) smooth random scores: their argmax is a three-phase structure with TPB."""
    rng = np.random.default_rng(seed)
    fields = np.stack([ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap") for _ in range(3)], -1)
    return fields / fields.std()


def blurred_one_hot(labels: np.ndarray, sigma: float) -> np.ndarray:
    """P(class) when the truth is ``labels`` shifted by a random N(0, sigma^2) translation: the
    Gaussian blur of its one-hot maps, calibrated voxel by voxel by construction."""
    return np.stack([ndi.gaussian_filter((labels == c).astype(np.float32), sigma, mode="wrap")
                     for c in range(3)], -1)


def _phantom() -> np.ndarray:
    return np.argmax(smooth_fields(), -1).astype(np.uint8)


def test_every_interval_contains_the_argmax_value_and_the_expected_volume_fraction():
    probabilities = softmax(smooth_fields() / 0.15, axis=-1)
    result = measure_with_intervals(ProbabilityVolume.from_array(probabilities, NAMES), size_phases=["ni"])
    argmax = np.argmax(np.rint(probabilities * 255), -1).astype(np.uint8)  # ties: as the stored uint8 decides
    expected = measure(argmax, dict(enumerate(NAMES)), size_phases=["ni"])
    assert flatten_metrics(result.result) == flatten_metrics(expected)
    assert len(result.samples) == 12 and {s.swept_class for s in result.samples} == set(NAMES)
    for key, interval in result.intervals.items():
        assert interval.low <= interval.value <= interval.high, key
    assert result.intervals["vf.ni"].width > 0 and result.intervals["tpb.density"].width > 0
    for name in NAMES:  # mean(P) lies in [vf - expected wrong, vf + expected missed] by construction
        expected = float(probabilities[..., NAMES.index(name)].mean())
        assert result.intervals[f"vf.{name}"].covers(result.expected_volume_fraction[name])
        assert result.expected_volume_fraction[name] == pytest.approx(expected, abs=2e-3)
    assert result.notes == []


def test_the_interval_shrinks_to_zero_width_as_probabilities_become_one_hot():
    fields = smooth_fields()
    widths = []
    for temperature in (0.3, 0.1, 0.03):
        intervals = metric_intervals(softmax(fields / temperature, axis=-1), NAMES, size_phases=[])
        widths.append({key: intervals[key].width for key in ("vf.ni", "ssa.ysz", "iface.pore-ni")})
    for key in widths[0]:
        assert widths[0][key] > widths[1][key] > widths[2][key] > 0, (key, widths)
    one_hot = np.eye(3, dtype=np.uint8)[np.argmax(fields, -1)] * 255
    result = measure_with_intervals(ProbabilityVolume.from_array(one_hot, NAMES), size_phases=[])
    assert all(interval.width == 0 for interval in result.intervals.values())
    assert all(sample.changed_fraction == 0 for sample in result.samples)


def test_calibrated_blurred_phantom_intervals_cover_the_truth():
    """Probabilities of a known noise model (the truth under a random translation, sigma = 0.5
    voxel) are calibrated; the intervals of the argmax cover the truth's fractions and TPB."""
    truth = _phantom()
    true_flat = flatten_metrics(measure(truth, dict(enumerate(NAMES)), size_phases=[]))
    result = measure_with_intervals(ProbabilityVolume.from_array(blurred_one_hot(truth, 0.5), NAMES), size_phases=[])
    for key in ("vf.pore", "vf.ysz", "vf.ni", "tpb.density", "ssa.ni", "iface.pore-ysz"):
        assert result.intervals[key].covers(true_flat[key]), (key, true_flat[key], result.intervals[key])
    assert result.intervals["vf.ni"].width > 0.01  # not covering by a zero-width coincidence


def test_a_wider_spread_gives_wider_intervals():
    probabilities = ProbabilityVolume.from_array(blurred_one_hot(_phantom(), 0.7), NAMES)
    narrow = measure_with_intervals(probabilities, BiasSweep(6, 0.5), size_phases=[]).intervals["vf.ni"]
    wide = measure_with_intervals(probabilities, BiasSweep(6, 2.0), size_phases=[]).intervals["vf.ni"]
    assert wide.low < narrow.low < narrow.value < narrow.high < wide.high


def test_the_bias_moves_as_many_voxels_as_asked_where_the_model_is_least_sure():
    probabilities = ProbabilityVolume.from_array(softmax(smooth_fields() / 0.2, axis=-1), NAMES)
    argmax, _ = decide(probabilities)
    margins = class_margins(probabilities)
    ni = NAMES.index("ni")
    for voxels in (50.0, -50.0, float(margins.expected_missed[ni]), -float(margins.expected_wrong[ni])):
        bias = np.zeros(3, dtype=np.int64)
        bias[ni] = margins.bias_moving(ni, voxels)
        labels, changed = decide(probabilities, bias, argmax)
        gained = int(np.sum(labels == ni)) - int(np.sum(argmax == ni))
        assert np.sign(gained) == np.sign(voxels) and abs(gained) >= abs(round(voxels)), (voxels, gained)
        assert changed == abs(gained)  # only the swept class's boundary voxels change
        bias[ni] -= int(np.sign(voxels))  # one step less moves fewer than asked: the smallest bias that does
        fewer = int(np.sum(decide(probabilities, bias)[0] == ni)) - int(np.sum(argmax == ni))
        assert abs(fewer) < abs(round(voxels))
    assert margins.bias_moving(ni, 0.0) == 0


def test_tiff_zarr_and_array_paths_agree_exactly(tmp_path):
    """uint8 stored probabilities, read block by block from a TIFF memory map or a Zarr store, give
    the same intervals as the in-memory float array they were quantised from."""
    probabilities = blurred_one_hot(_phantom(), 0.7)
    reference = measure_with_intervals(ProbabilityVolume.from_array(probabilities, NAMES), size_phases=[])
    quantised = np.rint(probabilities * 255).astype(np.uint8)
    tif = tmp_path / "probabilities.tif"
    with ProbabilityStackWriter(tif, SHAPE, NAMES, {"content": PROBABILITIES_CONTENT}) as writer:
        writer.write(quantised)
    phase_map = {"0": "pore", "128": "ysz", "255": "ni"}
    store = ChunkedLabels.create_or_resume(tmp_path / "labels.zarr", SHAPE, 5, {}, {"phase_map": phase_map},
                                           voxel_size_nm=40.0, n_classes=3)
    for index in range(store.n_chunks):
        start, stop = store.chunk(index)
        store.write(index, np.zeros((stop - start, *SHAPE[1:]), np.uint8), quantised[start:stop],
                    np.zeros((stop - start, *SHAPE[1:]), np.uint8))
    volumes = [ProbabilityVolume.open(tif), ProbabilityVolume.open(tmp_path / "labels.zarr"),
               ProbabilityVolume.from_array(quantised, NAMES)]
    volumes.append(ProbabilityVolume(*(lambda v: (v.name, v.shape, NAMES, v.read))(volumes[2]), block_depth=3))
    assert volumes[1].voxel_size_nm == 40.0 and volumes[1].block_depth == 5 and volumes[0].voxel_size_nm is None
    for volume in volumes:
        assert volume.class_names == NAMES and volume.shape == SHAPE
        got = measure_with_intervals(volume, size_phases=[])
        assert got.intervals == reference.intervals
        assert got.expected_volume_fraction == reference.expected_volume_fraction


def test_probability_volumes_are_recognised_by_their_record_not_their_name(tmp_path):
    labels_named_probs = tmp_path / "probabilities.tif"
    with LabelStackWriter(labels_named_probs, (2, 4, 4), {"phase_map": {"0": "pore"}}) as writer:
        writer.write(np.zeros((2, 4, 4), np.uint8))
    probs_named_labels = tmp_path / "labels.tif"
    record = {"content": PROBABILITIES_CONTENT}
    with ProbabilityStackWriter(probs_named_labels, (2, 4, 4), ["rest", "ni"], record) as writer:
        writer.write(np.zeros((2, 4, 4, 2), np.uint8))
    plain, other = tmp_path / "plain.zarr", tmp_path / "probs.zarr"
    ChunkedLabels.create_or_resume(plain, (2, 4, 4), 2, {}, {"phase_map": {"0": "pore"}})
    ChunkedLabels.create_or_resume(other, (2, 4, 4), 2, {}, {"phase_map": {"0": "rest", "255": "ni"}}, n_classes=2)
    tifffile.imwrite(tmp_path / "grey.tif", np.zeros((2, 4, 4), np.uint16))
    assert holds_probabilities(probs_named_labels) and holds_probabilities(other)
    for path in (labels_named_probs, plain, tmp_path / "grey.tif", tmp_path):
        assert not holds_probabilities(path), path
        with pytest.raises(VolumeError, match="holds no class probabilities"):
            ProbabilityVolume.open(path)
    with pytest.raises(VolumeError, match=r"not finished \(chunks \[0\] missing\)"):
        ProbabilityVolume.open(other)  # created, nothing written yet
    assert ProbabilityVolume.open(probs_named_labels).class_names == ["rest", "ni"]
    assert recorded_voxel_size_nm(plain) is None and recorded_voxel_size_nm(probs_named_labels) is None


def test_two_class_probabilities_sweep_the_second_class_only():
    p_ni = ndi.gaussian_filter((smooth_fields()[..., 0] > 0.3).astype(np.float32), 0.8)[..., np.newaxis]
    result = measure_with_intervals(ProbabilityVolume.from_array(p_ni, ["rest", "ni"]), BiasSweep(4), size_phases=[])
    assert [(s.swept_class, s.share) for s in result.samples] == [("ni", 1.0), ("ni", 0.5), ("ni", -1.0), ("ni", -0.5)]
    assert flatten_metrics(result.result)["vf.ni"] == pytest.approx(float(np.mean(p_ni > 0.5)))
    assert result.intervals["vf.rest"].low == pytest.approx(1 - result.intervals["vf.ni"].high)
    assert all(0 < s.threshold < 1 and (s.threshold < 0.5) == (s.share > 0) for s in result.samples)


@pytest.mark.parametrize("sweep, n_classes, message", [
    (dict(samples=5), 3, "5 samples cannot sweep 3 classes: at least 6"),
    (dict(samples=1), 2, "1 samples cannot sweep 1 classes: at least 2"),
    (dict(samples=-1), 3, "samples must be >= 0"),
    (dict(spread=0.0), 3, "spread must be a positive number"),
    (dict(spread=float("nan")), 3, "spread must be a positive number"),
])
def test_bad_sweeps_are_refused_with_a_message_naming_them(sweep, n_classes, message):
    with pytest.raises(ValueError, match=message):
        BiasSweep(**sweep).plan(n_classes)


def test_sweep_plan_shares_samples_between_classes_and_directions():
    assert BiasSweep(0).plan(3) == []
    plan = BiasSweep(13, 2.0).plan(3)
    assert [c for c, _ in plan] == [0] * 5 + [1] * 4 + [2] * 4
    assert [s for c, s in plan if c == 0] == [2.0, 4 / 3, 2 / 3, -2.0, -1.0]
    assert BiasSweep(6).plan(2) == [(1, 1.0), (1, 2 / 3), (1, 1 / 3), (1, -1.0), (1, -2 / 3), (1, -1 / 3)]


def test_missing_tortuosity_is_an_unbounded_interval_and_other_gaps_a_note():
    value = {"vf.ni": 0.3, "tau.ni.z": 2.0, "size.ni.d50": 1.0}
    samples = [{"vf.ni": 0.25, "tau.ni.z": 2.5}, {"vf.ni": 0.35, "tau.ni.z": 1.8, "size.ni.d50": 2.0, "tau.ni.x": 3.0}]
    intervals, notes = sweep_intervals(value, samples)
    assert intervals["vf.ni"] == MetricInterval(0.3, 0.25, 0.35)
    assert intervals["tau.ni.z"] == MetricInterval(2.0, 1.8, 2.5)
    assert intervals["size.ni.d50"] == MetricInterval(1.0, 1.0, 2.0)
    assert intervals["tau.ni.x"] == MetricInterval(math.inf, 3.0, math.inf)  # the argmax does not percolate
    assert intervals["tau.ni.x"].to_dict() == {"value": None, "low": 3.0, "high": None}
    assert notes == ["size.ni.d50: not defined in 1 of 2 sweep volumes (range over the others)"]
    value["tau.ni.x"] = 2.9
    assert sweep_intervals(value, samples)[0]["tau.ni.x"] == MetricInterval(2.9, 2.9, math.inf)


def test_samples_without_a_phase_s_tortuosity_do_not_count_for_its_transport_keys():
    value = {"vf.ni": 0.3, "tau.ni.z": 2.0, "deff.ni.z": 0.15, "tau.ysz.z": 1.5}
    samples = [{"vf.ni": 0.25, "tau.ni.z": 2.5, "deff.ni.z": 0.12}, {"vf.ni": 0.28, "tau.ysz.z": 1.7},
               {"vf.ni": 0.35, "tau.ni.z": 1.8, "deff.ni.z": 0.19}]
    intervals, notes = sweep_intervals(value, samples, [("Ni",), ("ysz",), ("ni",)])
    assert intervals["tau.ni.z"] == MetricInterval(2.0, 1.8, 2.5)  # not unbounded: sample 2 was not asked
    assert intervals["deff.ni.z"] == MetricInterval(0.15, 0.12, 0.19)
    assert intervals["tau.ysz.z"] == MetricInterval(1.5, 1.5, 1.7)
    assert intervals["vf.ni"] == MetricInterval(0.3, 0.25, 0.35)
    assert notes == []
    assert sweep_intervals(value, samples)[0]["tau.ni.z"].high == math.inf  # counted, it would not percolate


def test_each_phase_s_tortuosity_is_measured_on_its_own_class_s_extremes_only():
    probabilities = softmax(smooth_fields((16, 24, 24)) / 0.15, axis=-1)
    result = measure_with_intervals(ProbabilityVolume.from_array(probabilities, NAMES), BiasSweep(12),
                                    size_phases=[], tortuosity=["ni", "pore"])
    measured = {(s.swept_class, s.share): s.tortuosity for s in result.samples if s.tortuosity}
    assert measured == {("pore", 1.0): ("pore",), ("pore", -1.0): ("pore",), ("ysz", 1.0): ("ysz",),
                        ("ysz", -1.0): ("ysz",), ("ni", 1.0): ("ni",), ("ni", -1.0): ("ni",)}
    for s in result.samples:
        if s.changed_fraction > 0:
            phases = {k.split(".")[1] for k in s.metrics if k.startswith(("tau.", "deff."))}
            assert phases == ({s.swept_class} & {"ni", "pore"} if s.tortuosity else set())
    taus = [s.metrics["tau.ni.z"] for s in result.samples if "tau.ni.z" in s.metrics] + [result.intervals["tau.ni.z"].value]
    assert len(taus) == 3 and (result.intervals["tau.ni.z"].low, result.intervals["tau.ni.z"].high) == (min(taus), max(taus))
    assert not any(k.startswith("tau.ysz") for k in result.intervals)


def test_sweep_volumes_started_from_the_argmax_field_get_a_fresh_solve_s_tortuosity(monkeypatch):
    """The sweep's solves start from the argmax's concentration field (one queue for all volumes):
    each sweep volume's factor is what a solve of its own labels from scratch gives, to the
    solve tolerance; the argmax's is that solve exactly."""
    monkeypatch.setattr(tortuosity_module, "DIRECT_SOLVE_UNKNOWNS", 100)  # CG in this process (workers 1)
    volume = ProbabilityVolume.from_array(softmax(smooth_fields((24, 36, 36)) / 0.15, axis=-1), NAMES)
    result = measure_with_intervals(volume, BiasSweep(6), size_phases=[], tortuosity=["ni"], tortuosity_workers=1)
    argmax, _ = decide(volume)
    assert result.intervals["tau.ni.z"].value == tortuosity(argmax == 2, "z").factor
    assert result.result.tortuosity["ni"]["x"] == tortuosity(argmax == 2, "x")
    checked = 0
    for sample in result.samples:
        if sample.tortuosity == ("ni",):
            bias = np.zeros(3, np.int64)
            bias[NAMES.index(sample.swept_class)] = round(sample.bias * LOG_SCALE)
            labels, changed = decide(volume, bias, argmax)
            assert changed > 0
            for axis in ("z", "y", "x"):
                fresh = tortuosity(labels == 2, axis)  # deff: also where Ni stops percolating (no factor)
                assert sample.metrics[f"deff.ni.{axis}"] == pytest.approx(fresh.effective_diffusivity_ratio,
                                                                          rel=tortuosity_module.SOLVE_TOLERANCE)
                assert (f"tau.ni.{axis}" in sample.metrics) == (fresh.factor is not None)
                checked += 1
    assert checked == 6  # Ni's two extremes, three axes each


@pytest.mark.parametrize("array, names, message", [
    (np.zeros((4, 4, 4), np.float32), NAMES, r"must be \(Z, Y, X, classes\), got shape \(4, 4, 4\)"),
    (np.zeros((2, 4, 4, 3), np.float32), ["a", "b"], "3 probability channels but 2 class names"),
    (np.zeros((2, 4, 4, 3), np.int32), NAMES, "must be uint8 .* or float in \\[0, 1\\], got int32"),
])
def test_bad_probability_arrays_are_refused(array, names, message):
    with pytest.raises(VolumeError, match=message):
        ProbabilityVolume.from_array(array, names)


def test_a_probability_tiff_re_saved_compressed_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "probabilities.tif"
    with ProbabilityStackWriter(path, (2, 4, 4), NAMES, {"content": PROBABILITIES_CONTENT}) as writer:
        writer.write(np.zeros((2, 4, 4, 3), np.uint8))
    with tifffile.TiffFile(path) as tif:
        metadata = tif.imagej_metadata
    tifffile.imwrite(path, np.zeros((2, 3, 4, 4), np.uint8), imagej=True, compression="zlib",
                     metadata={"Info": metadata["Info"], "axes": "ZCYX"})
    assert holds_probabilities(path)
    with pytest.raises(VolumeError, match="cannot map the probability pages .* socseg segment --probabilities"):
        ProbabilityVolume.open(path)
