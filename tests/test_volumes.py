"""Volume model, deterministic atomic storage, and import of TIFF slices (synthetic and real)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

import socseg.data.volumes as volume_module
from socseg.data.volumes import (
    Volume,
    VolumeError,
    VolumeMeta,
    import_slices,
    load_volume,
    parse_phase_map,
    save_volume,
    volume_dir,
)
from socseg.data.stacks import read_stack

PHASES = {0: "pore", 128: "ysz", 255: "ni"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_volume(name: str = "v", shape=(3, 8, 9), labelled: bool = True) -> Volume:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 60000, shape, dtype=np.uint16)
    labels = rng.choice(np.array([0, 128, 255], dtype=np.uint8), shape) if labelled else None
    meta = VolumeMeta(name, shape, "uint16", dict(PHASES), has_labels=labelled, extra={"k": np.float32(1.5)})
    return Volume(image, labels, meta)


def test_parse_phase_map():
    assert parse_phase_map("0=pore, 128=ysz,255=ni") == PHASES
    for bad in ("", "0=pore,0=ni", "0=pore,1=pore", "300=x", "a=pore", "0pore"):
        with pytest.raises(VolumeError):
            parse_phase_map(bad)


def test_volume_dir_rejects_escaping_names(tmp_path):
    assert volume_dir("sample_1", tmp_path) == tmp_path / "sample_1"
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(VolumeError):
            volume_dir(bad, tmp_path)


def test_class_index_and_names():
    volume = make_volume()
    assert volume.class_names == ["pore", "ysz", "ni"]
    index = volume.class_index()
    assert index.dtype == np.uint8
    np.testing.assert_array_equal(index, np.searchsorted([0, 128, 255], volume.labels))
    assert sum(volume.phase_fractions().values()) == pytest.approx(1.0)


def test_volume_checks_consistency():
    volume = make_volume()
    with pytest.raises(VolumeError, match="labels shape"):
        Volume(volume.image, volume.labels[:2], volume.meta)
    with pytest.raises(VolumeError, match="dtype"):
        Volume(volume.image.astype(np.int32), volume.labels, volume.meta)
    volume.labels = None  # changed after construction: save_volume re-checks
    with pytest.raises(VolumeError, match="has_labels"):
        save_volume(volume, "unused")


def test_save_load_roundtrip_is_deterministic(tmp_path):
    volume = make_volume()
    first = save_volume(volume, tmp_path / "a")
    second = save_volume(make_volume(), tmp_path / "b")
    for name in ("image.tif", "labels.tif", "volume.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert volume.meta.checksums["image.tif"] == sha256(first / "image.tif")
    for mmap in (False, True):
        loaded = load_volume(first, mmap=mmap)
        np.testing.assert_array_equal(loaded.image, volume.image)
        np.testing.assert_array_equal(loaded.labels, volume.labels)
        assert loaded.meta.phase_map == PHASES and loaded.meta.shape == (3, 8, 9)
    with tifffile.TiffFile(first / "image.tif") as tif:
        assert len(tif.pages) == 3 and tif.series[0].axes == "ZYX"
        assert tif.pages[0].compression == 8  # zlib / adobe deflate


def test_save_refuses_existing_and_overwrites_atomically(tmp_path):
    target = save_volume(make_volume(labelled=False), tmp_path / "v")
    with pytest.raises(VolumeError, match="already exists"):
        save_volume(make_volume(), target)
    save_volume(make_volume(), target, overwrite=True)
    assert load_volume(target).labels is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_save_failure_leaves_nothing(tmp_path, monkeypatch):
    volume = make_volume()
    volume.labels[0, 0, 0] = 7  # not in the phase map
    with pytest.raises(VolumeError, match=r"\[7\]"):
        save_volume(volume, tmp_path / "data" / "v")
    assert not (tmp_path / "data").exists()

    def broken(path, array):  # fail after image.tif is already written
        if path.name == "labels.tif":
            raise OSError("disk full")
        real_write(path, array)

    real_write = volume_module._write_tiff
    monkeypatch.setattr(volume_module, "_write_tiff", broken)
    with pytest.raises(OSError, match="disk full"):
        save_volume(make_volume(), tmp_path / "data" / "v")
    assert list((tmp_path / "data").iterdir()) == []


def test_load_detects_tampering(tmp_path):
    target = save_volume(make_volume(), tmp_path / "v")
    tifffile.imwrite(target / "labels.tif", np.zeros((3, 8, 9), np.uint8), photometric="minisblack")
    with pytest.raises(VolumeError, match="sha256"):
        load_volume(target)
    (target / "image.tif").unlink()
    with pytest.raises(VolumeError, match="missing"):
        load_volume(target)
    with pytest.raises(VolumeError, match="volume.json"):
        load_volume(tmp_path)


def test_import_pairs_by_slice_number(tmp_path, write_slices):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 1000, (5, 6), dtype=np.uint16) for _ in range(12)]
    labels = [np.full((5, 6), (0, 128, 255)[i % 3], np.uint8) for i in range(12)]
    write_slices(tmp_path / "raw", "img", images, width=1, ext=".tiff")  # img1..img12: lexical order differs
    write_slices(tmp_path / "lab", "slice__", labels, width=3)
    volume = import_slices("t", str(tmp_path / "raw" / "*.tiff"), str(tmp_path / "lab" / "*.tif"), PHASES, 50.0)
    np.testing.assert_array_equal(volume.image, np.stack(images))
    np.testing.assert_array_equal(volume.labels, np.stack(labels))
    assert volume.meta.voxel_size_nm == 50.0
    assert volume.meta.extra["first_index"] == 1 and volume.meta.extra["last_index"] == 12
    assert set(volume.meta.checksums) == {"source_images", "source_labels"}


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_match", "no image files matched"),
        ("count", "do not pair"),
        ("shape", "img003"),
        ("label_shape", r"slice__001.tif: label slice is \(5, 4\)"),
        ("label_value", r"\[7\].*slice__002"),
        ("corrupt", "img002.tif: not a readable TIFF"),
        ("dtype", "int32 not allowed"),
        ("nan", "NaN"),
        ("float_labels", "integer"),
    ],
)
def test_import_errors(tmp_path, case, message, write_slices):
    image = np.zeros((4, 4), np.uint16)
    images = [image] * 3
    labels = [np.zeros((4, 4), np.uint8)] * 3
    if case == "count":
        labels = labels[:2]
    elif case == "shape":
        images = [image, image, np.zeros((4, 5), np.uint16)]
    elif case == "label_shape":
        labels = [np.zeros((5, 4), np.uint8)] * 3
    elif case == "label_value":
        labels = [labels[0], np.full((4, 4), 7, np.uint8), labels[0]]
    elif case == "dtype":
        images = [image.astype(np.int32)] * 3
    elif case == "nan":
        images = [np.full((4, 4), np.nan, np.float32)] * 3
    elif case == "float_labels":
        labels = [np.zeros((4, 4), np.float32)] * 3
    write_slices(tmp_path / "raw", "img", images)
    write_slices(tmp_path / "lab", "slice__", labels)
    if case == "corrupt":
        (tmp_path / "raw" / "img002.tif").write_bytes(b"II*\x00garbage" * 10)
    pattern = str(tmp_path / "raw" / ("nothing*.tif" if case == "no_match" else "*.tif"))
    with pytest.raises(VolumeError, match=message):
        import_slices("t", pattern, str(tmp_path / "lab" / "*.tif"), PHASES)


def test_read_stack_forms(tmp_path, write_slices):
    volume = make_volume(shape=(4, 5, 6))
    tifffile.imwrite(tmp_path / "stack.tif", volume.image, photometric="minisblack")
    write_slices(tmp_path / "slices", "s_", list(volume.image), width=1)
    saved = save_volume(volume, tmp_path / "vol")
    for source in (tmp_path / "stack.tif", tmp_path / "slices", saved):
        np.testing.assert_array_equal(read_stack(source), volume.image)
    with pytest.raises(VolumeError, match="no such"):
        read_stack(tmp_path / "missing.tif")


def test_import_real_socpristine(tmp_path, shared_data):
    root = shared_data
    volume = import_slices(
        "socpristine", str(root / "data" / "SOCprist000[1-4].tiff"), str(root / "labels" / "slice__00[1-4].tif"), PHASES
    )
    assert volume.image.shape == (4, 501, 501) and volume.image.dtype == np.uint16
    assert set(np.unique(volume.labels)) <= {0, 128, 255}
    target = save_volume(volume, tmp_path / "socpristine")
    meta = load_volume(target).meta
    assert meta.phase_map == PHASES and meta.has_labels
    assert meta.checksums["image.tif"] == sha256(target / "image.tif")
    assert meta.checksums["labels.tif"] == sha256(target / "labels.tif")
    sources = sorted(sha256(root / "data" / f"SOCprist{i:04d}.tiff") for i in range(1, 5))
    assert meta.checksums["source_images"] == hashlib.sha256("\n".join(sources).encode()).hexdigest()
    # pairing is right: the grey order pore < YSZ < Ni holds on the paired labels
    means = [volume.image[volume.labels == v].mean() for v in (0, 128, 255)]
    assert means == sorted(means)


# --------------------------------------------------------------------------- colour images


def _write_colour(path: Path, channels: int, how: str) -> None:
    """A 20x30 colour image: photometric RGB(A) tags, or only a last axis of 3/4 grey samples."""
    array = np.random.default_rng(0).integers(0, 255, (20, 30, channels), dtype=np.uint8)
    if how == "rgb":
        tifffile.imwrite(path, array, photometric="rgb")
    elif how == "samples":  # one page, 3/4 samples per pixel, photometric minisblack
        tifffile.imwrite(path, array, photometric="minisblack", planarconfig="contig")
    else:  # "shape": 20 minisblack pages of 30 x 3 pixels, as a naive export writes it
        tifffile.imwrite(path, array, photometric="minisblack")


@pytest.mark.parametrize("how", ["rgb", "samples", "shape"])
@pytest.mark.parametrize("channels, kind", [(3, "RGB"), (4, "RGBA")])
def test_colour_image_is_refused_not_read_as_h_slices(tmp_path, channels, kind, how):
    path = tmp_path / "photo.tif"
    _write_colour(path, channels, how)
    message = rf"photo\.tif: an {kind} image \(20, 30, {channels}\), not a grey-value slice stack.*convert it to greyscale"
    with pytest.raises(VolumeError, match=message):
        import_slices("t", str(path), None, PHASES)
    with pytest.raises(VolumeError, match=message):
        read_stack(path)
    # A folder of colour slices is named the same way (not "expected one 2-D grey slice").
    folder = tmp_path / "slices"
    folder.mkdir()
    for k in (1, 2):
        _write_colour(folder / f"s{k}.tif", channels, how)
    with pytest.raises(VolumeError, match=rf"s1\.tif: an {kind} image"):
        import_slices("t", str(folder / "*.tif"), None, PHASES)
    with pytest.raises(VolumeError, match=rf"s1\.tif: an {kind} image"):
        read_stack(folder)


def test_grey_stacks_are_not_taken_for_colour_images(tmp_path):
    """Only (H, W, 3|4) is suspicious: grey stacks of 3 or 4 slices and 2-D slices still import."""
    rng = np.random.default_rng(0)
    for shape in ((3, 20, 30), (4, 20, 30), (4, 4, 4)):
        image = rng.integers(0, 60000, shape, dtype=np.uint16)
        tifffile.imwrite(tmp_path / "stack.tif", image, photometric="minisblack")
        np.testing.assert_array_equal(import_slices("t", str(tmp_path / "stack.tif"), None, PHASES).image, image)
        np.testing.assert_array_equal(read_stack(tmp_path / "stack.tif"), image)
