"""Batch segmentation (socseg segment): inputs, label stack and metadata, refusals, atomic output,
memory that does not grow with depth, multi-axis fusion, and real SOCPristine slices."""

import json
import os
import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from socseg.cli import main
from socseg.segment import check_paths, read_label_metadata, segment, segment_stream
from socseg.volume import VolumeError

PHASE_MAP = {0: "pore", 128: "ysz", 255: "ni"}


def _one_conv_segmenter(folder, context_slices: int = 0, seed: int = 1, bias: float = -0.5) -> str:
    """A one-convolution 'ni' network (fast, deterministic) saved as a pyfunc segmenter, tile 64."""
    import keras

    from socseg.normalise import IntensityNormalisation
    from socseg.pyfunc import SegmenterConfig, save_segmenter

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 2 * context_slices + 1))
    x = IntensityNormalisation(20000.0, 43000.0)(inputs)
    outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid", bias_initializer=keras.initializers.Constant(bias))(x)
    config = SegmenterConfig("ni", ["rest", "ni"], PHASE_MAP, 64, {"low": 20000.0, "high": 43000.0}, batch_size=16,
                             context_slices=context_slices)
    return str(save_segmenter(keras.Model(inputs, outputs), config, folder / "model"))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return _one_conv_segmenter(tmp_path_factory.mktemp("seg"))


@pytest.fixture(scope="module")
def model_2p5d_path(tmp_path_factory):
    """2.5D: one neighbour on each side, 3 input channels."""
    return _one_conv_segmenter(tmp_path_factory.mktemp("seg25"), context_slices=1, seed=2, bias=-1.0)


@pytest.fixture(scope="module")
def grey():
    rng = np.random.default_rng(0)
    return rng.integers(18000, 45000, (11, 90, 130)).astype(np.uint16)


@pytest.fixture()
def stack(tmp_path, grey):
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey, photometric="minisblack")
    return path


def test_segments_a_multipage_tiff_into_a_label_stack_with_its_phase_map(model_path, stack, grey, tmp_path):
    out = tmp_path / "labels.tif"
    result = segment(model_path, stack, out, slice_batch=4, progress=False)
    labels = tifffile.imread(out)
    assert result.shape == grey.shape and labels.shape == grey.shape and labels.dtype == np.uint8
    expected = mlflow.pyfunc.load_model(model_path).predict(grey)  # all slices at once, in memory
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == {0, 255}
    meta = read_label_metadata(out)
    assert meta["phase_map"] == {"0": "rest", "255": "ni"} and meta["task"] == "ni"
    assert meta["axes"] == "ZYX" and meta["shape"] == list(grey.shape) and meta["model_uri"] == model_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.tif", "labels.tif"]  # no partial file left


def test_folder_of_slices_and_volume_directory_give_the_same_labels(model_path, stack, grey, tmp_path):
    from socseg.volume import Volume, VolumeMeta, save_volume

    folder = tmp_path / "slices"
    folder.mkdir()
    for k, page in enumerate(grey):
        tifffile.imwrite(folder / f"SOCprist{k + 1:04d}.tiff", page)
    meta = VolumeMeta("v", grey.shape, "uint16", PHASE_MAP)
    volume_dir = save_volume(Volume(grey, None, meta), tmp_path / "volume")
    paged = tmp_path / "paged.tif"  # one shaped series per page: tifffile.imread would see slice 0 only
    with tifffile.TiffWriter(paged) as tif:
        for page in grey:
            tif.write(page)
    segment(model_path, stack, tmp_path / "a.tif", slice_batch=3, progress=False)
    a = tifffile.imread(tmp_path / "a.tif")
    for name, source, batch in (("b", folder, 5), ("c", volume_dir, 100), ("d", paged, 4)):
        segment(model_path, source, tmp_path / f"{name}.tif", slice_batch=batch, progress=False)
        np.testing.assert_array_equal(tifffile.imread(tmp_path / f"{name}.tif"), a)


@pytest.mark.parametrize("multi_axis", [False, True])
def test_2p5d_model_gives_the_same_labels_whatever_the_chunking(model_2p5d_path, stack, grey, tmp_path, multi_axis):
    """Each chunk travels with its neighbouring slices (halo), so chunk borders are invisible."""
    small, large = tmp_path / "small.tif", tmp_path / "large.tif"
    segment(model_2p5d_path, stack, small, slice_batch=2, multi_axis=multi_axis, progress=False)
    segment(model_2p5d_path, stack, large, slice_batch=100, multi_axis=multi_axis, progress=False)
    np.testing.assert_array_equal(tifffile.imread(small), tifffile.imread(large))
    if not multi_axis:
        model = mlflow.pyfunc.load_model(model_2p5d_path)
        np.testing.assert_array_equal(tifffile.imread(small), model.predict(grey))
        without_halo = np.concatenate([model.predict(grey[a : a + 2]) for a in range(0, len(grey), 2)])
        assert not np.array_equal(without_halo, model.predict(grey))  # so the halo is what makes them equal


