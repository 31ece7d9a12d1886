"""Chunked Zarr output, in this process and on a real Dask LocalCluster (2 worker processes, loopback)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import tiny_segmenter

from socseg.data.chunked import ChunkedLabels
from socseg.data.volumes import VolumeError

SHAPE = (20, 48, 40)


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    """A grey phantom stack as a multi-page TIFF."""
    from socseg.data.synth import synth_from_params
    from socseg.params import load_params

    folder = tmp_path_factory.mktemp("volume")
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    grey = synth_from_params(params, "v", shape=SHAPE, seed=5).image
    path = folder / "grey.tif"
    tifffile.imwrite(path, grey)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, str]:
    folder = tmp_path_factory.mktemp("models")
    return {k: tiny_segmenter(folder, k) for k in (0, 1, 2)}


@pytest.fixture(scope="module")
def cluster():
    """A real LocalCluster: 2 worker processes (each with a nanny that restarts it), on loopback."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as local:
        yield local


def _segment_zarr(model: str, source, output, scheduler=None, chunk_depth=6, overwrite=False, probabilities=False,
                  options=None):
    from socseg.inference.distributed import ZarrTarget, segment_to_zarr
    from socseg.inference.request import InferenceOptions

    target = ZarrTarget(output, chunk_depth, overwrite, probabilities)
    return segment_to_zarr(model, source, target, options or InferenceOptions(), tracking_uri="sqlite:///unused.db",
                           scheduler=scheduler, progress=False)


def _tif_labels(model: str, source, output, options=None) -> np.ndarray:
    from socseg.inference.request import InferenceOptions
    from socseg.inference.segment import segment

    segment(model, source, output, options or InferenceOptions(), slice_batch=4, progress=False)
    return tifffile.imread(output)


def _zarr_labels(path) -> np.ndarray:
    return np.asarray(ChunkedLabels.open(path).labels[:])


@pytest.mark.parametrize("context", [0, 1])
def test_single_process_and_cluster_write_what_socseg_segment_writes(models, volume, cluster, tmp_path, context):
    expected = _tif_labels(models[context], volume, tmp_path / "ref.tif")
    single = _segment_zarr(models[context], volume, tmp_path / "single.zarr")
    assert single.n_chunks == 4 and single.n_skipped == 0 and single.shape == SHAPE
    np.testing.assert_array_equal(_zarr_labels(tmp_path / "single.zarr"), expected)
    spread = _segment_zarr(models[context], volume, tmp_path / "dask.zarr", scheduler=cluster.scheduler_address)
    np.testing.assert_array_equal(_zarr_labels(tmp_path / "dask.zarr"), expected)
    assert len(spread.per_worker) == 2 and sum(w["chunks"] for w in spread.per_worker.values()) == 4
    attrs = ChunkedLabels.open(tmp_path / "dask.zarr").attrs
    assert attrs["phase_map"] == {"0": "pore", "128": "ysz", "255": "ni"} and attrs["model_uri"] == models[context]
    import zarr

    ome = dict(zarr.open_group(str(tmp_path / "dask.zarr"), mode="r").attrs)["ome"]
    assert [a["name"] for a in ome["multiscales"][0]["axes"]] == ["z", "y", "x"]


def test_a_worker_killed_mid_run_changes_nothing(models, volume, cluster, tmp_path):
    from distributed import Client

    expected = _tif_labels(models[1], volume, tmp_path / "ref.tif")
    with Client(cluster.scheduler_address) as client:
        pids = list(client.run(os.getpid).values())
    output = tmp_path / "killed.zarr"
    killed = []

    def kill_when_a_chunk_is_done() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if len(ChunkedLabels.open(output).pending()) < 10:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            except (VolumeError, OSError, KeyError, ValueError):
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_a_chunk_is_done)
    watcher.start()
    result = _segment_zarr(models[1], volume, output, scheduler=cluster.scheduler_address, chunk_depth=2)
    watcher.join()
    assert killed, "no worker was killed: the test did not test anything"
    assert result.n_chunks == 10
    np.testing.assert_array_equal(_zarr_labels(output), expected)
    cluster.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_a_rerun_skips_finished_chunks_and_redoes_the_unfinished(models, volume, tmp_path):
    output = tmp_path / "resume.zarr"
    _segment_zarr(models[1], volume, output)
    expected = _zarr_labels(output)
    store = ChunkedLabels.open(output)
    # An interrupted run: chunk 1 never flagged complete (its writer died), chunk 3 half-written.
    store.complete[1] = 0
    store.complete[3] = 0
    store.labels[18:20] = 7
    again = _segment_zarr(models[1], volume, output)
    assert (again.n_chunks, again.n_skipped) == (4, 2)
    assert sum(w["chunks"] for w in again.per_worker.values()) == 2
    np.testing.assert_array_equal(_zarr_labels(output), expected)
    # Another model into the same store is refused rather than mixed in.
    with pytest.raises(VolumeError, match="another run"):
        _segment_zarr(models[0], volume, output)
    _segment_zarr(models[0], volume, output, overwrite=True)


