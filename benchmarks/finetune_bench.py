"""Fine-tuning on a few labelled slices of a new scan, against the base model and a random forest.

    python benchmarks/finetune_bench.py --model-uri MODEL_URI [--split 0.6,0.1,0.3,8] \
        [--set finetune.epochs=5 ...] [--out benchmarks/results/finetune]

The "new scan" is the SOCPristine volume transformed as a whole (``--new-scan``, default: gamma
0.5, then Gaussian blur sigma 2, then noise at 4x the native level, with the transforms of
``normalisation_bench.py``: another beamtime's contrast, resolution and dose). The first ten
slices of its test slab are the annotator's pool; after a gap, the rest of the test slab is
scored, with the one scorer (``score_slabs`` / ``slab_confusion``), and never trained on.

The gap leaves at least ``max(c + 2, 2c)`` unused slices between every labelled and every scored
slice, ``c`` being the base model's ``context_slices`` (:func:`pool_and_scored`): a 2.5D model
reads ``c`` neighbours on each side, so a scored slice next to a labelled one would be scored on
grey values the fine-tune trained on (neighbouring PXCT slices are near-copies: the leak the slab
split exists to stop). A split that leaves no slice to score is refused.

For 1, 3 and 10 labelled slices, and for 3 slices of which only 10 % of the pixels are labelled
(random 24-pixel squares, the rest ``IGNORE``, as a user's painted regions), the script scores:

- the base model as is (``--model-uri``, e.g. the champion; no fine-tuning), and for a fixed-mode
  model also with the scan's grey range mapped onto its own (``socseg segment --grey-range``);
- ``socseg.training.finetune.finetune`` from it on those pixels (params.yaml's ``finetune.*``,
  ``--set`` overrides; ``finetune.test_fraction`` 0: every labelled slice trains, the score is on
  the other slices);
- ``RandomForestBaseline`` (ilastik-like features, 100 trees) trained on the same labelled pixels.

Writes ``finetune.json`` / ``finetune.md`` / ``finetune.png`` (IoU vs labelled slices) into --out
and logs the table, the curve and the settings to one MLflow run (experiment
``socseg-finetune-bench``); each fine-tune is an MLflow run of its own, with the base model as lineage.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, add_socpristine_arguments, floats, import_socpristine, run_metadata, write_result  # noqa: E402

NEW_SCANS = {  # name -> (gamma, blur sigma, noise x native): another beamtime's contrast, resolution and dose
    "gamma 0.5 + blur 2 + noise 4x": (0.5, 2.0, 4.0),
    "gamma 0.7 + blur 1 + noise 2x": (0.7, 1.0, 2.0),
}
PARTIAL_FRACTION = 0.10  # of the pixels of each partially labelled slice
SQUARE = 24  # side of one painted square (pixels)


def new_scan(image: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """``image`` as the new scan ``name`` (:data:`NEW_SCANS`): gamma, then blur, then noise."""
    from normalisation_bench import add_noise, blur, gamma

    exponent, sigma, noise = NEW_SCANS[name]
    return add_noise(blur(gamma(image, exponent), sigma), noise, seed)


def painted_mask(shape: tuple[int, int], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Random ``SQUARE``-pixel squares until ``fraction`` of the slice is covered (overlaps allowed)."""
    mask = np.zeros(shape, bool)
    while mask.mean() < fraction:
        y, x = rng.integers(0, shape[0] - SQUARE), rng.integers(0, shape[1] - SQUARE)
        mask[y : y + SQUARE, x : x + SQUARE] = True
    return mask


def min_gap(context_slices: int) -> int:
    """Unused slices between the labelled pool and the scored slices, at least: ``c + 2`` (no labelled
    slice inside a scored slice's context window, with two to spare, as the slab split asks) and
    ``2c`` (no grey slice read by both a labelled and a scored slice's window)."""
    return max(context_slices + 2, 2 * context_slices)


