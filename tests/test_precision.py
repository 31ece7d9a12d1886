"""The native-precision probe and a logged model made to fit the machine (socseg.model.precision)."""

from __future__ import annotations

import numpy as np
import pytest

from socseg.model.precision import computes_in_bf16, float32_network, native_bf16, runnable_network


def mixed_network():
    """A tiny functional model whose layers compute in bf16 (a nested model inside, as socseg's)."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", dtype="mixed_bfloat16")(inputs)
    inner = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid", dtype="mixed_bfloat16")(x))
    outer = keras.Input((None, None, 1))
    return keras.Model(outer, inner(outer))


def test_a_bf16_model_runs_in_float32_where_bf16_is_not_native(monkeypatch):
    """The real probe, with the machine made AVX2-like the way the benchmarks do it (oneDNN capped,
    no GPU): a bf16 model comes back as its float32 copy with the same weights and outputs within
    bf16 rounding; where bf16 is native it is returned untouched. (The cap is handed to the probe
    rather than put in the environment: oneDNN reads it once per process, and it would then cap
    every later test of this worker.)"""
    from socseg.model import precision
    network = mixed_network()
    batch = np.random.default_rng(0).random((2, 12, 12, 1), dtype=np.float32)
    monkeypatch.setattr("socseg.model.precision.gpu_supports_bf16", lambda: None)
    monkeypatch.setattr("socseg.model.precision.cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})

    capped = precision.onednn_allows_bf16
    monkeypatch.setattr(precision, "onednn_allows_bf16", lambda isa_cap=None: capped("AVX2"))
    assert computes_in_bf16(network) and not native_bf16()
    runnable, how = runnable_network(network)
    assert runnable is not network and not computes_in_bf16(runnable) and how.startswith("float32")
    for a, b in zip(network.get_weights(), runnable.get_weights()):
        np.testing.assert_array_equal(a, b)
    out = runnable.predict_on_batch(batch)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.asarray(network.predict_on_batch(batch), np.float32), atol=0.02)

    monkeypatch.setattr(precision, "onednn_allows_bf16", lambda isa_cap=None: capped(""))
    assert native_bf16()
    assert runnable_network(network) == (network, "as trained")


def test_a_float32_model_is_never_copied(monkeypatch):
    import keras

    monkeypatch.setattr("socseg.model.precision.native_bf16", lambda: False)
    inputs = keras.Input((None, None, 1))
    network = keras.Model(inputs, keras.layers.Conv2D(1, 1)(inputs))
    assert not computes_in_bf16(network)
    assert runnable_network(network) == (network, "as trained")
    assert float32_network(network) == (network, False)


def test_a_logged_bf16_segmenter_loads_in_float32_without_native_bf16(tmp_path, monkeypatch):
    """The served and scoring path: a pyfunc segmenter trained in bf16, loaded where bf16 is not
    native, predicts with a float32 network and gives the labels of the bf16 one (or nearly: bf16
    rounding may flip a pixel on a class boundary)."""
    import keras
    import mlflow

    from socseg.data.normalise import Normaliser
    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import export_model
    from socseg.model.unet import build_model
    from test_pyfunc import make_config

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        network = export_model(build_model("unet", "phases", n_classes=3, base_filters=4, encoder_weights="none"),
                               Normaliser(20000.0, 43000.0, 0.5, 99.5))
    finally:
        keras.config.set_dtype_policy("float32")
    path = save_segmenter(network, make_config(), tmp_path / "model")
    grey = np.random.default_rng(0).integers(18000, 45000, (2, 40, 40)).astype(np.uint16)
    monkeypatch.setattr("socseg.model.precision.native_bf16", lambda: True)
    as_trained = mlflow.pyfunc.load_model(str(path))
    assert as_trained.unwrap_python_model().computes_in == "as trained"
    assert computes_in_bf16(as_trained.unwrap_python_model().predictor.network)
    monkeypatch.setattr("socseg.model.precision.native_bf16", lambda: False)
    converted = mlflow.pyfunc.load_model(str(path))
    inner = converted.unwrap_python_model()
    assert inner.computes_in.startswith("float32") and not computes_in_bf16(inner.predictor.network)
    agree = np.mean(np.asarray(converted.predict(grey)) == np.asarray(as_trained.predict(grey)))
    assert agree > 0.99


def test_the_probe_times_a_training_step_and_restores_the_dtype_policy():
    import keras

    from socseg.model.precision import time_training_step

    before = keras.config.dtype_policy().name
    seconds = time_training_step("mixed_bfloat16", steps=1, batch=2, size=32)
    assert 0 < seconds < 60 and keras.config.dtype_policy().name == before


@pytest.mark.parametrize("float32_s, bf16_s, expected", [(1.0, 0.5, "mixed_bfloat16"), (1.0, 1.5, "float32"),
                                                         (1.0, 0.95, "float32")])  # 5 % is within the margin
def test_the_measured_precision_is_the_faster_one_and_is_kept_per_machine(float32_s, bf16_s, expected, tmp_path,
                                                                          monkeypatch):
    import json

    from socseg.model import precision

    monkeypatch.setenv("SOCSEG_CACHE", str(tmp_path))
    steps = {"float32": float32_s, "mixed_bfloat16": bf16_s}
    calls = []
    monkeypatch.setattr(precision, "time_training_step", lambda policy: calls.append(policy) or steps[policy])
    precision.measured_cpu_precision.cache_clear()
    try:
        assert precision.measured_cpu_precision() == expected and len(calls) == 2
        record = json.loads((tmp_path / precision.PROBE_FILE).read_text())
        (key, entry), = record.items()
        assert entry["precision"] == expected and entry["float32_step_s"] == float32_s and "oneDNN cap" in key
        precision.measured_cpu_precision.cache_clear()  # a new process: the file answers, no new probe
        assert precision.measured_cpu_precision() == expected and len(calls) == 2
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # another cap is another machine key
        precision.measured_cpu_precision.cache_clear()
        precision.measured_cpu_precision()
        assert len(calls) == 4 and len(json.loads((tmp_path / precision.PROBE_FILE).read_text())) == 2
    finally:
        precision.measured_cpu_precision.cache_clear()


@pytest.mark.slow(seconds=15)
def test_processes_that_start_at_once_share_one_probe(tmp_path):
    """Dask workers loading a model at once: the first times the step, the others wait for its
    answer instead of timing each other's contention."""
    import os
    import subprocess
    import sys

    probes = tmp_path / "probes"
    script = f"""
import time
from socseg.model import precision

def fake_step(policy):
    with open({str(probes)!r}, "a") as handle:
        handle.write(policy + "\\n")
    time.sleep(1.0)
    return 1.0 if policy == "float32" else 2.0

precision.time_training_step = fake_step
print("CHOICE", precision.measured_cpu_precision())
"""
    env = {**os.environ, "SOCSEG_CACHE": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    workers = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [line for out in outputs for line in out.splitlines() if line.startswith("CHOICE")] == ["CHOICE float32"] * 2
    assert probes.read_text().split() == ["float32", "mixed_bfloat16"]