def test_a_fused_zarr_run_writes_what_a_fused_tif_run_writes_and_never_resumes_a_slice_by_slice_store(
        models, volume, tmp_path):
    """planes zyx into a Zarr store: each task reads its chunk with the fusion halo (16 slices: with
    chunks of 10, the whole 20-slice phantom, as the .tif run's one chunk), so the store holds the
    .tif run's labels; the store records its planes, so a store written slice by slice is not
    resumed fused (nor the reverse), and resumes slice by slice."""
    from socseg.inference.request import InferenceOptions

    fused = InferenceOptions(planes="zyx")
    expected = _tif_labels(models[1], volume, tmp_path / "fused.tif", fused)
    assert not np.array_equal(expected, _tif_labels(models[1], volume, tmp_path / "z.tif"))
    _segment_zarr(models[1], volume, tmp_path / "fused.zarr", chunk_depth=10, options=fused)
    np.testing.assert_array_equal(_zarr_labels(tmp_path / "fused.zarr"), expected)
    _segment_zarr(models[1], volume, tmp_path / "z.zarr")
    with pytest.raises(VolumeError, match="differs in: planes"):
        _segment_zarr(models[1], volume, tmp_path / "z.zarr", options=fused)
    with pytest.raises(VolumeError, match="differs in: planes"):
        _segment_zarr(models[1], volume, tmp_path / "fused.zarr", chunk_depth=10, options=InferenceOptions(planes="z"))
    assert _segment_zarr(models[1], volume, tmp_path / "z.zarr", options=InferenceOptions(planes="z")).n_skipped == 4


def test_hdf5_and_zarr_inputs_give_the_labels_of_the_tiff(models, volume, tmp_path):
    import h5py
    import zarr

    grey = tifffile.imread(volume)
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f.create_dataset("entry/data/data", data=grey, chunks=(4, 48, 40))
        f.create_dataset("entry/data/flat", data=grey[0])
    zarr.create_array(str(tmp_path / "scan.zarr"), data=grey, chunks=(4, 24, 40))
    expected = _tif_labels(models[1], volume, tmp_path / "ref.tif")
    np.testing.assert_array_equal(_tif_labels(models[1], f"{tmp_path / 'scan.h5'}:/entry/data/data", tmp_path / "h5.tif"), expected)
    np.testing.assert_array_equal(_tif_labels(models[1], tmp_path / "scan.zarr", tmp_path / "zarr.tif"), expected)
    _segment_zarr(models[1], f"{tmp_path / 'scan.h5'}:/entry/data/data", tmp_path / "h5.zarr")
    np.testing.assert_array_equal(_zarr_labels(tmp_path / "h5.zarr"), expected)

    with pytest.raises(VolumeError, match="no dataset 'entry/data/missing'"):
        _tif_labels(models[1], f"{tmp_path / 'scan.h5'}:entry/data/missing", tmp_path / "x.tif")
    with pytest.raises(VolumeError, match="name the dataset.*entry/data/data"):
        _tif_labels(models[1], tmp_path / "scan.h5", tmp_path / "x.tif")
    with h5py.File(tmp_path / "four.h5", "w") as f:
        f.create_dataset("d", data=np.zeros((2, 3, 8, 8), np.uint16))
    with pytest.raises(VolumeError, match="expected a 3-D"):
        _tif_labels(models[1], f"{tmp_path / 'four.h5'}:/d", tmp_path / "x.tif")
    with pytest.raises(VolumeError, match="expected a 3-D"):
        _tif_labels(models[1], f"{tmp_path / 'scan.h5'}:/entry/data/flat", tmp_path / "x.tif")
    assert not (tmp_path / "x.tif").exists()


