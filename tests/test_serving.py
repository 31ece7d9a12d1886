"""A real `mlflow models serve` of a registered tiny segmenter (models:/<name>@champion) on loopback:
bad requests get a 4xx naming the problem while the server keeps serving, served predictions equal
local pyfunc.predict, and serving/client.py segments a volume through it."""

import base64
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import tifffile

from socseg.inference.pyfunc import decode_array, encode_array

REPO = Path(__file__).resolve().parents[1]
NAME = "socseg-tiny"
MAX_PIXELS = 512 * 512


def _tiff_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, compression="zlib")
    return base64.b64encode(buffer.getvalue()).decode()


def _frame(*slices: str) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[s] for s in slices]}}


@pytest.fixture()
def server(tiny_params, mlflow_env, tmp_path, serving_client):
    """Train a 2.5D model (one neighbour per side), register as NAME@champion, serve; yields
    (url, model URI); the server always stops."""
    from mlflow.tracking import MlflowClient

    from socseg.training.train import train

    tiny_params["inference"] = {**tiny_params.get("inference", {}), "max_slice_pixels": MAX_PIXELS}
    tiny_params["train"]["context_slices"] = 1
    result = train(tiny_params, run_name="tiny")
    version = mlflow.register_model(result.model_uri, NAME)
    MlflowClient().set_registered_model_alias(NAME, "champion", version.version)
    uri = f"models:/{NAME}@champion"
    with serving_client.local_server(uri, timeout=60, log_path=tmp_path / "server.log") as (url, _):
        yield url, uri


def _bad_requests() -> list[tuple[str, bytes, str, str]]:
    """(what, body, content type, words the answer must contain)."""
    js = "application/json"
    tiff = _tiff_b64(np.zeros((30, 30), np.uint16))

    def body(obj) -> bytes:
        return json.dumps(obj).encode()

    return [
        ("wrong rank", body({"inputs": [[1, 2], [3, 4]]}), js, "rank 2"),
        ("wrong dtype", body({"inputs": [[["a", "b"]]]}), js, "must be numbers"),
        ("declared dtype", body({"inputs": [[[1.5, 2]]], "params": {"dtype": "uint16"}}), js, "not integers"),
        ("out of range", body({"inputs": [[[70000, 2]]]}), js, "0..65535"),
        ("NaN", b'{"inputs": [[[1, NaN]]]}', js, "NaN or infinity"),
        ("inf", b'{"inputs": [[[1, Infinity]]]}', js, "NaN or infinity"),
        ("empty batch", body({"inputs": []}), js, "empty batch"),
        ("empty compact batch", body(_frame()), js, "empty batch"),
        ("corrupt base64", body(_frame("@@not base64@@")), js, "slice 0: not valid base64"),
        ("corrupt TIFF", body(_frame(tiff, base64.b64encode(b"II*\x00" + b"\x05" * 64).decode())), js, "slice 1: corrupt TIFF"),
        ("not an image", body({"inputs": [base64.b64encode(b"hello").decode()]}), js, "neither .npy nor TIFF"),
        ("mismatched sizes", body(_frame(tiff, _tiff_b64(np.zeros((31, 30), np.uint16)))), js, "slice 1 is 31x30 but slice 0 is 30x30"),
        ("ragged tensor", body({"inputs": [[[1, 2], [3, 4]], [[1, 2, 3]]]}), js, "inhomogeneous shape"),
        ("oversized slice", body(_frame(_tiff_b64(np.zeros((600, 600), np.uint8)))), js, f"limit of {MAX_PIXELS} pixels"),
        ("bad parameter", body({"inputs": [[[1, 2]]], "params": {"step_fraction": 3}}), js, "step_fraction"),
        ("context too large", body({"inputs": [[[1, 2]]] * 2, "params": {"context_before": 1, "context_after": 1}}), js,
         "leaves none of the 2 slices"),
        ("bad context", body({"inputs": [[[1, 2]]] * 2, "params": {"context_before": -1}}), js,
         "context_before must be a whole number of slices >= 0"),
        ("no image column", body({"dataframe_split": {"columns": ["x"], "data": [["a"]]}}), js, "column 'image'"),
        # constant slices: a per_volume model (the default, as served here) has no grey range to map
        # (a fixed-mode model refuses another grey scale: tests/test_pyfunc.py)
        ("constant slices", body({"inputs": np.full((1, 40, 50), 0.2).tolist()}), js,
         "send the volume's grey range as grey_low and grey_high"),
        # MLflow's scoring server parses the body before the model sees it; its 400 names the problem
        # and where the parser stopped (checked here so that stays true with the pinned MLflow).
        ("not JSON", b"{this is not json", js, "Ensure that input is a valid JSON formatted string"),
        ("not JSON, position", b"{this is not json", js, "Expecting property name enclosed in double quotes: line 1 column 2"),
        ("not UTF-8", b"\xff\xfe{}", js, "Ensure that input is a valid JSON formatted string"),
        ("wrong content type", b"1,2,3", "text/plain", "content types"),
    ]


