"""The input-format registry: each format recognised and read alike, ambiguous paths settled by the
table's order, anything else refused naming the path and the accepted formats."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from socseg.data.formats import (
    FORMATS,
    HDF5_DATASET,
    MULTIPAGE_TIFF,
    SLICE_FOLDER,
    VOLUME_DIRECTORY,
    ZARR_ARRAY,
    accepted_formats,
    detect_format,
    on_disk,
    split_hdf5_path,
)
from socseg.data.stacks import SliceReader, load_labels, read_stack, recorded_phase_map
from socseg.data.volumes import Volume, VolumeError, VolumeMeta, save_volume

PHASES = {0: "pore", 128: "ysz", 255: "ni"}
GREY = np.random.default_rng(3).integers(0, 60000, (5, 12, 10), dtype=np.uint16)


def _every_format(root: Path, write_slices) -> dict[str, tuple[str, object]]:
    """One input of each format holding GREY: name -> (path, the format it must be)."""
    tifffile.imwrite(root / "stack.tif", GREY, photometric="minisblack")
    tifffile.imwrite(root / "stack.data", GREY, photometric="minisblack")  # a TIFF by its first bytes only
    write_slices(root / "slices", "s_", list(GREY), width=2)
    labels = np.zeros(GREY.shape, np.uint8)
    save_volume(Volume(GREY, labels, VolumeMeta("v", GREY.shape, "uint16", dict(PHASES), has_labels=True)), root / "vol")
    with h5py.File(root / "scan.h5", "w") as f:
        f.create_dataset("entry/data/data", data=GREY, chunks=(2, 12, 10))
    zarr.create_array(str(root / "scan.zarr"), data=GREY, chunks=(2, 12, 10))
    zarr.create_array(str(root / "bare_v3"), data=GREY)  # no .zarr suffix: known by zarr.json
    zarr.create_array(str(root / "bare_v2"), data=GREY, zarr_format=2)  # known by .zarray
    return {
        "tiff": (str(root / "stack.tif"), MULTIPAGE_TIFF),
        "tiff by header": (str(root / "stack.data"), MULTIPAGE_TIFF),
        "folder": (str(root / "slices"), SLICE_FOLDER),
        "volume": (str(root / "vol"), VOLUME_DIRECTORY),
        "hdf5": (f"{root / 'scan.h5'}:/entry/data/data", HDF5_DATASET),
        "zarr": (str(root / "scan.zarr"), ZARR_ARRAY),
        "zarr v3 without suffix": (str(root / "bare_v3"), ZARR_ARRAY),
        "zarr v2 without suffix": (str(root / "bare_v2"), ZARR_ARRAY),
    }


def test_each_format_is_recognised_and_read_alike(tmp_path, write_slices):
    for name, (path, expected) in _every_format(tmp_path, write_slices).items():
        assert detect_format(path) is expected, name
        with expected.open(path) as source:
            assert source.shape == GREY.shape and source.dtype == GREY.dtype, name
            np.testing.assert_array_equal(source.read(1, 4), GREY[1:4], err_msg=name)
        np.testing.assert_array_equal(expected.read(path), GREY, err_msg=name)
        np.testing.assert_array_equal(read_stack(path), GREY, err_msg=name)
        with SliceReader(path) as reader:
            assert reader.format is expected and reader.shape == GREY.shape, name
            np.testing.assert_array_equal(reader.read(0, 5), GREY, err_msg=name)


def test_the_table_lists_each_format_once_and_the_message_names_them_all():
    assert len({f.name for f in FORMATS}) == len(FORMATS) == 5
    message = accepted_formats()
    for input_format in FORMATS:
        assert input_format.name in message and input_format.example in message


def test_a_path_matching_no_format_is_refused_naming_it_and_the_accepted_formats(tmp_path):
    missing = tmp_path / "missing.tif"
    with pytest.raises(VolumeError, match=r"missing\.tif: no such file or directory \(accepted inputs: a multi-page TIFF"):
        detect_format(missing)
    with pytest.raises(VolumeError, match=r"missing\.tif: no such file or directory"):
        SliceReader(missing)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a volume")
    for call in (detect_format, SliceReader, read_stack):
        with pytest.raises(VolumeError, match=r"notes\.txt: not an input socseg reads \(accepted inputs: .*HDF5 dataset"):
            call(notes)
    with pytest.raises(VolumeError, match=r"notes\.txt: not an input socseg reads"):
        load_labels(notes, None, PHASES)


def test_ambiguous_paths_go_to_the_first_format_of_the_table(tmp_path, write_slices):
    # A Zarr store that also holds volume.json is Zarr; a volume directory holding slice TIFFs is a volume.
    zarr.create_array(str(tmp_path / "store"), data=GREY)
    (tmp_path / "store" / "volume.json").write_text("{}")
    assert detect_format(tmp_path / "store") is ZARR_ARRAY
    save_volume(Volume(GREY, None, VolumeMeta("v", GREY.shape, "uint16", dict(PHASES))), tmp_path / "vol")
    write_slices(tmp_path / "vol", "s_", list(GREY[:2]))
    assert detect_format(tmp_path / "vol") is VOLUME_DIRECTORY
    np.testing.assert_array_equal(read_stack(tmp_path / "vol"), GREY)
    # An HDF5 name is HDF5 whether or not it exists, even a folder; a .zarr name is Zarr even a file.
    (tmp_path / "dir.h5").mkdir()
    for path in (tmp_path / "absent.h5", f"{tmp_path / 'absent.h5'}:/entry", tmp_path / "dir.h5"):
        assert detect_format(path) is HDF5_DATASET
    with pytest.raises(VolumeError, match=r"absent\.h5: no such HDF5 file"):
        SliceReader(f"{tmp_path / 'absent.h5'}:/entry")
    (tmp_path / "file.zarr").write_text("not a store")
    assert detect_format(tmp_path / "file.zarr") is ZARR_ARRAY
    with pytest.raises(VolumeError, match=r"file\.zarr: not a readable Zarr store"):
        SliceReader(tmp_path / "file.zarr")
    # A .tif name is a TIFF even when its bytes are not; any folder is a folder of slices.
    (tmp_path / "broken.tif").write_bytes(b"garbage")
    assert detect_format(tmp_path / "broken.tif") is MULTIPAGE_TIFF
    with pytest.raises(VolumeError, match=r"broken\.tif: not a readable TIFF"):
        SliceReader(tmp_path / "broken.tif")
    (tmp_path / "empty").mkdir()
    assert detect_format(tmp_path / "empty") is SLICE_FOLDER
    with pytest.raises(VolumeError, match=r"empty: no \.tif/\.tiff files \(accepted inputs: "):
        SliceReader(tmp_path / "empty")


def test_hdf5_paths_split_into_file_and_dataset(tmp_path):
    assert split_hdf5_path("scan.h5:/entry/data/data") == (Path("scan.h5"), "/entry/data/data")
    assert split_hdf5_path("SCAN.NXS:entry/data") == (Path("SCAN.NXS"), "entry/data")
    assert split_hdf5_path("a.hdf5:") == (Path("a.hdf5"), "/")
    assert split_hdf5_path("scan.hdf") == (Path("scan.hdf"), "")
    assert split_hdf5_path("scan.tif") is None and split_hdf5_path("h5/scan.tif") is None
    assert on_disk("scan.h5:/entry/data/data") == Path("scan.h5") and on_disk(tmp_path) == tmp_path


def test_what_socseg_recorded_is_read_where_the_format_keeps_it(tmp_path, write_slices):
    formats = _every_format(tmp_path, write_slices)
    tifffile.imwrite(tmp_path / "labels.tif", np.zeros((2, 4, 4), np.uint8),
                     description=json.dumps({"phase_map": {"0": "rest", "255": "ni"}}), metadata=None)
    assert MULTIPAGE_TIFF.socseg_record(str(tmp_path / "labels.tif"))["phase_map"] == {"0": "rest", "255": "ni"}
    assert recorded_phase_map(tmp_path / "labels.tif") == {0: "rest", 255: "ni"}
    group = zarr.open_group(str(tmp_path / "labels.zarr"), mode="w")
    group.create_array("0", data=np.zeros((2, 4, 4), np.uint8))
    group.attrs["socseg"] = {"phase_map": {"0": "pore", "1": "ni"}}
    assert recorded_phase_map(tmp_path / "labels.zarr") == {0: "pore", 1: "ni"}
    for name, (path, _) in formats.items():  # nothing recorded: volumes record theirs in volume.json
        assert recorded_phase_map(path) is None, name
    assert recorded_phase_map(tmp_path / "missing.tif") is None


def test_label_stacks_of_every_format_load_with_their_phase_map(tmp_path, write_slices):
    labels = np.random.default_rng(0).choice(np.array([0, 128, 255], np.uint8), GREY.shape)
    tifffile.imwrite(tmp_path / "l.tif", labels, photometric="minisblack")
    write_slices(tmp_path / "lslices", "l_", list(labels))
    with h5py.File(tmp_path / "l.h5", "w") as f:
        f.create_dataset("seg", data=labels)
    zarr.create_array(str(tmp_path / "l.zarr"), data=labels)
    save_volume(Volume(GREY, labels, VolumeMeta("vol", GREY.shape, "uint16", dict(PHASES), 25.0, has_labels=True)),
                tmp_path / "vol")
    default = {0: "a", 128: "b", 255: "c"}
    for path, name in ((tmp_path / "l.tif", "l"), (tmp_path / "lslices", "lslices"), (f"{tmp_path / 'l.h5'}:/seg", "l"),
                       (tmp_path / "l.zarr", "l")):
        loaded = load_labels(path, None, default)
        assert (loaded.name, loaded.phase_map, loaded.voxel_size_nm) == (name, default, None), path
        np.testing.assert_array_equal(loaded.labels, labels)
    volume = load_labels(tmp_path / "vol", None, default)
    assert (volume.name, volume.phase_map, volume.voxel_size_nm) == ("vol", PHASES, 25.0)
    np.testing.assert_array_equal(volume.labels, labels)


def test_bad_label_stacks_are_refused_whatever_their_format(tmp_path):
    save_volume(Volume(GREY, None, VolumeMeta("v", GREY.shape, "uint16", dict(PHASES))), tmp_path / "unlabelled")
    with pytest.raises(VolumeError, match=r"unlabelled: no labels\.tif \(an unlabelled volume: segment it first\)"):
        load_labels(tmp_path / "unlabelled", None, PHASES)
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((2, 4, 4), np.float32), photometric="minisblack")
    with h5py.File(tmp_path / "wide.h5", "w") as f:
        f.create_dataset("seg", data=np.zeros((2, 4, 4), np.int32))
        f.create_dataset("float", data=np.zeros((2, 4, 4), np.float32))
    tifffile.imwrite(tmp_path / "wide.tif", np.zeros((2, 4, 4), np.int32), photometric="minisblack")
    for path in (tmp_path / "float.tif", f"{tmp_path / 'wide.h5'}:/float"):
        with pytest.raises(VolumeError, match="must hold integer label values, got float32"):
            load_labels(path, None, PHASES)
    for path in (tmp_path / "wide.tif", f"{tmp_path / 'wide.h5'}:/seg"):
        with pytest.raises(VolumeError, match=r"label dtype int32 not allowed \(allowed: uint8, uint16\)"):
            load_labels(path, None, PHASES)
