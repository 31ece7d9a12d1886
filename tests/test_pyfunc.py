"""The pyfunc segmenter: both input forms, label values, probabilities, clear 400s for bad requests,
its config on request, models pickled before the restructure, and its logging by a training run."""

import base64
import dataclasses
import io
import json
import os

import mlflow
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from mlflow.exceptions import MlflowException

from socseg.data.normalise import FixedRange, PerVolume
from socseg.inference.predictor import GreyRangeError, ModelConfig, Predictor
from socseg.inference.request import InferenceOptions, InferenceRequest
from socseg.inference.pyfunc import RequestError, decode_array, encode_array, model_config, parse_request
from socseg.inference.window import iter_window_probabilities

PHASE_MAP = {0: "pore", 128: "ysz", 255: "ni"}


def make_config(**fields):
    """A ModelConfig with every field given (the constructor has no defaults)."""
    values = dict(
        task="phases",
        encoder="unet",
        class_names=["pore", "ysz", "ni"],
        phase_map=PHASE_MAP,
        tile_size=32,
        context_slices=0,
        normalisation=FixedRange(low=20000.0, high=43000.0),
        window="sliding",
        whole_slice_max_pixels=0,
        step_fraction=0.5,
        tta=False,
        batch_size=8,
        max_slice_pixels=100_000,
        max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime="keras", planes="z", fusion_depth=64, fusion_halo=16,
    )
    return ModelConfig(**{**values, **fields})


