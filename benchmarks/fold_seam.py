"""The first z-fold predicted in its cross-validation copy: what the wrong neighbour at the seam cost.

    python benchmarks/fold_seam.py --model models:/<fold-1 model> [--folds 5] [--gap 8] \\
        [--out benchmarks/results/fold_seam]

``benchmarks/accuracy.py --folds`` trains and scores each fold on a reordered copy of the volume
(``fold_order``). Before this script, the first fold's copy was ``after[gap:] + fold``: slice n-1
right before slice 0, so slice 0 read slice n-1 as its 2.5D neighbour, and the y and x planes of
fusion crossed that seam. This script predicts the first fold (a fold-1 model of that benchmark)
three ways, slice by slice (``planes z``) and fused (``zyx``, chunk read with the default halo):

- in that old copy order (``after[gap:] + fold``);
- in the volume's own order (slice 0 at the start: mirror context, as ``socseg segment`` gives);
- in the copy order ``fold_order`` builds now (the volume reversed for the first fold);

and scores each against the manual labels as ``benchmarks/cv_postprocess.py`` does (per-class IoU,
relative errors of the microstructure), plus the pixel accuracy of the fold's first and last slice.
Writes ``fold_seam.json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import RESULTS, add_socpristine_arguments, import_socpristine, run_metadata, write_result  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the 3-phase U-Net trained for the first fold")
    add_socpristine_arguments(p)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--gap", type=int, default=8)
    p.add_argument("--note", default="")
    p.add_argument("--out", type=Path, default=RESULTS / "fold_seam")
    return p.parse_args(argv)


ARRANGEMENTS = {"old_copy": "old copy (slice n-1 before slice 0)", "volume": "volume order",
                "new_copy": "copy of fold_order now"}


def orders(n: int, folds: int, gap: int) -> dict[str, list[int]]:
    """The slice order of each of :data:`ARRANGEMENTS`, by key."""
    from accuracy import fold_bounds, fold_order

    _, stop = fold_bounds(n, folds, 0)
    return {"old_copy": list(range(stop + gap, n)) + list(range(0, stop)), "volume": list(range(n)),
            "new_copy": fold_order(n, folds, 0, gap)[0]}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from accuracy import fold_bounds
    from cv_postprocess import microstructure, scored
    from socseg.data.volumes import load_volume
    from socseg.inference.predictor import load_predictor
    from socseg.inference.request import InferenceOptions

    metadata = run_metadata(__file__, argv)
    source = load_volume(import_socpristine(args.source, args.cache_dir), mmap=True, verify=False)
    image, names = np.asarray(source.image), [n.lower() for n in source.class_names]
    start, stop = fold_bounds(image.shape[0], args.folds, 0)
    truth = source.class_index(slice(start, stop))
    reference = microstructure(truth, names)
    predictor = load_predictor(args.model)
    rows: list[dict[str, Any]] = []
    for key, order in orders(image.shape[0], args.folds, args.gap).items():
        volume = image[order]
        first = min(order.index(z) for z in range(start, stop))  # where the fold begins in this order
        for planes in ("z", "zyx"):
            request = predictor.request(InferenceOptions(planes=planes), source=volume, check_range=False)
            halo = request.context(predictor.config.context_slices)
            lo, hi = max(first - halo, 0), min(first + (stop - start) + halo, volume.shape[0])
            probabilities = predictor.probabilities(volume[lo:hi], first - lo, hi - first - (stop - start), request)
            predicted = predictor.to_classes(probabilities).astype(np.uint8)
            in_volume_order = np.empty_like(predicted)
            in_volume_order[[order[first + k] - start for k in range(stop - start)]] = predicted
            row = {"key": key, "arrangement": ARRANGEMENTS[key], "planes": planes,
                   "neighbour_before_slice_0": _neighbour(order, start),
                   **scored(truth, in_volume_order, names, reference)}
            accuracy_per_slice = (in_volume_order == truth).reshape(stop - start, -1).mean(axis=1)
            row["accuracy_slice_0"], row["accuracy_last_slice"] = float(accuracy_per_slice[0]), float(accuracy_per_slice[-1])
            rows.append(row)
            print(f"{ARRANGEMENTS[key]} {planes}: mean IoU {row['mean_iou']:.4f}, TPB {row['err.tpb.density']:+.2%}, "
                  f"slice 0 accuracy {row['accuracy_slice_0']:.4f}", flush=True)
    figures = {f"{r['key']}_{r['planes']}": {"mean_iou": r["mean_iou"], "tpb_err": r["err.tpb.density"],
                                                           "accuracy_slice_0": r["accuracy_slice_0"]} for r in rows}
    settings = {"model": args.model, "fold": f"1 of {args.folds} (slices {start}-{stop - 1}), gap {args.gap}",
                "prediction": "planes z and zyx; the fold read with the request's context (fusion: its halo) from the arrangement",
                **({"note": args.note} if args.note else {})}
    columns = [("arrangement", "arrangement"), ("planes", "planes"), ("neighbour_before_slice_0", "slice before slice 0"),
               ("mean_iou", "mean IoU", ".4f"), ("err.tpb.density", "TPB", "+.1%"),
               ("err.iface.ysz-ni", "YSZ-Ni interface", "+.1%"), ("accuracy_slice_0", "slice 0 accuracy", ".4f"),
               ("accuracy_last_slice", "last slice accuracy", ".4f")]
    json_path, md_path = write_result(args.out, "fold_seam", "The first z-fold in its cross-validation copy",
                                      metadata, settings, figures, columns, rows)
    print(f"wrote {json_path} and {md_path}")


def _neighbour(order: list[int], z: int) -> str:
    """The slice next to ``z`` in ``order`` on the side away from the rest of its fold."""
    k = order.index(z)
    sides = [order[k - 1] if k > 0 else None, order[k + 1] if k + 1 < len(order) else None]
    outside = [s for s in sides if s != z + 1]
    return "none (mirror)" if not outside or outside[0] is None else str(outside[0])


if __name__ == "__main__":
    main()
