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
from socseg.data.stacks import check_paths, read_label_metadata
from socseg.data.volumes import VolumeError
from socseg.data.normalise import FixedRange, PerVolume
from socseg.inference.predictor import GreyRangeError, ModelConfig
from socseg.inference.request import InferenceOptions
from socseg.inference.segment import SegmentOutputs
from socseg.inference.segment import segment, segment_stream

PHASE_MAP = {0: "pore", 128: "ysz", 255: "ni"}


def _config(context_slices: int = 0, batch_size: int = 16, planes: str = "z", fusion_depth: int = 64,
            fusion_halo: int = 16) -> ModelConfig:
    """An 'ni' model's config: tile 64, normalisation 20000..43000, whole-slice passes, no TTA."""
    return ModelConfig(
        task="ni", encoder="unet", class_names=["rest", "ni"], phase_map=PHASE_MAP, tile_size=64,
        context_slices=context_slices, normalisation=FixedRange(low=20000.0, high=43000.0),
        window="whole_slice",
        whole_slice_max_pixels=4096 * 4096, step_fraction=0.5, tta=False, batch_size=batch_size, max_slice_pixels=4096 * 4096, max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime="keras", planes=planes, fusion_depth=fusion_depth,
        fusion_halo=fusion_halo,
    )


def _one_conv_segmenter(folder, context_slices: int = 0, seed: int = 1, bias: float = -0.5, **fusion) -> str:
    """A one-convolution 'ni' network (fast, deterministic) saved as a pyfunc segmenter, tile 64."""
    import keras

    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import IntensityNormalisation

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 2 * context_slices + 1))
    x = IntensityNormalisation(20000.0, 43000.0)(inputs)
    outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid", bias_initializer=keras.initializers.Constant(bias))(x)
    return str(save_segmenter(keras.Model(inputs, outputs), _config(context_slices, **fusion), folder / "model"))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return _one_conv_segmenter(tmp_path_factory.mktemp("seg"))


@pytest.fixture(scope="module")
def model_fused_path(tmp_path_factory):
    """2.5D and multi-axis fusion by default (planes zyx), in chunks of 3 slices with a halo of 2."""
    return _one_conv_segmenter(tmp_path_factory.mktemp("fused"), context_slices=1, seed=2, bias=-1.0, planes="zyx",
                               fusion_depth=3, fusion_halo=2)


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
    from socseg.data.volumes import Volume, VolumeMeta, save_volume

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


def test_2p5d_model_gives_the_same_labels_whatever_the_chunking(model_2p5d_path, stack, grey, tmp_path):
    """Each chunk travels with its neighbouring slices (the model's context_slices), so chunk borders are invisible."""
    small, large = tmp_path / "small.tif", tmp_path / "large.tif"
    segment(model_2p5d_path, stack, small, slice_batch=2, progress=False)
    segment(model_2p5d_path, stack, large, slice_batch=100, progress=False)
    np.testing.assert_array_equal(tifffile.imread(small), tifffile.imread(large))
    model = mlflow.pyfunc.load_model(model_2p5d_path)
    np.testing.assert_array_equal(tifffile.imread(small), model.predict(grey))
    without_context = np.concatenate([model.predict(grey[a : a + 2]) for a in range(0, len(grey), 2)])
    assert not np.array_equal(without_context, model.predict(grey))  # so the context is what makes them equal


