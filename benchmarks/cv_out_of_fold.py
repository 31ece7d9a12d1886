"""The whole volume's microstructure from out-of-fold predictions: every slice segmented by the fold model that never saw it.

    python benchmarks/cv_out_of_fold.py --models benchmarks/results/cv_fixed_folds/accuracy.csv \\
        [--samples 12] [--with-forest] [--out benchmarks/results/cv_out_of_fold]

The cross-validation of ``cv_postprocess.py`` compares each fold's microstructure on its own
40-slice slab. A slab that thin cannot carry every metric a paper reports: a path across it in y or
x hinges on a few connections, so an in-plane tortuosity factor or percolating fraction of 40
slices is a fragile number for the labels as much as for a prediction. Here the five held-out
folds' predictions are put back where their slices came from, giving a 200-slice volume in which
no slice was seen by the model that segmented it, and that volume is measured whole against the
manual labels, as a user measures a scan:

- U-Net: each fold's U-Net of ``--models`` (accuracy.py ``--folds`` CSV) on its held-out fold, fused
  over z, y and x (``inference.planes: zyx``, the fold read with its fusion halo from its real
  neighbours, grey values only), smoothed in-plane with ``inference.smoothing_sigma`` of
  ``--params`` (the served default), with its class-bias intervals
  (:func:`socseg.analysis.intervals.measure_with_intervals`, ``--samples`` volumes): does each
  interval cover the labels' value? Also without smoothing (point values), so the smoothing's part
  shows.
- ``--with-forest``: the ilastik-style forest of accuracy.py fitted on each fold's training slabs,
  its argmax labels (point values; no smoothing, as ilastik users get it).

Every metric, tortuosity included, is measured on all 200 x 501 x 501 voxels. The fold seams (a
model change every 40 slices) are in the volume; the labels have none. Writes
``cv_out_of_fold.json`` / ``.md`` into ``--out``: one row per method and metric, and the IoU of the
whole volume per method.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, add_fold_model_arguments, add_socpristine_arguments, import_socpristine, joined_paths, run_metadata, write_result  # noqa: E402


def add_out_of_fold_arguments(p: argparse.ArgumentParser) -> None:
    """What :func:`out_of_fold` reads: the fold models, the forest's settings, the data and params."""
    add_fold_model_arguments(p, "the U-Net method name of those rows (accuracy.py --variant)")
    p.add_argument("--with-forest", action="store_true", help="also the forest of accuracy.py, per fold")
    p.add_argument("--rf-trees", type=int, default=100)
    p.add_argument("--rf-samples", type=int, default=150_000)
    p.add_argument("--rf-jobs", type=int, default=2)
    add_socpristine_arguments(p)
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_of_fold_arguments(p)
    p.add_argument("--samples", type=int, default=12, help="class-bias sweep volumes per interval (U-Net)")
    p.add_argument("--out", type=Path, default=RESULTS / "cv_out_of_fold")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def held_out_positions(slab) -> np.ndarray:
    """The original-volume z index of each slice of a fold copy's test slab (``meta.extra["order"]``)."""
    order = slab.volume.meta.extra.get("order")
    if order is None:
        raise SystemExit(f"{slab.volume.meta.name}: not a fold copy (no slice order recorded)")
    z0, z1 = slab.z_range
    return np.asarray(order[z0:z1], dtype=int)


def place(volume: np.ndarray | None, shape: tuple[int, ...], positions: np.ndarray, block: np.ndarray,
          filled: np.ndarray) -> np.ndarray:
    """Put ``block`` at ``positions`` (z) of ``volume`` (made on first use), refusing a slice placed twice."""
    if volume is None:
        volume = np.zeros(shape + block.shape[len(positions.shape) + 2:], dtype=block.dtype)
    if filled[positions].any():
        raise SystemExit(f"slices {positions[filled[positions]].tolist()} are held out by two folds")
    volume[positions] = block
    return volume


def smoothed(probabilities: np.ndarray, sigma: float) -> np.ndarray:
    """Each slice smoothed in-plane as the predictor does (``inference.smoothing_sigma``)."""
    from socseg.inference.window import smooth_probabilities

    return np.stack([smooth_probabilities(p, sigma) for p in probabilities]) if sigma > 0 else probabilities