def small_network(context_slices=0, seed=0):
    """A small random-weight U-Net behind the normalisation of make_config (raw grey in)."""
    import keras

    from socseg.data.normalise import Normaliser
    from socseg.model.export import export_model
    from socseg.model.unet import build_model

    keras.utils.set_random_seed(seed)
    network = build_model("unet", "phases", n_classes=3, base_filters=4, encoder_weights="none", context_slices=context_slices)
    return export_model(network, Normaliser(20000.0, 43000.0, 0.5, 99.5))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small random-weight U-Net saved as a pyfunc segmenter (tile 32): (its folder, the Keras model)."""
    from socseg.inference.pyfunc import save_segmenter

    exported = small_network()
    return save_segmenter(exported, make_config(), tmp_path_factory.mktemp("segmenter") / "model"), exported


@pytest.fixture(scope="module")
def segmenter(saved):
    """The saved segmenter loaded back, and the Keras model it was saved from."""
    path, exported = saved
    return mlflow.pyfunc.load_model(str(path)), exported


@pytest.fixture(scope="module")
def grey():
    return np.random.default_rng(0).integers(18000, 45000, (3, 45, 70)).astype(np.uint16)


def test_tensor_form_any_size_gives_label_values(segmenter, saved, grey):
    model, exported = segmenter
    labels = model.predict(grey)
    assert labels.shape == grey.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= set(PHASE_MAP)
    config = model_config(str(saved[0]))
    assert config == make_config()  # stored once, in the MLmodel, and read back without loading
    probs = Predictor(exported, config).probabilities(grey)
    np.testing.assert_array_equal(labels, np.array(sorted(PHASE_MAP), np.uint8)[probs.argmax(-1)])
    # Same grey values in another dtype or with a channel axis: same labels.
    np.testing.assert_array_equal(model.predict(grey.astype(np.float32)), labels)
    np.testing.assert_array_equal(model.predict(grey[..., None]), labels)
    np.testing.assert_array_equal(model.predict(grey.astype(np.int64)), labels)  # as JSON numbers arrive


def test_probabilities_on_request(segmenter, grey):
    model, _ = segmenter
    out = model.predict(grey, params={"return_probabilities": True})
    assert out["probabilities"].shape == (*grey.shape, 3)
    np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out["labels"], model.predict(grey))
    tta = model.predict(grey, params={"return_probabilities": True, "tta": True, "step_fraction": 0.25})
    assert tta["probabilities"].shape == out["probabilities"].shape
    assert not np.allclose(tta["probabilities"], out["probabilities"])


@pytest.mark.parametrize("encoding", ["npy", "tiff"])
def test_compact_form_matches_tensor_form_in_the_same_encoding(segmenter, grey, encoding):
    model, _ = segmenter
    encoded = [encode_array(s, encoding) for s in grey]
    np.testing.assert_array_equal(decode_array(encoded[0]), grey[0])  # uint16 travels exactly
    expected = model.predict(grey)
    for request in (pd.DataFrame({"image": encoded}), {"image": encoded}, np.array(encoded)):
        frame = model.predict(request)
        assert list(frame.columns) == ["labels", "phase_map", "runtime"]
        assert base64.b64decode(frame["labels"][0])[:2] == (b"\x93N" if encoding == "npy" else b"II")
        np.testing.assert_array_equal(np.stack([decode_array(t) for t in frame["labels"]]), expected)
    assert frame["phase_map"][0] == '{"0": "pore", "128": "ysz", "255": "ni"}'
    other = "npy" if encoding == "tiff" else "tiff"
    frame = model.predict(pd.DataFrame({"image": encoded}), params={"return_probabilities": True, "encoding": other})
    assert decode_array(frame["probabilities"][1]).shape == (45, 70, 3)
    assert base64.b64decode(frame["labels"][0])[:2] == (b"\x93N" if other == "npy" else b"II")
    for channels in (1, 3):  # probabilities keep their channel axis in both encodings
        probs = np.random.default_rng(1).random((5, 6, channels), dtype=np.float32)
        np.testing.assert_array_equal(decode_array(encode_array(probs, encoding)), probs)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _tiff(array, **kwargs) -> str:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return _b64(buffer.getvalue())


BAD_REQUESTS = [
    ("rank 2", np.zeros((40, 40), np.uint16), "rank 2"),
    ("rank 5", np.zeros((1, 2, 40, 40, 3), np.uint16), "rank 5"),
    ("strings", np.full((1, 4, 4), "a"), "must be numbers"),
    ("bools", np.zeros((1, 4, 4), bool), "must be numbers"),
    ("negative ints", np.full((1, 4, 4), -3), "0..65535"),
    ("nan", np.array([[[1.0, np.nan]]]), "NaN"),
    ("inf", np.array([[[1.0, np.inf]]], np.float32), "NaN or infinity"),
    ("empty batch", np.zeros((0,)), "empty batch"),
    ("empty batch 3-D", np.zeros((0, 40, 40), np.uint16), "empty batch"),
    ("ragged list", [np.zeros((4, 4)), np.zeros((5, 4))], "different sizes"),
    ("oversized", np.zeros((1, 400, 400), np.uint8), "exceeds this model's limit of 100000 pixels"),
    ("no image column", pd.DataFrame({"x": ["a"]}), "column 'image'"),
    ("empty column", pd.DataFrame({"image": []}), "empty batch"),
    ("bad base64", pd.DataFrame({"image": ["@@@"]}), "slice 0: not valid base64"),
    ("not an image", pd.DataFrame({"image": [_b64(b"hello world")]}), "neither .npy nor TIFF"),
    ("corrupt tiff", pd.DataFrame({"image": [_b64(b"II*\x00" + b"\x07" * 40)]}), "slice 0: corrupt TIFF"),
    ("corrupt npy", pd.DataFrame({"image": [_b64(b"\x93NUMPY\x01\x00garbage")]}), "corrupt .npy"),
    ("3-D slice", pd.DataFrame({"image": [encode_array(np.zeros((2, 4, 4), np.uint16), "npy")]}), "one 2-D slice"),
    ("int32 slice", pd.DataFrame({"image": [encode_array(np.zeros((4, 4), np.int32), "npy")]}), "dtype int32"),
    ("nan slice", pd.DataFrame({"image": [encode_array(np.full((4, 4), np.nan, np.float32), "npy")]}), "slice 0: grey values contain NaN"),
    (
        "mismatched sizes",
        pd.DataFrame({"image": [encode_array(np.zeros((4, 4), np.uint16), "npy"), encode_array(np.zeros((5, 4), np.uint16), "tiff")]}),
        "slice 1 is 5x4 but slice 0 is 4x4",
    ),
    ("oversized tiff", pd.DataFrame({"image": [_tiff(np.zeros((400, 400), np.uint8), compression="zlib")]}), "exceeds"),
    ("multi-page tiff", pd.DataFrame({"image": [_tiff(np.zeros((2, 4, 4), np.uint8), photometric="minisblack")]}), "2 pages"),
]


@pytest.mark.parametrize("what, request_input, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_raise_a_400_that_names_the_problem(segmenter, what, request_input, message):
    model, _ = segmenter
    with pytest.raises(RequestError, match=None) as info:
        model.predict(request_input)
    assert message in info.value.message
    assert info.value.get_http_status_code() == 400


@pytest.mark.parametrize(
    "params, message",
    [
        ({"step_fraction": 1.5}, "step_fraction must be in (0, 1]"),
        ({"smoothing_sigma": -1.0}, "smoothing_sigma must be in [0, 3] pixels"),
        ({"encoding": "png"}, "unknown encoding 'png'"),
        ({"dtype": "uint8"}, "values span"),
        ({"dtype": "int7"}, "unknown dtype"),
        ({"context_before": -1}, "context_before must be a whole number of slices >= 0"),
        ({"context_before": 2, "context_after": 1}, "leaves none of the 3 slices"),
    ],
)
def test_bad_parameters_are_400s_too(segmenter, grey, params, message):
    model, _ = segmenter
    with pytest.raises(RequestError) as info:
        model.predict(grey, params=params)
    assert message in info.value.message


def test_context_parameters_must_be_whole_slice_counts():
    from socseg.inference.pyfunc import parse_context

    assert parse_context({"context_before": 2, "context_after": None}, 5) == (2, 0)
    assert parse_context({}, 1) == (0, 0)
    assert parse_context({"context_before": 2.0, "context_after": "1"}, 4) == (2, 1)
    for bad in (1.5, "two"):
        with pytest.raises(RequestError, match="context_after must be a whole number"):
            parse_context({"context_after": bad}, 5)


def test_declared_dtype_checks_json_numbers():
    config = make_config(class_names=["a", "b"], phase_map={0: "a", 255: "b"})
    assert parse_request(np.array([[[1.0, 2.0]]]), config, "uint16").images.dtype == np.uint16
    with pytest.raises(RequestError, match="not integers"):
        parse_request(np.array([[[1.5, 2.0]]]), config, "uint16")
    assert parse_request(np.array([[[70000, 2]]]), config, "float32").images.dtype == np.float32
    small = dataclasses.replace(config, max_slice_pixels=10)
    with pytest.raises(RequestError, match="4x4 = 16 pixels exceeds"):
        parse_request(np.zeros((1, 4, 4), np.uint8), small)


def test_ni_task_outputs_rest_and_ni_values():
    config = make_config(task="ni", class_names=["rest", "ni"])
    assert config.label_phase_map == {0: "rest", 255: "ni"}
    assert make_config().label_phase_map == PHASE_MAP
    record = config.to_dict()
    assert record["phase_map"] == {"0": "pore", "128": "ysz", "255": "ni"}  # JSON/YAML keys
    round_trip = ModelConfig.from_dict(json.loads(json.dumps(record)))
    assert round_trip == config


def test_config_of_models_logged_before_the_later_fields():
    """Records of older models lack encoder, context_slices and max_clipped_fraction: the values they ran with."""
    record = make_config().to_dict()
    for later in ("encoder", "context_slices", "max_clipped_fraction", "window", "whole_slice_max_pixels",
                  "smoothing_sigma"):
        del record[later]
    del record["normalisation"]["mode"]  # recorded neither inside normalisation nor beside it
    old = ModelConfig.from_dict(record)
    assert (old.encoder, old.context_slices, old.max_clipped_fraction, old.smoothing_sigma) == ("", 0, 0.5, 0.0)
    assert old.normalisation.mode == "fixed"  # what every model before per_volume did
    assert old.window == "sliding"  # what every model before whole-slice passes did ...
    from socseg.inference.window import fits_whole_slice

    on_request = InferenceRequest.resolve(old, InferenceOptions(window="whole_slice"))
    assert fits_whole_slice(501, 501, on_request.window)  # ... which they do on request
    assert old == make_config(encoder="", whole_slice_max_pixels=old.whole_slice_max_pixels)
    with pytest.raises(KeyError):
        ModelConfig.from_dict({k: v for k, v in record.items() if k != "tile_size"})  # not optional


def test_describe_answers_with_the_config_and_context_params_work(tmp_path):
    """A 2.5D segmenter tells clients its context_slices and phase map; a chunk sent with its
    neighbours as context comes back predicted with those true neighbours."""
    from socseg.inference.pyfunc import save_segmenter

    exported = small_network(context_slices=1, seed=1)
    config = make_config(context_slices=1, tile_size=16, max_slice_pixels=10_000)
    model = mlflow.pyfunc.load_model(str(save_segmenter(exported, config, tmp_path / "model")))
    images = np.random.default_rng(2).integers(18000, 45000, (6, 24, 20)).astype(np.uint16)

    answer = model.predict(images, params={"describe": True})
    assert isinstance(answer, pd.DataFrame) and list(answer.columns) == ["config", "runtime"] and len(answer) == 1
    assert answer["runtime"][0].startswith("keras ")  # the config's inference.runtime: keras
    described = json.loads(answer["config"][0])
    assert described["context_slices"] == 1
    assert described["phase_map"] == {"0": "pore", "128": "ysz", "255": "ni"}
    assert ModelConfig.from_dict(described) == config
    # Compact requests too (the REST client asks before it sends anything).
    compact = pd.DataFrame({"image": [encode_array(images[0], "npy")]})
    assert json.loads(model.predict(compact, params={"describe": True})["config"][0]) == described

    whole = model.predict(images)
    reference = Predictor(exported, config).probabilities(images)
    np.testing.assert_array_equal(whole, np.array(sorted(PHASE_MAP), np.uint8)[reference.argmax(-1)])
    middle = model.predict(images, params={"context_before": 2, "context_after": 1})
    assert middle.shape == (3, 24, 20)
    np.testing.assert_array_equal(middle, whole[2:5])
    # Without the context slices the chunk's ends see replicated slices instead: the context matters.
    alone = model.predict(images[2:5], params={"return_probabilities": True})["probabilities"]
    with_context = model.predict(images, params={"context_before": 2, "context_after": 1, "return_probabilities": True})
    np.testing.assert_allclose(with_context["probabilities"], reference[2:5], atol=1e-6)
    assert not np.allclose(alone[0], reference[2], atol=1e-6)


def test_a_model_pickled_before_the_restructure_still_loads(segmenter, grey, tmp_path):
    """Models logged before the by-stage layout pickled their class as ``socseg.pyfunc.Segmenter``."""
    from socseg.inference.pyfunc import Segmenter, save_segmenter

    model, exported = segmenter
    path = save_segmenter(exported, make_config(), tmp_path / "model")
    pickled = path / "python_model.pkl"
    assert pickled.is_file()
    # What cloudpickle wrote for those models: protocol 0, a GLOBAL reference to the old module path.
    pickled.write_bytes(b"csocseg.pyfunc\nSegmenter\n)\x81.")
    old = mlflow.pyfunc.load_model(str(path))
    assert isinstance(old.unwrap_python_model(), Segmenter)
    np.testing.assert_array_equal(old.predict(grey), model.predict(grey))


def test_relog_gives_an_old_model_this_versions_serving_code(segmenter, grey, tmp_path, mlflow_env):
    """`socseg relog`: an old model's network and training record in a new run, without retraining,
    with the inference settings of params.yaml now (e.g. whole-slice passes)."""
    import json

    from socseg.params import load_params, typed

    from click.testing import CliRunner

    from socseg.cli import main
    from socseg.inference.pyfunc import save_segmenter

    model, exported = segmenter
    old = save_segmenter(exported, make_config(), tmp_path / "old")
    (old / "python_model.pkl").write_bytes(b"csocseg.pyfunc\nSegmenter\n)\x81.")
    out = CliRunner().invoke(main, ["relog", str(old)])
    assert out.exit_code == 0, out.output
    uri = out.output.split(" model ")[1].split(" (from ")[0]
    assert uri.startswith("models:/") and f"(from {old})" in out.output
    new = mlflow.pyfunc.load_model(uri)
    local = Path(mlflow.artifacts.download_artifacts(uri))
    assert b"socseg.inference.pyfunc" in (local / "python_model.pkl").read_bytes()
    # The same network: with the old model's window, smoothing and planes, the same labels.
    np.testing.assert_array_equal(new.predict(grey, params={"window": "sliding", "smoothing_sigma": 0.0, "planes": "z"}),
                                  model.predict(grey))
    described = json.loads(new.predict(grey[:1], params={"describe": True})["config"][0])
    inference = typed(load_params()).inference
    assert described == ModelConfig.from_training(model_config(str(old)).to_dict(), inference).to_dict()
    assert described["window"] == inference.window and model_config(str(old)).window == "sliding"
    assert described["planes"] == inference.planes and model_config(str(old)).planes == "z"
    assert mlflow.get_run(mlflow.models.get_model_info(uri).run_id).data.tags["relogged_from"] == str(old)


def test_training_logs_one_model_the_segmenter(tiny_params, mlflow_env):
    """The run's pyfunc segments whole slices with the trained network and the params' settings."""
    from socseg.training.train import train
    from socseg.data.volumes import load_volume

    tiny_params["inference"].update(step_fraction=0.25, tta=True, batch_size=4, max_slice_pixels=10_000)
    result = train(tiny_params, run_name="tiny")
    assert result.model_uri.startswith("models:/")
    assert not hasattr(result, "segmenter_uri")
    info = mlflow.models.get_model_info(result.model_uri)
    assert "python_function" in info.flavors and "keras" not in info.flavors
    assert {p.name for p in info.signature.params.params} >= {"return_probabilities", "tta", "step_fraction", "describe"}
    config = model_config(result.model_uri)
    assert (config.tile_size, config.step_fraction, config.tta, config.max_slice_pixels) == (32, 0.25, True, 10_000)
    assert (config.task, config.encoder, config.context_slices) == ("ni", "unet", 0)
    assert config.label_phase_map == {0: "rest", 255: "ni"}

    model = mlflow.pyfunc.load_model(result.model_uri)
    network = model.unwrap_python_model().predictor.network
    image = load_volume(f"{tiny_params['data']['dir']}/tiny").image[-3:]
    labels = model.predict(image)
    # The window on its own, with the settings the params gave (TTA, a quarter-tile step), on the
    # grey values the network sees: per_volume (the default), the request's own range mapped.
    predictor = model.unwrap_python_model().predictor
    assert config.normalisation.mode == tiny_params["normalise"]["mode"] == "per_volume"
    mapped = predictor.map_grey(image, config.normalisation.estimate_range(image))
    probs = np.stack(list(iter_window_probabilities(network.predict_on_batch, mapped, predictor.request(source=image).window)))
    np.testing.assert_array_equal(labels, np.where(probs[..., 0] > 0.5, 255, 0).astype(np.uint8))


def test_training_a_2p5d_model_logs_its_context_and_the_segmenter_uses_it(tiny_params, mlflow_env):
    from socseg.data.context import iter_with_context
    from socseg.inference.evaluate import evaluate_model
    from socseg.training.train import train
    from socseg.data.volumes import load_volume

    tiny_params["train"]["context_slices"] = 1
    # ce_dice, not the default boundary_ce_dice: this tiny training leaves the boundary-weighted
    # model at p = 0.5 on a few percent of pixels, where two batchings may round either way; the
    # test is about the context slices, which the loss does not touch.
    tiny_params["train"]["loss"] = "ce_dice"
    result = train(tiny_params, run_name="tiny-2.5d")
    model = mlflow.pyfunc.load_model(result.model_uri)
    network = model.unwrap_python_model().predictor.network
    assert network.input_shape[-1] == 3
    config = model_config(result.model_uri)
    assert config.context_slices == 1
    assert json.loads(model.predict(np.zeros((1, 8, 8), np.uint16), params={"describe": True})["config"][0])["context_slices"] == 1
    volume = load_volume(f"{tiny_params['data']['dir']}/tiny")
    image = volume.image[-4:]
    predictor = model.unwrap_python_model().predictor
    stacked = iter_with_context(predictor.map_grey(image, config.normalisation.estimate_range(image)), 1)
    probs = np.stack(list(iter_window_probabilities(network.predict_on_batch, stacked, predictor.request(source=image).window)))
    np.testing.assert_array_equal(model.predict(image), np.where(probs[..., 0] > 0.5, 255, 0).astype(np.uint8))
    # Context slices are context only: the middle two slices come back, predicted with their true neighbours.
    middle = model.predict(image, params={"context_before": 1, "context_after": 1})
    np.testing.assert_array_equal(middle, np.where(probs[1:3, ..., 0] > 0.5, 255, 0).astype(np.uint8))
    scores = evaluate_model(result.model_uri, volume, z_range=(20, 24))
    assert scores["n_slices"] == 4 and 0.0 <= scores["mean_iou"] <= 1.0


def test_segmenter_carries_its_own_code_and_loads_without_socseg_installed(segmenter, grey, tmp_path):
    """A serving environment built from the pinned requirements has no socseg: the model brings it."""
    import subprocess
    import sys

    from socseg.inference.pyfunc import save_segmenter

    model, exported = segmenter
    path = save_segmenter(exported, model.unwrap_python_model().config, tmp_path / "model")
    assert (path / "code" / "socseg" / "inference" / "pyfunc.py").is_file()
    assert (path / "code" / "socseg" / "pyfunc.py").is_file()  # where older pickles look
    requirements = (path / "requirements.txt").read_text()
    for package in ("mlflow==", "keras==", "numpy==", "tifffile==", "pyyaml=="):
        assert package in requirements.lower(), package
    np.save(tmp_path / "grey.npy", grey)
    script = f"""