def test_a_fusing_model_streams_chunks_that_give_the_whole_volume_fusion(model_fused_path, stack, grey, tmp_path):
    """planes zyx streams: chunks of fusion_depth slices, each read with fusion_halo slices around it
    (beyond the 3x3 network's reach), give the labels of fusing the whole volume at once, and differ
    from slice-by-slice labels; the output records the planes."""
    from socseg.inference.predictor import Predictor

    out = tmp_path / "fused.tif"
    segment(model_fused_path, stack, out, slice_batch=2, progress=False)
    predictor = Predictor.load(model_fused_path)
    whole = predictor.to_labels(predictor.to_classes(predictor.probabilities(grey, request=predictor.request(source=grey))))
    np.testing.assert_array_equal(tifffile.imread(out), whole)
    assert read_label_metadata(out)["planes"] == "zyx"
    segment(model_fused_path, stack, tmp_path / "z.tif", InferenceOptions(planes="z"), slice_batch=2, progress=False)
    assert not np.array_equal(tifffile.imread(tmp_path / "z.tif"), whole)
    assert read_label_metadata(tmp_path / "z.tif")["planes"] == "z"


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

    def interrupted(batch, before, after):
        calls.append((len(batch), before, after))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.zeros(batch.shape, np.uint8)

    out = tmp_path / "labels.tif"
    with pytest.raises(KeyboardInterrupt):
        segment_stream(interrupted, stack, out, context=0, slice_batch=4, progress=False)
    assert calls == [(4, 0, 0), (4, 0, 0)]  # a 2-D model: no context slices around the chunks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.tif"]  # no OUTPUT, no partial file
    out.write_bytes(b"previous result")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        segment_stream(interrupted, stack, SegmentOutputs(out, overwrite=True), context=0, slice_batch=4, progress=False)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.tif", "labels.tif"]
    with pytest.raises(VolumeError, match="labels of shape"):
        segment_stream(lambda b, before, after: np.zeros((1, 2, 2), np.uint8), stack, SegmentOutputs(out, overwrite=True),
                       context=0, slice_batch=4, progress=False)
    assert out.read_bytes() == b"previous result"
    with pytest.raises(ValueError, match="slice_batch must be >= 1"):
        segment_stream(interrupted, stack, SegmentOutputs(out, overwrite=True), context=0, slice_batch=0, progress=False)


def test_stream_sends_each_chunk_with_its_context_slices(stack, grey, tmp_path):
    """segment_stream reads up to context_slices real neighbours around each chunk (fewer at the
    stack's ends) and writes only the labels of the chunk itself."""
    calls = []

    def label_by_grey(batch, before, after):
        calls.append((batch.copy(), before, after))
        return (batch[before : len(batch) - after] // 256).astype(np.uint8)

    out = tmp_path / "labels.tif"
    result = segment_stream(label_by_grey, stack, out, context=2, slice_batch=4, progress=False)
    # 11 slices in chunks 0-3, 4-7, 8-10, read with context (0, 2), (2, 2), (2, 0)
    assert [(b, a) for _, b, a in calls] == [(0, 2), (2, 2), (2, 0)]
    for (batch, _, _), read in zip(calls, (slice(0, 6), slice(2, 10), slice(6, 11))):
        np.testing.assert_array_equal(batch, grey[read])
    assert result.shape == grey.shape
    np.testing.assert_array_equal(tifffile.imread(out), (grey // 256).astype(np.uint8))


def test_bad_input_files_are_named(model_path, tmp_path):
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(VolumeError, match=r"rgb\.tif: an RGB image \(20, 20, 3\), not a grey-value slice stack"):
        segment(model_path, rgb, tmp_path / "o.tif", slice_batch=4, progress=False)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00garbage")
    with pytest.raises(VolumeError, match="not a readable TIFF"):
        segment(model_path, broken, tmp_path / "o.tif", slice_batch=4, progress=False)
    nan = tmp_path / "nan.tif"
    tifffile.imwrite(nan, np.full((2, 20, 20), np.nan, np.float32), photometric="minisblack")
    with pytest.raises(VolumeError, match="NaN"):
        segment(model_path, nan, tmp_path / "o.tif", slice_batch=4, progress=False)
    assert not (tmp_path / "o.tif").exists()


def test_cli_segments_with_multi_axis_fusion_and_reports_errors(model_path, stack, grey, tmp_path):
    out = tmp_path / "fused.tif"
    runner = CliRunner()
    result = runner.invoke(main, ["segment", model_path, str(stack), str(out), "--planes", "zyx", "--tta", "--slice-batch", "5"])
    assert result.exit_code == 0, result.output
    assert "segmented 11x90x130" in result.output
    fused = tifffile.imread(out)
    assert fused.shape == grey.shape and set(np.unique(fused)) <= {0, 255}
    meta = read_label_metadata(out)
    assert meta["planes"] == "zyx" and meta["tta"] is True
    deprecated = runner.invoke(main, ["segment", model_path, str(stack), str(tmp_path / "old.tif"), "--multi-axis", "--tta"])
    assert deprecated.exit_code == 0, deprecated.output
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "old.tif"), fused)  # --multi-axis still means --planes zyx
    clash = runner.invoke(main, ["segment", model_path, str(stack), str(tmp_path / "c.tif"), "--multi-axis", "--planes", "z"])
    assert clash.exit_code == 2 and "--multi-axis means --planes zyx" in clash.output
    again = runner.invoke(main, ["segment", model_path, str(stack), str(out)])
    assert again.exit_code == 2 and "already exists (use --overwrite" in again.output
    bad_uri = runner.invoke(main, ["segment", str(tmp_path / "nothing"), str(stack), str(tmp_path / "x.tif")])
    assert bad_uri.exit_code != 0 and not (tmp_path / "x.tif").exists()


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, tifffile
    from socseg.inference.segment import segment
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
    from socseg.training.train import train

    result = train(tiny_params, run_name="tiny")
    slices = tmp_path / "socpristine"
    slices.mkdir()
    for k in (1, 2, 3):  # links, not copies: the real data stays in ../shared
        (slices / f"SOCprist{k:04d}.tiff").symlink_to(shared_data / "data" / f"SOCprist{k:04d}.tiff")
    out = tmp_path / "labels.tif"
    cli = CliRunner().invoke(main, ["segment", result.model_uri, str(slices), str(out)])
    assert cli.exit_code == 0, cli.output
    with tifffile.TiffFile(out) as tif:
        labels = tif.asarray()
        assert len(tif.pages) == 3
    assert labels.shape == (3, 501, 501) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 255}
    assert json.loads(json.dumps(read_label_metadata(out)["phase_map"])) == {"0": "rest", "255": "ni"}
    assert read_label_metadata(out)["model_uri"] == result.model_uri


