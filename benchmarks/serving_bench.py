"""Throughput, payload and memory of whole-volume segmentation: local vs REST (compact, tensor).

    python benchmarks/serving_bench.py [--slices 16] [--model-uri URI] [--encoder unet --base-filters 8]
        [--tile 128] [--slice-batch 8] [--depths 8,64]

On 501x501 slices (the first ``--slices`` SOCPristine slices from ../shared when present, else the
phantom), side by side in one run: slices/s of ``socseg segment`` in this process (model already
loaded), and of ``serving/client.py`` against ``mlflow models serve`` on loopback in the compact
form (base64 TIFF and .npy) and the tensor form (JSON numbers); request and response bytes per
slice; peak RSS of this process, of the server, and of a fresh ``socseg segment`` process at two
depths (streaming: the two should match). Without ``--model-uri`` the model is an untrained U-Net
(weights do not change the cost) saved as a pyfunc segmenter in a temporary folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "socpristine" / "data"


def _client():
    spec = importlib.util.spec_from_file_location("serving_client", REPO / "serving" / "client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _tree_peak_rss_mib(pid: int) -> float:
    """Largest VmHWM (peak RSS) in a process tree: the server is uvicorn under the mlflow CLI."""
    peak, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            peak = max(peak, int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM"))) / 1024)
            todo += [int(c) for c in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return peak


def _volume(n: int, path: Path) -> str:
    if SHARED.is_dir() and len(list(SHARED.glob("SOCprist*.tiff"))) >= n:
        stack = np.stack([tifffile.imread(SHARED / f"SOCprist{k:04d}.tiff") for k in range(1, n + 1)])
        source = f"SOCPristine slices 1-{n}"
    else:
        from socseg.config import load_params
        from socseg.synth import synth_from_params

        stack = synth_from_params(load_params(), "bench", shape=(n, 501, 501), seed=0).image
        source = "synthetic phantom"
    tifffile.imwrite(path, stack, photometric="minisblack")
    return f"{source}, {stack.shape[0]}x{stack.shape[1]}x{stack.shape[2]} {stack.dtype}"


def _model(args, folder: Path) -> tuple[str, str]:
    if args.model_uri:
        return args.model_uri, args.model_uri
    from socseg.models import build_model
    from socseg.normalise import Normaliser
    from socseg.pyfunc import save_segmenter, segmenter_config
    from socseg.train import export_model

    import keras

    keras.utils.set_random_seed(0)  # the same untrained model (and label payloads) every run
    network = build_model(args.encoder, "phases", n_classes=3, base_filters=args.base_filters, encoder_weights="none")
    exported = export_model(network, Normaliser(20229.0, 42606.0, 1.0, 99.0))
    meta = {"task": "phases", "class_names": ["pore", "ysz", "ni"], "phase_map": {"0": "pore", "128": "ysz", "255": "ni"},
            "normalisation": {"low": 20229.0, "high": 42606.0}, "tile_size": args.tile}
    path = save_segmenter(exported, segmenter_config(meta), folder / "segmenter")
    return str(path), f"untrained {args.encoder} U-Net (base filters {args.base_filters}), phases, tile {args.tile}"


_DEPTH_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, tifffile
    from socseg.segment import segment
    model, grey, depth, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    with tifffile.TiffFile(grey) as tif:
        first = tif.pages[0].asarray()
    with tifffile.TiffWriter(out + ".grey.tif") as tif:  # the volume, repeated to the depth
        for _ in range(depth):
            tif.write(first, photometric="minisblack")
    segment(model, out + ".grey.tif", out, slice_batch=int(sys.argv[5]), progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--model-uri", default=None, help="a pyfunc segmenter (default: untrained U-Net)")
    parser.add_argument("--encoder", default="unet", choices=["unet", "vgg16", "resnet50"])
    parser.add_argument("--base-filters", type=int, default=8)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--slice-batch", type=int, default=8)
    parser.add_argument("--depths", default="8,64", help="two depths for the streaming RSS check ('' to skip)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per mode; the best is shown (shared CPUs are noisy)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import mlflow

    from socseg.segment import segment_stream

    client = _client()
    rows: list[tuple[str, float, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        volume = folder / "grey.tif"
        print(f"volume: {_volume(args.slices, volume)}")
        uri, described = _model(args, folder)
        print(f"model: {described}; slice batch {args.slice_batch}")

        model = mlflow.pyfunc.load_model(uri)
        model.predict(tifffile.imread(volume, key=0)[None])  # warm-up: first-call tracing is not throughput
        rate = max(
            segment_stream(model.predict, volume, folder / "local.tif", slice_batch=args.slice_batch, overwrite=True,
                           progress=False).slices_per_second
            for _ in range(args.repeat)
        )
        rows.append(("local (socseg segment)", rate, "-", "-"))
        local_rss = _rss_mib()

        with client.local_server(uri, log_path=folder / "server.log") as (url, process):
            warm = client.RestSegmenter(url)
            warm(tifffile.imread(volume, key=0)[None])
            for name, form, encoding in (("REST compact, base64 TIFF", "compact", "tiff"),
                                         ("REST compact, base64 .npy", "compact", "npy"),
                                         ("REST tensor, JSON numbers", "tensor", "npy")):
                seconds = float("inf")
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    served, rest = client.segment_with_server(
                        url, str(volume), str(folder / f"{form}-{encoding}.tif"), slice_batch=args.slice_batch,
                        form=form, encoding=encoding, overwrite=True, progress=False,
                    )
                    seconds = min(seconds, time.perf_counter() - started)
                same = np.array_equal(tifffile.imread(folder / "local.tif"), tifffile.imread(served.output))
                rows.append((name + ("" if same else " (LABELS DIFFER)"), served.shape[0] / seconds,
                             f"{rest.bytes_sent / served.shape[0] / 1024:,.0f}", f"{rest.bytes_received / served.shape[0] / 1024:,.0f}"))
            server_rss = _tree_peak_rss_mib(process.pid)

        print(f"\n{'mode':34} {'slices/s':>9} {'KiB sent/slice':>15} {'KiB back/slice':>15}")
        for name, rate, sent, back in rows:
            print(f"{name:34} {rate:9.2f} {sent:>15} {back:>15}")
        print(f"\npeak RSS: this process after local segmentation {local_rss:.0f} MiB (client afterwards {_rss_mib():.0f} MiB), "
              f"server {server_rss:.0f} MiB")

        if args.depths:
            depths = [int(d) for d in args.depths.split(",")]
            peaks = []
            for depth in depths:
                out = subprocess.run(
                    [sys.executable, "-c", _DEPTH_SCRIPT, uri, str(volume), str(depth), str(folder / f"d{depth}.tif"),
                     str(args.slice_batch)], capture_output=True, text=True, check=True,
                )
                peaks.append(f"{depth} slices: {out.stdout.split()[-1]} MiB")
            print("peak RSS of a fresh `socseg segment` process (501x501 slices): " + ", ".join(peaks))


if __name__ == "__main__":
    main()