import sys
sys.path = [p for p in sys.path if not p.rstrip('/').endswith('src')]  # drop the installed socseg
import importlib.util
assert importlib.util.find_spec('socseg') is None
import mlflow, numpy as np
labels = mlflow.pyfunc.load_model({str(path)!r}).predict(np.load({str(tmp_path / 'grey.npy')!r}))
import socseg
assert socseg.__file__.startswith({str(path)!r}), socseg.__file__
np.save({str(tmp_path / 'labels.npy')!r}, labels)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), model.predict(grey))


# --------------------------------------------------------------------------- grey range


def test_input_outside_the_models_grey_range_is_a_400_unless_allowed(segmenter, grey):
    """The same slices saved as float32 after 2.5e-5 * x - 0.55 all clip below the model's low end."""
    model, _ = segmenter
    rescaled = (2.5e-5 * grey.astype(np.float64) - 0.55).astype(np.float32)
    for request in (rescaled, pd.DataFrame({"image": [encode_array(s, "npy") for s in rescaled]})):
        with pytest.raises(RequestError) as info:
            model.predict(request)
        message = info.value.message
        assert info.value.get_http_status_code() == 400 and "\n" not in message
        assert "100.0% of the" in message and "model's range 20000..43000" in message
        assert f"the input spans {rescaled.min():.6g}..{rescaled.max():.6g}" in message
        assert "--allow-out-of-range" in message and "allow_out_of_range=true" in message
    allowed = model.predict(rescaled, params={"allow_out_of_range": True})
    assert allowed.shape == grey.shape and allowed.dtype == np.uint8
    # Everything clips to 0: the labels are those of a constant slice at the model's low end.
    np.testing.assert_array_equal(allowed, model.predict(np.full(grey.shape, 0.0, np.float32), params={"allow_out_of_range": True}))
    # In-range input segments as before, the parameter changes nothing there.
    np.testing.assert_array_equal(model.predict(grey, params={"allow_out_of_range": True}), model.predict(grey))
    with pytest.raises(MlflowException, match="allow_out_of_range") as info:  # MLflow checks the param's type
        model.predict(grey, params={"allow_out_of_range": "maybe"})
    assert info.value.get_http_status_code() == 400


