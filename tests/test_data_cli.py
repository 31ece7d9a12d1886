"""``socseg data import|synth`` through click: summaries, exit codes, and nothing written on error."""

from __future__ import annotations


import click
import numpy as np
import pytest
from click.testing import CliRunner

from socseg.commands.data import data
from socseg.data.volumes import load_volume


def invoke(*args: str):
    """Run ``socseg data ARGS`` (the data group alone, so these tests need no other command)."""
    group = click.Group("socseg", commands={"data": data})
    return CliRunner().invoke(group, ["data", *map(str, args)])


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    (folder / "existing").mkdir(parents=True)
    return folder


def test_help():
    for args in ([], ["import"], ["synth"]):
        result = invoke(*args, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_registered_in_main():
    from socseg.cli import main

    result = CliRunner().invoke(main, ["data", "synth", "--help"])
    assert result.exit_code == 0 and "--seed" in result.output


def test_synth(data_dir):
    result = invoke("synth", "demo", "--shape", "6,32,40", "--seed", "2", "--data-dir", data_dir)
    assert result.exit_code == 0, result.output
    assert "demo: 6x32x40 uint16" in result.output and "pore" in result.output
    volume = load_volume(data_dir / "demo")
    assert volume.image.shape == (6, 32, 40) and volume.meta.extra["synth"]["seed"] == 2
    again = invoke("synth", "demo", "--shape", "6,32,40", "--data-dir", data_dir)
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert invoke("synth", "demo", "--shape", "6,32,40", "--data-dir", data_dir, "--overwrite").exit_code == 0


def test_import_real_slices(data_dir, shared_data):
    root = shared_data
    result = invoke(
        "import", "socpristine",
        "--images", root / "data" / "SOCprist000[1-4].tiff",
        "--labels", root / "labels" / "slice__00[1-4].tif",
        "--phase-map", "0=pore,128=ysz,255=ni",
        "--data-dir", data_dir,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "socpristine: 4x501x501 uint16" in result.output
    volume = load_volume(data_dir / "socpristine")
    assert volume.class_names == ["pore", "ysz", "ni"]
    assert set(np.unique(volume.labels)) <= {0, 128, 255}


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_match", "no image files matched"),
        ("count", "do not pair"),
        ("shape", "img003.tif"),
        ("label_shape", "slice__001.tif: label slice is (5, 4)"),
        ("label_value", "[7] not in phase map"),
        ("corrupt", "img002.tif: not a readable TIFF"),
        ("int32", "int32 not allowed"),
        ("complex", "complex64 not allowed"),
        ("phase_map", "bad phase map entry"),
        ("name", "bad volume name"),
    ],
)
def test_import_bad_input_writes_nothing(tmp_path, data_dir, case, message, write_slices):
    image = np.zeros((4, 4), np.uint16)
    images, labels = [image] * 3, [np.zeros((4, 4), np.uint8)] * 3
    if case == "count":
        labels = labels[:2]
    elif case == "shape":
        images = [image, image, np.zeros((5, 4), np.uint16)]
    elif case == "label_shape":
        labels = [np.zeros((5, 4), np.uint8)] * 3
    elif case == "label_value":
        labels = [labels[0], labels[0], np.full((4, 4), 7, np.uint8)]
    elif case in ("int32", "complex"):
        images = [image.astype(np.int32 if case == "int32" else np.complex64)] * 3
    write_slices(tmp_path / "raw", "img", images)
    write_slices(tmp_path / "lab", "slice__", labels)
    if case == "corrupt":
        (tmp_path / "raw" / "img002.tif").write_bytes(b"not a tiff at all" * 4)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = invoke(
        "import", "../escape" if case == "name" else "vol",
        "--images", tmp_path / "raw" / ("none*.tif" if case == "no_match" else "*.tif"),
        "--labels", tmp_path / "lab" / "*.tif",
        "--phase-map", "0=pore,128=ysz,x=ni" if case == "phase_map" else "0=pore,128=ysz,255=ni",
        "--data-dir", data_dir,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert [p.name for p in data_dir.iterdir()] == ["existing"]


@pytest.mark.parametrize("channels, kind", [(3, "RGB"), (4, "RGBA")])
def test_import_refuses_a_colour_image_in_one_line(tmp_path, data_dir, channels, kind):
    import tifffile

    photo = tmp_path / "photo.tif"
    tifffile.imwrite(photo, np.zeros((20, 30, channels), np.uint8), photometric="rgb")
    result = invoke("import", "vol", "--images", photo, "--data-dir", data_dir)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {photo}: an {kind} image (20, 30, {channels}), not a grey-value slice stack")
    assert "convert it to greyscale" in result.stderr and result.stderr.count("\n") == 1  # one line, no traceback
    assert [p.name for p in data_dir.iterdir()] == ["existing"]
