"""Whole volumes into a chunked Zarr store, in this process or on a Dask cluster.

``socseg segment MODEL INPUT OUTPUT.zarr [--scheduler local[:N] | tcp://HOST:PORT]``. The volume is
cut into z-chunks of ``inference.chunk_depth`` slices; one task segments one z-chunk, read with
the slices the request needs around it (the model's 2.5D context; with multi-axis fusion,
``inference.planes: zyx``, the ``fusion_halo``: a z-chunk's y and x planes then cost
``(chunk_depth + 2 x fusion_halo) / chunk_depth`` times a whole volume's), with the predictor that ``socseg segment`` and the
served model use, and writes it into :class:`socseg.data.chunked.ChunkedLabels`. Without a
scheduler the same tasks run here one after the other, so both paths write the same store.

Dask distributed is the engine: a ``LocalCluster`` on one machine, ``dask scheduler`` /
``dask worker`` processes on a cluster, dask-jobqueue on SLURM or PBS. Each worker process loads
the model once (:func:`worker_predictor` caches it) and reuses it for all its tasks; only the
model URI and file paths travel, never volumes. Finished chunks are recorded in the store, so an
interrupted run (Ctrl-C, a killed client or worker) is resumed by running the command again.

Dask ``distributed`` is imported only when a scheduler is asked for: a run in this process does
not start (or need) it.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import mlflow

from socseg.analysis.uncertainty import class_probabilities, normalised_entropy, quantise
from socseg.data.chunked import ChunkedLabels
from socseg.data.context import iter_chunks
from socseg.data.formats import detect_format, split_hdf5_path
from socseg.data.stacks import SliceReader, check_paths
from socseg.data.volumes import VolumeError
from socseg.inference.predictor import Predictor
from socseg.inference.pyfunc import model_config
from socseg.inference.request import InferenceOptions, InferenceRequest
from socseg.inference.segment import progress_bar

LOCAL = "local"


@dataclass(frozen=True)
class ChunkJob:
    """Everything a task needs, small enough to send to every worker: the request is resolved once,
    on the client (a per_volume model's grey range is the whole input's, not each chunk's)."""

    model_uri: str
    tracking_uri: str
    source: str
    output: str
    request: InferenceRequest
    probabilities: bool = False  # also write the probability and uncertainty arrays
    runtime: str | None = None  # auto | keras | openvino; None: the model's inference.runtime


@dataclass
class ZarrResult:
    output: Path
    shape: tuple[int, int, int]
    seconds: float
    n_chunks: int
    n_skipped: int  # chunks a previous run had finished
    per_worker: dict[str, dict[str, float]] = field(default_factory=dict)  # worker -> slices, seconds

    @property
    def slices_per_second(self) -> float:
        done = sum(w["slices"] for w in self.per_worker.values())
        return done / self.seconds if self.seconds > 0 else float("nan")


@lru_cache(maxsize=2)
def worker_predictor(model_uri: str, tracking_uri: str, runtime: str | None = None) -> Any:
    """The predictor of ``model_uri``, loaded once per process (a Dask worker keeps it for all its tasks)."""
    mlflow.set_tracking_uri(tracking_uri)
    return Predictor.load(model_uri, runtime)


def segment_chunk(index: int, job: ChunkJob) -> dict[str, Any]:
    """Segment z-chunk ``index`` of ``job.source`` into ``job.output``: the task of every path."""
    started = time.perf_counter()
    predictor = worker_predictor(job.model_uri, job.tracking_uri, job.runtime)
    store = ChunkedLabels.open(job.output)
    start, stop = store.chunk(index)
    piece = next(iter_chunks(store.shape[0], stop - start, job.request.context(predictor.context_slices), start, stop))
    with SliceReader(job.source) as reader:
        stack = reader.read(piece.read.start, piece.read.stop)
    probabilities = predictor.probabilities(stack, piece.before, piece.after, job.request)
    labels = predictor.to_labels(predictor.to_classes(probabilities))
    grey = stack[piece.before:piece.before + (stop - start)] if store.image is not None else None
    if job.probabilities:
        classes = class_probabilities(probabilities)
        store.write(index, labels, quantise(classes), quantise(normalised_entropy(classes)), image=grey)
    else:
        store.write(index, labels, image=grey)
    return {"index": index, "slices": stop - start, "seconds": time.perf_counter() - started, "worker": _worker_name(),
            "runtime": predictor.runtime}


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()} (this process)"