def test_grey_range_check_counts_both_ends_against_the_configured_fraction(saved):
    exported = saved[1]
    config = make_config(task="ni", class_names=["rest", "ni"], normalisation=FixedRange(low=100.0, high=200.0))
    assert config.max_clipped_fraction == 0.5

    def check(images, **fields):
        Predictor(exported, dataclasses.replace(config, **fields)).check_grey_range(images)

    images = np.full((1, 10, 10), 150, np.uint16)
    images.flat[:25], images.flat[25:50] = 50, 250  # exactly half clipped (below and above): accepted
    check(images)
    images.flat[50] = 250
    with pytest.raises(GreyRangeError, match=r"51\.0% of the 100 pixels .* \(25 below, 26 above\)"):
        check(images)
    assert issubclass(GreyRangeError, ValueError)
    check(images, max_clipped_fraction=0.6)
    with pytest.raises(GreyRangeError, match=r"allowed: 20%"):
        check(images, max_clipped_fraction=0.2)
    with pytest.raises(ValueError, match="records the layer's low and high"):  # no range recorded: refused
        ModelConfig.from_dict({**config.to_dict(), "normalisation": {"mode": "fixed"}})


def test_max_clipped_fraction_travels_from_params_into_the_model(segmenter, saved, repo_root):
    from socseg.params import ParamsError, load_params, typed

    tree = load_params(repo_root / "params.yaml")
    inference = typed(tree).inference
    assert inference.max_clipped_fraction == 0.5
    trained = {"task": "ni", "encoder": "unet", "class_names": ["rest", "ni"], "phase_map": {"0": "pore", "255": "ni"},
               "tile_size": 32, "context_slices": 0, "normalisation": {"low": 1.0, "high": 2.0}}
    assert ModelConfig.from_training(trained, inference).max_clipped_fraction == 0.5
    tree["inference"]["max_clipped_fraction"] = 0.9
    config = ModelConfig.from_training(trained, typed(tree).inference)
    assert ModelConfig.from_dict(config.to_dict()).max_clipped_fraction == 0.9
    assert (config.step_fraction, config.batch_size) == (inference.step_fraction, inference.batch_size)
    tree["inference"]["max_clipped_fraction"] = 0
    with pytest.raises(ParamsError, match="max_clipped_fraction must be in"):
        typed(tree)
    model, _ = segmenter
    assert model_config(str(saved[0])).max_clipped_fraction == 0.5
    assert {p.name: p.default for p in model.metadata.get_params_schema().params}["allow_out_of_range"] is False


