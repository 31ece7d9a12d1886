"""Chunked Zarr segmentation: one process against a Dask LocalCluster of 1 and 2 worker processes.

    python benchmarks/distributed_bench.py [--shape 256,512,512] [--chunk-depth 32] [--note TEXT]

A phantom volume (``socseg.data.synth``, uint16 TIFF) is segmented into OME-Zarr stores with
``socseg.inference.distributed.segment_to_zarr`` by the same untrained from-scratch U-Net
(accuracy is not the point: every path runs the same network on the same slices), and the
stores are checked to be identical. Reports slices/s and peak RSS per process (the client, and
each worker from inside it), with the command, commit and hardware, to
``benchmarks/results/distributed/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, floats, run_metadata, write_result  # noqa: E402

COLUMNS = [("mode", "mode"), ("slices_per_s", "slices/s", ".2f"), ("seconds", "wall s", ".1f"),
           ("peak_rss_mib", "peak RSS per process (MiB)", ""), ("identical", "labels = single process", "")]

# The single-process path in a fresh interpreter, so its peak RSS is its own.
_SINGLE = textwrap.dedent(
    """
    import json, sys, time
    from socseg.inference.distributed import ZarrTarget, segment_to_zarr
    model, grey, out, depth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    started = time.perf_counter()
    result = segment_to_zarr(model, grey, ZarrTarget(out, depth), tracking_uri="sqlite:///unused.db", progress=False)
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"seconds": time.perf_counter() - started, "rss": hwm // 1024}))
    """
)


def peak_rss_mib() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024


def _model(folder: Path, tile: int, base_filters: int) -> str:
    import keras

    from socseg.data.normalise import Normaliser
    from socseg.inference.predictor import ModelConfig
    from socseg.inference.pyfunc import save_segmenter
    from socseg.model.export import export_model
    from socseg.model.unet import build_model
    from socseg.params import load_params, typed

    keras.utils.set_random_seed(0)
    network = build_model("unet", "phases", n_classes=3, base_filters=base_filters, encoder_weights="none")
    trained = {"task": "phases", "encoder": "unet", "class_names": ["pore", "ysz", "ni"],
               "phase_map": {"0": "pore", "128": "ysz", "255": "ni"}, "normalisation": {"low": 20000.0, "high": 43000.0},
               "tile_size": tile, "context_slices": 0}
    config = ModelConfig.from_training(trained, typed(load_params(REPO / "params.yaml")).inference)
    return str(save_segmenter(export_model(network, Normaliser(20000.0, 43000.0, 0.5, 99.5)), config, folder / "model"))


def _phantom(path: Path, shape: tuple[int, int, int]) -> None:
    import tifffile

    from socseg.data.synth import synth_from_params
    from socseg.params import load_params

    volume = synth_from_params(load_params(REPO / "params.yaml"), "bench", shape=shape, seed=0)
    tifffile.imwrite(path, volume.image)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=lambda t: [int(v) for v in floats(t, 3)], default=[256, 512, 512])
    parser.add_argument("--chunk-depth", type=int, default=32)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--base-filters", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    metadata = run_metadata(__file__, argv)

    from distributed import Client, LocalCluster

    from socseg.data.chunked import ChunkedLabels
    from socseg.inference.distributed import segment_to_zarr

    shape = tuple(args.shape)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        _phantom(folder / "grey.tif", shape)
        print(f"phantom {shape} in {time.perf_counter() - started:.0f} s", flush=True)
        model = _model(folder, args.tile, args.base_filters)

        done = subprocess.run([sys.executable, "-c", _SINGLE, model, str(folder / "grey.tif"), str(folder / "single.zarr"),
                               str(args.chunk_depth)], capture_output=True, text=True, check=True)
        single = __import__("json").loads(done.stdout.strip().splitlines()[-1])
        reference = np.asarray(ChunkedLabels.open(folder / "single.zarr").labels[:])
        rows.append({"mode": "single process (socseg segment OUT.zarr)", "slices_per_s": shape[0] / single["seconds"],
                     "seconds": single["seconds"], "peak_rss_mib": str(single["rss"]), "identical": True})
        print(rows[-1], flush=True)

        for n in args.workers:
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address=None) as cluster, Client(cluster) as client:
                output = folder / f"dask{n}.zarr"
                began = time.perf_counter()
                result = segment_to_zarr(model, str(folder / "grey.tif"), ZarrTarget(output, args.chunk_depth),
                                         tracking_uri="sqlite:///unused.db", scheduler=cluster.scheduler_address,
                                         progress=False)
                seconds = time.perf_counter() - began
                worker_rss = client.run(peak_rss_mib)
            same = bool(np.array_equal(np.asarray(ChunkedLabels.open(output).labels[:]), reference))
            rss = ", ".join(str(v) for v in sorted(worker_rss.values()))
            rows.append({"mode": f"Dask LocalCluster, {n} worker process(es)", "slices_per_s": shape[0] / seconds,
                         "seconds": seconds, "peak_rss_mib": f"workers {rss}", "identical": same,
                         "chunks_per_worker": {w: v["chunks"] for w, v in result.per_worker.items()}})
            print(rows[-1], flush=True)
    client_rss = peak_rss_mib()
    settings = {"shape": list(shape), "dtype": "uint16", "chunk_depth": args.chunk_depth, "tile": args.tile,
                "model": f"untrained from-scratch U-Net, base filters {args.base_filters}, phases, float32",
                "window": "params.yaml inference: step_fraction, batch_size; no TTA",
                "client_peak_rss_mib (Dask rows; includes the phantom generation)": client_rss, "note": args.note}
    write_result(args.out, "distributed", "Chunked Zarr segmentation: one process vs a Dask LocalCluster", metadata,
                 settings=settings, figures={r["mode"]: round(r["slices_per_s"], 3) for r in rows}, columns=COLUMNS,
                 rows=rows)


if __name__ == "__main__":
    main()