@pytest.mark.slow
def test_real_server_bad_inputs_then_good_requests_equal_local_predictions(server, shared_data, tmp_path, serving_client):
    url, uri = server
    invocations = f"{url}/invocations"
    # Not constant: a per_volume model (the default) maps a request's own grey range, which a
    # constant slice does not have.
    good = {"inputs": np.random.default_rng(3).integers(20000, 42000, (1, 40, 50)).astype(np.uint16).tolist()}
    for what, body, content_type, words in _bad_requests():
        answer = requests.post(invocations, data=body, headers={"Content-Type": content_type}, timeout=60)
        assert 400 <= answer.status_code < 500, (what, answer.status_code, answer.text[:500])
        assert words in answer.text, (what, answer.text[:1000])
        # ... and the server is still there for the next good request.
        assert requests.post(invocations, json=good, timeout=60).status_code == 200, what

    rescaled = {"inputs": np.random.default_rng(4).uniform(0.1, 0.3, (1, 40, 50)).tolist(), "params": {"allow_out_of_range": True}}
    assert requests.post(invocations, json=rescaled, timeout=60).status_code == 200  # the override

    local = mlflow.pyfunc.load_model(uri)
    real = np.stack([tifffile.imread(shared_data / "data" / f"SOCprist{k:04d}.tiff") for k in (10, 11)])
    assert real.dtype == np.uint16 and real.shape == (2, 501, 501)
    expected = local.predict(real, params={"return_probabilities": True})

    served = requests.post(invocations, json={"inputs": real.tolist(), "params": {"return_probabilities": True}}, timeout=120)
    assert served.status_code == 200, served.text[:500]
    tensor = served.json()["predictions"]
    np.testing.assert_array_equal(np.asarray(tensor["labels"], np.uint8), expected["labels"])
    np.testing.assert_allclose(np.asarray(tensor["probabilities"], np.float32), expected["probabilities"], atol=1e-5)

    for encoding in ("tiff", "npy"):
        compact = requests.post(
            invocations, json={**_frame(*[encode_array(s, encoding) for s in real]), "params": {"return_probabilities": True}},
            timeout=120,
        )
        assert compact.status_code == 200, compact.text[:500]
        rows = compact.json()["predictions"]
        np.testing.assert_array_equal(np.stack([decode_array(r["labels"]) for r in rows]), expected["labels"])
        np.testing.assert_allclose(np.stack([decode_array(r["probabilities"]) for r in rows]), expected["probabilities"], atol=1e-5)
        assert json.loads(rows[0]["phase_map"]) == {"0": "rest", "255": "ni"}

    # The server describes its model: the config stored with it (context_slices 1, phase map...).
    from socseg.inference.predictor import ModelConfig
    from socseg.inference.pyfunc import model_config

    client = serving_client
    described = client.RestSegmenter(url).describe()
    assert ModelConfig.from_dict(described) == model_config(uri) and described["context_slices"] == 1
    assert client.label_phase_map(described) == {0: "rest", 255: "ni"}

    # serving/client.py: a volume through the server equals `socseg segment` in this process (one
    # chunk). Nobody tells the client the model's context: it asks the server (describe) and sends
    # each 2-slice chunk with its neighbours, as `socseg segment` does.
    from socseg.data.stacks import read_label_metadata
    from socseg.inference.segment import segment

    volume = tmp_path / "volume.tif"
    tifffile.imwrite(volume, np.concatenate([real, real[:1]]), photometric="minisblack")
    segment(uri, volume, tmp_path / "local.tif", slice_batch=8, progress=False)
    reference = tifffile.imread(tmp_path / "local.tif")
    sent_context = []
    payload = client.RestSegmenter.payload

    def spy(self, batch, context=None):
        sent_context.append((len(batch), dict(context or {})))
        return payload(self, batch, context)

    client.RestSegmenter.payload = spy
    for form in ("compact", "tensor"):
        out = tmp_path / f"served_{form}.tif"
        sent_context.clear()
        result, rest = client.segment_with_server(url, str(volume), str(out), slice_batch=2, form=form, progress=False)
        np.testing.assert_array_equal(tifffile.imread(out), reference)
        assert result.shape == (3, 501, 501) and rest.requests == 3  # describe + 2 chunks
        # slices 0-1 with slice 2 after, then slice 2 with slice 1 before
        assert sent_context == [(3, {"context_before": 0, "context_after": 1}), (2, {"context_before": 1, "context_after": 0})]
    client.RestSegmenter.payload = payload
    assert read_label_metadata(tmp_path / "served_compact.tif")["phase_map"] == {"0": "rest", "255": "ni"}
    assert client.main([url, str(volume), str(tmp_path / "served_compact.tif")]) == 2  # exists: refused
    assert client.main([url, str(volume), str(volume), "--overwrite"]) == 2  # never the input
    assert tifffile.imread(volume).shape == (3, 501, 501)