# --------------------------------------------------------------------------- per-volume normalisation

PER_VOLUME = {"low": 0.0, "high": 1.0, "low_percentile": 0.5, "high_percentile": 99.5}


def test_normalisation_is_one_typed_field_of_the_config():
    """The mode is recorded once, inside ``normalisation``; records of the earlier encoding (the mode
    beside it as ``normalisation_mode``) still load."""
    record = make_config().to_dict()
    record["normalisation"] = {"mode": "per_volume", **PER_VOLUME}
    assert "normalisation_mode" not in record
    config = ModelConfig.from_dict(record)
    assert config.normalisation == PerVolume(low_percentile=0.5, high_percentile=99.5)
    assert config.normalisation.to_dict() == {"mode": "per_volume", **PER_VOLUME}
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    earlier = {**record, "normalisation": dict(PER_VOLUME), "normalisation_mode": "per_volume"}
    assert ModelConfig.from_dict(earlier) == config
    record["normalisation"]["mode"] = "per_slice"
    with pytest.raises(ValueError, match="normalisation mode 'per_slice' is not one of fixed, per_volume"):
        ModelConfig.from_dict(record)


@pytest.fixture(scope="module")
def per_volume_saved(tmp_path_factory):
    """The small U-Net behind IntensityNormalisation(0, 1), saved as a per_volume segmenter."""
    import keras

    from socseg.data.normalise import Normaliser
    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import export_model
    from socseg.model.unet import build_model

    keras.utils.set_random_seed(0)
    network = build_model("unet", "phases", n_classes=3, base_filters=4, encoder_weights="none")
    exported = export_model(network, Normaliser(0.0, 1.0, 0.5, 99.5))
    config = make_config(normalisation=PerVolume(low_percentile=0.5, high_percentile=99.5))
    return save_segmenter(exported, config, tmp_path_factory.mktemp("per_volume") / "model"), exported


