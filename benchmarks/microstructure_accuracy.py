"""Microstructure of the real test slab: the U-Net's, the forest's and the thresholds' labels against the manual labels.

    python benchmarks/microstructure_accuracy.py --models benchmarks/results/base_2p5d_pv_phases/accuracy.csv \\
        [--split 0.6,0.1,0.3,8] [--samples 12] [--tortuosity-crop 256] [--out benchmarks/results/microstructure_accuracy]

What a paper reports from a segmented volume is its microstructure, not its IoU. On the held-out
test slab of SOCPristine (the slab ``benchmarks/accuracy.py`` scores, split ``--split``), each
method's labels are measured with :func:`socseg.analysis.microstructure.measure` and compared
metric by metric with the manual labels' values (relative error), and each method that gives
probabilities (U-Net, forest) gets its class-bias intervals
(:func:`socseg.analysis.intervals.measure_with_intervals`, ``--samples`` volumes): does the interval
cover the labels' value?

- U-Net: the 3-phase model of ``--models`` (an accuracy.py CSV; its U-Net row's ``model_uri``),
  its probabilities on the slab through its predictor (per_volume models map the whole volume's
  grey range, as ``socseg segment``), no TTA.
- Forest: ilastik-style random forest (accuracy.py's settings, ``fit_baseline``), trained here on
  the same training slabs; probabilities = the trees' vote shares.
- Thresholds: two grey thresholds fitted on the training slabs; labels only (no interval).

Tortuosity (``tau.*``, ``deff.*``) costs more than everything else together, so it is measured on a
centred crop of ``--tortuosity-crop`` pixels in y and x (the full slab depth), for the labels and
for each method on the same crop; every other metric on the whole slab. No voxel size is known for
this data (PROVENANCE.md): lengths, areas and densities are in voxel units, which relative errors do
not need.

Writes ``microstructure_accuracy.json`` / ``.md`` (one row per method and metric) into ``--out``.
The peak RSS is this process's (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, add_socpristine_arguments, floats, import_socpristine, run_metadata, write_result  # noqa: E402

# The metrics the goals name, shown first in the summary and in ``figures``.
HEADLINE = ("tpb.density", "tpb.active.z", "vf.ni", "iface.pore-ni", "perc.ni.isolated", "size.ni.d50",
            "tau.pore.z", "tau.ysz.z", "tau.ni.z")
GOALS = {"tpb.density": 0.03, "tau.pore.z": 0.05, "tau.ysz.z": 0.05, "tau.ni.z": 0.05}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True, help="accuracy.py CSV with a phases U-Net row (model_uri)")
    p.add_argument("--split", type=lambda t: floats(t, 4), default=[0.6, 0.1, 0.3, 8], metavar="TRAIN,VAL,TEST,GAP")
    add_socpristine_arguments(p)
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--samples", type=int, default=12, help="class-bias sweep volumes per interval")
    p.add_argument("--tortuosity-crop", type=int, default=256, help="y/x size of the centred crop for tortuosity; 0: none")
    p.add_argument("--rf-trees", type=int, default=100)
    p.add_argument("--rf-samples", type=int, default=150_000)
    p.add_argument("--rf-jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "microstructure_accuracy")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def unet_row(models: Path) -> dict[str, Any]:
    import pandas as pd

    frame = pd.read_csv(models)
    rows = frame[(frame["task"] == "phases") & frame["model_uri"].notna()]
    if rows.empty:
        raise SystemExit(f"{models}: no phases row with a model_uri")
    return rows.iloc[0].to_dict()


def unet_probabilities(model_uri: str, slab, smoothing_sigma: float | None = None, tta: bool = False,
                       planes: str | None = None) -> np.ndarray:
    """(Z, Y, X, C) probabilities of the slab's slices, the context (2.5D neighbours, fusion halo)
    from the real neighbours, as ``socseg segment`` reads them; ``smoothing_sigma`` None: the
    model's own in-plane smoothing, as users get it; 0: none. ``tta``: the predictor's 8-fold
    flip/rotation test-time augmentation. ``planes`` None: the model's own (``inference.planes``)."""
    from socseg.inference.predictor import load_predictor
    from socseg.inference.request import InferenceOptions

    predictor = load_predictor(model_uri)  # several URIs, comma-separated: their ensemble
    image = slab.volume.image
    request = predictor.request(InferenceOptions(tta=tta, smoothing_sigma=smoothing_sigma, planes=planes), source=image,
                                check_range=False)
    start, stop = slab.z_range
    context = request.context(predictor.context_slices)
    before, after = min(context, start), min(context, image.shape[0] - stop)
    return predictor.probabilities(np.asarray(image[start - before:stop + after]), before, after, request)


