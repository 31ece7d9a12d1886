"""Shared fixtures: params, the real SOCPristine data from ../shared, tiny synthetic volumes, MLflow stores."""

from __future__ import annotations

import contextlib
import copy
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]


# The napari GUI tests run in a pytest process of their own (tests/test_viewer_widget.py starts
# it): a process that has loaded TensorFlow cannot open an OpenGL viewer (socseg.viewer.jobs).
collect_ignore = [] if os.environ.get("SOCSEG_GUI_TESTS") else ["napari_gui"]

SLOW_TEST_SECONDS = 10.0  # what a ``slow`` test without ``seconds=`` is expected to take


def pytest_collection_modifyitems(config, items):
    """Longest files first, in-file order kept: with one file per xdist worker (``--dist
    loadfile``) the long files start at once and the short ones fill in at the end, so the suite
    takes about half its summed time on two workers, not that plus a long file started last. A
    file's length is the sum of its ``slow(seconds=...)`` marks (measured on 2 cores, rounded)."""
    from collections import defaultdict

    seconds: dict = defaultdict(float)
    for item in items:
        marker = item.get_closest_marker("slow")
        if marker is not None:
            seconds[item.path] += float(marker.kwargs.get("seconds", SLOW_TEST_SECONDS))
    items.sort(key=lambda item: -seconds[item.path])


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only SOCPristine slices next to the checkout (never copied into the repo)."""
    path = Path(os.environ.get("SOCSEG_SHARED_DATA", REPO.parent / "shared" / "data" / "socpristine"))
    if not (path / "data").is_dir():
        pytest.fail(f"real PXCT data not found at {path}: set SOCSEG_SHARED_DATA")
    return path


@pytest.fixture()
def params():
    from socseg.params import load_params

    return load_params(REPO / "params.yaml")


def make_tiny_params(params: dict, folder: Path) -> dict:
    """params.yaml shrunk for CPU tests, with data and MLflow store under ``folder``: a 24x64x64
    phantom, 32-pixel tiles, one epoch of 2 steps."""
    from socseg.data.synth import synth_from_params
    from socseg.data.volumes import save_volume

    p = copy.deepcopy(params)
    p["data"]["dir"] = str(folder / "data")
    p["data"]["volumes"] = ["tiny"]
    p["split"].update(train=0.6, val=0.2, test=0.2, gap=2)
    p["tiles"].update(size=32, steps_per_epoch=2)
    # float32: tests compare scores across batch sizes and processes; train.precision: auto would
    # make that hardware-dependent (bf16 on AVX512-BF16/AMX machines).
    # 2-D (params.yaml's recipe is 2.5D): most tests compare a slab's labels with a prediction of
    # those slices alone, which 2.5D makes differ at the slab's ends; tests of 2.5D set context_slices.
    # The learning rate these few-step trainings were calibrated with (the recipe's 0.001 left one
    # 8-epoch phases model without Ni on an AVX2 CPU), constant.
    p["train"].update(encoder="unet", epochs=1, batch_size=2, base_filters=4, patience=1, precision="float32",
                      context_slices=0, learning_rate=0.0005, reduce_lr_patience=0)
    p["mlflow"]["tracking_uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    # Slice by slice: the y and x planes of a 24-slice phantom through a one-epoch network add time,
    # not meaning; fusion has its own tests (test_window, test_segment, test_pyfunc, test_serving).
    p["inference"]["planes"] = "z"
    volume = synth_from_params(p, "tiny", shape=(24, 64, 64), seed=1)
    save_volume(volume, Path(p["data"]["dir"]) / "tiny")
    return p


@pytest.fixture()
def tiny_params(tmp_path, params):
    """params.yaml shrunk for CPU tests (:func:`make_tiny_params`), in the test's tmp_path."""
    return make_tiny_params(params, tmp_path)


def use_mlflow_store(uri: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point MLflow at ``uri`` through the environment (as `mlflow run` does) and process-wide."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    # The process-wide URI too: an earlier test's configure_tracking() would otherwise still win.
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture()
def mlflow_env(tmp_path, monkeypatch):
    """A private MLflow SQLite store for one test (set through the environment, as `mlflow run` does)."""
    import mlflow

    yield use_mlflow_store(f"sqlite:///{tmp_path / 'mlflow.db'}", monkeypatch)
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _write_slices(folder: Path, stem: str, arrays, width: int = 3, ext: str = ".tif", start: int = 1) -> None:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays, start):
        tifffile.imwrite(folder / f"{stem}{i:0{width}d}{ext}", array)