def test_refuses_to_overwrite_input_or_an_existing_output(stack, tmp_path):
    with pytest.raises(VolumeError, match="is the INPUT"):
        check_paths(stack, stack, overwrite=True)
    with pytest.raises(VolumeError, match="is the INPUT"):
        check_paths(stack, tmp_path / "." / "grey.tif", overwrite=True)
    existing = tmp_path / "old.tif"
    existing.write_bytes(b"keep me")
    with pytest.raises(VolumeError, match="already exists"):
        check_paths(stack, existing)
    assert check_paths(stack, existing, overwrite=True)
    with pytest.raises(VolumeError, match=r"\.tif/\.tiff"):
        check_paths(stack, tmp_path / "labels")
    folder = tmp_path / "slices"
    folder.mkdir()
    with pytest.raises(VolumeError, match="inside the INPUT folder"):
        check_paths(folder, folder / "labels.tif")
    with pytest.raises(VolumeError, match="no such file"):
        check_paths(tmp_path / "missing.tif", tmp_path / "x.tif")
    assert existing.read_bytes() == b"keep me"


def test_an_interrupted_run_leaves_no_output_and_keeps_the_old_one(stack, tmp_path):
    calls = []

    def interrupted(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.zeros(batch.shape, np.uint8)

    out = tmp_path / "labels.tif"
    with pytest.raises(KeyboardInterrupt):
        segment_stream(interrupted, stack, out, slice_batch=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.tif"]  # no OUTPUT, no partial file
    out.write_bytes(b"previous result")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        segment_stream(interrupted, stack, out, slice_batch=4, overwrite=True, progress=False)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.tif", "labels.tif"]
    with pytest.raises(VolumeError, match="labels of shape"):
        segment_stream(lambda b: np.zeros((1, 2, 2), np.uint8), stack, out, overwrite=True, progress=False)
    assert out.read_bytes() == b"previous result"


def test_bad_input_files_are_named(model_path, tmp_path):
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(VolumeError, match="not a stack of grey slices"):
        segment(model_path, rgb, tmp_path / "o.tif", progress=False)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00garbage")
    with pytest.raises(VolumeError, match="not a readable TIFF"):
        segment(model_path, broken, tmp_path / "o.tif", progress=False)
    nan = tmp_path / "nan.tif"
    tifffile.imwrite(nan, np.full((2, 20, 20), np.nan, np.float32), photometric="minisblack")
    with pytest.raises(VolumeError, match="NaN"):
        segment(model_path, nan, tmp_path / "o.tif", progress=False)
    assert not (tmp_path / "o.tif").exists()


def test_cli_segments_with_multi_axis_fusion_and_reports_errors(model_path, stack, grey, tmp_path):
    out = tmp_path / "fused.tif"
    runner = CliRunner()
    result = runner.invoke(main, ["segment", model_path, str(stack), str(out), "--multi-axis", "--tta", "--slice-batch", "5"])
    assert result.exit_code == 0, result.output
    assert "segmented 11x90x130" in result.output
    fused = tifffile.imread(out)
    assert fused.shape == grey.shape and set(np.unique(fused)) <= {0, 255}
    meta = read_label_metadata(out)
    assert meta["multi_axis"] is True and meta["tta"] is True
    again = runner.invoke(main, ["segment", model_path, str(stack), str(out)])
    assert again.exit_code == 2 and "already exists (use --overwrite" in again.output
    bad_uri = runner.invoke(main, ["segment", str(tmp_path / "nothing"), str(stack), str(tmp_path / "x.tif")])
    assert bad_uri.exit_code != 0 and not (tmp_path / "x.tif").exists()


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, tifffile
    from socseg.segment import segment
    model, path, depth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path) as tif:  # written page by page: the script itself stays small
        for _ in range(depth):
            tif.write(rng.random((384, 384), dtype=np.float32) * 30000 + 15000, photometric="minisblack")
    segment(model, path, path + ".labels.tif", slice_batch=8, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """
)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_depth(model_path, tmp_path):
    """8 vs 128 slices of 384x384 float32: holding the volume would add >= 140 MiB (grey, P, labels)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    rss = {}
    for depth in (8, 128):
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, model_path, str(tmp_path / f"d{depth}.tif"), str(depth)],
            capture_output=True, text=True, env=env, timeout=300, check=True,
        )
        rss[depth] = int(out.stdout.strip().splitlines()[-1])
        assert tifffile.TiffFile(tmp_path / f"d{depth}.tif.labels.tif").series[0].shape == (depth, 384, 384)
    print(f"peak RSS: depth 8 {rss[8]} MiB, depth 128 {rss[128]} MiB")
    assert rss[128] - rss[8] < 40, rss


@pytest.mark.slow
def test_real_socpristine_slices_with_a_tiny_trained_model(tiny_params, mlflow_env, shared_data, tmp_path):
    """Format, shape and label values on real data (accuracy is the accuracy issue's business)."""
    from socseg.train import train

    result = train(tiny_params, run_name="tiny")
    slices = tmp_path / "socpristine"
    slices.mkdir()
    for k in (1, 2, 3):  # links, not copies: the real data stays in ../shared
        (slices / f"SOCprist{k:04d}.tiff").symlink_to(shared_data / "data" / f"SOCprist{k:04d}.tiff")
    out = tmp_path / "labels.tif"
    cli = CliRunner().invoke(main, ["segment", result.segmenter_uri, str(slices), str(out)])
    assert cli.exit_code == 0, cli.output
    with tifffile.TiffFile(out) as tif:
        labels = tif.asarray()
        assert len(tif.pages) == 3
    assert labels.shape == (3, 501, 501) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 255}
    assert json.loads(json.dumps(read_label_metadata(out)["phase_map"])) == {"0": "rest", "255": "ni"}
    assert read_label_metadata(out)["model_uri"] == result.segmenter_uri