@pytest.mark.parametrize("how", ["photometric", "shape"])
@pytest.mark.parametrize("channels, kind", [(3, "RGB"), (4, "RGBA")])
def test_cli_refuses_a_colour_image_in_one_line(model_path, tmp_path, channels, kind, how):
    photo = tmp_path / "photo.tif"
    array = np.random.default_rng(0).integers(0, 255, (40, 50, channels), dtype=np.uint8)
    tifffile.imwrite(photo, array, photometric="rgb" if how == "photometric" else "minisblack")
    folder = tmp_path / "slices"  # a folder of colour slices too
    folder.mkdir()
    tifffile.imwrite(folder / "s001.tif", array, photometric="rgb" if how == "photometric" else "minisblack")
    for source in (photo, folder):
        result = CliRunner().invoke(main, ["segment", model_path, str(source), str(tmp_path / "out.tif")])
        assert result.exit_code == 2, result.output
        where = photo if source == photo else folder / "s001.tif"
        assert result.output.startswith(f"error: {where}: an {kind} image (40, 50, {channels}), not a grey-value slice stack")
        assert "convert it to greyscale" in result.output and result.output.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.tif", "slices"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """The synthetic PXCT phantom (uint16, SOCPristine grey levels) and its float32 copy
    ``2.5e-5 * x - 0.55``: the same image on another grey scale; and its Ni mask."""
    from socseg.params import load_params
    from socseg.data.synth import synth_from_params

    folder = tmp_path_factory.mktemp("phantom")
    volume = synth_from_params(load_params(), "p", shape=(6, 64, 80), seed=3)
    image = volume.image
    rescaled = (2.5e-5 * image.astype(np.float64) - 0.55).astype(np.float32)
    tifffile.imwrite(folder / "phantom.tif", image, photometric="minisblack")
    tifffile.imwrite(folder / "rescaled.tif", rescaled, photometric="minisblack")
    return folder / "phantom.tif", folder / "rescaled.tif", image, rescaled, volume.labels == 255


@pytest.fixture(scope="module")
def threshold_model_path(tmp_path_factory):
    """An 'ni' segmenter that works on the phantom: grey > 38000 (between YSZ 35000 and Ni 40900)
    is Ni, through the same normalisation 20000..43000 (a 1x1 convolution, set by hand)."""
    import keras

    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import IntensityNormalisation

    inputs = keras.Input((None, None, 1))
    x = IntensityNormalisation(20000.0, 43000.0)(inputs)
    threshold = (38000.0 - 20000.0) / 23000.0
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    outputs = conv(x)
    conv.set_weights([np.full((1, 1, 1, 1), 50.0, np.float32), np.array([-50.0 * threshold], np.float32)])
    return str(save_segmenter(keras.Model(inputs, outputs), _config(), tmp_path_factory.mktemp("thr") / "model"))


def test_cli_refuses_a_volume_outside_the_models_grey_range(threshold_model_path, phantom, tmp_path):
    """Segmented anyway, the rescaled copy comes back all non-Ni: what used to happen silently."""
    model_path = threshold_model_path
    uint16_path, rescaled_path, image, rescaled, ni = phantom
    out = tmp_path / "labels.tif"
    result = CliRunner().invoke(main, ["segment", model_path, str(rescaled_path), str(out), "--slice-batch", "4"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: grey values out of this model's range: 100.0% of the")
    assert result.output.count("\n") == 1  # one line, no traceback
    assert "model's range 20000..43000" in result.output and "--allow-out-of-range" in result.output
    chunk = rescaled[:4]  # the first chunk already is refused
    assert f"the input spans {chunk.min():.6g}..{chunk.max():.6g}" in result.output
    assert list(tmp_path.iterdir()) == []  # no OUTPUT, no partial file

    allowed = CliRunner().invoke(main, ["segment", model_path, str(rescaled_path), str(out), "--allow-out-of-range"])
    assert allowed.exit_code == 0, allowed.output
    assert read_label_metadata(out)["allow_out_of_range"] is True
    assert tifffile.imread(out).shape == image.shape and not tifffile.imread(out).any()  # all "rest"

    # The phantom on the training grey scale segments as before, with or without the override.
    in_range = CliRunner().invoke(main, ["segment", model_path, str(uint16_path), str(tmp_path / "a.tif")])
    assert in_range.exit_code == 0, in_range.output
    expected = mlflow.pyfunc.load_model(model_path).predict(image)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), expected)
    assert np.mean((expected == 255) == ni) > 0.95  # the model does find the phantom's Ni
    segment(model_path, uint16_path, tmp_path / "b.tif", InferenceOptions(allow_out_of_range=True), slice_batch=4, progress=False)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b.tif"), expected)


def test_each_chunk_is_checked_and_a_late_refusal_leaves_no_output(model_path, model_fused_path, phantom, tmp_path):
    """The range check sees each chunk's own slices: neither the rest of the volume nor a fusion
    halo dilutes a few slices on another grey scale."""
    _, _, image, rescaled, _ = phantom
    mixed = np.concatenate([image[:4].astype(np.float32), rescaled[4:]])  # slices 4-5 on another scale
    source = tmp_path / "mixed.tif"
    tifffile.imwrite(source, mixed, photometric="minisblack")
    out = tmp_path / "labels.tif"
    with pytest.raises(GreyRangeError, match="grey values out of this model's range: 100.0%"):
        segment(model_path, source, out, slice_batch=2, progress=False)  # 0-1, 2-3 pass, 4-5 not
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.tif"]  # no OUTPUT, no partial file
    with pytest.raises(GreyRangeError, match=r"grey values out of this model's range: 6\d\.\d%"):
        segment(model_fused_path, source, out, slice_batch=6, progress=False)  # chunks 0-2, 3-5 (halo 2 around)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.tif"]
    segment(model_path, source, out, slice_batch=6, progress=False)  # one chunk, 33% clipped
    assert tifffile.imread(out).shape == mixed.shape


def test_each_chunk_is_mapped_once_to_check_and_predict(model_path, phantom, tmp_path, monkeypatch):
    """The range check reads the grey values the network sees: one mapping per chunk, not two."""
    from socseg.inference.predictor import Predictor

    image = phantom[2]
    calls = []
    original = Predictor.map_grey
    monkeypatch.setattr(Predictor, "map_grey", lambda self, images, grey: calls.append(len(images)) or original(self, images, grey))
    source = tmp_path / "grey.tif"
    tifffile.imwrite(source, image, photometric="minisblack")
    segment(model_path, source, tmp_path / "labels.tif", InferenceOptions(grey_range=(20000.0, 43000.0)), slice_batch=4,
            progress=False)
    assert calls == [len(c) for c in np.array_split(np.arange(len(image)), range(4, len(image), 4))]


def test_microstructure_of_an_ni_segmentation_uses_its_recorded_phase_map(model_path, phantom, tmp_path):
    out = tmp_path / "labels.tif"
    segment(model_path, phantom[0], out, slice_batch=4, progress=False)
    labels = tifffile.imread(out)
    result = CliRunner().invoke(main, ["microstructure", str(out), "--json", "--size-phases", "none", "--unit", "voxel"])
    assert result.exit_code == 0, result.output
    fractions = json.loads(result.output)["volume"]["metrics"]["volume_fraction"]
    assert fractions == pytest.approx({"rest": np.mean(labels == 0), "ni": np.mean(labels == 255)})


# --------------------------------------------------------------------------- per-volume normalisation


def _as_uint8(image: np.ndarray) -> np.ndarray:
    """An 8-bit copy as a viewer exports one: min..max stretched to 0..255."""
    low, high = float(image.min()), float(image.max())
    return np.rint((image.astype(np.float64) - low) / (high - low) * 255).astype(np.uint8)


def test_per_volume_model_labels_uint16_float32_and_uint8_copies_alike(tiny_params, mlflow_env, phantom, threshold_model_path,
                                                                      tmp_path):
    """Issue 15: the same labelled phantom as uint16, as a float32 phase reconstruction
    (2.5e-5 * x - 0.55) and as uint8 gets the same labels from a briefly trained per_volume
    U-Net; a fixed-mode model refuses the float32 copy (the behaviour this replaces)."""
    from socseg.inference.pyfunc import model_config
    from socseg.training.train import train

    tiny_params["normalise"]["mode"] = "per_volume"
    tiny_params["train"].update(task="phases", epochs=8, batch_size=4)
    tiny_params["tiles"]["steps_per_epoch"] = 10
    result = train(tiny_params, run_name="per-volume")
    config = model_config(result.model_uri)
    assert config.normalisation == PerVolume(low_percentile=0.5, high_percentile=99.5)
    assert config.normalisation.to_dict() == {"mode": "per_volume", "low": 0.0, "high": 1.0, "low_percentile": 0.5,
                                              "high_percentile": 99.5}

    uint16_path, rescaled_path, image, rescaled, _ = phantom
    uint8_path = tmp_path / "uint8.tif"
    tifffile.imwrite(uint8_path, _as_uint8(image), photometric="minisblack")
    labels = {}
    for name, path in (("uint16", uint16_path), ("float32", rescaled_path), ("uint8", uint8_path)):
        out = tmp_path / f"labels_{name}.tif"
        segment(result.model_uri, path, out, slice_batch=4, progress=False)
        labels[name] = tifffile.imread(out)
        assert read_label_metadata(out)["normalisation_mode"] == "per_volume"
    assert len(np.unique(labels["uint16"])) == 3  # a model that labels phases, not one class
    for name in ("float32", "uint8"):
        agreement = np.mean(labels[name] == labels["uint16"])
        assert agreement >= 0.995, (name, agreement)
    with pytest.raises(GreyRangeError, match="out of this model's range"):
        segment(threshold_model_path, rescaled_path, tmp_path / "fixed.tif", slice_batch=4, progress=False)


@pytest.fixture(scope="module")
def per_volume_model_path(tmp_path_factory):
    """An 'ni' per_volume segmenter: Ni where the grey value lies above 78 % of the volume's own
    0.5..99.5 percentile range (a 1x1 convolution behind IntensityNormalisation(0, 1), set by hand)."""
    import dataclasses

    import keras

    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import IntensityNormalisation

    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    outputs = conv(IntensityNormalisation(0.0, 1.0)(inputs))
    conv.set_weights([np.full((1, 1, 1, 1), 50.0, np.float32), np.array([-50.0 * 0.78], np.float32)])
    config = dataclasses.replace(_config(), normalisation=PerVolume(low_percentile=0.5, high_percentile=99.5))
    return str(save_segmenter(keras.Model(inputs, outputs), config, tmp_path_factory.mktemp("pv") / "model"))


def test_per_volume_segment_estimates_the_whole_input_once_and_grey_range_overrides(per_volume_model_path, phantom,
                                                                                    tmp_path):
    from socseg.data.normalise import grey_range

    uint16_path, rescaled_path, image, rescaled, ni = phantom
    runner = CliRunner()
    out = tmp_path / "a.tif"
    done = runner.invoke(main, ["segment", per_volume_model_path, str(rescaled_path), str(out), "--slice-batch", "2"])
    assert done.exit_code == 0, done.output
    expected = grey_range(rescaled, 0.5, 99.5)
    assert read_label_metadata(out)["grey_range"] == pytest.approx([expected.low, expected.high])
    labels = tifffile.imread(out)
    assert np.mean((labels == 255) == ni) > 0.95  # the float32 copy's Ni is found
    # Chunks of 2 slices all use the whole volume's range: the same as one chunk of all slices.
    segment(per_volume_model_path, rescaled_path, tmp_path / "one.tif", slice_batch=len(image), progress=False)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "one.tif"), labels)
    # `socseg stats` prints the same range.
    stats = runner.invoke(main, ["stats", str(rescaled_path), "--model", per_volume_model_path])
    assert stats.exit_code == 0, stats.output
    printed = json.loads(stats.output)
    assert (printed["low"], printed["high"]) == (expected.low, expected.high)
    assert printed["n_sampled"] == rescaled.size and printed["source"] == str(rescaled_path)
    assert (printed["low_percentile"], printed["high_percentile"]) == (0.5, 99.5)
    other = json.loads(runner.invoke(main, ["stats", str(uint16_path), "--percentiles", "1,99"]).output)
    assert (other["low_percentile"], other["high_percentile"]) == (1.0, 99.0)
    # --grey-range overrides the estimate (here: the uint16 range on the uint16 copy gives the same labels).
    u = grey_range(image, 0.5, 99.5)
    given = runner.invoke(main, ["segment", per_volume_model_path, str(uint16_path), str(tmp_path / "b.tif"),
                                 "--grey-range", f"{u.low!r},{u.high!r}"])
    assert given.exit_code == 0, given.output
    assert read_label_metadata(tmp_path / "b.tif")["grey_range"] == [u.low, u.high]
    assert np.mean(tifffile.imread(tmp_path / "b.tif") == labels) > 0.999
    shifted = runner.invoke(main, ["segment", per_volume_model_path, str(uint16_path), str(tmp_path / "c.tif"),
                                   "--grey-range", f"{u.low},{(u.low + u.high) / 2}", "--allow-out-of-range"])
    assert shifted.exit_code == 0, shifted.output
    assert np.mean(tifffile.imread(tmp_path / "c.tif") == labels) < 0.9  # the given range is what is used
    bad = runner.invoke(main, ["segment", per_volume_model_path, str(uint16_path), str(tmp_path / "d.tif"),
                               "--grey-range", "5,1"])
    assert bad.exit_code == 2 and "LOW must be below HIGH" in bad.output and not (tmp_path / "d.tif").exists()
    # A .zarr OUTPUT (the Dask path's tasks, here in this process) gets the same range in every chunk.
    zarr = runner.invoke(main, ["segment", per_volume_model_path, str(rescaled_path), str(tmp_path / "l.zarr"),
                                "--chunk-depth", "2"])
    assert zarr.exit_code == 0, zarr.output
    from socseg.data.chunked import ChunkedLabels

    np.testing.assert_array_equal(np.asarray(ChunkedLabels.open(tmp_path / "l.zarr").labels[:]), labels)


@pytest.mark.parametrize("kind", ["constant", "nan"])
def test_a_volume_without_grey_statistics_is_one_error_line_and_nothing_written(per_volume_model_path, tmp_path, kind):
    volume = np.full((3, 40, 40), 30000, np.uint16) if kind == "constant" else np.full((3, 40, 40), np.nan, np.float32)
    source = tmp_path / "in.tif"
    tifffile.imwrite(source, volume, photometric="minisblack")
    message = "grey values are constant" if kind == "constant" else "NaN or infinite"
    runner = CliRunner()
    for args in (["segment", per_volume_model_path, str(source), str(tmp_path / "out.tif")],
                 ["segment", per_volume_model_path, str(source), str(tmp_path / "out.zarr")],
                 ["stats", str(source)]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and message in result.output, result.output
        assert result.output.count("\n") == 1  # one line, no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]  # no OUTPUT, no partial file


def test_several_models_segment_as_their_ensemble(tmp_path, stack, grey):
    """MODEL_URI 'A,B': the labels of the averaged probabilities, recorded as an ensemble; a
    .zarr OUTPUT refuses an ensemble before loading anything."""
    from socseg.inference.predictor import Ensemble, Predictor

    low = _one_conv_segmenter(tmp_path / "low", seed=3, bias=-2.0)
    high = _one_conv_segmenter(tmp_path / "high", seed=4, bias=1.0)
    out = tmp_path / "ensemble.tif"
    result = CliRunner().invoke(main, ["segment", f"{low},{high}", str(stack), str(out), "--probabilities",
                                       str(tmp_path / "probs.tif")])
    assert result.exit_code == 0, result.output
    assert "runtime: ensemble of 2" in result.output
    members = [Predictor.load(low), Predictor.load(high)]
    expected = Ensemble(members).classes(grey)
    labels = tifffile.imread(out)
    np.testing.assert_array_equal(labels, np.where(expected == 1, 255, 0))
    alone = [m.classes(grey) for m in members]
    assert not np.array_equal(alone[0], alone[1]) and not np.array_equal(expected, alone[0])
    meta = read_label_metadata(out)
    assert meta["model_uri"] == f"{low},{high}" and meta["runtime"].startswith("ensemble of 2")
    refused = CliRunner().invoke(main, ["segment", f"{low},{high}", str(stack), str(tmp_path / "e.zarr")])
    assert refused.exit_code == 2 and "an ensemble" in refused.output and not (tmp_path / "e.zarr").exists()