def test_bad_chunking_and_unwritable_output_are_clear_errors(models, volume, tmp_path):
    with pytest.raises(ValueError, match=r"chunk depth 1 is smaller than the model's context \(2 slices"):
        _segment_zarr(models[2], volume, tmp_path / "a.zarr", chunk_depth=1)
    with pytest.raises(ValueError, match="must be >= 1"):
        _segment_zarr(models[0], volume, tmp_path / "a.zarr", chunk_depth=0)
    with pytest.raises(ValueError, match="an ensemble .* a .zarr store and its Dask workers take one model"):
        _segment_zarr(f"{models[0]},{models[1]}", volume, tmp_path / "a.zarr")
    assert not (tmp_path / "a.zarr").exists()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output's parent folder should be")
    with pytest.raises(VolumeError, match="cannot create the Zarr store"):
        _segment_zarr(models[1], volume, blocker / "out.zarr")
    with pytest.raises(VolumeError, match="OUTPUT must be"):
        _segment_zarr(models[1], volume, tmp_path / "out.h5")


def test_scheduler_spellings():
    from socseg.inference.distributed import parse_scheduler

    assert parse_scheduler("local") == ("local", None)
    assert parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("tcp://10.0.0.1:8786") == ("tcp://10.0.0.1:8786", None)
    for bad in ("local:0", "local:x", "10.0.0.1:8786"):
        with pytest.raises(ValueError, match="scheduler"):
            parse_scheduler(bad)


def test_microstructure_reads_zarr_and_hdf5_label_volumes(models, volume, tmp_path):
    import h5py
    from click.testing import CliRunner

    from socseg.cli import main
    from socseg.data.stacks import load_labels

    _segment_zarr(models[0], volume, tmp_path / "labels.zarr")
    labels = _zarr_labels(tmp_path / "labels.zarr")
    with h5py.File(tmp_path / "labels.h5", "w") as f:
        f.create_dataset("seg", data=labels)
    default = {0: "pore", 128: "ysz", 255: "ni"}
    from_zarr = load_labels(tmp_path / "labels.zarr", None, {0: "a", 1: "b"})  # the recorded map wins
    assert from_zarr.phase_map == default and np.array_equal(from_zarr.labels, labels)
    from_h5 = load_labels(f"{tmp_path / 'labels.h5'}:/seg", None, default)
    assert np.array_equal(from_h5.labels, labels)
    with pytest.raises(VolumeError, match="contradicts the phase map recorded"):
        load_labels(tmp_path / "labels.zarr", {0: "rest", 255: "ni"}, default)
    out = CliRunner().invoke(main, ["microstructure", str(tmp_path / "labels.zarr"), "--json", "--unit", "voxel"])
    assert out.exit_code == 0, out.output
    import json

    report = json.loads(out.output)
    fractions = {k: v for k, v in report["volume"]["flat"].items() if k.startswith("vf.")}
    assert fractions["vf.ni"] == pytest.approx(float(np.mean(labels == 255)))


def test_segment_command_writes_zarr_and_names_wrong_combinations(models, volume, tmp_path):
    from click.testing import CliRunner

    from socseg.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["segment", models[1], str(volume), str(tmp_path / "cli.zarr"), "--chunk-depth", "8"])
    assert out.exit_code == 0, out.output
    assert "3 chunk(s) of 8 slices, 0 already finished" in out.output
    again = runner.invoke(main, ["segment", models[1], str(volume), str(tmp_path / "cli.zarr"), "--chunk-depth", "8"])
    assert "3 already finished" in again.output
    np.testing.assert_array_equal(_zarr_labels(tmp_path / "cli.zarr"), _tif_labels(models[1], volume, tmp_path / "r.tif"))
    bad = runner.invoke(main, ["segment", models[1], str(volume), str(tmp_path / "x.tif"), "--scheduler", "local:2"])
    assert bad.exit_code == 2 and "--scheduler writes a chunked .zarr OUTPUT" in bad.stderr
    bad = runner.invoke(main, ["segment", models[1], str(volume), str(tmp_path / "x.zarr"), "--planes", "zq"])
    assert bad.exit_code == 2 and "planes must be distinct letters of 'zyx'" in bad.stderr