def iou_figures(truth: np.ndarray, pred: np.ndarray, names: list[str]) -> dict[str, float]:
    from socseg.model.metrics import confusion_matrix, segmentation_scores

    scores = segmentation_scores(confusion_matrix(truth, pred, len(names)), names)
    return {"mean_iou": float(scores["mean_iou"]), **{f"iou_{n}": float(scores[f"iou_{n}"]) for n in names}}


def tortuosity_summary(rows: list[dict[str, Any]], goal: float = 0.05) -> dict[str, Any]:
    """How many tortuosity factors (``tau.<phase>.<axis>``) are within ``goal`` of the labels', and the
    largest relative error; a factor only one side can solve (the other does not percolate) counts as missed."""
    factors = [r for r in rows if r["metric"].startswith("tau.")]
    errors = [abs(r["rel_error"]) if r["rel_error"] is not None
              else 0.0 if math.isinf(r["labels"]) and math.isinf(r["value"]) else math.inf for r in factors]
    return {"tau_within_5pct": f"{sum(e <= goal for e in errors)}/{len(errors)}",
            "tau_max_abs_rel_error": max(errors) if errors else None}


@dataclass
class OutOfFold:
    """The whole volume assembled from the held-out folds: labels, the U-Net's fused probabilities
    (unsmoothed) and, when asked, the forest's labels, each slice from the fold that held it out."""

    truth: np.ndarray
    probabilities: np.ndarray
    forest: np.ndarray | None
    names: list[str]
    n_folds: int
    sigma: float  # the served in-plane smoothing (params inference.smoothing_sigma)
    seconds: float


