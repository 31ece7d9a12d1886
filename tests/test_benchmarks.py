"""The benchmark scripts end to end on tiny inputs: runtime_bench.py, serving_load_bench.py and train_throughput.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The runtimes runtime_bench.py compares with Keras: OpenVINO is a dependency (the default CPU
# runtime), the others are pinned in pyproject's `test` extra, so their agreement checks run wherever
# the tests do (pip install -e ".[test]").
RUNTIMES = ("onnx", "tf2onnx", "onnxruntime", "nncf")
CORE_RUNTIMES = ("openvino",)


def _pins(which: str) -> dict[str, str]:
    """``which``: "dependencies" or an extra's name."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] if which == "dependencies" else project["optional-dependencies"][which]
    return {m.group(1).lower(): m.group(2) for m in (re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", d) for d in listed) if m}


def test_runtime_packages_are_pinned_and_installed():
    """Declared and missing is a failure naming the package, never a silent skip of the ONNX /
    OpenVINO rows; the installed versions are the pinned ones and import with this numpy."""
    import importlib
    import importlib.metadata

    core, extra = _pins("dependencies"), _pins("test")
    assert set(CORE_RUNTIMES) <= set(core), f"pyproject's dependencies must pin {sorted(set(CORE_RUNTIMES) - set(core))}"
    assert set(RUNTIMES) <= set(extra), f"pyproject's test extra must pin {sorted(set(RUNTIMES) - set(extra))}"
    pins = {**core, **extra}
    for package in (*CORE_RUNTIMES, *RUNTIMES):
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{package}=={pins[package]} is declared in the test extra but not installed: pip install -e '.[test]'")
        assert installed == pins[package], f"{package} {installed} installed, {pins[package]} pinned"
    import onnxruntime
    import openvino

    assert "CPUExecutionProvider" in onnxruntime.get_available_providers()
    assert "CPU" in openvino.Core().available_devices
    importlib.import_module("tf2onnx")  # keras' model.export(format="onnx") goes through it on TensorFlow


def _bench(script: str, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_runtime_bench_measures_every_variant_against_keras(tmp_path):
    """One whole slice, float32 untrained U-Net: a row per variant, Keras the reference, the XLA,
    ONNX Runtime and OpenVINO (f32) labels equal to Keras', figures printed = recorded. The runtimes
    are pinned test dependencies: a row left empty (package missing, export failed) fails here."""
    out = tmp_path / "out"
    variants = ("keras", "xla", "onnxruntime", "openvino")
    args = ["--slices", "1", "--repeat", "1", "--base-filters", "4", "--precision", "float32",
            "--variants", ",".join(variants), "--workloads", "slices", "--out", str(out)]
    run = _bench("runtime_bench.py", args, timeout=400)
    record = json.loads((out / "runtime.json").read_text())
    assert record["command"] == "python benchmarks/runtime_bench.py " + " ".join(args)
    assert record["figures"]["untrained_model"] is True and record["figures"]["adoption_bar"]["speedup"] == 1.5
    pins = {**_pins("dependencies"), **_pins("test")}
    assert record["figures"]["runtime_versions"] == {p: pins[p] for p in ("onnx", "tf2onnx", "onnxruntime", "openvino")}
    assert [(r["workload"], r["variant"]) for r in record["rows"]] == [("slices", v) for v in variants]
    rows = {(r["workload"], r["variant"]): r for r in record["rows"]}
    keras_row = rows["slices", "keras"]
    assert keras_row["items"] == 1 and keras_row["rate"] > 0 and keras_row["speedup"] == 1.0
    assert keras_row["agreement_pct"] == 100.0 and keras_row["max_abs_prob_diff"] == 0.0
    assert keras_row["meets_bar"] == "-"  # the reference is not a candidate
    for variant in variants[1:]:
        row = rows["slices", variant]
        assert row.get("error") is None, f"{variant}: {row.get('error')}"
        # float32 all through: the same network to rounding (an untrained network's near-ties may flip a few labels)
        assert row["rate"] > 0 and row["agreement_pct"] >= 99.9 and row["max_abs_prob_diff"] < 1e-4, row
        assert row["meets_bar"] in ("yes", "no")  # the rule itself: test_meets_bar_on_both_sides_of_the_bar
    assert record["figures"]["meets_bar"] == sorted(
        f"{variant} (slices)" for variant in variants[1:] if rows["slices", variant]["meets_bar"] == "yes")
    assert "inference precision f32" in rows["slices", "openvino"]["detail"]
    first = rows["slices", "xla"]
    assert f"slices: {first['rate']:.2f} slices/s ({first['speedup']:.2f}x Keras)" in run.stdout
    markdown = (out / "runtime.md").read_text()
    assert f"| slices | xla | {first['rate']:.2f} | slices/s |" in markdown and "untrained" in markdown


def test_runtime_bench_inputs_cover_every_pixel():
    """The tile workload is the sliding window's grid (tile 128, step 64, 32-pixel mirror margin:
    8 x 8 tiles of a 501x501 slice) in batches of the model's batch size; the slice workload pads
    to 512x512 and its crop gives the slices back."""
    bench = _bench_module("runtime_bench")
    stack = np.random.default_rng(0).integers(0, 65535, (3, 501, 501), dtype=np.uint16)
    batches = bench.tile_batches(stack, 0, 128, 0.5, 16)
    assert [len(b) for b in batches] == [16] * 12 and batches[0].shape[1:] == (128, 128, 1)
    assert batches[0].dtype == np.float32
    assert np.array_equal(batches[0][0, 32:, 32:, 0], stack[0, :96, :96])  # first tile: margin, then the slice
    assert np.array_equal(batches[0][0, :32, 32:, 0], stack[0, 31::-1, :96])  # mirrored, edge pixel repeated
    assert np.array_equal(batches[-1][-1, :-32, :-32, 0], stack[2, -96:, -96:])  # last tile: the corner
    context = bench.tile_batches(stack, 1, 128, 0.5, 16)  # 2.5D: the neighbours as channels
    assert context[0].shape[1:] == (128, 128, 3) and np.array_equal(context[0][0, 32:, 32:, 1], stack[0, :96, :96])
    slices, crop = bench.slice_batches(stack, 0, 2)
    assert [b.shape for b in slices] == [(2, 512, 512, 1), (1, 512, 512, 1)]
    assert np.array_equal(np.concatenate(slices)[:, crop[0], crop[1], 0], stack)


@pytest.mark.parametrize(
    "variant, speedup, agreement, expected",
    [
        ("xla", 1.5, 0.999, "yes"),  # exactly at both bars
        ("openvino", 2.3, 0.9995, "yes"),
        ("onnxruntime", 1.49, 1.0, "no"),  # labels identical, not fast enough
        ("openvino-default", 4.0, 0.9989, "no"),  # fast, but 0.11 % of pixels differ
        ("xla", 0.7, 0.5, "no"),
        ("keras", 1.0, 1.0, "-"),  # the reference is never a candidate
        ("keras", 9.0, 1.0, "-"),
    ],
)
def test_meets_bar_on_both_sides_of_the_bar(variant, speedup, agreement, expected):
    """Issue 17's bar: >= 1.5x Keras AND labels equal on >= 99.9 % of pixels (hand-written verdicts)."""
    assert _bench_module("runtime_bench").meets_bar(variant, speedup, agreement) == expected


def test_float32_copy_of_a_mixed_precision_network():
    """A mixed_bfloat16 network (what precision: auto trains on AMX CPUs) is exported through a
    float32 copy with the same weights, whose probabilities are the bf16 ones to bf16 rounding."""
    import keras

    runtime_bench = _bench_module("runtime_bench")
    from socseg.data.normalise import Normaliser
    from socseg.model.export import export_model
    from socseg.model.unet import build_model

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        mixed = export_model(build_model("unet", "phases", n_classes=3, base_filters=4), Normaliser(0.0, 1000.0, 1.0, 99.0))
    finally:
        keras.config.set_dtype_policy("float32")
    copy, cast = runtime_bench.float32_network(mixed)
    assert cast and copy is not mixed
    policies = {layer.dtype_policy.name for layer in copy.layers[-1].layers}
    assert policies == {"float32"}, policies
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in mixed.layers[-1].layers}
    assert all(np.array_equal(a, b) for a, b in zip(copy.get_weights(), mixed.get_weights()))
    x = np.random.default_rng(0).uniform(0, 1000, (2, 64, 64, 1)).astype(np.float32)
    assert np.max(np.abs(copy.predict_on_batch(x) - np.asarray(mixed.predict_on_batch(x), np.float32))) < 0.02
    same, cast_again = runtime_bench.float32_network(copy)
    assert same is copy and not cast_again


@pytest.mark.slow
def test_serving_load_bench_two_workers(tmp_path):
    """Two concurrent clients against a 2-worker server: no error, every answer equal to the same
    request sent alone, the workers' processes in the RSS figure, and the table of the .md result
    file (the one the docs' serving page renders) holding the same figures."""
    out = tmp_path / "out"
    args = ["--workers", "2", "--clients", "2", "--requests", "2", "--slices", "2", "--slices-per-request", "2",
            "--base-filters", "4", "--out", str(out)]
    run = _bench("serving_load_bench.py", args)
    record = json.loads((out / "serving_load.json").read_text())
    assert record["command"] == "python benchmarks/serving_load_bench.py " + " ".join(args)
    (row,) = record["rows"]
    assert row["workers"] == 2 and row["errors"] == 0 and row["requests_ok"] == 4 and row["labels_consistent"]
    assert record["figures"]["errors_total"] == 0 and len(record["figures"]["workers_2"]["latencies_s"]) == 4
    assert 0 < row["latency_p50_s"] <= row["latency_p95_s"] <= row["latency_max_s"]
    assert row["slices_per_s"] > 0 and row["slices_per_s"] * row["wall_s"] == pytest.approx(8)
    # mlflow CLI + uvicorn + 2 workers: a lone process would mean MLFLOW_MODELS_WORKERS was ignored
    assert row["server_processes"] >= 4 and row["server_rss_sum_mib"] > row["server_peak_rss_mib"] > 100
    assert f"{row['slices_per_s']:.2f} slices/s" in run.stdout
    written = (out / "serving_load.md").read_text()
    assert f"| 2 | 4 | 0 | {row['latency_p50_s']:.2f} | {row['latency_p95_s']:.2f} |" in written
    assert f"`{record['command']}`" in written and "**what else ran**" in written


@pytest.mark.slow
def test_train_throughput_times_the_training_step_per_cpu_class(tmp_path, shared_data):
    """Two steps of the 2.5D U-Net on real slices under the AVX2 cap: the row records the class,
    backend and precision the worker really ran (float32: no native bf16 under the cap, so the
    float32 variant is not run twice), tiles/s printed = recorded; a variant whose backend is not
    installed gets a row saying why."""
    out = tmp_path / "out"
    try:
        import jax  # noqa: F401

        asked, expected = ("keras", "float32"), ["keras"]
    except ImportError:
        asked, expected = ("keras", "float32", "jax"), ["keras", "jax"]
    args = ["--models", "2p5d", "--variants", ",".join(asked), "--classes", "avx2", "--steps", "2",
            "--warmup-steps", "1", "--slices", "4", "--data", str(shared_data), "--out", str(out)]
    run = _bench("train_throughput.py", args, timeout=300)
    record = json.loads((out / "throughput.json").read_text())
    assert record["command"] == "python benchmarks/train_throughput.py " + " ".join(args)
    rows = {r["variant"]: r for r in record["rows"]}
    assert list(rows) == expected
    row = rows["keras"]
    assert row.get("error") is None, row
    assert row["cpu"] == "avx2" and row["cpu_class"].startswith("AVX2")
    assert row["backend"].startswith("tensorflow 2.") and row["precision"] == "float32" and row["jit_compile"] is False
    assert row["encoder"] == "unet" and row["context_slices"] == 1 and row["steps"] == 2
    assert row["tiles_s"] > 0 and row["vs_keras"] == 1.0 and record["figures"]["avx2_2p5d_keras"] == row["tiles_s"]
    assert f"[avx2 2p5d keras] {row['tiles_s']}" in run.stdout
    if "jax" in rows:
        assert "tiles_s" not in rows["jax"] and "jax" in rows["jax"]["error"].lower()
    assert f"| 2p5d | keras | {row['backend']} | float32 |" in (out / "throughput.md").read_text()


def test_train_throughput_classes_and_variants_are_checked():
    bench = _bench_module("train_throughput")
    assert bench.class_environment("native") == {}
    assert bench.class_environment("avx2") == {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}
    assert bench.variant_environment("jax") == {"KERAS_BACKEND": "jax"}
    assert bench.variant_environment("xla") == {"KERAS_BACKEND": "tensorflow"}
    with pytest.raises(ValueError, match="unknown CPU class 'avx9'"):
        bench.class_environment("avx9")
    with pytest.raises(ValueError, match="unknown variant 'torch'"):
        bench.variant_environment("torch")


def _bench_module(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