@pytest.fixture()
def write_slices():
    """Write arrays as one TIFF per slice, ``<stem><number><ext>`` as microscopes export them."""
    return _write_slices


def _load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (benchmarks are scripts, not part of the package),
    registered under ``socseg_<name>_benchmark`` so that dataclasses and pickling find it."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"socseg_{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_benchmark():
    """Load a benchmark script by name: ``load_benchmark("cv_postprocess")``."""
    return _load_benchmark


@pytest.fixture(scope="session")
def serving_client():
    """``serving/client.py`` as a module (a script, not part of the package): the REST client,
    ``local_server`` and ``free_port`` that tests share."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serving_client", REPO / "serving" / "client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def run_checked():
    """``run(args, cwd, env, timeout=900)``: run a command, fail the test with the tail of its
    output unless it exits 0, return its stdout (end-to-end tests: dvc, mlflow run, socseg)."""
    def run(args, cwd, env, timeout=900):
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    return run


def _read_env_file(path: Path) -> dict[str, str]:
    """The ``export KEY='value'`` lines that lab_services.sh writes to lab.env."""
    values = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            values[key] = value
    return values


@contextlib.contextmanager
def own_lab(serving_client, prefix: str = "socseg-lab-", **settings: str):
    """Start ``scripts/lab_services.sh`` (PostgreSQL + ``mlflow server``) in a new directory on free
    loopback ports; yields ``{"storage", "tracking_uri", "env", "dir", "restart"}`` and stops both (by
    PID) at the end. ``settings``: more ``LAB_*`` variables (``LAB_AUTH`` defaults to none here);
    ``restart(service)`` runs ``lab_services.sh restart DIR service`` with the same settings."""
    # Not pytest's tmp_path: its 0700 parents keep out the `postgres` user that runs the cluster.
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    script = ["bash", str(REPO / "scripts" / "lab_services.sh")]
    pg_port = serving_client.free_port()
    mlflow_port = serving_client.free_port({pg_port})
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "LAB_PG_PORT": str(pg_port), "LAB_MLFLOW_PORT": str(mlflow_port), "LAB_PYTHON": sys.executable,
           "LAB_TIMEOUT": "120", "LAB_AUTH": "none", **settings}

    def lab_script(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(script + [*args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"lab_services.sh {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    try:
        started = lab_script("start", str(directory))
        values = _read_env_file(directory / "lab.env")
        yield {"storage": values["SOCSEG_STORAGE"], "tracking_uri": values["MLFLOW_TRACKING_URI"],
               "env": {"PGPASSFILE": values["PGPASSFILE"]}, "dir": directory, "output": started.stdout + started.stderr,
               "restart": lambda service: lab_script("restart", str(directory), service)}
    finally:
        stopped = subprocess.run(script + ["stop", str(directory)], capture_output=True, text=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)
        assert stopped.returncode == 0, f"lab_services.sh stop failed:\n{stopped.stdout}\n{stopped.stderr}"


@pytest.fixture(scope="session")
def lab(serving_client):
    """``{"storage", "tracking_uri", "env"}`` of a running lab (PostgreSQL + ``mlflow server``), shared
    by the session: ``SOCSEG_TEST_PG_URL`` / ``SOCSEG_TEST_MLFLOW_URI`` when set (``.ci/run`` starts
    them), else :func:`own_lab`. Tests that restart services start their own."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.fail("the PostgreSQL driver is missing: pip install psycopg2-binary (pinned in pyproject.toml)")
    storage, tracking_uri = os.environ.get("SOCSEG_TEST_PG_URL"), os.environ.get("SOCSEG_TEST_MLFLOW_URI")
    if storage and tracking_uri:
        yield {"storage": storage, "tracking_uri": tracking_uri, "env": {}}
        return
    with own_lab(serving_client) as started:
        yield started


@pytest.fixture(scope="session")
def constant_segmenter():
    """``make(name, ni) -> (model URI, run id)``: a logged segmenter with a known answer (below), in
    the active tracking store."""
    return _constant_segmenter


def _constant_segmenter(name: str, ni: bool) -> tuple[str, str]:
    """A per_volume ni segmenter whose answer is known: a 1x1 convolution with zero kernel and bias
    +-40 says "ni" (or "rest") everywhere, and stays so through a short fine-tune (the sigmoid is
    saturated: float32 gradients of 0, Adam steps of at most the learning rate). Logged in a run of
    its own; returns (model URI, run id)."""
    import keras
    import mlflow
    import numpy as np

    from socseg.data.normalise import Normalisation, Normaliser
    from socseg.inference.predictor import ModelConfig
    from socseg.inference.pyfunc import log_segmenter
    from socseg.model.export import export_model

    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    network = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.zeros((1, 1, 1, 1), np.float32), np.array([40.0 if ni else -40.0], np.float32)])
    config = ModelConfig(task="ni", encoder="unet", class_names=["rest", "ni"], phase_map={0: "pore", 128: "ysz", 255: "ni"}, tile_size=32,
                         context_slices=0, normalisation=Normalisation.from_dict({"low": 0.0, "high": 1.0, "low_percentile": 0.5,
                                                          "high_percentile": 99.5}, "per_volume"),
                          window="whole_slice", whole_slice_max_pixels=10**6,
                         step_fraction=0.5, tta=False, batch_size=8, max_slice_pixels=10**6, max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime="keras",
                         planes="z", fusion_depth=64, fusion_halo=16)
    with mlflow.start_run(run_name=name) as run:
        info = log_segmenter(export_model(network, Normaliser(0.0, 1.0, 0.5, 99.5)), config)
    return info.model_uri, run.info.run_id