def _voxel_size_nm(source: str) -> float | None:
    meta = detect_format(source).volume_meta(source)  # only a socseg volume directory records one
    return meta.voxel_size_nm if meta is not None else None


def parse_scheduler(text: str) -> tuple[str, int | None]:
    """``local`` / ``local:N`` (N worker processes on this machine) or a scheduler address."""
    if text == LOCAL or text.startswith(LOCAL + ":"):
        _, _, n = text.partition(":")
        try:
            workers = int(n) if n else None
        except ValueError:
            raise ValueError(f"--scheduler {text!r}: expected local, local:N or tcp://HOST:PORT") from None
        if workers is not None and workers < 1:
            raise ValueError(f"--scheduler {text!r}: at least one worker")
        return LOCAL, workers
    if "://" not in text:
        raise ValueError(f"--scheduler {text!r}: expected local, local:N or tcp://HOST:PORT")
    return text, None


def _client(scheduler: str):
    """A Dask client: a new loopback LocalCluster of worker processes, or the scheduler at an address."""
    from distributed import Client, LocalCluster

    address, n_workers = parse_scheduler(scheduler)
    if address != LOCAL:
        return Client(address, timeout="30s"), None
    cluster = LocalCluster(n_workers=n_workers or max(1, (os.cpu_count() or 2) // 2), threads_per_worker=1,
                           processes=True, host="127.0.0.1", dashboard_address=None)
    return Client(cluster), cluster


@dataclass(frozen=True)
class ZarrTarget:
    """Where and how a Zarr run writes: the store, its z-chunk depth, whether an existing store is
    replaced (else resumed), and whether probabilities and uncertainty are kept beside the labels."""

    output: str | os.PathLike
    chunk_depth: int
    overwrite: bool = False
    probabilities: bool = False


def segment_to_zarr(
    model_uri: str,
    source: str | os.PathLike,
    target: ZarrTarget,
    options: InferenceOptions = InferenceOptions(),
    *,
    tracking_uri: str,
    scheduler: str | None = None,
    progress: bool = True,
    runtime: str | None = None,
) -> ZarrResult:
    """Segment ``source`` into the Zarr store ``target.output``, resuming what a previous run finished.

    ``options`` are resolved into one request here, on the whole input (a per_volume model's grey
    range is estimated once: the tasks see one chunk each), and sent to every task.
    ``target.probabilities``: also keep each voxel's class probabilities and their normalised
    entropy (uncertainty: where to label next), uint8-quantised, beside the labels.
    ``runtime`` (auto, keras, openvino): what runs each task's forward passes (None: the model's
    ``inference.runtime``); the runtime of each worker is recorded in the store.
    """
    output, chunk_depth = target.output, target.chunk_depth
    if "," in model_uri:
        raise ValueError(f"{model_uri!r}: an ensemble (several comma-separated model URIs) writes a .tif output; "
                         "a .zarr store and its Dask workers take one model")
    check_paths(source, output, target.overwrite)
    config = model_config(model_uri)  # read from the MLmodel: the client does not load the network
    if chunk_depth < 1:
        raise ValueError(f"chunk depth must be >= 1 slice, got {chunk_depth}")
    if chunk_depth < config.context_slices:
        raise ValueError(f"chunk depth {chunk_depth} is smaller than the model's context ({config.context_slices} "
                         "slices on each side): use a chunk depth of at least that (inference.chunk_depth)")
    with SliceReader(source) as reader:
        shape, dtype = reader.shape, reader.dtype
        request = InferenceRequest.resolve(config, options, source=reader)
    job = ChunkJob(model_uri, tracking_uri, str(source), str(output), request, target.probabilities, runtime)
    run = {"model_uri": model_uri, "source": str(Path(str(source)).resolve()) if split_hdf5_path(source) is None
           else str(source), "shape": list(shape), "chunk_depth": chunk_depth,
           **{k: v for k, v in options.record().items() if k != "planes"},
           # the resolved planes when fused: a store written slice by slice (also one from before planes
           # existed) resumes slice by slice only, and a fused one fused only
           **({"planes": request.planes} if request.fuses else {}),
           "probabilities": target.probabilities,
           **({"grey_range": list(request.grey_range)} if request.grey_range is not None else {})}  # a resume must use the same
    metadata = {"phase_map": {str(k): v for k, v in config.label_phase_map.items()}, "task": config.task.name,
                "model_uri": model_uri, "source": str(source), "context_slices": config.context_slices,
                "planes": request.planes}
    n_classes = len(config.class_names) if target.probabilities else 0
    store = ChunkedLabels.create_or_resume(output, shape, chunk_depth, run, metadata, _voxel_size_nm(str(source)),
                                           target.overwrite, n_classes, image_dtype=dtype)
    return _finish(store, job, scheduler, progress)


def _finish(store: ChunkedLabels, job: ChunkJob, scheduler: str | None, progress: bool) -> ZarrResult:
    """Run the store's pending chunks (here or on the cluster) and check that all were written."""
    pending = store.pending()
    started = time.perf_counter()
    per_worker: dict[str, dict[str, float]] = {}
    with progress_bar(len(pending), "segment (chunks)", progress, unit="chunk") as bar:
        for done in _run(pending, job, scheduler):
            entry = per_worker.setdefault(done["worker"], {"slices": 0, "seconds": 0.0, "chunks": 0,
                                                           "runtime": done["runtime"]})
            entry["slices"] += done["slices"]
            entry["seconds"] += done["seconds"]
            entry["chunks"] += 1
            bar.update(1)
    if per_worker:  # what made this run's chunks (a resumed store keeps the earlier run's entry too)
        store.record(runtimes=sorted({*store.attrs.get("runtimes", []), *(w["runtime"] for w in per_worker.values())}))
    missing = store.pending()
    if missing:
        raise VolumeError(f"{job.output}: chunks {missing} were not written; run the command again to finish them")
    return ZarrResult(Path(job.output), store.shape, time.perf_counter() - started, store.n_chunks,
                      store.n_chunks - len(pending), per_worker)


def _run(pending: list[int], job: ChunkJob, scheduler: str | None) -> Iterator[dict[str, Any]]:
    """Each pending chunk's task result, as the tasks finish."""
    if scheduler is None:
        for index in pending:
            yield segment_chunk(index, job)
        return
    from distributed import as_completed

    client, cluster = _client(scheduler)
    try:
        info = client.scheduler_info()
        served = "dashboard" in info.get("services", {})  # only where the scheduler runs one (needs bokeh)
        print(f"dask: {len(info.get('workers', {}))} worker(s) at {client.scheduler.address}"
              + (f", dashboard {client.dashboard_link}" if served else ""), flush=True)
        futures = client.map(segment_chunk, pending, job=job, pure=False)
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def describe(result: ZarrResult) -> str:
    """One line per worker: chunks, slices and slices/s."""
    lines = []
    for worker, w in sorted(result.per_worker.items()):
        rate = w["slices"] / w["seconds"] if w["seconds"] else float("nan")
        lines.append(f"  {worker}: {w['chunks']} chunk(s), {w['slices']} slices, {rate:.2f} slices/s while busy, "
                     f"{w['runtime']}")
    return "\n".join(lines)

