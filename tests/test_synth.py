"""The synthetic phantom: deterministic, right fractions and grey levels, hard but not too hard."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from socseg.params import load_params, override
from socseg.data.synth import synth_from_params, synth_volume
from socseg.data.volumes import VolumeError

SHAPE = (24, 96, 96)
REPO = Path(__file__).resolve().parents[1]


def synth(**changes):
    """synth_volume with the settings of params.yaml (every one is required), ``changes`` applied."""
    params = load_params(REPO / "params.yaml")
    settings = {k: v for k, v in params["synth"].items() if k != "check_against"}
    settings.update(phase_map=params["data"]["phase_map"], **changes)
    return synth_volume("phantom", **settings)


@pytest.fixture(scope="module")
def phantom():
    return synth(shape=SHAPE, seed=0)


def test_deterministic(phantom):
    again = synth(shape=SHAPE, seed=0)
    np.testing.assert_array_equal(again.image, phantom.image)
    np.testing.assert_array_equal(again.labels, phantom.labels)
    other = synth(shape=SHAPE, seed=1)
    assert not np.array_equal(other.labels, phantom.labels)
    assert not np.array_equal(other.image, phantom.image)


def test_fractions_levels_and_labels(phantom):
    assert phantom.image.dtype == np.uint16 and phantom.image.shape == SHAPE
    assert set(np.unique(phantom.labels)) <= {0, 128, 255}
    fractions = phantom.phase_fractions()
    for phase, target in {"pore": 0.30, "ysz": 0.43, "ni": 0.27}.items():
        assert fractions[phase] == pytest.approx(target, abs=0.02)
    means = [phantom.image[phantom.labels == v].mean() for v in (0, 128, 255)]
    assert means[0] < means[1] < means[2]


def test_phases_form_networks(phantom):
    # a cermet's phases percolate: each phase is dominated by one connected cluster
    for value in (0, 128, 255):
        mask = phantom.labels == value
        clusters, _ = ndimage.label(mask)
        assert np.bincount(clusters.ravel())[1:].max() > 0.8 * mask.sum()


def test_two_threshold_rule_is_good_not_perfect(phantom):
    grey = phantom.image.astype(np.float32)
    low, high = (22500 + 35000) / 2, (35000 + 40900) / 2
    predicted = np.where(grey < low, 0, np.where(grey < high, 128, 255))
    accuracy = float((predicted == phantom.labels).mean())
    assert 0.8 < accuracy < 0.995


def test_default_shape_is_fast(params):
    start = time.perf_counter()
    volume = synth_from_params(params, "sample")
    assert volume.image.shape == (48, 192, 192)
    assert time.perf_counter() - start < 10


def test_from_params_and_overrides(params):
    volume = synth_from_params(params, "demo", shape=(8, 32, 32), seed=3)
    assert volume.meta.name == "demo" and volume.image.shape == (8, 32, 32)
    assert volume.meta.phase_map == {int(k): v for k, v in params["data"]["phase_map"].items()}
    assert volume.meta.extra["synth"]["seed"] == 3
    changed = override(params, "synth", fractions={"pore": 0.5, "ysz": 0.3, "ni": 0.2})
    fractions = synth_from_params(changed, "demo", shape=(8, 32, 32)).phase_fractions()
    assert fractions["pore"] == pytest.approx(0.5, abs=0.01)


def test_bad_settings():
    with pytest.raises(VolumeError, match="sum to 1"):
        synth(shape=(4, 8, 8), fractions={"pore": 0.5, "ysz": 0.5, "ni": 0.5})
    with pytest.raises(VolumeError, match="phase map"):
        synth(shape=(4, 8, 8), fractions={"pore": 0.5, "metal": 0.5})
    with pytest.raises(VolumeError, match="phase map"):
        synth(shape=(4, 8, 8), grey_levels={"pore": 1.0, "ysz": 2.0})
    with pytest.raises(VolumeError, match="shape"):
        synth(shape=(4, 8))
    with pytest.raises(VolumeError, match="grain_size"):
        synth(shape=(4, 8, 8), grain_size=0)


def test_builtin_sample_is_the_one_data_dvc_versions(params, repo_root, tmp_path, monkeypatch):
    """Made on a fresh clone, it hashes to data.dvc's md5; with other synth params it is refused and removed."""
    from socseg.data.synth import materialise_sample
    from socseg.data.volumes import VolumeError

    monkeypatch.chdir(repo_root)  # synth.check_against is relative to the project root
    target = materialise_sample(params, tmp_path / "samples" / "sample")
    assert sorted(p.name for p in target.iterdir()) == ["image.tif", "labels.tif", "volume.json"]

    params["synth"]["noise_sigma"] = 1200
    with pytest.raises(VolumeError, match="differs from the one data.dvc versions"):
        materialise_sample(params, tmp_path / "other" / "sample")
    assert not (tmp_path / "other" / "sample").exists()
    params["synth"]["check_against"] = ""
    assert materialise_sample(params, tmp_path / "other" / "sample").is_dir()


