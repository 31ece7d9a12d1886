"""Where Ni IoU is lost: the cross-validated errors of each phase pair, per face of that interface in the labels.

    python benchmarks/interface_errors.py \\
        --scores benchmarks/results/cv_boundary_long_fused/cv_postprocess.json \\
                 benchmarks/results/cv_boundary_fixed/cv_postprocess.json \\
        [--method 'U-Net + multi-axis'] [--variant 'in-plane sigma 0.7'] [--out benchmarks/results/interface_errors]

Almost every remaining error of the U-Net lies within a pixel of a label boundary
(``error_analysis.json``), so a phase's IoU is set by how much boundary it has and how accurately
each kind of boundary is placed. This script separates the two, for models already scored by
``cv_postprocess.py`` (no model is run again):

- For each held-out fold (the same fold copies as the CV run) it counts the labels' faces between
  each pair of phases (pore/YSZ, pore/Ni, YSZ/Ni; neighbouring voxels along z, y and x).
- From a fold's recorded per-class IoU and relative volume-fraction errors it recovers exactly how
  many voxels the model confused between each pair: with T the label's voxels of a class, P the
  prediction's (T times one plus the volume-fraction error), the union is (T + P) / (1 + IoU) and
  the class's wrong voxels E = union x (1 - IoU); each wrong voxel is wrong for two classes, so the
  pair (a, b) holds (E_a + E_b - E_c) / 2 of them.
- Errors per face of each interface is the pair's confused voxels over its faces: comparable across
  interfaces, folds and models, whatever the phase's share of boundary.
- The grey-value contrast of each interface in the raw volume: the difference of the two phases'
  interior means (voxels at least 3 from another phase) over their pooled interior standard
  deviation (contrast-to-noise ratio, CNR), on all slices.

Figures: per scores file, the mean over folds of the errors per face of each interface; the Ni IoU
the same folds would have if both Ni interfaces were placed as accurately as pore/YSZ (from
(T - E/2) / (T + E/2), which holds when over- and under-predicted voxels balance); and by how much
the Ni errors must fall for Ni IoU 0.99 (same relation).

Writes ``interface_errors.json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import RESULTS, add_socpristine_arguments, import_socpristine, run_metadata, write_result  # noqa: E402

PHASES = ("pore", "ysz", "ni")
PAIRS = (("pore", "ysz"), ("pore", "ni"), ("ysz", "ni"))
NI_GOAL = 0.99
INTERIOR_DISTANCE = 3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scores", type=Path, nargs="+", required=True, help="cv_postprocess.json files (held-out folds)")
    p.add_argument("--method", default="U-Net + multi-axis", help="the method of their rows to take")
    p.add_argument("--variant", default="in-plane sigma 0.7", help="the variant of their rows to take")
    add_socpristine_arguments(p)
    p.add_argument("--out", type=Path, default=RESULTS / "interface_errors")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def interface_faces(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``faces[a, b]`` (a < b): neighbouring voxel pairs along z, y and x with labels a and b."""
    counts = np.zeros((n_classes, n_classes), np.int64)
    for axis in range(labels.ndim):
        first = np.moveaxis(labels, axis, 0)
        low, high = first[:-1].astype(np.int64), first[1:].astype(np.int64)
        pair = np.minimum(low, high) * n_classes + np.maximum(low, high)
        counts += np.bincount(pair[low != high], minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    return counts


def wrong_voxels(truth_voxels: float, iou: float, volume_error: float) -> float:
    """A class's wrong voxels (false positives + false negatives) from its label voxels, IoU and
    relative volume error: union = (T + P) / (1 + IoU), wrong = union - intersection."""
    predicted = truth_voxels * (1.0 + volume_error)
    union = (truth_voxels + predicted) / (1.0 + iou)
    return union * (1.0 - iou)


def pair_confusions(wrong: Mapping[str, float]) -> dict[tuple[str, str], float]:
    """Voxels confused between each pair of three classes from each class's wrong voxels: a voxel
    wrong between a and b counts once for a and once for b."""
    total = sum(wrong.values()) / 2.0
    out = {}
    for a, b in PAIRS:
        (other,) = set(PHASES) - {a, b}
        out[(a, b)] = total - wrong[other]
    return out


def iou_from_wrong(truth_voxels: float, wrong: float) -> float:
    """IoU of a class whose ``wrong`` voxels split evenly into false positives and negatives."""
    return (truth_voxels - wrong / 2.0) / (truth_voxels + wrong / 2.0)


def contrast(image: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Interior mean and sd of each phase and the contrast-to-noise ratio of each pair."""
    from scipy import ndimage as ndi

    stats = {}
    for index, name in enumerate(names):
        inside = ndi.binary_erosion(labels == index, iterations=INTERIOR_DISTANCE)
        values = image[inside].astype(np.float64)
        stats[name] = {"mean": float(values.mean()), "sd": float(values.std()), "voxels": int(values.size)}
    pairs = {}
    for a, b in PAIRS:
        pooled = np.sqrt((stats[a]["sd"] ** 2 + stats[b]["sd"] ** 2) / 2.0)
        pairs[f"{a}-{b}"] = abs(stats[b]["mean"] - stats[a]["mean"]) / pooled
    return {"phases": stats, "cnr": pairs}


def fold_rows(record: Mapping[str, Any], method: str, variant: str) -> dict[int, Mapping[str, Any]]:
    rows = {r["fold"]: r for r in record["rows"] if r["method"] == method and r["variant"] == variant}
    if not rows:
        raise SystemExit(f"no rows of method {method!r}, variant {variant!r}")
    return rows


def fold_layout(record: Mapping[str, Any]) -> tuple[int, tuple[float, ...]]:
    """(number of folds, split) of the cross-validation a cv_postprocess record scored, from its
    settings; a record that does not say is refused rather than guessed."""
    import re

    data = record.get("settings", {}).get("data", "")
    found = re.search(r"of (\d+) contiguous z-folds, split \[([^\]]+)\]", data)
    if found is None:
        raise SystemExit(f"settings.data {data!r}: no fold count and split recorded")
    return int(found.group(1)), tuple(float(v) for v in found.group(2).split(","))


def analyse(label: str, scored: Mapping[int, Mapping[str, Any]], truths: Mapping[int, np.ndarray],
            cnr: Mapping[str, float]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per fold and interface, one per fold and phase) and figures for one scores file."""
    rows: list[dict[str, Any]] = []
    per_face: dict[str, list[float]] = {f"{a}-{b}": [] for a, b in PAIRS}
    ni_iou, ni_if_like_pore_ysz, ni_cut = [], [], []
    for fold, row in sorted(scored.items()):
        truth = truths[fold]
        voxels = {name: float((truth == i).sum()) for i, name in enumerate(PHASES)}
        upper = interface_faces(truth, len(PHASES))
        faces = upper + upper.T  # faces[a, b] == faces[b, a]; a row sums to that phase's own faces
        wrong = {name: wrong_voxels(voxels[name], row[f"iou_{name}"], row[f"err.vf.{name}"]) for name in PHASES}
        confused = pair_confusions(wrong)
        rates = {}
        for a, b in PAIRS:
            n_faces = int(faces[PHASES.index(a), PHASES.index(b)])
            rates[(a, b)] = confused[(a, b)] / n_faces
            per_face[f"{a}-{b}"].append(rates[(a, b)])
            rows.append({"scores": label, "fold": fold, "kind": "interface", "name": f"{a}-{b}", "faces": n_faces,
                         "wrong_voxels": confused[(a, b)], "per_face": rates[(a, b)], "cnr": cnr[f"{a}-{b}"]})
        like_pore_ysz = rates[("pore", "ysz")] * faces[PHASES.index("ni")].sum()
        ni_iou.append(row["iou_ni"])
        ni_if_like_pore_ysz.append(iou_from_wrong(voxels["ni"], like_pore_ysz))
        needed = 2.0 * voxels["ni"] * (1.0 - NI_GOAL) / (1.0 + NI_GOAL)
        ni_cut.append(1.0 - needed / wrong["ni"])
        for name in PHASES:
            own_faces = int(faces[PHASES.index(name)].sum())
            rows.append({"scores": label, "fold": fold, "kind": "phase", "name": name, "faces": own_faces,
                         "wrong_voxels": wrong[name], "faces_per_voxel": own_faces / voxels[name],
                         "iou": row[f"iou_{name}"]})

    def mean_sd(values: Sequence[float]) -> dict[str, float]:
        array = np.asarray(values, float)
        return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if array.size > 1 else 0.0}

    figures = {
        # recovered counts of voxels: whole numbers when the rows and the fold's labels belong together
        "max_distance_from_whole": float(max(abs(r["wrong_voxels"] - round(r["wrong_voxels"])) for r in rows)),
        "per_face": {pair: mean_sd(v) for pair, v in per_face.items()},
        "per_face_ratio_to_pore_ysz": {pair: float(np.mean(v) / np.mean(per_face["pore-ysz"])) for pair, v in per_face.items()},
        "iou_ni": mean_sd(ni_iou),
        "iou_ni_if_ni_faces_like_pore_ysz": mean_sd(ni_if_like_pore_ysz),
        "ni_error_cut_for_goal": mean_sd(ni_cut),
        "wrong_voxels": {name: float(sum(r["wrong_voxels"] for r in rows if r["kind"] == "phase" and r["name"] == name))
                         for name in PHASES},
        "faces_per_voxel": {name: mean_sd([r["faces_per_voxel"] for r in rows if r["kind"] == "phase" and r["name"] == name])
                            for name in PHASES},
    }
    return rows, figures


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from accuracy import fold_setting, test_slabs
    from socseg.data.volumes import load_volume

    metadata = run_metadata(__file__, argv)
    records = {path: json.loads(path.read_text()) for path in args.scores}
    scored = {path: fold_rows(record, args.method, args.variant) for path, record in records.items()}
    source = import_socpristine(args.source, args.cache_dir)
    volume = load_volume(source)
    if [n.lower() for n in volume.class_names] != list(PHASES):
        raise SystemExit(f"{source}: phases {volume.class_names}, expected {PHASES}")
    grey = contrast(np.asarray(volume.image), np.asarray(volume.class_index(slice(0, volume.image.shape[0]))), PHASES)
    layouts = {(fold_layout(record)) for record in records.values()}
    if len(layouts) != 1:
        raise SystemExit(f"the scores files come from different cross-validations (folds, split): {sorted(layouts)}")
    n_folds, split = next(iter(layouts))
    folds = {fold for rows in scored.values() for fold in rows}
    truths = {}
    for fold in sorted(folds):
        with tempfile.TemporaryDirectory(prefix="socseg-interface-errors-") as tmp:
            slab = test_slabs(fold_setting(source, args.cache_dir, n_folds, fold - 1, list(split), Path(tmp)))[0]
            truths[fold] = np.asarray(slab.targets("phases"))
    rows: list[dict[str, Any]] = []
    figures: dict[str, Any] = {"cnr": grey["cnr"], "grey": grey["phases"]}
    for path in args.scores:
        label = path.parent.name
        found, figures[label] = analyse(label, scored[path], truths, grey["cnr"])
        rows += found
    settings = {
        "scores": ", ".join(str(p) for p in args.scores),
        "rows": f"method {args.method!r}, variant {args.variant!r}, each fold's held-out fold",
        "faces": "neighbouring voxel pairs along z, y and x with two different labels, per held-out fold",
        "contrast": f"interior (>= {INTERIOR_DISTANCE} voxels from another phase) grey means and sds, all slices",
        "goal": f"Ni IoU {NI_GOAL}",
        **({"note": args.note} if args.note else {}),
    }
    columns = [("scores", "scores"), ("fold", "fold", "d"), ("kind", "kind"), ("name", "interface / phase"),
               ("faces", "faces", "d"), ("wrong_voxels", "wrong voxels", ",.0f"), ("per_face", "errors per face", ".4f"),
               ("cnr", "CNR", ".2f"), ("faces_per_voxel", "faces per voxel", ".4f"), ("iou", "IoU", ".4f")]
    notes = ["Wrong voxels of an interface: voxels the model gave one of its two phases where the labels have the other, "
             "recovered from the recorded per-class IoU and volume-fraction errors. Errors per face: those over the "
             "labels' faces of that interface. CNR: contrast-to-noise ratio of the two phases' grey values."]
    json_path, md_path = write_result(args.out, "interface_errors", "Errors per face of each interface, cross-validated",
                                      metadata, settings, figures, columns, rows, notes)
    print(f"wrote {json_path} and {md_path}", flush=True)


if __name__ == "__main__":
    main()
