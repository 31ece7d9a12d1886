"""Multi-axis fusion streamed in chunks: how much halo the y and x planes need, and what it costs.

    python benchmarks/fusion_bench.py --models benchmarks/results/cv_inference_rerun/accuracy.csv \\
        [--halos 0,8,16] [--depth 64] [--time-volume] [--out benchmarks/results/fusion_halo]

``inference.planes: zyx`` predicts each voxel in its z, y and x planes and averages the
probabilities (:meth:`socseg.inference.predictor.Predictor.probabilities`). ``socseg segment``, the
Dask tasks, the REST client and scoring stream it: chunks of ``inference.fusion_depth`` slices,
each read with ``inference.fusion_halo`` grey slices on either side, so memory does not grow with
the volume. A y or x plane of a chunk is then cut short along z where the whole volume's would go
on, and the network sees mirror padding there instead of the next slices. This script measures,
on the z-fold cross-validation of ``benchmarks/accuracy.py --folds`` (its CSV names each fold's
U-Net), whether that changes anything:

- per fold, the held-out fold predicted four ways with the fold model's own settings (smoothing
  included): slice by slice (``planes z``); fused over the whole volume at once (the y and x planes
  span all 200 slices: what ``segment --multi-axis`` did before it streamed); fused in chunks of
  ``--depth`` slices aligned at slice 0, as ``socseg segment`` cuts them, read with each of
  ``--halos``;
- each scored against the manual labels as ``benchmarks/cv_postprocess.py`` scores (per-class IoU,
  relative error of the TPB density and the other microstructure metrics), plus the share of the
  fold's voxels whose label equals the whole-volume fusion's, and the seconds spent per fold slice;
- ``--time-volume``: the last fold's model segments the whole 200-slice volume with
  ``socseg.inference.segment.segment`` (TIFF in and out, planes z, then zyx streamed with the
  model's ``fusion_depth`` and ``fusion_halo``), wall-clock seconds and slices per second: the cost
  of making fusion the default.

Writes ``fusion_halo.json`` / ``.md`` into ``--out``, rewritten after each fold.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import RESULTS, add_fold_model_arguments, add_socpristine_arguments, floats, import_socpristine, joined_paths, run_metadata, segment_volume_timing, write_result  # noqa: E402

WHOLE = "zyx, whole volume"
PLAIN = "z (slice by slice)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fold_model_arguments(p, "the U-Net method name of those rows")
    p.add_argument("--halos", type=lambda t: [int(v) for v in floats(t)], default=[0, 8, 16],
                   help="grey slices read on either side of a chunk")
    p.add_argument("--depth", type=int, default=None, help="slices per chunk [the model's inference.fusion_depth]")
    p.add_argument("--only-folds", type=lambda t: [int(v) for v in floats(t)], default=None, help="1-based folds to run")
    p.add_argument("--time-volume", action="store_true", help="also time segment() on the whole volume, z and zyx")
    add_socpristine_arguments(p)
    p.add_argument("--out", type=Path, default=RESULTS / "fusion_halo")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def streamed_probabilities(predictor, request, image: np.ndarray, z_range: tuple[int, int], depth: int,
                           halo: int) -> np.ndarray:
    """``(Z, Y, X, C)`` probabilities of slices ``z_range`` from chunks of ``depth`` slices aligned
    at slice 0 (as ``socseg segment`` cuts a volume), each read with ``halo`` slices around it."""
    from socseg.data.context import iter_chunks

    start, stop = z_range
    out: np.ndarray | None = None
    for chunk in iter_chunks(image.shape[0], depth, max(halo, predictor.context_slices)):
        if chunk.stop <= start or chunk.start >= stop:
            continue
        probs = predictor.probabilities(np.asarray(image[chunk.read]), chunk.before, chunk.after, request)
        if out is None:
            out = np.empty((stop - start, *probs.shape[1:]), np.float32)
        lo, hi = max(chunk.start, start), min(chunk.stop, stop)
        out[lo - start : hi - start] = probs[lo - chunk.start : hi - chunk.start]
    assert out is not None
    return out


def fold_rows(model_uri: str, slab, halos: Sequence[int], depth: int | None, fold: int) -> list[dict[str, Any]]:
    """One row per way of predicting the fold: IoU, microstructure errors, agreement with the
    whole-volume fusion, seconds per fold slice."""
    from cv_postprocess import microstructure, scored
    from socseg.inference.predictor import load_predictor
    from socseg.inference.request import InferenceOptions

    predictor = load_predictor(model_uri)
    image = np.asarray(slab.volume.image)
    start, stop = slab.z_range
    names = [n.lower() for n in slab.volume.class_names]
    truth = slab.targets("phases")
    reference = microstructure(truth, names)
    fused = predictor.request(InferenceOptions(planes="zyx"), source=image, check_range=False)
    plain = predictor.request(InferenceOptions(planes="z"), source=image, check_range=False)
    depth = depth or fused.fusion_depth
    ways: list[tuple[str, str, Any]] = [
        ("z", PLAIN, lambda: streamed_probabilities(predictor, plain, image, (start, stop), stop - start, 0)),
        ("whole", WHOLE, lambda: predictor.probabilities(image, start, image.shape[0] - stop, fused)),
        *[(f"halo{h}", f"zyx, chunks of {depth}, halo {h}",
           lambda h=h: streamed_probabilities(predictor, fused, image, (start, stop), depth, h)) for h in halos],
    ]
    rows, whole_labels = [], None
    for key, name, predict in ways:
        began = time.perf_counter()
        labels = predictor.to_classes(predict())
        seconds = time.perf_counter() - began
        if name == WHOLE:
            whole_labels = labels
        row = {"fold": fold, "way": name, "way_id": key, **scored(truth, labels, names, reference),
               "s_per_slice": seconds / (stop - start)}
        row["same_as_whole"] = None if whole_labels is None else float(np.mean(labels == whole_labels))
        rows.append(row)
        print(f"fold {fold} {name}: mean IoU {row['mean_iou']:.4f}, TPB {row['err.tpb.density']:+.2%}, "
              f"same as whole {row['same_as_whole']}, {row['s_per_slice']:.2f} s/slice", flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per way of predicting (keyed z, whole, halo<h>): means and sds over the folds (keys without
    dots, so the docs can name them)."""
    out: dict[str, dict[str, Any]] = {}
    for way in dict.fromkeys(r["way_id"] for r in rows):
        mine = [r for r in rows if r["way_id"] == way]
        entry: dict[str, Any] = {"label": mine[0]["way"], "folds": len(mine)}
        for key, name in (("mean_iou", "mean_iou"), ("err.tpb.density", "tpb_err"),
                          ("err.tpb.active_density.z", "active_tpb_z_err"), ("same_as_whole", "same_as_whole"),
                          ("s_per_slice", "s_per_slice")):
            values = np.array([r[key] for r in mine if r.get(key) is not None], float)
            if values.size:
                entry[name] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0}
        entry["mean_abs_tpb_err"] = float(np.mean([abs(r["err.tpb.density"]) for r in mine]))
        out[way] = entry
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from accuracy import fold_setting, test_slabs
    from cv_postprocess import fold_models

    metadata = run_metadata(__file__, argv)
    models = fold_models(args.models, args.method)
    wanted = sorted(models) if args.only_folds is None else [f - 1 for f in args.only_folds]
    source = import_socpristine(args.source, args.cache_dir)
    rows: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
    columns = [("fold", "fold", "d"), ("way", "prediction"), ("mean_iou", "mean IoU", ".4f"),
               ("err.tpb.density", "TPB", "+.1%"), ("err.tpb.active_density.z", "active TPB z", "+.1%"),
               ("same_as_whole", "labels as whole-volume fusion", ".5f"), ("s_per_slice", "s / fold slice", ".2f")]
    for fold in wanted:
        folds, uri = models[fold]
        with tempfile.TemporaryDirectory(prefix="socseg-fusion-") as tmp:
            setting = fold_setting(source, args.cache_dir, folds, fold, args.split, Path(tmp))
            slab = test_slabs(setting)[0]
            rows.extend(fold_rows(uri, slab, args.halos, args.depth, fold + 1))
            if args.time_volume and fold == wanted[-1]:
                timing = segment_volume_timing(uri, np.asarray(slab.volume.image))
        settings = {
            "models": f"{joined_paths(args.models)} ({args.method} rows, one per fold)",
            "data": f"SOCPristine, z-folds {', '.join(str(r) for r in sorted({r['fold'] for r in rows}))} of "
                    f"{folds}, split {args.split} (the CV run's fold copies)",
            "ways": "z slice by slice; zyx over the whole volume; zyx in chunks aligned at slice 0 with each halo",
            "smoothing": "each fold model's own inference.smoothing_sigma, per plane before the average",
            **({"note": args.note} if args.note else {}),
        }
        figures: dict[str, Any] = {"ways": summary(rows), "volume_timing": timing}
        notes = ["'labels as whole-volume fusion': share of the fold's voxels whose class equals the one fusing "
                 "the whole volume at once gives. s / fold slice: prediction time divided by the fold's slices "
                 "(chunks reach beyond the fold, so streamed ways pay for slices outside it)."]
        json_path, md_path = write_result(args.out, "fusion_halo", "Multi-axis fusion streamed in chunks",
                                          metadata, settings, figures, columns, rows, notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