def test_served_grey_range_params_give_the_labels_of_local_segment(per_volume_saved, grey, tmp_path):
    """grey_low/grey_high: a request of some slices is mapped with the whole volume's range, as
    `socseg segment` maps each chunk; a float32 copy with its own range gets the same labels."""
    from socseg.inference.segment import segment

    path, exported = per_volume_saved
    model = mlflow.pyfunc.load_model(str(path))
    predictor = Predictor(exported, model_config(str(path)))
    low, high = predictor.config.normalisation.estimate_range(grey)
    stack = tmp_path / "grey.tif"
    tifffile.imwrite(stack, grey, photometric="minisblack")
    segment(str(path), stack, tmp_path / "local.tif", InferenceOptions(grey_range=(low, high)), slice_batch=1, progress=False)
    local = tifffile.imread(tmp_path / "local.tif")
    params = {"grey_low": low, "grey_high": high}
    np.testing.assert_array_equal(model.predict(grey[1:2], params=params), local[1:2])  # one slice, the volume's range
    np.testing.assert_array_equal(model.predict(grey, params=params), local)
    # Without the params a per_volume model uses the request's own slices: the whole volume here.
    np.testing.assert_array_equal(model.predict(grey), local)
    # The same slices as a float32 phase reconstruction, with its own range: the same labels.
    rescaled = (2.5e-5 * grey.astype(np.float64) - 0.55).astype(np.float32)
    r_low, r_high = predictor.config.normalisation.estimate_range(rescaled)
    assert r_low == pytest.approx(2.5e-5 * low - 0.55, abs=1e-6)
    assert np.mean(model.predict(rescaled, params={"grey_low": r_low, "grey_high": r_high}) == local) > 0.999
    # A wrong range changes the labels: the params are applied.
    wrong = {"grey_low": low, "grey_high": (low + high) / 2, "allow_out_of_range": True}
    assert np.mean(model.predict(grey, params=wrong) == local) < 0.9