def test_training_makes_a_missing_builtin_sample(params, repo_root, tmp_path, monkeypatch):
    from socseg.data.prepare import load_labelled_volumes

    monkeypatch.chdir(repo_root)
    params["data"]["dir"] = str(tmp_path / "samples")
    (volume,) = load_labelled_volumes(params, ["sample"])
    assert volume.image.shape == tuple(params["synth"]["shape"]) and volume.labels is not None


def _data_dvc_with_own_volume(project, sample_dir, tamper: bool = False) -> None:
    """A project whose data.dvc versions the sample *and* a user's volume, as after `dvc add data`:
    the directory md5 covers both; DVC's .dir manifest in the cache lists each file."""
    import hashlib
    import json

    entries = [{"md5": hashlib.md5(p.read_bytes()).hexdigest(), "relpath": f"sample/{p.name}"}
               for p in sorted(sample_dir.iterdir())]
    if tamper:
        entries[0]["md5"] = "0" * 32
    entries.append({"md5": "1" * 32, "relpath": "mine/image.tif"})
    text = json.dumps(sorted(entries, key=lambda e: e["relpath"]))
    dir_md5 = hashlib.md5(text.encode()).hexdigest()
    manifest = project / ".dvc" / "cache" / "files" / "md5" / dir_md5[:2] / f"{dir_md5[2:]}.dir"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(text)
    (project / "data.dvc").write_text(f"outs:\n- md5: {dir_md5}.dir\n  nfiles: 4\n  hash: md5\n  path: data\n")


def test_builtin_sample_is_checked_once_own_volumes_are_versioned_beside_it(params, tmp_path, monkeypatch):
    """After `dvc add data` with the user's own volume, the sample is checked file by file against
    DVC's manifest: the true sample passes, a differing one is refused, an absent manifest warns."""
    from socseg.data.synth import materialise_sample
    from socseg.data.volumes import VolumeError

    params["synth"]["check_against"] = ""
    reference = materialise_sample(params, tmp_path / "reference" / "sample")
    params["synth"]["check_against"] = "data.dvc"
    good, bad, pulled_not = (tmp_path / name for name in ("good", "bad", "nocache"))
    for project, tamper in ((good, False), (bad, True), (pulled_not, False)):
        project.mkdir()
        _data_dvc_with_own_volume(project, reference, tamper)
    monkeypatch.chdir(good)
    assert materialise_sample(params, good / "samples" / "sample").is_dir()
    monkeypatch.chdir(bad)
    with pytest.raises(VolumeError, match="sample/image.tif"):
        materialise_sample(params, bad / "samples" / "sample")
    assert not (bad / "samples" / "sample").exists()
    shutil.rmtree(pulled_not / ".dvc")
    monkeypatch.chdir(pulled_not)
    with pytest.warns(UserWarning, match="not in the DVC cache"):
        assert materialise_sample(params, pulled_not / "samples" / "sample").is_dir()
