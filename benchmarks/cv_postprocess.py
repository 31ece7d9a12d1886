"""Post-processing under cross-validation: which probability smoothing brings each fold's microstructure closest to the labels.

    python benchmarks/cv_postprocess.py --models benchmarks/results/cv_phases/accuracy.csv \\
        [--sigmas 0,0.5,0.7,1,1.3] [--with-forest] [--out benchmarks/results/cv_postprocess]

Pixel errors of a good U-Net sit almost all on phase boundaries (``error_analysis.json``), and there
they matter far more to the triple-phase boundary (TPB) than to IoU: a one-pixel speck of YSZ
between pore and Ni adds a TPB loop while costing one pixel of IoU. The candidate fix is
``inference.smoothing_sigma`` (:func:`socseg.inference.window.smooth_probabilities`): an in-plane
Gaussian on each slice's probabilities before the argmax. This script measures it the way issue 29
asks, on the z-fold cross-validation of ``benchmarks/accuracy.py --folds`` (its CSV names each
fold's U-Net), so that the choice is not made on one test slab:

- each fold's U-Net predicts its own held-out fold (the same fold copies and split as the CV run,
  its predictor and grey-range mapping, no TTA); the raw probabilities are smoothed with each
  ``--sigmas`` value exactly as the predictor does, then the argmax is scored against the manual
  labels: per-class IoU (:mod:`socseg.model.metrics`) and the microstructure
  (:func:`socseg.analysis.microstructure.measure`: TPB density and active TPB density per axis,
  interfaces, percolating fractions, Ni sizes), relative error against the labels' own values;
- two references that are not inference settings: removing 6-connected islands below 8 voxels
  (the size below which the manual labels hold almost no components, ``error_analysis.json``) and
  a 3-D Gaussian of sigma 0.7 (it needs each slice's neighbours' probabilities, which a served
  request of a few slices does not have);
- ``--with-forest``: the ilastik-style forest of accuracy.py, fitted on each fold's training slabs,
  with the same smoothings of its vote shares;
- ``--inference plain,tta,multi-axis``: how each U-Net predicts before those variants: one pass per
  z-slice (plain), the 8-fold flip/rotation test-time augmentation (``inference.tta``), or the
  mean of the probabilities from slicing along z, y and x (``inference.planes: zyx``; the fold read
  with the model's ``fusion_halo`` slices around it, as ``socseg segment`` reads a chunk). Each is its own method in the result
  (``U-Net + TTA``, ``U-Net + multi-axis``), so both inference options are cross-validated for
  IoU and microstructure at once.

``--score-on train`` scores each fold's U-Net on slices it was trained on instead: a window as
long as its fold, from the longest run of its training slices that are neighbours in the volume
(its 2.5D context and fusion halo are then real neighbours, all trained on). That is how well the
recipe fits labels it has seen, the ceiling its held-out score could reach without a better fit
(issue 29 point 5).

``--tortuosity`` adds the tortuosity factor of each phase along z, y and x
(:mod:`socseg.analysis.tortuosity`) to the labels' and the in-plane variants' metrics (not to the
two references: the solves are the slow part), so its relative error is cross-validated too.

The chosen sigma (``figures.chosen_sigma``): the in-plane value with the smallest mean |TPB density
error| over the folds among those whose mean IoU is within ``--iou-tolerance`` of no smoothing.

Writes ``cv_postprocess.json`` / ``.md`` into ``--out``: one row per fold, method and variant; the
figures hold the means and standard deviations over folds.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import RESULTS, add_fold_model_arguments, add_socpristine_arguments, floats, import_socpristine, joined_paths, run_metadata, write_result  # noqa: E402

# Metrics compared with the labels; ``tpb.active_density.<axis>`` = TPB density x active share.
METRICS = ("tpb.density", "tpb.active_density.z", "tpb.active_density.y", "tpb.active_density.x",
           "iface.pore-ysz", "iface.pore-ni", "iface.ysz-ni", "perc.pore.z", "perc.ysz.z", "perc.ni.z",
           "vf.pore", "vf.ysz", "vf.ni", "size.ni.d50")
# --tortuosity: the tortuosity factor of each phase along each axis (issue 27's 5 % goal)
TORTUOSITY_METRICS = tuple(f"tau.{phase}.{axis}" for phase in ("pore", "ysz", "ni") for axis in "zyx")
ISLAND_VOXELS = 8
# --inference: the method label's suffix for each way of predicting
INFERENCE = {"plain": "", "tta": " + TTA", "multi-axis": " + multi-axis"}
REFERENCE_3D_SIGMA = 0.7


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fold_model_arguments(p, "the U-Net method name of those rows (accuracy.py --variant; with --seeds, e.g. "
                                "'pv seed 42' or 'pv ensemble of 2'); a comma list compares several, each labelled "
                                "'U-Net <name>'")
    p.add_argument("--ensemble", action="store_true",
                   help="a fold found in several --models CSVs is scored as the ensemble of their models "
                        "(probabilities averaged), labelled 'U-Net ensemble of N'")
    p.add_argument("--sigmas", type=floats, default=[0.0, 0.5, 0.7, 1.0, 1.3], help="in-plane smoothing sigmas (pixels)")
    p.add_argument("--iou-tolerance", type=float, default=0.0005,
                   help="a sigma is eligible if its mean IoU is at most this far below no smoothing's")
    p.add_argument("--with-forest", action="store_true", help="also the forest of accuracy.py, per fold")
    p.add_argument("--inference", type=inference_modes, default=["plain"],
                   help=f"comma list of how the U-Nets predict: {', '.join(INFERENCE)}")
    p.add_argument("--score-on", choices=["heldout", "train"], default="heldout",
                   help="score each fold's model on its held-out fold, or on a window of its own training slices")
    p.add_argument("--tortuosity", action="store_true",
                   help="also each phase's tortuosity factor per axis, for the labels and the in-plane variants")
    p.add_argument("--rf-trees", type=int, default=100)
    p.add_argument("--rf-samples", type=int, default=150_000)
    p.add_argument("--rf-jobs", type=int, default=2)
    add_socpristine_arguments(p)
    p.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    p.add_argument("--out", type=Path, default=RESULTS / "cv_postprocess")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def inference_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in INFERENCE]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown inference mode(s) {unknown}; choose from {', '.join(INFERENCE)}")
    return modes


def fold_probabilities(model_uri: str, slab, mode: str) -> np.ndarray:
    """Unsmoothed ``(Z, Y, X, C)`` probabilities of the slab's slices by one ``--inference`` mode.

    Unsmoothed: each variant applies its own smoothing (models logged since the default
    ``inference.smoothing_sigma`` became non-zero would otherwise be smoothed twice). Multi-axis
    fusion (``planes`` zyx) reads the fold with the model's ``fusion_halo`` slices on either side
    from the training slabs around it (grey values only: what a user segmenting the volume gives
    it), as ``socseg segment`` does; plain and TTA predict z-slices only.
    """
    from microstructure_accuracy import unet_probabilities

    return unet_probabilities(model_uri, slab, smoothing_sigma=0.0, tta=mode == "tta",
                              planes="zyx" if mode == "multi-axis" else "z")


def fold_models(paths: Path | Sequence[Path], method: str, ensemble: bool = False) -> dict[int, tuple[int, str]]:
    """``{fold index (0-based): (number of folds, model URI)}`` of the phases rows of ``method``
    (the end of the row's method label: ``pv`` is not ``pv seed 42``); an ensemble row's URI
    lists its members, comma-separated. Several CSVs (folds trained in separate runs) are read as
    one table; a fold found twice, or a different number of folds, is refused rather than guessed.

    ``ensemble``: a fold found in several CSVs is not refused but becomes the ensemble of their
    models (URIs joined by commas: their probabilities averaged), e.g. one recipe trained with two
    losses or two lengths; every fold must then have the same number of members, so that the
    figure averaged over folds is one recipe's."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: dict[int, tuple[int, str]] = {}
    source: dict[int, Path] = {}
    members: dict[int, list[str]] = {}
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                found = re.match(r"z-fold (\d+)/(\d+)", row.get("split", ""))
                label = row.get("method", "")
                named = label == method or label.endswith((f" {method}", f",{method}"))
                if not (row.get("task") == "phases" and row.get("model_uri") and found and named):
                    continue
                fold = int(found.group(1)) - 1
                if ensemble and fold in source and source[fold] == path:
                    raise SystemExit(f"{path}: fold {fold + 1} of method {method!r} is in it twice; --ensemble "
                                     "takes one model per fold from each CSV")
                if fold in source and source[fold] != path and not ensemble:
                    raise SystemExit(f"fold {fold + 1} of method {method!r} is in both {source[fold]} and {path}")
                members.setdefault(fold, []).append(row["model_uri"])
                out[fold], source[fold] = (int(found.group(2)), row["model_uri"]), path
    if ensemble and out:
        sizes = {fold: len(uris) for fold, uris in members.items()}
        if len(set(sizes.values())) > 1:
            raise SystemExit(f"{joined_paths(paths)}: --ensemble needs the same number of models for every fold "
                             f"of method {method!r}, found {dict(sorted((f + 1, n) for f, n in sizes.items()))}")
        out = {fold: (out[fold][0], ",".join(uris)) for fold, uris in members.items()}
    if not out:
        raise SystemExit(f"{joined_paths(paths)}: no phases rows of method {method!r} with a model_uri "
                         "and a 'z-fold k/K' split")
    if len({k for k, _ in out.values()}) > 1:
        raise SystemExit(f"{joined_paths(paths)}: the rows of method {method!r} come from cross-validations "
                         f"with different numbers of folds: {sorted({k for k, _ in out.values()})}")
    return out


def training_window(setting, length: int):
    """A slab of ``length`` training slices of a fold copy, centred in the longest run of them that
    are neighbours in the original volume (``meta.extra["order"]``), so that its context and fusion
    halo are real, trained-on neighbours."""
    from socseg.data.prepare import Slab
    from socseg.data.split import slab_split
    from socseg.data.volumes import load_volume

    volume = load_volume(setting.tests[0][0])
    order = volume.meta.extra["order"]
    split = setting.split
    start, stop = slab_split(len(order), split["train"], split["val"], split["test"], int(split["gap"])).train
    runs, first = [], start
    for i in range(start + 1, stop + 1):
        if i == stop or abs(order[i] - order[i - 1]) != 1:
            runs.append((first, i))
            first = i
    run_start, run_stop = max(runs, key=lambda r: r[1] - r[0])
    if run_stop - run_start < length:
        raise SystemExit(f"{setting.label}: no {length} neighbouring training slices (longest run {run_stop - run_start})")
    begin = run_start + (run_stop - run_start - length) // 2
    return Slab(volume, (begin, begin + length))


def variants(sigmas: Sequence[float]) -> list[tuple[str, str, float]]:
    """(name, kind, value): in-plane sigmas, then the two references."""
    return ([(f"in-plane sigma {s:g}", "plane", float(s)) for s in sigmas]
            + [(f"islands < {ISLAND_VOXELS} removed", "islands", float(ISLAND_VOXELS)),
               (f"3-D sigma {REFERENCE_3D_SIGMA:g}", "volume", REFERENCE_3D_SIGMA)])


def apply_variant(probabilities: np.ndarray, kind: str, value: float) -> np.ndarray:
    """Class indices (uint8) of ``(Z, Y, X, C)`` probabilities after one variant."""
    from scipy import ndimage as ndi

    from microstructure_accuracy import without_islands
    from socseg.inference.window import smooth_probabilities

    if kind == "plane":
        return np.stack([smooth_probabilities(p, value).argmax(-1) for p in probabilities]).astype(np.uint8)
    if kind == "volume":
        return ndi.gaussian_filter(probabilities, (value, value, value, 0.0)).argmax(-1).astype(np.uint8)
    return without_islands(probabilities.argmax(-1).astype(np.uint8), int(value))


def microstructure(labels: np.ndarray, names: list[str], tortuosity: bool = False) -> dict[str, float]:
    from socseg.analysis.microstructure import flatten_metrics, measure

    flat = flatten_metrics(measure(labels, dict(enumerate(names)), size_phases=["ni"], tortuosity=tortuosity))
    for axis in "zyx":
        flat[f"tpb.active_density.{axis}"] = flat["tpb.density"] * flat[f"tpb.active.{axis}"]
    return flat


def scored(truth: np.ndarray, pred: np.ndarray, names: list[str], reference: dict[str, float],
           tortuosity: bool = False) -> dict[str, Any]:
    """IoU per class and the relative error of each of METRICS (and TORTUOSITY_METRICS with
    ``tortuosity``) against ``reference`` (the labels')."""
    from socseg.model.metrics import confusion_matrix, segmentation_scores

    scores = segmentation_scores(confusion_matrix(truth, pred, len(names)), names)
    found = microstructure(pred, names, tortuosity)
    row: dict[str, Any] = {"mean_iou": scores["mean_iou"], **{f"iou_{n}": scores[f"iou_{n}"] for n in names}}
    for key in METRICS + (TORTUOSITY_METRICS if tortuosity else ()):
        row[f"err.{key}"] = (found[key] - reference[key]) / reference[key] if reference.get(key) and key in found else None
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method and variant: mean and sd over folds of the IoU and of each relative error."""
    out: dict[str, dict[str, Any]] = {}
    keys = ["mean_iou"] + [f"err.{k}" for k in METRICS + TORTUOSITY_METRICS]
    for method, variant in dict.fromkeys((r["method"], r["variant"]) for r in rows):
        mine = [r for r in rows if r["method"] == method and r["variant"] == variant]
        entry: dict[str, Any] = {"folds": len(mine)}
        for key in keys:
            values = np.array([r[key] for r in mine if r.get(key) is not None], float)
            if values.size:
                entry[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0}
        entry["mean_abs_err.tpb.density"] = float(np.mean([abs(r["err.tpb.density"]) for r in mine]))
        out[f"{method} | {variant}"] = entry
    return out


def chosen_sigma(stats: dict[str, dict[str, Any]], method: str, sigmas: Sequence[float], tolerance: float) -> float:
    """The in-plane sigma with the smallest mean |TPB density error| whose mean IoU is within
    ``tolerance`` of no smoothing's."""
    base = stats[f"{method} | in-plane sigma 0"]["mean_iou"]["mean"]
    eligible = [s for s in sigmas if stats[f"{method} | in-plane sigma {s:g}"]["mean_iou"]["mean"] >= base - tolerance]
    return float(min(eligible, key=lambda s: stats[f"{method} | in-plane sigma {s:g}"]["mean_abs_err.tpb.density"]))


def write_outputs(args: argparse.Namespace, metadata: dict[str, Any], models: dict, method_names: list[str],
                  labels: dict[str, str], rows: list[dict[str, Any]]) -> tuple[Path, Path, dict[str, Any]]:
    """The result file of the folds scored so far (rewritten after each fold: a stopped run keeps them)."""
    stats = summary(rows)
    first = labels[method_names[0]] + INFERENCE[args.inference[0]]
    figures: dict[str, Any] = {"chosen_sigma": chosen_sigma(stats, first, args.sigmas, args.iou_tolerance), **stats}
    done = sorted({r["fold"] for r in rows})
    settings = {
        "models": f"{joined_paths(args.models)} ({', '.join(method_names)} rows, "
                  + ("each fold the ensemble of its models in these files, probabilities averaged)" if args.ensemble
                     else "one per fold each)"),
        "data": f"SOCPristine, {len(models)} of {sorted({k for k, _ in models.values()})[0]} contiguous z-folds, split "
                f"{args.split} (the CV run's fold copies); "
                f"folds scored: {', '.join(map(str, done))}",
        "variants": ", ".join(v for v, _, _ in variants(args.sigmas)),
        "scored on": ("each fold's held-out fold" if args.score_on == "heldout" else
                      "a window of each fold's own training slices, as long as the fold, neighbours in the volume"),
        "inference": ", ".join(args.inference) + " (unsmoothed probabilities; each variant smooths its own)",
        "rule": f"chosen sigma ({first}): smallest mean |TPB density error| among in-plane sigmas with mean IoU "
                f"within {args.iou_tolerance:g} of sigma 0",
        "units": "voxel (no voxel size known for this data); relative errors need none",
        "tortuosity": ("tortuosity factor per phase and axis for the labels and the in-plane variants"
                       if args.tortuosity else "not solved"),
        **({"note": args.note} if args.note else {}),
    }
    columns = [("fold", "fold", "d"), ("method", "method"), ("variant", "variant"), ("mean_iou", "mean IoU", ".4f"),
               ("err.tpb.density", "TPB", "+.1%"), ("err.tpb.active_density.z", "active TPB z", "+.1%"),
               ("err.tpb.active_density.y", "active TPB y", "+.1%"), ("err.iface.pore-ni", "pore-Ni area", "+.1%"),
               ("err.perc.pore.z", "pore perc. z", "+.1%"), ("err.size.ni.d50", "Ni d50", "+.1%")]
    if args.tortuosity:
        columns += [(f"err.tau.{phase}.z", f"tau {name} z", "+.1%") for phase, name in
                    (("pore", "pore"), ("ysz", "YSZ"), ("ni", "Ni"))]
    notes = ["Relative errors against the manual labels of the slices scored. Active TPB density = TPB density x the "
             "share of TPB whose three phases each reach both faces normal to the axis."]
    json_path, md_path = write_result(args.out, "cv_postprocess", "Probability smoothing under z-fold cross-validation",
                                      metadata, settings, figures, columns, rows, notes)
    return json_path, md_path, figures


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if 0.0 not in args.sigmas:
        raise SystemExit("--sigmas must include 0 (no smoothing): the other values are judged against it")
    from accuracy import fit_baseline, fold_setting, test_slabs
    from microstructure_accuracy import log
    from socseg.params import load_params

    metadata = run_metadata(__file__, argv)
    method_names = [m.strip() for m in args.method.split(",") if m.strip()]
    per_method = {name: fold_models(args.models, name, args.ensemble) for name in method_names}
    models = per_method[method_names[0]]
    members = {name: len(next(iter(found.values()))[1].split(",")) for name, found in per_method.items()}
    labels = {name: ("U-Net" if len(method_names) == 1 else f"U-Net {name}")
              + (f" ensemble of {members[name]}" if args.ensemble and members[name] > 1 else "")
              for name in method_names}
    missing = {name: sorted(set(models) - set(found)) for name, found in per_method.items() if set(found) != set(models)}
    if missing:
        raise SystemExit(f"{joined_paths(args.models)}: the methods do not cover the same folds: {missing}")
    params = load_params(args.params)
    source = import_socpristine(args.source, args.cache_dir)
    rows: list[dict[str, Any]] = []
    for fold, (folds, _) in sorted(models.items()):
        with tempfile.TemporaryDirectory(prefix="socseg-cv-postprocess-") as tmp:
            setting = fold_setting(source, args.cache_dir, folds, fold, args.split, Path(tmp))
            slab = test_slabs(setting)[0]
            if args.score_on == "train":
                slab = training_window(setting, slab.z_range[1] - slab.z_range[0])
            names = [n.lower() for n in slab.volume.class_names]
            truth = slab.targets("phases")
            reference = microstructure(truth, names, args.tortuosity)
            methods = {labels[name] + INFERENCE[mode]: fold_probabilities(per_method[name][fold][1], slab, mode)
                       for name in method_names for mode in args.inference}
            if args.with_forest:
                forest = fit_baseline("rf", "phases", setting, params, args)
                methods["forest"] = forest.model.probabilities(forest.data.normalised(slab), len(names))
        for method, probabilities in methods.items():
            for variant, kind, value in variants(args.sigmas):
                row = {"fold": fold + 1, "method": method, "variant": variant,
                       **scored(truth, apply_variant(probabilities, kind, value), names, reference,
                                args.tortuosity and kind == "plane")}
                rows.append(row)
                log(f"fold {fold + 1}/{folds} {method} {variant}: mean IoU {row['mean_iou']:.4f}, "
                    f"TPB {row['err.tpb.density']:+.2%}, active TPB z {row['err.tpb.active_density.z']:+.2%}")
        del methods
        json_path, md_path, figures = write_outputs(args, metadata, models, method_names, labels, rows)
    log(f"chosen sigma {figures['chosen_sigma']:g}; wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