def test_client_retries_connection_errors_then_gives_up(tmp_path, serving_client):
    client = serving_client
    volume = tmp_path / "v.tif"
    tifffile.imwrite(volume, np.zeros((2, 20, 20), np.uint16), photometric="minisblack")
    rest = client.RestSegmenter(f"http://127.0.0.1:{client.free_port()}", retries=2, backoff=0.01)
    with pytest.raises(client.ServerError, match="giving up after 3 attempts"):
        rest(np.zeros((1, 20, 20), np.uint16))
    assert client.main([f"http://127.0.0.1:{client.free_port()}", str(volume), str(tmp_path / "o.tif"), "--retries", "0"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.tif"]  # no output, no partial file


@pytest.mark.slow(seconds=60)
def test_the_client_rides_out_a_server_killed_and_restarted_mid_volume(tiny_params, mlflow_env, tmp_path,
                                                                        serving_client, capsys):
    """`mlflow models serve` SIGKILLed while serving/client.py is halfway through a volume and
    started again on the same port: the client retries, and its labels equal an undisturbed run's."""
    import os
    import signal
    import threading
    import time

    from socseg.training.train import train

    client = serving_client
    tiny_params["train"]["context_slices"] = 1
    uri = train(tiny_params, run_name="tiny").model_uri
    volume = tmp_path / "volume.tif"
    grey = np.random.default_rng(5).integers(20000, 42000, (40, 64, 64)).astype(np.uint16)
    tifffile.imwrite(volume, grey, photometric="minisblack")
    port = client.free_port()
    posts = []
    post = client.RestSegmenter.post

    def counted(self, body):
        posts.append(time.monotonic())
        return post(self, body)

    client.RestSegmenter.post = counted
    outcome = {}
    try:
        with client.local_server(uri, port=port, timeout=120, log_path=tmp_path / "first.log") as (url, process):
            _, undisturbed = client.segment_with_server(url, str(volume), str(tmp_path / "undisturbed.tif"),
                                                        slice_batch=1, progress=False)
            undisturbed_requests = len(posts)
            posts.clear()

            def segment() -> None:
                try:
                    outcome["result"] = client.segment_with_server(
                        url, str(volume), str(tmp_path / "disturbed.tif"), slice_batch=1, progress=False)
                except Exception as error:  # noqa: BLE001 (reported by the assertion below)
                    outcome["error"] = error

            worker = threading.Thread(target=segment)
            worker.start()
            deadline = time.monotonic() + 120
            while len(posts) < 5 and worker.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            os.killpg(process.pid, signal.SIGKILL)  # mid-volume, without warning
            process.wait(timeout=30)
        killed_after = len(posts)
        assert worker.is_alive() and killed_after < undisturbed_requests, "the volume was done before the kill"
        with client.local_server(uri, port=port, timeout=120, log_path=tmp_path / "second.log"):
            worker.join(timeout=300)
    finally:
        client.RestSegmenter.post = post
    assert not worker.is_alive() and "error" not in outcome, outcome.get("error")
    assert "retrying in" in capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "disturbed.tif"), tifffile.imread(tmp_path / "undisturbed.tif"))
    assert outcome["result"][1].requests == undisturbed.requests  # every chunk answered once, none twice



