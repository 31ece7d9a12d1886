"""Throughput, payload and memory of whole-volume segmentation: local vs REST (compact, tensor).

    python benchmarks/serving_bench.py [--slices 16] [--model-uri URI] [--encoder unet --base-filters 8]
        [--tile 128] [--slice-batch 8] [--depths 8,64] [--out benchmarks/results/serving]

On 501x501 slices (the first ``--slices`` SOCPristine slices from ../shared when present, else the
phantom), side by side in one run: slices/s of ``socseg segment`` in this process (model already
loaded), and of ``serving/client.py`` against ``mlflow models serve`` on loopback in the compact
form (base64 TIFF and .npy) and the tensor form (JSON numbers); request and response bytes per
slice; peak RSS of this process, of the server, and of a fresh ``socseg segment`` process at two
depths (streaming: the two should match). Without ``--model-uri`` the model is an untrained U-Net
(weights do not change the cost) saved as a pyfunc segmenter in a temporary folder. Writes
``serving.json`` (figures, command, commit, hardware, software) and ``serving.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, run_metadata, serving_client, write_result  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "socpristine" / "data"


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
        from socseg.params import load_params
        from socseg.data.synth import synth_from_params

        stack = synth_from_params(load_params(), "bench", shape=(n, 501, 501), seed=0).image
        source = "synthetic phantom"
    tifffile.imwrite(path, stack, photometric="minisblack")
    return f"{source}, {stack.shape[0]}x{stack.shape[1]}x{stack.shape[2]} {stack.dtype}"


def _model(args, folder: Path) -> tuple[str, str]:
    if args.model_uri:
        return args.model_uri, args.model_uri
    from socseg.model.unet import build_model
    from socseg.data.normalise import Normaliser
    from socseg.inference.predictor import ModelConfig
    from socseg.inference.pyfunc import save_segmenter
    from socseg.params import load_params, typed
    from socseg.model.export import export_model

    import keras

    keras.utils.set_random_seed(0)  # the same untrained model (and label payloads) every run
    network = build_model(args.encoder, "phases", n_classes=3, base_filters=args.base_filters, encoder_weights="none")
    exported = export_model(network, Normaliser(20229.0, 42606.0, 1.0, 99.0))
    trained = {"task": "phases", "encoder": args.encoder, "class_names": ["pore", "ysz", "ni"],
               "phase_map": {"0": "pore", "128": "ysz", "255": "ni"}, "normalisation": {"low": 20229.0, "high": 42606.0},
               "tile_size": args.tile, "context_slices": 0}
    config = ModelConfig.from_training(trained, typed(load_params(REPO / "params.yaml")).inference)
    path = save_segmenter(exported, config, folder / "segmenter")
    return str(path), f"untrained {args.encoder} U-Net (base filters {args.base_filters}), phases, tile {args.tile}"


_DEPTH_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, tifffile
    from socseg.inference.segment import segment
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


COLUMNS = [("mode", "mode"), ("slices_per_s", "slices/s", ".2f"), ("kib_sent_per_slice", "KiB sent / slice", ",.0f"),
           ("kib_back_per_slice", "KiB back / slice", ",.0f")]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--model-uri", default=None, help="a pyfunc segmenter (default: untrained U-Net)")
    parser.add_argument("--encoder", default="unet", choices=["unet", "vgg16", "resnet50"])
    parser.add_argument("--base-filters", type=int, default=8)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--slice-batch", type=int, default=8)
    parser.add_argument("--depths", default="8,64", help="two depths for the streaming RSS check ('' to skip)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per mode; the best is shown (shared CPUs are noisy)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving", help="folder for serving.json and serving.md")
    parser.add_argument("--note", default="", help="free text for the result file (e.g. what else ran on the machine)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    metadata = run_metadata(__file__, argv)

    from socseg.inference.predictor import Predictor
    from socseg.inference.segment import SegmentOutputs, segment_stream

    client = serving_client()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        volume = folder / "grey.tif"
        volume_text = _volume(args.slices, volume)
        print(f"volume: {volume_text}")
        uri, described = _model(args, folder)
        print(f"model: {described}; slice batch {args.slice_batch}")

        predictor = Predictor.load(uri)
        request = predictor.request(source=tifffile.imread(volume))  # the whole input's range, as segment resolves it

        def labels(stack, before, after):
            return predictor.to_labels(predictor.classes(stack, before, after, request))

        labels(tifffile.imread(volume, key=0)[None], 0, 0)  # warm-up: first-call tracing is not throughput
        rate = max(
            segment_stream(labels, volume, SegmentOutputs(folder / "local.tif", overwrite=True),
                           context=request.context(predictor.context_slices),
                           slice_batch=request.chunk_slices(args.slice_batch),
                           progress=False).slices_per_second
            for _ in range(args.repeat)
        )
        rows.append({"mode": "local (socseg segment, model loaded)", "slices_per_s": rate, "kib_sent_per_slice": None,
                     "kib_back_per_slice": None, "labels_equal_local": True})
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
                same = bool(np.array_equal(tifffile.imread(folder / "local.tif"), tifffile.imread(served.output)))
                rows.append({"mode": name + ("" if same else " (LABELS DIFFER)"), "slices_per_s": served.shape[0] / seconds,
                             "kib_sent_per_slice": rest.bytes_sent / served.shape[0] / 1024,
                             "kib_back_per_slice": rest.bytes_received / served.shape[0] / 1024, "labels_equal_local": same})
            server_rss = _tree_peak_rss_mib(process.pid)

        client_rss = _rss_mib()

        def kib(value: float | None) -> str:
            return "-" if value is None else f"{value:,.0f}"

        print(f"\n{'mode':38} {'slices/s':>9} {'KiB sent/slice':>15} {'KiB back/slice':>15}")
        for row in rows:
            print(f"{row['mode']:38} {row['slices_per_s']:9.2f} {kib(row['kib_sent_per_slice']):>15} "
                  f"{kib(row['kib_back_per_slice']):>15}")
        print(f"\npeak RSS: this process after local segmentation {local_rss:.0f} MiB (client afterwards {client_rss:.0f} MiB), "
              f"server {server_rss:.0f} MiB")

        depth_peaks: dict[str, float] = {}
        if args.depths:
            depths = [int(d) for d in args.depths.split(",")]
            for depth in depths:
                out = subprocess.run(
                    [sys.executable, "-c", _DEPTH_SCRIPT, uri, str(volume), str(depth), str(folder / f"d{depth}.tif"),
                     str(args.slice_batch)], capture_output=True, text=True, check=True,
                )
                depth_peaks[str(depth)] = float(out.stdout.split()[-1])
            print("peak RSS of a fresh `socseg segment` process (501x501 slices): "
                  + ", ".join(f"{depth} slices: {mib:.0f} MiB" for depth, mib in depth_peaks.items()))

    settings = {"volume": volume_text, "model": described, "slice batch": args.slice_batch,
                "repeats per mode (best shown)": args.repeat}
    figures = {"peak_rss_mib": {"local_segmentation": local_rss, "client_after_rest": client_rss, "server": server_rss,
                                "fresh_segment_process_by_depth": depth_peaks}}
    notes = [f"Peak RSS: this process after local segmentation {local_rss:.0f} MiB (client after the REST runs "
             f"{client_rss:.0f} MiB), server {server_rss:.0f} MiB"
             + ("; a fresh `socseg segment` process: " + ", ".join(f"{d} slices {m:.0f} MiB" for d, m in depth_peaks.items())
                if depth_peaks else "") + "."]
    if args.note:
        settings["note"] = args.note
    json_path, md_path = write_result(args.out, "serving", "Serving benchmark", metadata, settings, figures, COLUMNS,
                                      rows, notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
