"""Chunk depth of streamed multi-axis fusion: time, memory and agreement with whole-volume fusion.

    python benchmarks/fusion_depth.py --models benchmarks/results/base_2p5d_pv_epyc/accuracy.csv \\
        [--ways whole,128:16,64:16,128:8] [--out benchmarks/results/fusion_depth_avx2]

``socseg segment`` fuses the z, y and x planes in chunks of ``inference.fusion_depth`` slices,
each read with ``inference.fusion_halo`` more on either side (:mod:`socseg.inference.predictor`).
The y and x passes of a chunk predict its halo slices too, so a chunk of ``d`` slices with halo
``h`` costs about ``1 + 2 (d + 2h) / d`` forward passes per slice instead of three: deeper chunks
spend less on halos and hold more in memory. ``benchmarks/fusion_bench.py`` chose the halo under
the z-fold cross-validation at one depth; this script takes one model (the first U-Net row of an
``accuracy.py`` CSV) and the whole SOCPristine volume and, for each ``--ways`` entry
(``DEPTH:HALO``, or ``whole``: one chunk of the whole volume, no halo, the reference), records the
seconds of ``Predictor.iter_volume`` (prediction, smoothing and fusion; no file reading or writing),
the peak of NumPy memory it allocated (tracemalloc: the chunk's grey values, probabilities and
planes; the runtime's own buffers are not counted) and the share of voxels labelled as whole-volume
fusion labels them. Writes ``fusion_depth.json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, add_socpristine_arguments, import_socpristine, model_rows, run_metadata, write_result  # noqa: E402


def parse_ways(text: str) -> list[tuple[int | None, int]]:
    """``whole,128:16`` -> [(None, 0), (128, 16)] (depth None: the whole volume)."""
    ways: list[tuple[int | None, int]] = []
    for item in (t.strip() for t in text.split(",")):
        if item == "whole":
            ways.append((None, 0))
            continue
        depth, _, halo = item.partition(":")
        try:
            ways.append((int(depth), int(halo or 0)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"way {item!r}: use DEPTH:HALO (whole numbers) or whole") from None
        if ways[-1][0] < 1 or ways[-1][1] < 0:
            raise argparse.ArgumentTypeError(f"way {item!r}: depth must be >= 1 and halo >= 0")
    if (None, 0) not in ways:
        ways.insert(0, (None, 0))  # the reference every other way is compared with
    return sorted(ways, key=lambda way: way[0] is not None)  # the reference first


def fusion_ways(predictor: Any, image: np.ndarray, ways: Sequence[tuple[int | None, int]]) -> list[dict[str, Any]]:
    """One row per way: fused labels of the whole ``image`` through ``predictor.iter_volume`` with
    the predictor's config at that depth and halo (planes zyx), timed and compared with the first
    way's labels (``parse_ways`` puts whole-volume fusion first)."""
    import dataclasses

    from socseg.inference.request import InferenceOptions

    base = predictor.config
    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    try:
        for depth, halo in ways:
            predictor.config = dataclasses.replace(base, fusion_depth=depth or image.shape[0], fusion_halo=halo)
            request = predictor.request(InferenceOptions(planes="zyx"), source=image, check_range=False)
            tracemalloc.start()
            started = time.perf_counter()
            labels = np.concatenate([classes for _, classes in predictor.iter_volume(image, request=request)])
            seconds = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            reference = labels if reference is None else reference
            rows.append({"way": "whole volume" if depth is None else f"chunks of {depth}, halo {halo}",
                         "depth": depth or image.shape[0], "halo": halo, "seconds": seconds,
                         "slices_per_s": image.shape[0] / seconds, "numpy_peak_mib": peak / 2**20,
                         "same_as_whole": float(np.mean(labels == reference))})
            print(f"[{time.strftime('%H:%M:%S')}] {rows[-1]['way']:24s} {seconds:7.1f} s  "
                  f"NumPy peak {rows[-1]['numpy_peak_mib']:7.0f} MiB  labels as whole {rows[-1]['same_as_whole']:.5%}",
                  flush=True)
    finally:
        predictor.config = base
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True, help="accuracy.py CSV: its first row with a model_uri is used")
    add_socpristine_arguments(p)
    p.add_argument("--ways", type=parse_ways, default=parse_ways("whole,128:16,64:16,128:8"), metavar="WAY[,WAY...]",
                   help="DEPTH:HALO or whole (the reference, always run first)")
    p.add_argument("--out", type=Path, default=RESULTS / "fusion_depth")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from socseg.data.volumes import load_volume
    from socseg.inference.predictor import Predictor

    model = model_rows(args.models).iloc[0]
    image = np.asarray(load_volume(import_socpristine(args.source, args.cache_dir)).image)
    metadata = run_metadata(__file__, argv)
    predictor = Predictor.load(str(model["model_uri"])).as_served()
    request = predictor.request(source=image, check_range=False)
    predictor.probabilities(image[:8], 0, 0, request)  # compiles the network: not part of any way's time
    rows = fusion_ways(predictor, image, args.ways)
    whole = rows[0]["seconds"]
    for row in rows:
        row["x_whole_time"] = row["seconds"] / whole
    figures = {f"d{row['depth']}_h{row['halo']}": {k: row[k] for k in ("seconds", "slices_per_s", "numpy_peak_mib",
                                                                         "same_as_whole", "x_whole_time")}
               for row in rows}
    settings = {"model": f"{model['method']} ({model['model_uri']}; {args.models})",
                "data": f"SOCPristine, all {image.shape[0]} slices of {image.shape[1]} x {image.shape[2]}",
                "runtime": predictor.runtime, "planes": "zyx", "smoothing_sigma": predictor.config.smoothing_sigma,
                "timing": "Predictor.iter_volume: prediction, smoothing, fusion; no file reading or writing; "
                          "after one compile pass"}
    if args.note:
        settings["note"] = args.note
    columns = [("way", "way"), ("seconds", "seconds", ".1f"), ("slices_per_s", "slices/s", ".2f"),
               ("x_whole_time", "x whole-volume time", ".2f"), ("numpy_peak_mib", "NumPy peak MiB", ",.0f"),
               ("same_as_whole", "labels as whole-volume fusion", ".5%")]
    json_path, md_path = write_result(args.out, "fusion_depth", "Fusion chunk depth: time, memory, agreement",
                                      metadata, settings, figures, columns, rows)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