@pytest.mark.parametrize(
    ("flags", "params"),
    [
        ([], None),
        (["--allow-out-of-range"], {"allow_out_of_range": True}),
        (["--allow-out-of-range", "--tta", "--step-fraction", "0.25"],
         {"allow_out_of_range": True, "tta": True, "step_fraction": 0.25}),
        (["--no-tta"], {"tta": False}),
        (["--smoothing-sigma", "1.0"], {"smoothing_sigma": 1.0}),
        (["--planes", "z"], {"planes": "z"}),
    ],
)
def test_client_options_become_request_params(tmp_path, monkeypatch, flags, params, serving_client):
    """What client.py's options put in each request's "params" (no server: the request body is built here)."""
    client = serving_client
    calls = []

    def capture(url, source, output, **kwargs):
        calls.append(kwargs)
        raise client.ServerError("stopped by the test")

    monkeypatch.setattr(client, "segment_with_server", capture)
    argv = ["http://127.0.0.1:5000", str(tmp_path / "v.tif"), str(tmp_path / "o.tif"), "--slice-batch", "2"]
    assert client.main(argv + flags) == 2
    rest = client.RestSegmenter("http://127.0.0.1:5000", params=calls[0]["params"])
    body = json.loads(rest.payload(np.zeros((1, 4, 4), np.uint16)))
    assert body.get("params") == params
    context = json.loads(rest.payload(np.zeros((3, 4, 4), np.uint16), {"context_before": 1, "context_after": 1}))
    assert context["params"] == {**(params or {}), "context_before": 1, "context_after": 1}
    with pytest.raises(SystemExit) as stop:  # no --halo any more: the server says its model's context
        client.main(argv + ["--halo", "1"])
    assert stop.value.code == 2 and len(calls) == 1

@pytest.mark.slow(seconds=35)
def test_serving_bench_writes_its_result_file(tmp_path):
    """benchmarks/serving_bench.py on 2 slices, one repeat: the printed figures land in serving.json /
    serving.md with the command, commit, hardware and software."""
    import subprocess
    import sys

    out = tmp_path / "out"
    args = ["--slices", "2", "--repeat", "1", "--depths", "2,4", "--out", str(out)]
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serving_bench.py"), *args], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    record = json.loads((out / "serving.json").read_text())
    assert record["command"] == "python benchmarks/serving_bench.py " + " ".join(args)
    assert record["git_commit"] and record["hardware"]["cores"] >= 1 and "mlflow" in record["software"]
    modes = [row["mode"] for row in record["rows"]]
    assert modes[0].startswith("local") and len(modes) == 4 and all(row["labels_equal_local"] for row in record["rows"])
    assert all(row["slices_per_s"] > 0 for row in record["rows"])
    assert set(record["figures"]["peak_rss_mib"]["fresh_segment_process_by_depth"]) == {"2", "4"}
    first = record["rows"][0]
    assert f"{first['mode']:38} {first['slices_per_s']:9.2f}" in run.stdout  # the printed figure is the recorded one
    assert f"| {first['mode']} | {first['slices_per_s']:.2f} |" in (out / "serving.md").read_text()