def out_of_fold(args: argparse.Namespace) -> OutOfFold:
    """Each fold's U-Net of ``args.models`` (and with ``args.with_forest`` the forest, fitted per
    fold) on its held-out fold, put back in place; every slice of the source volume exactly once."""
    from accuracy import fit_baseline, fold_setting, test_slabs, volume_slices
    from cv_postprocess import fold_models, fold_probabilities
    from microstructure_accuracy import log
    from socseg.params import load_params, typed

    params = load_params(args.params)

    models = fold_models(args.models, args.method)
    folds = sorted({k for k, _ in models.values()})
    if len(folds) != 1 or len(models) != folds[0]:
        raise SystemExit(f"{joined_paths(args.models)}: a U-Net for each of the folds is needed, found folds "
                         f"{sorted(i + 1 for i in models)} of {folds}")
    source = import_socpristine(args.source, args.cache_dir)
    truth = unet = forest = None
    filled: np.ndarray | None = None
    names: list[str] = []
    started = time.perf_counter()
    for fold, (n_folds, uri) in sorted(models.items()):
        with tempfile.TemporaryDirectory(prefix="socseg-cv-out-of-fold-") as tmp:
            setting = fold_setting(source, args.cache_dir, n_folds, fold, args.split, Path(tmp))
            slab = test_slabs(setting)[0]
            names = [n.lower() for n in slab.volume.class_names]
            positions = held_out_positions(slab)
            if filled is None:  # the source volume's slices (a fold copy drops the gap after its fold)
                filled = np.zeros(volume_slices(source), dtype=bool)
            shape = (len(filled), *slab.volume.image.shape[1:])
            truth = place(truth, shape, positions, slab.targets("phases"), filled)
            probabilities = fold_probabilities(uri, slab, "multi-axis")
            unet = place(unet, shape, positions, probabilities.astype(np.float32), filled)
            if args.with_forest:
                fitted = fit_baseline("rf", "phases", setting, params, args)
                found = fitted.model.probabilities(fitted.data.normalised(slab), len(names))
                forest = place(forest, shape, positions, found.argmax(-1).astype(np.uint8), filled)
            filled[positions] = True
            log(f"fold {fold + 1}/{n_folds}: slices {positions.min()}-{positions.max()} predicted")
    if filled is None or not filled.all():
        raise SystemExit(f"slices {np.flatnonzero(~filled).tolist()} are held out by no fold")
    assert truth is not None and unet is not None
    return OutOfFold(truth, unet, forest, names, folds[0], float(typed(params).inference.smoothing_sigma),
                     time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from microstructure_accuracy import comparison_rows, figures_of, log, measured

    metadata = run_metadata(__file__, argv)
    volumes = out_of_fold(args)
    sigma = volumes.sigma
    truth, unet, forest, names = volumes.truth, volumes.probabilities, volumes.forest, volumes.names
    seconds: dict[str, float] = {"predict": volumes.seconds}
    unet_plain = unet.argmax(-1).astype(np.uint8)
    unet = smoothed(unet, sigma)
    whole = (slice(None),) * 3
    # figure key (render.py reads dotted paths: no dot in it) -> (row label, labels, probabilities)
    methods: dict[str, tuple[str, np.ndarray | None, np.ndarray | None]] = {
        "unet": (f"U-Net fused, sigma {sigma:g}", None, unet), "unet_unsmoothed": ("U-Net fused, sigma 0", unet_plain, None)}
    if forest is not None:
        methods["forest"] = ("forest", forest, None)
    step = time.perf_counter()
    reference = measured(truth, None, names, whole, 0)["value"]
    seconds["labels"] = time.perf_counter() - step
    log(f"labels measured in {seconds['labels']:.0f} s")
    rows: list[dict[str, Any]] = []
    ious: dict[str, dict[str, float]] = {}
    figures: dict[str, Any] = {}
    for key, (method, labels, probabilities) in methods.items():
        step = time.perf_counter()
        found = measured(labels, probabilities, names, whole, args.samples if probabilities is not None else 0)
        seconds[key] = time.perf_counter() - step
        pred = labels if labels is not None else probabilities.argmax(-1).astype(np.uint8)
        mine = comparison_rows(method, found, reference)
        rows += mine
        figures[key] = {"label": method, **iou_figures(truth, pred, names), **figures_of(mine)[method],
                        **tortuosity_summary(mine)}
        log(f"{method}: mean IoU {figures[key]['mean_iou']:.4f}, TPB {figures[key]['tpb_density']['rel_error']:+.2%}, "
            f"tortuosity within 5 %: {figures[key]['tau_within_5pct']}, measured in {seconds[key]:.0f} s")
    settings = {
        "data": f"SOCPristine, all {truth.shape[0]} slices ({truth.shape}), each from the held-out fold of its "
                f"{volumes.n_folds}-fold cross-validation (split {args.split}, the CV run's fold copies)",
        "U-Net": f"the {args.method} rows of {joined_paths(args.models)}, one model per fold; fused over z, y and x; in-plane sigma "
                 f"{sigma:g} (params inference.smoothing_sigma) and 0",
        "forest": (f"{args.rf_trees} trees, {args.rf_samples} training pixels, fitted per fold (accuracy.py's forest); "
                   "argmax, no smoothing" if args.with_forest else "not run"),
        "intervals": f"U-Net at sigma {sigma:g}: class-bias sweep, {args.samples} volumes, spread 1",
        "measured": "every metric on the whole volume, tortuosity of each phase along z, y and x included",
        "units": "voxel (no voxel size known for this data); relative errors need none",
        "seconds": ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        **({"note": args.note} if args.note else {}),
    }
    columns = [("method", "method"), ("metric", "metric"), ("labels", "labels", ".5g"), ("value", "method's", ".5g"),
               ("rel_error", "rel. error", "+.2%"), ("low", "interval low", ".5g"), ("high", "interval high", ".5g"),
               ("covers", "covers labels")]
    notes = ["Goals (issue 27): TPB density within 3 % and tortuosity factor within 5 % of the labels'. `inf`: the "
             "phase does not percolate along that axis. Whole-volume IoU per method in the figures."]
    json_path, md_path = write_result(args.out, "cv_out_of_fold",
                                      "The whole volume from out-of-fold predictions against the manual labels",
                                      metadata, settings, figures, columns, rows, notes)
    log(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
