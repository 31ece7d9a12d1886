"""The OME-NGFF store layout and the napari plugin's readers and writers (no viewer needed):
stores validated by ome-zarr-models and read by napari-ome-zarr, socseg files as layer data,
label layers saved as socseg label TIFFs and OME-Zarr labels and read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from conftest import tiny_segmenter
from socseg.data.chunked import ChunkedLabels
from socseg.data.phases import phase_colours, rgba
from socseg.data.volumes import VolumeError

PHASES = {0: "pore", 128: "ysz", 255: "ni"}


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scan")
    grey = np.random.default_rng(4).integers(20000, 43000, (10, 40, 36)).astype(np.uint16)
    tifffile.imwrite(folder / "grey.tif", grey)
    return folder / "grey.tif"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_segmenter(tmp_path_factory.mktemp("model"), 1)


def _segment(model: str, source: Path, output: Path, probabilities: bool = False):
    from socseg.inference.distributed import ZarrTarget, segment_to_zarr

    return segment_to_zarr(model, source, ZarrTarget(output, 4, False, probabilities), tracking_uri="sqlite:///unused.db",
                           progress=False)


def _reference(model: str, source: Path, output: Path) -> np.ndarray:
    from socseg.inference.segment import segment

    segment(model, source, output, slice_batch=4, progress=False)
    return tifffile.imread(output)


def test_a_segmented_store_is_an_ome_ngff_image_with_named_coloured_phase_labels(model, scan, tmp_path):
    from napari_ome_zarr import napari_get_reader
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    store_path = tmp_path / "out.zarr"
    _segment(model, scan, store_path)
    store = ChunkedLabels.open(store_path)
    np.testing.assert_array_equal(np.asarray(store.labels[:]), _reference(model, scan, tmp_path / "ref.tif"))
    np.testing.assert_array_equal(np.asarray(store.image[:]), tifffile.imread(scan))  # the grey image, as read
    assert isinstance(open_ome_zarr(zarr.open_group(str(store_path), mode="r")), Image)
    assert isinstance(open_ome_zarr(zarr.open_group(str(store_path / "labels"), mode="r")), Labels)
    label_image = open_ome_zarr(zarr.open_group(str(store_path / "labels" / "phases"), mode="r"))
    assert isinstance(label_image, ImageLabel)
    ome = dict(zarr.open_group(str(store_path / "labels" / "phases"), mode="r").attrs)["ome"]["image-label"]
    assert {c["label-value"]: c["rgba"] for c in ome["colors"]} == {
        v: rgba(c) for v, c in zip(PHASES, phase_colours(list(PHASES.values())))}
    assert {p["label-value"]: p["phase"] for p in ome["properties"]} == PHASES
    # napari-ome-zarr (the generic OME-Zarr plugin) shows the grey image and a Labels layer with the phase names
    layers = napari_get_reader(str(store_path))(str(store_path))
    kinds = {kind for _, _, kind in layers}
    assert kinds == {"image", "labels"}
    (labels_kwargs,) = [kw for _, kw, kind in layers if kind == "labels"]
    assert list(labels_kwargs["properties"]["phase"]) == ["pore", "ysz", "ni"]
    # read as labels (microstructure, evaluate) a store gives its phases, read as grey its image
    from socseg.data.stacks import SliceReader, load_labels

    assert np.array_equal(load_labels(store_path, None, {}).labels, np.asarray(store.labels[:]))
    with SliceReader(store_path) as reader:
        assert reader.dtype == np.uint16 and np.array_equal(reader.read(0, 2), tifffile.imread(scan)[:2])


def test_a_store_of_the_first_layout_still_opens_and_its_interrupted_run_resumes(model, scan, tmp_path, monkeypatch):
    """A store written before the OME-NGFF labels layout (labels at the root, no grey image),
    interrupted: the same command finishes it in its own layout, and every reader still opens it."""
    from socseg.viewer.layers import get_reader

    original = ChunkedLabels.create_or_resume.__func__

    def first_layout(cls, *args, image_dtype=None, **kwargs):
        return original(cls, *args, **kwargs)  # no image dtype: the old layout

    output = tmp_path / "old.zarr"
    monkeypatch.setattr(ChunkedLabels, "create_or_resume", classmethod(first_layout))
    _segment(model, scan, output)
    monkeypatch.undo()
    old = zarr.open_group(str(output), mode="r+")
    assert "layout" not in dict(old.attrs)["socseg"] and old["0"].dtype == np.uint8
    expected = np.asarray(old["0"][:])
    old["complete"][1:] = 0  # interrupted after the first chunk
    old["0"][4:] = 0
    again = _segment(model, scan, output)
    assert again.n_skipped == 1
    store = ChunkedLabels.open(output)
    assert store.layout == 1 and store.image is None
    np.testing.assert_array_equal(np.asarray(store.labels[:]), expected)
    from socseg.data.stacks import load_labels

    assert np.array_equal(load_labels(output, None, {}).labels, expected)
    layers = get_reader(str(output))(str(output))
    assert [kind for _, _, kind in layers] == ["labels"]


def test_the_reader_opens_socseg_files_as_the_right_layers_and_leaves_other_files_to_napari(model, scan, tmp_path):
    from socseg.data.volumes import Volume, VolumeMeta, save_volume
    from socseg.viewer.layers import get_reader

    assert get_reader(str(scan)) is None  # a plain grey TIFF: napari's own reader
    assert get_reader(str(tmp_path / "nothing.zarr")) is None
    store = tmp_path / "probs.zarr"
    _segment(model, scan, store, probabilities=True)
    layers = get_reader(str(store))(str(store))
    assert [(kind, kw["name"]) for _, kw, kind in layers] == [
        ("image", "probs image"), ("labels", "probs phases"), ("image", ["P(pore)", "P(ysz)", "P(ni)"]),
        ("image", "probs uncertainty")]
    _, labels_kwargs, _ = layers[1]
    colours = labels_kwargs["colormap"]
    assert np.allclose(colours[255], np.array(rgba(phase_colours(["ni"])[0])) / 255.0)
    assert labels_kwargs["features"]["phase"] == ["pore", "ysz", "ni"]
    assert labels_kwargs["metadata"]["socseg"]["phase_map"] == {"0": "pore", "128": "ysz", "255": "ni"}
    # a label TIFF of socseg segment: labels with its recorded phase map
    labels_tif = tmp_path / "labels.tif"
    expected = _reference(model, scan, labels_tif)
    ((data, kwargs, kind),) = get_reader(str(labels_tif))(str(labels_tif))
    assert kind == "labels" and np.array_equal(data, expected) and kwargs["features"]["phase"] == ["pore", "ysz", "ni"]
    # a volume folder: image and labels
    grey = tifffile.imread(scan)
    meta = VolumeMeta(name="vol", shape=grey.shape, image_dtype="uint16", phase_map=PHASES, voxel_size_nm=50.0,
                      has_labels=True)
    save_volume(Volume(grey, expected, meta), tmp_path / "vol")
    layers = get_reader(str(tmp_path / "vol"))(str(tmp_path / "vol"))
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    assert np.array_equal(layers[0][0], grey) and layers[1][1]["scale"] == [0.05, 0.05, 0.05]


def test_labels_and_corrections_round_trip_through_both_writers(tmp_path):
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v05.image_label import ImageLabel

    from socseg.data.stacks import load_labels, read_label_metadata
    from socseg.viewer.layers import correction_layer, get_reader, labels_layer, write_labels

    labels = np.random.default_rng(1).choice(list(PHASES), size=(3, 16, 12)).astype(np.uint8)
    _, meta, _ = labels_layer(labels, PHASES, "phases")
    for name in ("out.tif", "out.zarr"):
        assert write_labels(str(tmp_path / name), labels, meta) == [str(tmp_path / name)]
        read = load_labels(tmp_path / name, None, {})
        assert np.array_equal(read.labels, labels) and read.phase_map == PHASES
        ((data, kwargs, kind),) = get_reader(str(tmp_path / name))(str(tmp_path / name))
        assert kind == "labels" and np.array_equal(np.asarray(data), labels)
    assert isinstance(open_ome_zarr(zarr.open_group(str(tmp_path / "out.zarr"), mode="r")), ImageLabel)
    # a correction layer: painted class k as k + 1, the ignore value elsewhere, as socseg finetune reads it
    painted, meta, _ = correction_layer((3, 16, 12), PHASES)
    painted[1, 2:6, 3:5] = 3  # ni
    painted[1, 8, :] = 1  # pore
    write_labels(str(tmp_path / "corr.tif"), painted, meta)
    written = tifffile.imread(tmp_path / "corr.tif")
    assert set(np.unique(written[[0, 2]])) == {1}  # finetune.ignore_value of params.yaml
    assert np.all(written[1, 2:6, 3:5] == 255) and np.all(written[1, 8] == 0)
    record = read_label_metadata(tmp_path / "corr.tif")
    assert record["ignore_value"] == 1 and record["labelled_slices"] == [1]


def test_bad_layers_are_refused_and_nothing_is_written(tmp_path):
    from socseg.viewer.layers import correction_layer, labels_layer, write_labels

    labels = np.zeros((2, 8, 8), np.uint8)
    labels[0, 0, 0] = 7
    _, meta, _ = labels_layer(labels, PHASES, "phases")
    with pytest.raises(VolumeError, match=r"label values \[7\] are not in the phase map"):
        write_labels(str(tmp_path / "a.tif"), labels, meta)
    painted, meta_c, _ = correction_layer((2, 8, 8), PHASES)
    painted[0, 0, 0] = 9
    with pytest.raises(VolumeError, match="paint 1..3"):
        write_labels(str(tmp_path / "b.zarr"), painted, meta_c)
    with pytest.raises(VolumeError, match="no socseg phase map"):
        write_labels(str(tmp_path / "c.tif"), np.zeros((2, 8, 8), np.uint8), {"metadata": {}})
    with pytest.raises(VolumeError, match=r"save labels as \.tif"):
        write_labels(str(tmp_path / "d.png"), np.zeros((2, 8, 8), np.uint8), meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial file or store left