def _serve_in_process(serving_client, monkeypatch, model_path: str) -> list[dict]:
    """Replace the client's HTTP with the pyfunc model at ``model_path`` answering in this process;
    returns the list that collects each request's params."""
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_path)
    sent: list[dict] = []

    def post(self, body: bytes):
        request = json.loads(body)
        params = request.get("params") or {}
        sent.append(params)
        if "dataframe_split" in request:
            split = request["dataframe_split"]
            data = pd.DataFrame(split["data"], columns=split["columns"])
        else:
            data = np.asarray(request["inputs"])
        answer = model.predict(data, params=params)
        return answer.to_dict(orient="records") if isinstance(answer, pd.DataFrame) else np.asarray(answer).tolist()

    monkeypatch.setattr(serving_client.RestSegmenter, "post", post)
    return sent


def test_the_client_sends_a_fusing_models_chunks_with_their_halo(serving_client, tmp_path, monkeypatch):
    """A model fusing planes (planes zyx): the client reads fusion_depth slices per request with
    fusion_halo neighbours as context (from describe), so the served labels equal `socseg segment`'s
    and differ from slice-by-slice ones; --planes z goes back to slice_batch chunks."""
    import keras

    from socseg.inference.predictor import ModelConfig
    from socseg.inference.pyfunc import save_segmenter
    from socseg.inference.request import InferenceOptions
    from socseg.inference.segment import segment
    from socseg.model.export import IntensityNormalisation

    keras.utils.set_random_seed(4)
    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(IntensityNormalisation(0.0, 1.0)(inputs))
    config = ModelConfig.from_dict({
        "task": "ni", "encoder": "unet", "class_names": ["rest", "ni"], "phase_map": {"0": "pore", "128": "ysz", "255": "ni"},
        "tile_size": 32, "context_slices": 0, "window": "whole_slice", "whole_slice_max_pixels": 4096 * 4096,
        "step_fraction": 0.5, "tta": False, "batch_size": 8, "max_slice_pixels": MAX_PIXELS, "max_clipped_fraction": 0.5,
        "planes": "zyx", "fusion_depth": 3, "fusion_halo": 2,
        "normalisation": {"mode": "fixed", "low": 0.0, "high": 1.0}})
    model_path = str(save_segmenter(keras.Model(inputs, outputs), config, tmp_path / "model"))
    sent = _serve_in_process(serving_client, monkeypatch, model_path)
    volume = np.random.default_rng(6).random((8, 30, 40)).astype(np.float32)
    source = tmp_path / "scan.tif"
    tifffile.imwrite(source, volume, photometric="minisblack")
    segment(model_path, source, tmp_path / "local.tif", slice_batch=8, progress=False)
    segment(model_path, source, tmp_path / "z.tif", InferenceOptions(planes="z"), slice_batch=8, progress=False)
    local = tifffile.imread(tmp_path / "local.tif")
    assert not np.array_equal(local, tifffile.imread(tmp_path / "z.tif"))

    serving_client.segment_with_server("http://fake", str(source), str(tmp_path / "served.tif"), slice_batch=8,
                                       progress=False)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "served.tif"), local)
    chunks = [(p.get("context_before", 0), p.get("context_after", 0)) for p in sent[1:]]
    assert chunks == [(0, 2), (2, 2), (2, 0)]  # slices 0-2, 3-5, 6-7 with up to 2 neighbours each side
    sent.clear()
    assert serving_client.main(["http://fake", str(source), str(tmp_path / "served-z.tif"), "--slice-batch", "4",
                                "--planes", "z"]) == 0
    assert len(sent) == 3 and all(p["planes"] == "z" and "context_before" not in p for p in sent[1:])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "served-z.tif"), tifffile.imread(tmp_path / "z.tif"))
    assert serving_client.main(["http://fake", str(source), str(tmp_path / "bad.tif"), "--planes", "w"]) == 2
    assert not (tmp_path / "bad.tif").exists()