@pytest.mark.parametrize("params, message", [
    ({"grey_low": 1.0}, "grey_low given without grey_high: send both"),
    ({"grey_high": 2.0}, "grey_high given without grey_low: send both"),
    ({"grey_low": 5.0, "grey_high": 5.0}, "LOW must be below HIGH"),
])
def test_grey_range_params_are_checked(per_volume_saved, grey, params, message):
    model = mlflow.pyfunc.load_model(str(per_volume_saved[0]))
    with pytest.raises(MlflowException, match=message) as info:
        model.predict(grey, params=params)
    assert info.value.get_http_status_code() == 400


def test_per_volume_request_without_a_range_to_estimate_is_a_400(per_volume_saved):
    model = mlflow.pyfunc.load_model(str(per_volume_saved[0]))
    flat = np.full((2, 20, 20), 30000, np.uint16)
    with pytest.raises(MlflowException, match="grey values are constant.*send the volume's grey range as grey_low") as info:
        model.predict(flat)
    assert info.value.get_http_status_code() == 400
    assert model.predict(flat, params={"grey_low": 20000.0, "grey_high": 43000.0}).shape == flat.shape


def test_fixed_model_maps_a_given_grey_range_onto_its_training_range(segmenter, grey):
    """A fixed model refuses a float32 copy on another scale; with that copy's range it segments it."""
    model, _ = segmenter
    rescaled = (2.5e-5 * grey.astype(np.float64) - 0.55).astype(np.float32)
    with pytest.raises(MlflowException, match="out of this model's range"):
        model.predict(rescaled)
    as_given = model.predict(rescaled, params={"grey_low": 2.5e-5 * 20000.0 - 0.55, "grey_high": 2.5e-5 * 43000.0 - 0.55})
    assert np.mean(as_given == model.predict(grey)) > 0.999


