"""Where the U-Net's isolated-Ni error comes from, component by component, with the image's evidence.

    python benchmarks/ni_connectivity.py --models benchmarks/results/cv_fixed_folds/accuracy.csv \\
        [--with-forest] [--reach 8] [--out benchmarks/results/ni_connectivity]

On the out-of-fold whole volume (``cv_out_of_fold``) the U-Net as served puts far less of the Ni in
components touching no face than the manual labels do. The isolated share is decided by a few
components, so this lists them one by one (:mod:`socseg.analysis.connectivity`): each isolated Ni
component of the labels with its size, z extent, distance to the rest of the labelled Ni and
**bridge level** (the grey value of the weakest voxel on the brightest path joining it to the rest,
within ``--reach`` voxels), and what each method does with it: keeps it, drops it, or joins it to
the network. The bridge level is placed on the labels' own grey scale, 0 at the median grey value of
labelled YSZ and 1 at that of labelled Ni: a join along a path near 1 is one the image supports
(a contact the slice-by-slice labels leave out, or two particles closer than the resolution), a
join along a path near 0 crosses YSZ. The same is done the other way round, for each method's
isolated components against the labels. For a joined component, the voxels the method adds
between it and the labelled network (within the component's distance of both) are located in z
against the fold seams, where the segmenting model changes.

The volume is that of ``cv_out_of_fold`` (each slice segmented by the fold model that never saw it,
fused over z, y and x, smoothed with ``inference.smoothing_sigma``; unsmoothed too), read from the
source volume's grey values. Writes ``ni_connectivity.json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import RESULTS, import_socpristine, run_metadata, write_result  # noqa: E402
from cv_out_of_fold import add_out_of_fold_arguments  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_of_fold_arguments(p)
    p.add_argument("--phase", default="ni", help="the phase whose isolated components are listed (the brightest one)")
    p.add_argument("--reach", type=int, default=8, help="voxels around a component's bounding box searched for a path")
    p.add_argument("--out", type=Path, default=RESULTS / "ni_connectivity")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def grey_scale(image: np.ndarray, labels: np.ndarray, low: int, high: int) -> tuple[float, float]:
    """The median grey values of the labelled classes ``low`` and ``high`` (0 and 1 of the bridge scale)."""
    return float(np.median(image[labels == low])), float(np.median(image[labels == high]))


def added_between(component: np.ndarray, rest: np.ndarray, method: np.ndarray, distance: float) -> np.ndarray:
    """The voxels ``method`` gives the phase and the reference does not, within ``distance`` of both
    the reference component and the rest of the reference phase: the contact the method draws."""
    from scipy import ndimage as ndi

    near = (ndi.distance_transform_edt(~component) <= distance) & (ndi.distance_transform_edt(~rest) <= distance)
    return near & method & ~component & ~rest


def seam_planes(n_slices: int, n_folds: int) -> list[int]:
    """The first slice of each fold after the first: where the segmenting model changes."""
    return [round(n_slices * k / n_folds) for k in range(1, n_folds)]


def component_rows(reference_name: str, reference: np.ndarray, others: dict[str, np.ndarray], image: np.ndarray,
                   scale: tuple[float, float], reach: int, seams: list[int]) -> list[dict[str, Any]]:
    """One row per isolated component of ``reference``: its size, distance and bridge level, and per
    other segmentation whether it keeps and joins it; where the first other joins it, where the
    added contact lies in z."""
    from socseg.analysis.connectivity import compare_isolated, labelled_isolated

    low, high = scale
    isolated = labelled_isolated(reference, image, reach)  # labelled once, bridge levels found once
    labelled = isolated[0]
    comparisons = {name: compare_isolated(reference, mask, image, reach, isolated) for name, mask in others.items()}
    first = next(iter(others))
    total = sum(c.component.voxels for c in comparisons[first]) or 1
    rows = []
    for i, base in enumerate(comparisons[first]):
        part = base.component
        level = part.bridge_level
        row: dict[str, Any] = {
            "isolated_in": reference_name, "voxels": part.voxels, "share": part.voxels / total,
            "z": f"{part.z_range[0]}-{part.z_range[1]}", "distance": part.distance, "bridge_level": level,
            "bridge_scale": None if level is None else (level - low) / (high - low),
        }
        for name, found in comparisons.items():
            row[f"kept.{name}"] = found[i].kept
            row[f"joined.{name}"] = found[i].joined
        if base.joined and part.distance is not None:
            me = labelled == part.label
            added = added_between(me, reference & ~me, others[first], part.distance)
            z = np.flatnonzero(added.any(axis=(1, 2)))
            row["added_voxels"] = int(added.sum())
            row["added_z"] = f"{z.min()}-{z.max()}" if z.size else ""
            row["added_near_seam"] = bool(z.size) and any(abs(int(s) - int(v)) <= 2 for s in seams for v in (z.min(), z.max()))
        rows.append(row)
    return rows


def isolated_share(rows: list[dict[str, Any]], mask: np.ndarray) -> float:
    return float(sum(r["voxels"] for r in rows) / max(int(mask.sum()), 1))


def summary(rows: list[dict[str, Any]], reference_name: str, method: str) -> dict[str, Any]:
    """Of ``reference_name``'s isolated volume: the share ``method`` joins to the network, and of that
    the share whose brightest path is brighter than the midpoint between the two phases' medians."""
    mine = [r for r in rows if r["isolated_in"] == reference_name]
    total = sum(r["voxels"] for r in mine) or 1
    joined = [r for r in mine if r.get(f"joined.{method}")]
    bright = [r for r in joined if r["bridge_scale"] is not None and r["bridge_scale"] >= 0.5]
    return {"components": len(mine), "joined_components": len(joined),
            "joined_share": sum(r["voxels"] for r in joined) / total,
            "joined_bright_share": sum(r["voxels"] for r in bright) / max(sum(r["voxels"] for r in joined), 1)}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cv_out_of_fold import out_of_fold, smoothed
    from microstructure_accuracy import log
    from socseg.data.volumes import load_volume

    metadata = run_metadata(__file__, argv)
    volumes = out_of_fold(args)
    names, sigma = volumes.names, volumes.sigma
    if args.phase not in names:
        raise SystemExit(f"--phase {args.phase!r} is not a class of the volume: {names}")
    phase = names.index(args.phase)
    image = load_volume(import_socpristine(args.source, args.cache_dir)).image
    if image.shape != volumes.truth.shape:
        raise SystemExit(f"the source image {image.shape} and the assembled labels {volumes.truth.shape} differ")
    # key (render.py reads dotted paths: no dot in it) -> mask of the phase; titles for the table
    segmentations = {"unet": smoothed(volumes.probabilities, sigma).argmax(-1) == phase,
                     "unet_unsmoothed": volumes.probabilities.argmax(-1) == phase}
    titles = {"labels": "labels", "unet": f"U-Net fused, sigma {sigma:g}", "unet_unsmoothed": "U-Net fused, sigma 0"}
    if volumes.forest is not None:
        segmentations["forest"], titles["forest"] = volumes.forest == phase, "forest"
    labels = volumes.truth == phase
    below = names[int(np.argsort([np.median(image[volumes.truth == k]) for k in range(len(names))])[-2])]
    scale = grey_scale(image, volumes.truth, names.index(below), phase)
    seams = seam_planes(len(labels), volumes.n_folds)
    started = time.perf_counter()
    rows = component_rows("labels", labels, segmentations, image, scale, args.reach, seams)
    for name, mask in segmentations.items():
        rows += component_rows(name, mask, {"labels": labels}, image, scale, args.reach, seams)
        log(f"{titles[name]}: isolated components listed")
    seconds = {"predict": volumes.seconds, "components": time.perf_counter() - started}
    shares = {"labels": isolated_share([r for r in rows if r["isolated_in"] == "labels"], labels)}
    shares.update({name: isolated_share([r for r in rows if r["isolated_in"] == name], mask)
                   for name, mask in segmentations.items()})
    figures: dict[str, Any] = {
        "titles": titles,
        "isolated_share": shares,
        "grey_scale": {"low_class": below, "low_median": scale[0], "high_median": scale[1]},
        "labels_isolated_by_method": {name: summary(rows, "labels", name) for name in segmentations},
        "method_isolated_in_labels": {name: summary(rows, name, "labels") for name in segmentations},
    }
    settings = {
        "data": f"SOCPristine, all {labels.shape[0]} slices, each from the held-out fold of its {volumes.n_folds}-fold "
                f"cross-validation (split {args.split}); fold seams at z {seams}",
        "U-Net": f"the {args.method} rows of the --models CSVs, fused over z, y and x; in-plane sigma {sigma:g} "
                 "(params inference.smoothing_sigma) and 0",
        "forest": "fitted per fold (accuracy.py's forest), argmax" if args.with_forest else "not run",
        "components": f"{args.phase}, 6-connected, touching no face of the volume; distance and bridge level within "
                      f"{args.reach} voxels of each component's bounding box",
        "bridge scale": f"0 = median grey of labelled {below} ({scale[0]:.0f}), 1 = median grey of labelled "
                        f"{args.phase} ({scale[1]:.0f}); raw grey values of the source volume",
        "seconds": ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
        **({"note": args.note} if args.note else {}),
    }
    method_columns = [(f"kept.{name}", f"kept by {titles[name]}", ".2f") for name in segmentations] + \
        [(f"joined.{name}", f"joined by {titles[name]}") for name in segmentations]
    for row in rows:
        row["isolated_in"] = titles[row["isolated_in"]]
    columns = [("isolated_in", "isolated in"), ("voxels", "voxels", "d"), ("share", "share of its isolated", ".1%"),
               ("z", "z"), ("distance", "distance", ".2f"), ("bridge_level", "bridge level", ".0f"),
               ("bridge_scale", "bridge (0 YSZ, 1 Ni)", ".2f"), *method_columns,
               ("kept.labels", "kept by labels", ".2f"), ("joined.labels", "joined by labels"),
               ("added_voxels", "contact voxels added", "d"), ("added_z", "their z"), ("added_near_seam", "at a seam")]
    notes = ["One row per isolated component, largest first within each segmentation. 'kept': share of its voxels the "
             "other segmentation gives the phase; 'joined': those voxels lie in a component of the other segmentation "
             "that touches a face. Contact voxels: given the phase by the first other segmentation, not by this one, "
             "within the component's distance of both it and the rest of the phase."]
    json_path, md_path = write_result(args.out, "ni_connectivity",
                                      "Isolated Ni, component by component, against the image",
                                      metadata, settings, figures, columns, rows, notes)
    log(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
