"""Does the uncertainty map point at the errors? Per-slice and per-pixel, on the SOCPristine test slab.

    python benchmarks/uncertainty_bench.py --model-uri MODEL_URI [--split 0.6,0.1,0.3,8] \
        [--out benchmarks/results/uncertainty]

``socseg suggest-slices`` ranks slices by mean uncertainty (normalised entropy of the class
probabilities, :mod:`socseg.analysis.uncertainty`) so that a user labels the slices where the
model is wrong. This measures whether that holds, on the original test slab and on the "new
scan" copy of ``finetune_bench.py`` (where fine-tuning would start):

- per slice: Pearson and Spearman correlation between the slice's mean uncertainty and its error
  rate (misclassified labelled pixels), and how many of the ``--top`` most uncertain slices are
  among the ``--top`` slices with the most errors;
- per pixel: the error rate among the 5 % most uncertain pixels against the overall error rate,
  and the ROC AUC of uncertainty as a detector of misclassified pixels.

The predictor runs as ``socseg segment`` does (the model's window, no TTA, context from the whole
stack, a per_volume model's range from the whole copy). Writes ``uncertainty.json`` /
``uncertainty.md`` / ``uncertainty.png`` (scatter per slice) into --out.
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

from _common import RESULTS, add_socpristine_arguments, floats, import_socpristine, run_metadata, write_result  # noqa: E402

PIXEL_SAMPLE = 400_000  # pixels drawn (evenly) for the ROC AUC
TOP_PIXEL_FRACTION = 0.05


def slice_statistics(predictor: Any, image: np.ndarray, labels_volume: Any, z_range: tuple[int, int]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per slice of ``z_range``: mean uncertainty and error rate; and a pixel sample of
    (uncertainty, wrong) for the pixel-level figures."""
    from socseg.analysis.uncertainty import uncertainty
    from socseg.data.context import iter_chunks
    from socseg.data.prepare import Slab
    from socseg.inference.request import InferenceOptions

    start, stop = z_range
    request = predictor.request(InferenceOptions(tta=False), source=image, check_range=False)
    targets = Slab(labels_volume, z_range).targets(predictor.config.task)
    step = max(1, targets.size // PIXEL_SAMPLE)
    means, errors, pixel_u, pixel_wrong = [], [], [], []
    for piece in iter_chunks(image.shape[0], request.chunk_slices(8), request.context(predictor.context_slices), start, stop):
        probs = predictor.probabilities(np.asarray(image[piece.read]), piece.before, piece.after, request)
        unsure = uncertainty(probs)
        wrong = predictor.to_classes(probs) != targets[piece.start - start : piece.stop - start]
        means.extend(unsure.reshape(len(unsure), -1).mean(axis=1).tolist())
        errors.extend(wrong.reshape(len(wrong), -1).mean(axis=1).tolist())
        pixel_u.append(unsure.reshape(-1)[::step])
        pixel_wrong.append(wrong.reshape(-1)[::step])
    return np.array(means), np.array(errors), np.concatenate(pixel_u), np.concatenate(pixel_wrong)


def figures_for(means: np.ndarray, errors: np.ndarray, pixel_u: np.ndarray, pixel_wrong: np.ndarray,
                top: int) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import roc_auc_score

    most_unsure = set(np.argsort(-means)[:top].tolist())
    most_wrong = set(np.argsort(-errors)[:top].tolist())
    cut = np.quantile(pixel_u, 1.0 - TOP_PIXEL_FRACTION)
    return {
        "pearson_r": float(pearsonr(means, errors)[0]),
        "spearman_rho": float(spearmanr(means, errors)[0]),
        "top_overlap": float(len(most_unsure & most_wrong)),
        "error_top_uncertain_slices": float(errors[sorted(most_unsure)].mean()),
        "error_all_slices": float(errors.mean()),
        "pixel_error_rate": float(pixel_wrong.mean()),
        "pixel_error_rate_top5pct_uncertain": float(pixel_wrong[pixel_u >= cut].mean()),
        "pixel_roc_auc": float(roc_auc_score(pixel_wrong, pixel_u)) if 0 < pixel_wrong.mean() < 1 else float("nan"),
    }


def plot(points: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 4.0), dpi=120)
    for k, (name, (means, errors)) in enumerate(points.items()):
        ax.scatter(means, 100 * errors, s=12, color=f"C{k}", label=name)
    ax.set_xlabel("mean uncertainty of the slice (normalised entropy)")
    ax.set_ylabel("misclassified pixels of the slice (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from finetune_bench import NEW_SCANS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", required=True)
    p.add_argument("--new-scan", choices=list(NEW_SCANS), default=next(iter(NEW_SCANS)))
    p.add_argument("--split", type=lambda t: floats(t, 4), default=[0.6, 0.1, 0.3, 8], metavar="TRAIN,VAL,TEST,GAP")
    p.add_argument("--top", type=int, default=5, help="how many slices a user would label next")
    p.add_argument("--seed", type=int, default=0)
    add_socpristine_arguments(p)
    p.add_argument("--out", type=Path, default=RESULTS / "uncertainty")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from finetune_bench import new_scan

    from socseg.data.split import slab_split
    from socseg.data.volumes import load_volume
    from socseg.inference.predictor import Predictor

    metadata = run_metadata(__file__, argv)
    volume = load_volume(import_socpristine(args.source, args.cache_dir))
    train, val, test, gap = args.split
    z_range = slab_split(volume.image.shape[0], train, val, test, int(gap)).test
    predictor = Predictor.load(args.model_uri)
    copies = {"original": volume.image, f"new scan ({args.new_scan})": new_scan(volume.image, args.new_scan, args.seed)}
    rows: list[dict[str, Any]] = []
    points: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, image in copies.items():
        means, errors, pixel_u, pixel_wrong = slice_statistics(predictor, image, volume, z_range)
        points[name] = (means, errors)
        rows.append({"copy": name, "slices": len(means), **figures_for(means, errors, pixel_u, pixel_wrong, args.top)})
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {rows[-1]}", flush=True)
    settings = {"data": f"SOCPristine test slab z {z_range[0]}-{z_range[1] - 1} (split {args.split}), 501x501",
                "model": args.model_uri, "uncertainty": "normalised entropy, no TTA, the model's window",
                "top": f"{args.top} slices; pixel figures on {TOP_PIXEL_FRACTION:.0%} most uncertain of an even sample"}
    if args.note:
        settings["note"] = args.note
    columns = [("copy", "test slab"), ("pearson_r", "Pearson r (slice)", ".3f"), ("spearman_rho", "Spearman rho (slice)", ".3f"),
               ("top_overlap", f"top-{args.top} overlap", ".0f"),
               ("error_top_uncertain_slices", f"error, {args.top} most uncertain slices", ".4f"),
               ("error_all_slices", "error, all slices", ".4f"),
               ("pixel_error_rate_top5pct_uncertain", "error, 5% most uncertain pixels", ".4f"),
               ("pixel_error_rate", "error, all pixels", ".4f"), ("pixel_roc_auc", "pixel ROC AUC", ".3f")]
    figures = {f"{k}_{'original' if i == 0 else 'new_scan'}": v for i, row in enumerate(rows)
               for k, v in row.items() if isinstance(v, float)}
    json_path, md_path = write_result(args.out, "uncertainty", "Uncertainty against errors on the test slab",
                                      metadata, settings, figures, columns, rows)
    plot(points, args.out / "uncertainty.png")
    print(f"wrote {json_path}, {md_path} and {args.out / 'uncertainty.png'}")


if __name__ == "__main__":
    main()