def test_a_served_request_may_smooth_the_probabilities_as_segment_does(segmenter, saved, grey):
    """params.smoothing_sigma reaches the predictor: the served labels equal the predictor's with the
    same request, and differ from the unsmoothed ones (a random network's labels are speckled)."""
    from socseg.inference.pyfunc import parse_options

    model, exported = segmenter
    predictor = Predictor(exported, model_config(str(saved[0])))
    request = predictor.request(parse_options({"smoothing_sigma": 1.5}), source=grey)
    assert request.window.smoothing_sigma == 1.5
    smoothed = model.predict(grey, params={"smoothing_sigma": 1.5})
    expected = np.array(sorted(PHASE_MAP), np.uint8)[predictor.probabilities(grey, request=request).argmax(-1)]
    np.testing.assert_array_equal(smoothed, expected)
    assert np.count_nonzero(smoothed != model.predict(grey)) > 0


def test_a_served_request_may_fuse_planes_as_segment_does(segmenter, saved, grey):
    """params.planes reaches the predictor: fused over the request's slices (the client sends the
    fusion halo as context_before/after), equal to the predictor's labels with the same request;
    the signature offers the model's own planes, and a bad value is a clear 400."""
    from socseg.inference.pyfunc import parse_options

    model, exported = segmenter
    predictor = Predictor(exported, model_config(str(saved[0])))
    request = predictor.request(parse_options({"planes": "zyx"}), source=grey)
    assert request.planes == "zyx" and request.fuses
    fused = model.predict(grey, params={"planes": "zyx", "context_before": 1, "context_after": 1})
    expected = np.array(sorted(PHASE_MAP), np.uint8)[predictor.probabilities(grey, 1, 1, request).argmax(-1)]
    np.testing.assert_array_equal(fused, expected)
    assert np.count_nonzero(fused != model.predict(grey)[1:-1]) > 0
    planes = {p.name: p.default for p in model.metadata.get_params_schema().params}["planes"]
    assert planes == model_config(str(saved[0])).planes
    with pytest.raises(Exception, match="planes must be distinct letters of 'zyx'"):
        model.predict(grey, params={"planes": "zw"})