def centre_crop(shape: Sequence[int], size: int) -> tuple[slice, slice, slice]:
    """(all z, centred y, centred x) of at most ``size`` pixels; size 0: everything."""
    def centred(n: int) -> slice:
        return slice(None) if size <= 0 or size >= n else slice((n - size) // 2, (n - size) // 2 + size)
    return (slice(None), centred(shape[1]), centred(shape[2]))


def measured(labels: np.ndarray | None, probabilities: np.ndarray | None, names: list[str], crop, samples: int) -> dict[str, Any]:
    """``{"value": {...}, "low": {...}, "high": {...}}`` over all flat metrics: the slab's metrics
    with Ni sizes, the crop's tortuosity; intervals where probabilities are given. A crop that is
    the whole slab is measured in one pass (one sweep, not one for the metrics and one for tortuosity)."""
    from socseg.analysis.intervals import BiasSweep, ProbabilityVolume, measure_with_intervals
    from socseg.analysis.microstructure import flatten_metrics, measure

    phase_map = dict(enumerate(names))
    transport = ("tau.", "deff.")
    whole = (slice(None),) * 3
    # (part, options, which keys to keep: transport only, all but transport, or None for all)
    passes: list[tuple[Any, dict[str, Any], bool | None]] = (
        [(whole, {"size_phases": ["ni"], "tortuosity": True}, None)] if tuple(crop) == whole  # one pass does both
        else [(whole, {"size_phases": ["ni"]}, False), (crop, {"size_phases": [], "tortuosity": True}, True)])
    out: dict[str, dict[str, float]] = {"value": {}, "low": {}, "high": {}}
    for part, options, transport_only in passes:
        def kept(key: str, transport_only: bool | None = transport_only) -> bool:
            return transport_only is None or key.startswith(transport) == transport_only

        if probabilities is None:
            values = flatten_metrics(measure(labels[part], phase_map, **options))
            out["value"].update({k: v for k, v in values.items() if kept(k)})
            continue
        result = measure_with_intervals(ProbabilityVolume.from_array(probabilities[part], names), BiasSweep(samples), **options)
        for key, interval in result.intervals.items():
            if kept(key):
                out["value"][key], out["low"][key], out["high"][key] = interval.value, interval.low, interval.high
    return out


def comparison_rows(method: str, found: dict[str, Any], truth: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for key in dict.fromkeys([*truth, *found["value"]]):
        # a tortuosity missing: the phase does not percolate along that axis
        reference, value = truth.get(key, math.inf), found["value"].get(key, math.inf)
        low, high = found["low"].get(key), found["high"].get(key)
        error = (value - reference) / abs(reference) if reference and math.isfinite(value + reference) else None
        covers = None if low is None else bool(low - 1e-9 * abs(low) <= reference <= high + 1e-9 * abs(high))
        rows.append({"method": method, "metric": key, "labels": reference, "value": value, "rel_error": error,
                     "low": low, "high": high, "covers": covers})
    return rows


def figures_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{method: {metric with "_" for ".": {"rel_error", "covered"}, "covered", ...}}`` (render.py
    reads dotted paths, so no key holds a dot)."""
    figures: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {}
        for r in mine:
            if r["metric"] in HEADLINE:
                entry[r["metric"].replace(".", "_")] = {"rel_error": r["rel_error"], "covered": r["covers"]}
        checked = [r for r in mine if r["covers"] is not None]
        if checked:
            entry["covered"] = f"{sum(r['covers'] for r in checked)}/{len(checked)}"
        errors = [abs(r["rel_error"]) for r in mine if r["rel_error"] is not None]
        entry["median_abs_rel_error"] = float(np.median(errors)) if errors else None
        entry["goals_met"] = ", ".join(f"{k} {'yes' if abs(r['rel_error']) <= g else 'no'}"
                                       for k, g in GOALS.items() for r in mine
                                       if r["metric"] == k and r["rel_error"] is not None)
        figures[method] = entry
    return figures


# In-plane distance to the nearest label boundary (pixels) that separates the bands of the error analysis.
BANDS = ((0.0, 1.0, "within 1 px of a boundary"), (1.0, 2.0, "1-2 px from a boundary"), (2.0, math.inf, "interior (> 2 px)"))
ISLAND_SIZES = (8, 64)


def boundary_distance(labels: np.ndarray) -> np.ndarray:
    """Per slice, each pixel's distance to the nearest pixel with a 4-neighbour of another class
    (such pixels: 0). In-plane, as the labels were drawn slice by slice."""
    from scipy import ndimage as ndi

    out = np.empty(labels.shape, np.float32)
    for k, image in enumerate(labels):
        edge = np.zeros(image.shape, bool)
        for axis in (0, 1):
            step = np.diff(image, axis=axis) != 0
            low, high = [slice(None)] * 2, [slice(None)] * 2
            low[axis], high[axis] = slice(0, -1), slice(1, None)
            edge[tuple(low)] |= step
            edge[tuple(high)] |= step
        out[k] = ndi.distance_transform_edt(~edge)
    return out


def band_rows(method: str, truth: np.ndarray, pred: np.ndarray, distance: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """Per-class IoU inside each distance band, and the band's share of all wrong pixels."""
    from socseg.model.metrics import confusion_matrix, segmentation_scores

    wrong = truth != pred
    total_wrong = max(int(np.count_nonzero(wrong)), 1)
    rows = []
    for low, high, label in BANDS:
        band = (distance > low) & (distance <= high) if low > 0 else distance <= high
        scores = segmentation_scores(confusion_matrix(truth, pred, len(names), band), names)
        rows.append({"method": method, "band": label, "pixels": float(np.count_nonzero(band)) / band.size,
                     "error_share": float(np.count_nonzero(wrong & band)) / total_wrong,
                     **{f"iou_{n}": scores[f"iou_{n}"] for n in names}, "mean_iou": scores["mean_iou"]})
    return rows


def shifted_label_ceiling(truth: np.ndarray, names: list[str]) -> dict[str, float]:
    """Mean IoU of the labels against themselves moved by one pixel along x and along y: what a
    one-pixel disagreement on every boundary costs."""
    from socseg.model.metrics import confusion_matrix, segmentation_scores

    out = {}
    for axis, name in ((2, "x"), (1, "y")):
        a = np.take(truth, range(1, truth.shape[axis]), axis=axis)
        b = np.take(truth, range(0, truth.shape[axis] - 1), axis=axis)
        out[f"one_pixel_shift_{name}.mean_iou"] = segmentation_scores(confusion_matrix(a, b, len(names)), names)["mean_iou"]
    return out


def without_islands(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """``labels`` with every 6-connected component of a class smaller than ``min_voxels`` given
    the class of the nearest voxel outside such components."""
    from scipy import ndimage as ndi

    small = np.zeros(labels.shape, bool)
    for c in np.unique(labels):
        components, _ = ndi.label(labels == c)
        sizes = np.bincount(components.ravel())
        sizes[0] = min_voxels
        small |= (sizes < min_voxels)[components]
    if not small.any():
        return labels
    nearest = ndi.distance_transform_edt(small, return_distances=False, return_indices=True)
    return labels[tuple(nearest)]


def island_rows(method: str, pred: np.ndarray, names: list[str], truth_tpb: float) -> list[dict[str, Any]]:
    """TPB density error after removing islands smaller than each of ISLAND_SIZES: how much of the
    extra TPB the small spurious components make."""
    from socseg.analysis.microstructure import flatten_metrics, measure

    rows = []
    for size in (0, *ISLAND_SIZES):
        cleaned = without_islands(pred, size) if size else pred
        tpb = flatten_metrics(measure(cleaned, dict(enumerate(names)), size_phases=[]))["tpb.density"]
        rows.append({"method": method, "islands_removed_below": size, "tpb_density": tpb,
                     "rel_error": (tpb - truth_tpb) / truth_tpb,
                     "changed_fraction": float(np.count_nonzero(cleaned != pred)) / pred.size})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tempfile

    from accuracy import fit_baseline, make_setting, test_slabs
    from socseg.analysis.microstructure import flatten_metrics, measure
    from socseg.params import load_params

    metadata = run_metadata(__file__, argv)
    unet = unet_row(args.models)
    params = load_params(args.params)
    source = import_socpristine(args.source, args.cache_dir)
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="socseg-microstructure-") as tmp:
        setting = make_setting("z-slabs", [source], None, args.split, Path(tmp))
        slab = test_slabs(setting)[0]
        names = [n.lower() for n in slab.volume.class_names]
        truth_labels = slab.targets("phases")
        crop = centre_crop(truth_labels.shape, args.tortuosity_crop)
        started = time.perf_counter()
        truth = measured(truth_labels, None, names, crop, 0)["value"]
        seconds["labels"] = time.perf_counter() - started
        log(f"labels measured in {seconds['labels']:.0f} s: TPB {truth['tpb.density']:.4g} per voxel^2")
        methods: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
        methods["U-Net"] = (None, unet_probabilities(str(unet["model_uri"]), slab))
        forest = fit_baseline("rf", "phases", setting, params, args)
        methods["forest"] = (None, forest.model.probabilities(forest.data.normalised(slab), len(names)))
        thresholds = fit_baseline("threshold", "phases", setting, params, args)
        methods["thresholds"] = (thresholds.model.predict(thresholds.data.normalised(slab)), None)
        distance = boundary_distance(truth_labels)
        bands: list[dict[str, Any]] = []
        islands = island_rows("labels", truth_labels, names, truth["tpb.density"])
        for method, (labels, probabilities) in methods.items():
            started = time.perf_counter()
            found = measured(labels, probabilities, names, crop, args.samples)
            seconds[method] = time.perf_counter() - started
            rows += comparison_rows(method, found, truth)
            tpb = next(r for r in rows if r["method"] == method and r["metric"] == "tpb.density")
            log(f"{method}: measured in {seconds[method]:.0f} s, TPB density error {tpb['rel_error']:+.2%}")
            pred = labels if labels is not None else np.argmax(probabilities, -1).astype(np.uint8)
            bands += band_rows(method, truth_labels, pred, distance, names)
            islands += island_rows(method, pred, names, truth["tpb.density"])
        del methods
        ceiling = shifted_label_ceiling(truth_labels, names)
    z0, z1 = slab.z_range
    settings = {
        "data": f"SOCPristine test slab z {z0}-{z1 - 1} (0-based, split {args.split}), {truth_labels.shape} voxels",
        "U-Net": f"{unet['model_uri']} ({unet.get('method')}, {args.models}: {str(unet.get('settings', ''))[:160]})",
        "forest": f"{args.rf_trees} trees, {args.rf_samples} training pixels (accuracy.py's forest)",
        "intervals": f"class-bias sweep, {args.samples} volumes, spread 1 (tortuosity at each class's extremes)",
        "tortuosity": f"on the centred crop {truth_labels[crop].shape} (z, y, x), all three axes",
        "units": "voxel (no voxel size known for this data); TPB with the isotropic correction",
        "seconds": ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if args.note:
        settings["note"] = args.note
    columns = [("method", "method"), ("metric", "metric"), ("labels", "labels", ".5g"), ("value", "method's", ".5g"),
               ("rel_error", "rel. error", "+.2%"), ("low", "interval low", ".5g"), ("high", "interval high", ".5g"),
               ("covers", "covers labels")]
    notes = ["Goals (issue 27): TPB density within 3 % and tortuosity factor within 5 % of the labels' for the "
             "searched model. `inf`: the phase does not percolate along that axis in the method's labels; "
             "an interval high of `inf`: it may not percolate within the interval."]
    json_path, md_path = write_result(args.out, "microstructure_accuracy",
                                      "Microstructure of the real test slab against the manual labels",
                                      metadata, settings, figures_of(rows), columns, rows, notes)
    log(f"wrote {json_path} and {md_path}")
    write_error_analysis(args, metadata, settings, bands, islands, ceiling)


def write_error_analysis(args: argparse.Namespace, metadata: dict[str, Any], settings: dict[str, Any],
                         bands: list[dict[str, Any]], islands: list[dict[str, Any]], ceiling: dict[str, float]) -> None:
    """Where the errors are: IoU by distance to a label boundary; TPB without small islands."""
    names = [k[4:] for k in bands[0] if k.startswith("iou_")]
    figures: dict[str, Any] = {"ceiling": {k.replace(".", "_"): v for k, v in ceiling.items()}}
    for r in bands:
        figures.setdefault(r["method"], {}).setdefault("error_share", {})[r["band"]] = r["error_share"]
    for r in islands:
        figures.setdefault(r["method"], {}).setdefault("tpb_rel_error", {})[f"islands_below_{r['islands_removed_below']}"] = r["rel_error"]
    rows = [{"table": "IoU by band", **r} for r in bands] + [{"table": "TPB without islands", **r} for r in islands]
    columns = [("table", "table"), ("method", "method"), ("band", "band"), ("pixels", "share of pixels", ".1%"),
               ("error_share", "share of errors", ".1%"), *[(f"iou_{n}", f"IoU {n}", ".4f") for n in names],
               ("mean_iou", "mean IoU", ".4f"), ("islands_removed_below", "islands removed below (voxels)", "d"),
               ("tpb_density", "TPB density", ".5g"), ("rel_error", "TPB rel. error", "+.2%"),
               ("changed_fraction", "voxels changed", ".2%")]
    notes = [f"Band: each pixel's in-plane distance to the nearest pixel with a 4-neighbour of another class in the "
             f"manual labels. Ceiling: the labels against themselves moved by one pixel score mean IoU "
             + ", ".join(f"{v:.4f} ({k.split('.')[0].replace('_', ' ')})" for k, v in ceiling.items())
             + ". Islands: 6-connected components of a class below the size, given the nearest other voxel's class; "
             "TPB errors against the unmodified labels (the labels' own row shows what cleaning does to them)."]
    json_path, md_path = write_result(args.out, "error_analysis", "Where the errors are: boundary bands and small islands",
                                      metadata, settings, figures, columns, rows, notes)
    log(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