def test_evaluate_scores_hdf5_grey_against_zarr_labels_as_it_scores_a_volume(models, tmp_path, params):
    import json

    import h5py
    from click.testing import CliRunner

    from socseg.cli import main
    from socseg.data.synth import synth_from_params
    from socseg.data.volumes import save_volume

    volume = synth_from_params(params, "labelled", shape=(12, 48, 40), seed=2)
    save_volume(volume, tmp_path / "labelled")
    with h5py.File(tmp_path / "grey.h5", "w") as f:
        f.create_dataset("entry/data/data", data=volume.image)
    import zarr

    zarr.create_array(str(tmp_path / "truth.zarr"), data=volume.labels, chunks=(4, 48, 40))
    runner = CliRunner()
    as_volume = runner.invoke(main, ["evaluate", models[0], str(tmp_path / "labelled"), "--json"])
    as_files = runner.invoke(main, ["evaluate", models[0], f"{tmp_path / 'grey.h5'}:/entry/data/data",
                                    "--labels", str(tmp_path / "truth.zarr"), "--json"])
    assert as_volume.exit_code == 0 and as_files.exit_code == 0, as_files.output
    a, b = json.loads(as_volume.output), json.loads(as_files.output)
    assert a["confusion"] == b["confusion"] and a["mean_iou"] == b["mean_iou"]


def test_probabilities_and_uncertainty_beside_the_labels(models, volume, tmp_path):
    from socseg.analysis.uncertainty import class_probabilities, normalised_entropy
    from socseg.inference.predictor import Predictor

    _segment_zarr(models[0], volume, tmp_path / "plain.zarr")
    _segment_zarr(models[0], volume, tmp_path / "probs.zarr", probabilities=True)
    store = ChunkedLabels.open(tmp_path / "probs.zarr")
    np.testing.assert_array_equal(np.asarray(store.labels[:]), _zarr_labels(tmp_path / "plain.zarr"))
    probs = np.asarray(store.probabilities[:]).astype(int)
    assert probs.shape == (*SHAPE, 3) and np.all(np.abs(probs.sum(-1) - 255) <= 2)
    exact = Predictor.load(models[0]).probabilities(tifffile.imread(volume))
    expected = np.rint(normalised_entropy(class_probabilities(exact)) * 255)
    assert np.abs(np.asarray(store.uncertainty[:]).astype(int) - expected).max() <= 1
    assert ChunkedLabels.open(tmp_path / "plain.zarr").probabilities is None


def test_a_killed_client_loses_no_finished_chunk(models, volume, tmp_path):
    """`socseg segment ... OUT.zarr` killed (SIGKILL) mid-run; the same command again finishes the
    store, skipping what was done, identical to an uninterrupted run."""
    import subprocess
    import sys

    expected = _tif_labels(models[1], volume, tmp_path / "ref.tif")
    output = tmp_path / "killed-client.zarr"
    command = [sys.executable, "-m", "socseg.cli", "segment", models[1], str(volume), str(output), "--chunk-depth", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    done = 0
    while time.monotonic() < deadline and process.poll() is None:
        try:
            done = SHAPE[0] - len(ChunkedLabels.open(output).pending())
        except (VolumeError, OSError, KeyError, ValueError):
            done = 0
        if done >= 2:
            process.kill()
            break
        time.sleep(0.05)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, f"the run was not killed mid-way ({done} chunks done)"
    finished = SHAPE[0] - len(ChunkedLabels.open(output).pending())
    assert 2 <= finished < SHAPE[0]
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{finished} already finished by an earlier run" in again.stdout
    np.testing.assert_array_equal(_zarr_labels(output), expected)