def pool_and_scored(start: int, stop: int, pool_size: int, context_slices: int) -> tuple[list[int], int, list[int]]:
    """Test slab ``[start, stop)`` -> (labelled pool, gap, scored slices).

    The pool is the slab's first ``pool_size`` slices (one contiguous part, as an annotator labels
    a stretch of a scan); ``gap`` unused slices follow (:func:`min_gap`); the rest is scored.
    Raises ValueError when no slice is left to score.
    """
    if pool_size < 3:
        raise ValueError(f"--pool {pool_size}: the labelled sets need a pool of at least 3 slices")
    gap = min_gap(context_slices)
    pool = list(range(start, start + pool_size))
    scored = list(range(pool[-1] + gap + 1, stop))
    if not scored:
        raise ValueError(
            f"no slice left to score: the test slab z {start}-{stop - 1} ({stop - start} slices) holds the pool of "
            f"{pool_size} and a gap of {gap} (context_slices {context_slices}) but nothing after them; "
            f"lower --pool or give the test slab more slices (--split)")
    return pool, gap, scored


def settings_to_run(pool: Sequence[int]) -> list[dict[str, Any]]:
    """The labelled sets: 1, 3 and 10 whole slices from the pool, and 3 slices 10 % painted."""
    pool = list(pool)
    three = [pool[1], pool[len(pool) // 2], pool[-2]]
    return [
        {"setting": "1 slice", "slices": [pool[len(pool) // 2]], "partial": False},
        {"setting": "3 slices", "slices": three, "partial": False},
        {"setting": "10 slices", "slices": pool, "partial": False},
        {"setting": f"3 slices, {PARTIAL_FRACTION:.0%} of pixels", "slices": three, "partial": True},
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", required=True, help="the base model (a socseg ni model: runs:/, models:/)")
    p.add_argument("--new-scan", choices=list(NEW_SCANS), default=next(iter(NEW_SCANS)))
    p.add_argument("--split", type=lambda t: floats(t, 4), default=[0.6, 0.1, 0.3, 8], metavar="TRAIN,VAL,TEST,GAP")
    p.add_argument("--pool", type=int, default=10,
                   help="labelled-slice pool: the first POOL slices of the test slab (the rest, after a gap, is scored)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="params override for the fine-tunes, e.g. finetune.epochs=10 (repeatable)")
    p.add_argument("--forest-trees", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    add_socpristine_arguments(p)
    p.add_argument("--experiment", default="socseg-finetune-bench")
    p.add_argument("--out", type=Path, default=RESULTS / "finetune")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def plot_curve(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    styles = {"fine-tuned U-Net": ("C0", "o"), "random forest": ("C1", "s")}
    for method, (colour, marker) in styles.items():
        whole = sorted((r["labelled_slices"], r["iou_ni"]) for r in rows if r["method"] == method and not r["partial"])
        partial = [(r["labelled_slices"], r["iou_ni"]) for r in rows if r["method"] == method and r["partial"]]
        ax.plot(*zip(*whole), color=colour, marker=marker, label=f"{method}, whole slices")
        if partial:
            ax.plot(*zip(*partial), color=colour, marker=marker, markerfacecolor="none", linestyle="none",
                    markersize=9, label=f"{method}, {PARTIAL_FRACTION:.0%} of pixels")
    for method, style in (("base model", "--"), ("base model, grey range mapped", ":")):
        for row in (r for r in rows if r["method"] == method):
            ax.axhline(row["iou_ni"], color="grey", linestyle=style, label=f"{method}, no fine-tuning")
    ax.set_xscale("log")
    ax.set_xticks([1, 3, 10], ["1", "3", "10"])
    ax.set_xlabel("labelled slices of the new scan")
    ax.set_ylabel("Ni IoU on the other test slices")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mlflow
    import yaml

    from socseg.data.prepare import Slab
    from socseg.data.sparse import sparse_volume
    from socseg.data.split import slab_split
    from socseg.data.volumes import Volume, VolumeMeta, load_volume
    from socseg.inference.evaluate import score_slabs, slab_confusion
    from socseg.inference.predictor import Predictor
    from socseg.inference.request import InferenceOptions
    from socseg.model.baselines import RandomForestBaseline
    from socseg.model.metrics import segmentation_scores
    from socseg.params import load_params, set_dotted
    from socseg.training.finetune import finetune

    metadata = run_metadata(__file__, argv)
    params = load_params(REPO / "params.yaml")
    overrides = ["finetune.test_fraction=0", *args.set]
    for item in overrides:
        key, _, value = item.partition("=")
        set_dotted(params, key, yaml.safe_load(value))
    params["mlflow"]["tracking_uri"] = mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI: the base model's store

    original = load_volume(import_socpristine(args.source, args.cache_dir))
    image = new_scan(original.image, args.new_scan, args.seed)
    train, val, test, gap = args.split
    start, stop = slab_split(original.image.shape[0], train, val, test, int(gap)).test
    base_predictor = Predictor.load(args.model_uri)
    context = base_predictor.context_slices
    try:
        pool, pool_gap, scored = pool_and_scored(start, stop, args.pool, context)
    except ValueError as error:
        raise SystemExit(f"finetune_bench: {error}") from None
    meta = VolumeMeta(**{**original.meta.__dict__, "name": "socpristine-new-scan", "image_dtype": image.dtype.name,
                         "checksums": {}})
    scan = Volume(image, original.labels, meta)
    scoring_slab = Slab(scan, (scored[0], stop))  # context slices are read from the gap, never from the pool

    def model_row(setting: dict[str, Any], method: str, model_uri: str, seconds: float, pixels: int,
                  grey_range: tuple[float, float] | None = None) -> dict[str, Any]:
        options = InferenceOptions(tta=False, grey_range=grey_range)
        scores = score_slabs(Predictor.load(model_uri), [scoring_slab], "ni", options=options).scores
        return {"setting": setting["setting"], "method": method, "labelled_slices": len(setting["slices"]),
                "labelled_z": list(setting["slices"]), "partial": setting["partial"], "labelled_pixels": pixels,
                "iou_ni": scores["iou_ni"], "mean_iou": scores["mean_iou"], "train_s": seconds, "model_uri": model_uri}

    def progress(row: dict[str, Any]) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {row['setting']:26s} {row['method']:18s} IoU Ni {row['iou_ni']:.4f} "
              f"({row['labelled_pixels']} labelled px, {row['train_s']:.0f} s)", flush=True)

    rows: list[dict[str, Any]] = []
    base = {"setting": "none", "slices": [], "partial": False}
    rows.append(model_row(base, "base model", args.model_uri, 0.0, 0))
    progress(rows[-1])
    if base_predictor.config.normalisation.source_range(image) is None:  # a fixed model: what a user tries first,
        # --grey-range, the scan's range mapped
        rows.append(model_row(base, "base model, grey range mapped", args.model_uri, 0.0, 0,
                              grey_range=base_predictor.config.normalisation.estimate_range(image)))
        progress(rows[-1])
    rng = np.random.default_rng(args.seed)
    for setting in settings_to_run(pool):
        ignore_value = int(params["finetune"]["ignore_value"])
        labels = np.full(original.labels.shape, ignore_value, dtype=np.uint8)  # unlabelled everywhere ...
        for z in setting["slices"]:  # ... but on the labelled slices (or their painted squares)
            keep = painted_mask(labels.shape[1:], PARTIAL_FRACTION, rng) if setting["partial"] else np.ones(labels.shape[1:], bool)
            labels[z][keep] = original.labels[z][keep]
        sparse = sparse_volume(Volume(image, labels, meta), ignore_value, setting["slices"])
        pixels = sum(sparse.labelled_pixels(z) for z in setting["slices"])

        began = time.perf_counter()
        tuned = finetune(
            params, args.model_uri, sparse, labelled=setting["slices"], ignore_value=ignore_value, register=False,
            run_name=f"finetune-bench {setting['setting']}")
        rows.append(model_row(setting, "fine-tuned U-Net", tuned.model_uri, time.perf_counter() - began, pixels))
        progress(rows[-1])

        began = time.perf_counter()
        slabs = [Slab(sparse, (z, z + 1)) for z in setting["slices"]]
        forest = RandomForestBaseline(n_estimators=args.forest_trees, seed=args.seed).fit(
            [np.asarray(image[z : z + 1], np.float32) for z in setting["slices"]], [s.targets("ni") for s in slabs])
        train_s = time.perf_counter() - began
        cm = np.zeros((2, 2), np.int64)
        for z in scored:
            cm += slab_confusion(scoring_slab, forest.predict(np.asarray(image[z : z + 1], np.float32)), "ni", z)
        scores = segmentation_scores(cm, ["rest", "ni"])
        rows.append({"setting": setting["setting"], "method": "random forest", "labelled_slices": len(setting["slices"]),
                     "labelled_z": list(setting["slices"]), "partial": setting["partial"], "labelled_pixels": pixels, "iou_ni": scores["iou_ni"],
                     "mean_iou": scores["mean_iou"], "train_s": train_s, "model_uri": ""})
        progress(rows[-1])

    figures = {"base_iou_ni": rows[0]["iou_ni"]}
    for row in rows[1:]:
        if row["method"].startswith("base"):
            figures["base_mapped_iou_ni"] = row["iou_ni"]
            continue
        key = f"{row['method'].split()[0].replace('-', '_')}_{row['setting'].split(',')[0].replace(' ', '_')}"
        figures[key + ("_partial" if row["partial"] else "") + "_iou_ni"] = row["iou_ni"]
    settings = {
        "new scan": f"SOCPristine transformed: {args.new_scan} (seed {args.seed})",
        "labelled pool": f"z {pool[0]}-{pool[-1]}: the first {len(pool)} slices of the test slab z {start}-{stop - 1}",
        "gap": f"{pool_gap} unused slices (z {pool[-1] + 1}-{scored[0] - 1}) between the labelled and the scored "
               f"slices: at least context_slices + 2, and no slice read by both (base model context_slices "
               f"{context}; max(c + 2, 2c))",
        "scored": f"{len(scored)} slices z {scored[0]}-{scored[-1]}, never trained on",
        "scored_z_range": [scored[0], scored[-1]],
        "base model": args.model_uri,
        "fine-tune": ", ".join(f"{k} {v}" for k, v in params["finetune"].items()),
        "forest": f"RandomForestBaseline, {args.forest_trees} trees, the same labelled pixels",
        "overrides": ", ".join(overrides),
    }
    if args.note:
        settings["note"] = args.note
    columns = [("setting", "labelled"), ("method", "method"), ("labelled_pixels", "labelled pixels", ",d"),
               ("iou_ni", "IoU Ni", ".4f"), ("mean_iou", "mean IoU", ".4f"), ("train_s", "train (s)", ".0f")]
    json_path, md_path = write_result(args.out, "finetune", "Fine-tuning on a few labelled slices of a new scan",
                                      metadata, settings, figures, columns, rows)
    png = args.out / "finetune.png"
    plot_curve(rows, png, f"new scan: {args.new_scan}")
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name=f"finetune-bench {args.new_scan}"):
        mlflow.log_params({k: str(v)[:500] for k, v in settings.items()})
        mlflow.log_metrics(figures)
        for path in (json_path, md_path, png):
            mlflow.log_artifact(str(path), "finetune_bench")
    print(f"wrote {json_path}, {md_path} and {png}")


if __name__ == "__main__":
    main()