@pytest.fixture()
def parent(tiny_params, mlflow_env):
    """A tiny trained fixed-mode ni model registered as socseg-ni v1, champion (fixed: a scan on
    another grey scale is refused; a per_volume parent is fine-tuned in
    test_a_per_volume_model_is_fine_tuned_on_a_scan_of_another_grey_scale)."""
    return register_parent(tiny_params)


def register_parent(tiny_params: dict) -> dict:
    """:func:`parent`'s work, callable in a child process (the napari GUI tests): trains and
    registers in the store ``MLFLOW_TRACKING_URI`` names; returns the params fine-tunes use."""
    from socseg.training.registry import register_and_promote
    from socseg.training.train import train

    tiny_params["normalise"]["mode"] = "fixed"
    result = train(tiny_params, run_name="parent", evaluate_test=False)  # no champion yet: nothing to compare
    promotion = register_and_promote(result.model_uri, "socseg-ni", result.metrics["val_mean_iou"],
                                     evaluate=lambda uri: 0.0, run_id=result.run_id, lock=params_lock(tiny_params))
    assert promotion.version == "1" and promotion.promoted
    tiny_params["finetune"].update(epochs=1, steps_per_epoch=2)
    return tiny_params


def params_lock(params):
    """The promotion lock the pipeline would take with these params (a file lock beside the test's store)."""
    import mlflow

    from socseg.params import typed
    from socseg.training.promotion_lock import lock_for

    return lock_for(typed(params), mlflow.get_tracking_uri())


def tiny_segmenter(folder: Path, context_slices: int, runtime: str = "keras") -> str:
    """A small untrained 3-phase U-Net saved as a socseg segmenter folder (a model URI without a
    tracking server), fixed grey range 20000..43000; ``runtime``: its inference.runtime."""
    import keras

    from socseg.data.normalise import Normalisation

    from socseg.data.normalise import Normaliser
    from socseg.inference.predictor import ModelConfig
    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import export_model
    from socseg.model.unet import build_model

    keras.utils.set_random_seed(3)
    network = build_model("unet", "phases", n_classes=3, base_filters=4, context_slices=context_slices)
    config = ModelConfig(task="phases", encoder="unet", class_names=["pore", "ysz", "ni"],
                         phase_map={0: "pore", 128: "ysz", 255: "ni"}, tile_size=32, context_slices=context_slices,
                         normalisation=Normalisation.from_dict({"low": 20000.0, "high": 43000.0}, "fixed"),  window="whole_slice",
                         whole_slice_max_pixels=4096 * 4096, step_fraction=0.5, tta=False, batch_size=8,
                         max_slice_pixels=4096 * 4096, max_clipped_fraction=0.5, smoothing_sigma=0.0, runtime=runtime,
                         planes="z", fusion_depth=64, fusion_halo=16)
    return str(save_segmenter(export_model(network, Normaliser(20000.0, 43000.0, 0.5, 99.5)), config,
                              folder / f"model{context_slices}-{runtime}"))
