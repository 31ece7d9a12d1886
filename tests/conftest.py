"""Shared fixtures: params, the real SOCPristine data from ../shared, tiny synthetic volumes, MLflow stores."""

from __future__ import annotations

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
    p["train"].update(encoder="unet", epochs=1, batch_size=2, base_filters=4, patience=1, precision="float32")
    p["mlflow"]["tracking_uri"] = f"sqlite:///{folder / 'mlflow.db'}"
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


@pytest.fixture(scope="session")
def lab(serving_client):
    """``{"storage", "tracking_uri", "env"}`` of a running lab (PostgreSQL + ``mlflow server``):
    ``SOCSEG_TEST_PG_URL`` / ``SOCSEG_TEST_MLFLOW_URI`` when set (``.ci/run`` starts them), else
    started here with ``scripts/lab_services.sh`` on free loopback ports and stopped (by PID) at the end."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.fail("the PostgreSQL driver is missing: pip install psycopg2-binary (pinned in pyproject.toml)")
    storage, tracking_uri = os.environ.get("SOCSEG_TEST_PG_URL"), os.environ.get("SOCSEG_TEST_MLFLOW_URI")
    if storage and tracking_uri:
        yield {"storage": storage, "tracking_uri": tracking_uri, "env": {}}
        return
    # Not pytest's tmp_path: its 0700 parents keep out the `postgres` user that runs the cluster.
    directory = Path(tempfile.mkdtemp(prefix="socseg-lab-"))
    directory.chmod(0o755)
    script = ["bash", str(REPO / "scripts" / "lab_services.sh")]
    pg_port = serving_client.free_port()
    mlflow_port = serving_client.free_port({pg_port})
    env = {**os.environ, "LAB_PG_PORT": str(pg_port), "LAB_MLFLOW_PORT": str(mlflow_port),
           "LAB_PYTHON": sys.executable, "LAB_TIMEOUT": "90"}
    try:
        started = subprocess.run(script + ["start", str(directory)], env=env, capture_output=True, text=True,
                                 timeout=240)
        assert started.returncode == 0, f"lab_services.sh start failed:\n{started.stdout}\n{started.stderr}"
        values = _read_env_file(directory / "lab.env")
        yield {"storage": values["SOCSEG_STORAGE"], "tracking_uri": values["MLFLOW_TRACKING_URI"],
               "env": {"PGPASSFILE": values["PGPASSFILE"]}}
    finally:
        stopped = subprocess.run(script + ["stop", str(directory)], capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, f"lab_services.sh stop failed:\n{stopped.stdout}\n{stopped.stderr}"
        shutil.rmtree(directory, ignore_errors=True)