def test_client_sends_a_per_volume_models_whole_input_range_with_every_request(serving_client, tmp_path, monkeypatch):
    """serving/client.py, its HTTP replaced by the pyfunc model itself: for a per_volume model the
    whole input's grey range goes with every request (as `socseg segment` applies it to every
    chunk), so the labels equal local segmentation; --grey-range sends the given range instead."""
    import dataclasses

    import keras

    from socseg.data.normalise import grey_range
    from socseg.data.stacks import read_label_metadata
    from socseg.inference.predictor import ModelConfig
    from socseg.inference.pyfunc import save_segmenter
    from socseg.inference.segment import segment
    from socseg.model.export import IntensityNormalisation

    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    outputs = conv(IntensityNormalisation(0.0, 1.0)(inputs))
    conv.set_weights([np.full((1, 1, 1, 1), 50.0, np.float32), np.array([-25.0], np.float32)])  # Ni above mid-range
    config = ModelConfig.from_dict({
        "task": "ni", "encoder": "unet", "class_names": ["rest", "ni"], "phase_map": {"0": "pore", "128": "ysz", "255": "ni"},
        "tile_size": 32, "context_slices": 0, "window": "whole_slice", "whole_slice_max_pixels": 4096 * 4096,
        "step_fraction": 0.5, "tta": False, "batch_size": 8, "max_slice_pixels": MAX_PIXELS, "max_clipped_fraction": 0.5,
        "normalisation": {"mode": "per_volume", "low": 0.0, "high": 1.0, "low_percentile": 0.5, "high_percentile": 99.5}})
    model_path = str(save_segmenter(keras.Model(inputs, outputs), config, tmp_path / "model"))
    sent = _serve_in_process(serving_client, monkeypatch, model_path)
    rng = np.random.default_rng(5)
    volume = (2.5e-5 * rng.integers(20000, 43000, (6, 30, 40)) - 0.55).astype(np.float32)  # a float32 scan
    volume[3:] *= 1.1  # later slices brighter: a range per request would differ from the whole volume's
    source = tmp_path / "scan.tif"
    tifffile.imwrite(source, volume, photometric="minisblack")
    segment(model_path, source, tmp_path / "local.tif", slice_batch=6, progress=False)
    local = tifffile.imread(tmp_path / "local.tif")

    serving_client.segment_with_server("http://fake", str(source), str(tmp_path / "served.tif"), slice_batch=2,
                                       progress=False)
    whole = grey_range(volume, 0.5, 99.5)
    assert len(sent) == 4 and sent[0] == {"describe": True}  # describe, then three requests of two slices
    assert all((p["grey_low"], p["grey_high"]) == (whole.low, whole.high) for p in sent[1:])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "served.tif"), local)
    assert read_label_metadata(tmp_path / "served.tif")["params"]["grey_low"] == whole.low

    sent.clear()
    assert serving_client.main(["http://fake", str(source), str(tmp_path / "given.tif"), "--slice-batch", "3",
                                "--grey-range=-0.1,0.6", "--allow-out-of-range"]) == 0
    assert all((p["grey_low"], p["grey_high"]) == (-0.1, 0.6) for p in sent[1:]) and len(sent) == 3
    with pytest.raises(SystemExit):  # argparse refuses a bad --grey-range
        serving_client.main(["http://fake", str(source), str(tmp_path / "bad.tif"), "--grey-range", "1"])
    assert not (tmp_path / "bad.tif").exists()
