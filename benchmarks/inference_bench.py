"""Inference speed against accuracy: sliding window vs whole-slice passes, next to the random forest.

    python benchmarks/inference_bench.py --models benchmarks/results/inference_models/accuracy.csv \
        [--split 0.6,0.1,0.3,8] [--windows sliding:0.5,sliding:0.75,sliding:1.0,whole_slice] [--quickstart]

The U-Nets are the ones ``benchmarks/accuracy.py`` trained and logged (their ``model_uri`` column in
its CSV; the same ``--split``, so the same test slab). In one run, on the same SOCPristine test
slices (501x501): each model through its predictor (``socseg.inference.evaluate.score_slabs``,
the scoring path of the evaluate stage, no TTA) with every ``--windows`` setting, and an
ilastik-style random forest trained here on the same training slab: IoU and slices/s of
prediction (the forest: feature filters + trees; the U-Nets: normalisation + network + blending;
neither counts reading). Each setting is warmed up on two slices first (graph tracing is not
inference). ``--quickstart`` also trains the README quick-start model (one VGG16 run, 3 epochs x
15 steps, on the built-in sample) and times ``socseg segment`` of the 48x192x192 sample after
model load. Writes ``inference.json`` and ``inference.md`` into ``--out``.

Precision: a logged model computes in the dtype policy it was trained with (``train.precision``;
``auto`` is bf16 on a CPU with AVX512-BF16 or AMX), whatever CPU loads it: the layers' policies
are saved in the .keras file. On a CPU without native bf16 (``ONEDNN_MAX_CPU_ISA=AVX2`` on this
one, or an AVX2 laptop) that bf16 is emulated. ``--precisions as_trained,float32`` scores the
model as it loads and also the same weights computing in float32 (what ``auto`` trains on such a
CPU); every U-Net row records the policy its layers computed in (``compute_dtype``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, floats, import_socpristine, run_metadata, write_result  # noqa: E402

from socseg.model.precision import float32_network  # noqa: E402


def parse_windows(text: str) -> list[dict[str, Any]]:
    """``sliding:0.5,whole_slice`` -> per-call predictor settings."""
    from socseg.params import WINDOWS

    out = []
    for item in text.split(","):
        name, _, step = item.strip().partition(":")
        if name not in WINDOWS:
            raise argparse.ArgumentTypeError(f"unknown window {name!r}: use {', '.join(WINDOWS)}")
        out.append({"window": name, "step_fraction": float(step) if step else None})
    return out


PRECISION_CHOICES = ("as_trained", "float32")


def parse_precisions(text: str) -> list[str]:
    """``as_trained,float32`` -> the compute precisions each U-Net is scored in."""
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in chosen if item not in PRECISION_CHOICES]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"unknown precision(s) {bad or text!r}: use {', '.join(PRECISION_CHOICES)}")
    return chosen


def compute_dtypes(network: Any) -> str:
    """The dtype policies the network's weighted layers compute in (nested models walked), e.g.
    ``mixed_bfloat16``: the precision a loaded model really runs in."""
    names: set[str] = set()

    def walk(model: Any) -> None:
        for layer in model.layers:
            if hasattr(layer, "layers"):
                walk(layer)
            elif layer.weights:
                names.add(layer.dtype_policy.name)

    walk(network)
    return ", ".join(sorted(names)) or "none"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True, help="accuracy.py CSV: U-Net rows with a model_uri")
    p.add_argument("--split", type=lambda t: floats(t, 4), default=[0.6, 0.1, 0.3, 8], metavar="TRAIN,VAL,TEST,GAP",
                   help="the split the models were trained with (their test slab is scored)")
    p.add_argument("--source", type=Path, default=Path(os.environ.get("SOCSEG_SHARED_DATA", REPO.parent / "shared/data/socpristine")))
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("SOCSEG_CACHE", Path.home() / ".cache/socseg")) / "accuracy")
    p.add_argument("--windows", type=parse_windows, default=parse_windows("sliding:0.5,sliding:0.75,sliding:1.0,whole_slice"))
    p.add_argument("--precisions", type=parse_precisions, default=["as_trained"],
                   help="comma list: as_trained (the logged model as it loads) and/or float32 (the same weights "
                        "computing in float32)")
    p.add_argument("--test-slices", type=int, default=0, help="score only the first N test slices (0: all)")
    p.add_argument("--rf-trees", type=int, default=100)
    p.add_argument("--rf-samples", type=int, default=150_000)
    p.add_argument("--rf-jobs", type=int, default=2)
    p.add_argument("--quickstart", action="store_true", help="also time socseg segment of the sample with the quick-start model")
    p.add_argument("--out", type=Path, default=RESULTS / "inference")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def test_slab(volume_dir: Path, split: Sequence[float], limit: int):
    from socseg.data.prepare import Slab
    from socseg.data.split import slab_split
    from socseg.data.volumes import load_volume

    volume = load_volume(volume_dir)
    train, val, test, gap = split
    s = slab_split(volume.image.shape[0], train, val, test, int(gap))
    start, stop = s.test
    if limit:
        stop = min(stop, start + limit)
    return volume, s, Slab(volume, (start, stop))


def forest_row(volume, split, slab, args) -> dict[str, Any]:
    """The random forest of accuracy.py, trained on the training slab, timed on the test slab."""
    import numpy as np

    from socseg.data.normalise import Normaliser
    from socseg.inference.evaluate import slab_confusion
    from socseg.model.baselines import RandomForestBaseline
    from socseg.model.metrics import segmentation_scores
    from socseg.data.prepare import Slab
    from socseg.params import load_params

    norm = load_params()["normalise"]
    train = Slab(volume, split.train)
    normaliser = Normaliser.fit([volume.image[slice(*split.train)]], norm["low_percentile"], norm["high_percentile"])
    forest = RandomForestBaseline(n_estimators=args.rf_trees, n_samples=args.rf_samples, n_jobs=args.rf_jobs)
    print(f"[{time.strftime('%H:%M:%S')}] training the random forest", flush=True)
    forest.fit([normaliser.apply(volume.image[slice(*split.train)])], [train.targets("ni")])
    forest.predict(normaliser.apply(volume.image[slab.z_range[0] : slab.z_range[0] + 2]))  # warm-up
    started = time.perf_counter()
    predicted = forest.predict(normaliser.apply(volume.image[slice(*slab.z_range)]))
    seconds = time.perf_counter() - started
    scores = segmentation_scores(slab_confusion(slab, predicted, "ni"), ["rest", "ni"])
    return {"model": "random forest (ilastik features)", "window": "-", "iou_ni": scores["iou_ni"],
            "mean_iou": scores["mean_iou"], "seconds": seconds, "slices_per_s": len(predicted) / seconds,
            "settings": f"{args.rf_trees} trees, {args.rf_samples // 1000}k px, n_jobs {args.rf_jobs}"}


def unet_rows(label: str, model_uri: str, slab, windows: list[dict[str, Any]],
              precisions: Sequence[str] = ("as_trained",)) -> list[dict[str, Any]]:
    from socseg.inference.predictor import Predictor

    loaded = Predictor.load(model_uri)
    trained = compute_dtypes(loaded.network)
    rows = []
    for precision in precisions:
        if precision == "as_trained":
            predictor, dtype = loaded, f"{trained} (as trained)"
        else:
            predictor = Predictor(float32_network(loaded.network)[0], loaded.config)
            dtype = f"{compute_dtypes(predictor.network)} (weights of the {trained} model)"
        rows += window_rows(label, model_uri, predictor, slab, windows, dtype)
    return rows


def window_rows(label: str, model_uri: str, predictor, slab, windows: list[dict[str, Any]],
                dtype: str) -> list[dict[str, Any]]:
    """One row per window setting: IoU and slices/s of ``predictor`` on the slab (after a warm-up)."""
    from socseg.data.prepare import Slab
    from socseg.inference.evaluate import score_slabs
    from socseg.inference.request import InferenceOptions

    rows = []
    for settings in windows:
        name = settings["window"] + (f", step {settings['step_fraction']:g}" if settings["step_fraction"] else "")
        row = {"model": label, "window": name, "model_uri": model_uri, "compute_dtype": dtype,
               "settings": f"batch {predictor.config.batch_size} tiles of {predictor.config.tile_size}^2, "
                           f"context {predictor.config.context_slices}"}
        try:
            options = InferenceOptions(tta=False, **settings)
            score_slabs(predictor, [Slab(slab.volume, (slab.z_range[0], slab.z_range[0] + 2))], "ni", options=options)
            evaluation = score_slabs(predictor, [slab], "ni", options=options)
        except Exception as error:  # e.g. a bf16 model under ONEDNN_MAX_CPU_ISA=AVX2: recorded, the others still run
            row.update(iou_ni=None, mean_iou=None, seconds=None, slices_per_s=None, error=failure(error))
            row["settings"] += f"; did not run: {row['error']}"
            print(f"[{time.strftime('%H:%M:%S')}] {label:28s} {name:22s} {dtype.split()[0]:15s} FAILED: {row['error']}",
                  flush=True)
            rows.append(row)
            continue
        row.update(iou_ni=evaluation.scores["iou_ni"], mean_iou=evaluation.scores["mean_iou"], seconds=evaluation.seconds,
                   slices_per_s=evaluation.n_slices / evaluation.seconds)
        rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {label:28s} {name:22s} {dtype.split()[0]:15s} IoU Ni {row['iou_ni']:.4f} "
              f"{row['slices_per_s']:.2f} slices/s", flush=True)
    return rows


def failure(error: Exception) -> str:
    """``Type: the error's first meaningful line`` (TensorFlow's messages run over many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for word in ("exception", "could not", "error") for line in lines if word in line.lower()),
                  lines[0] if lines else "")
    return f"{type(error).__name__}: {detail[:300]}"


def quickstart_row(tmp: Path) -> dict[str, Any]:
    """The README quick start's model (one VGG16 run, 3 x 15 steps, on the sample), then ``socseg
    segment`` of the sample with it: seconds after model load (SegmentResult.seconds)."""
    import mlflow

    from socseg.data.prepare import load_labelled_volumes
    from socseg.inference.segment import segment
    from socseg.params import load_params
    from socseg.training.train import train

    p = load_params()
    p["train"].update(encoder="vgg16", epochs=3)
    p["tiles"]["steps_per_epoch"] = 15
    p["mlflow"]["experiment"] = "socseg-inference-bench"
    volume = load_labelled_volumes(p, ["sample"])[0]
    result = train(p, ["sample"], run_name="quickstart-model")
    image = Path(p["data"]["dir"]) / "sample" / "image.tif"
    mlflow.end_run()
    segmented = segment(result.model_uri, image, tmp / "sample-labels.tif", slice_batch=p["inference"]["slice_batch"],
                        progress=False)
    z, h, w = volume.image.shape
    return {"model": "quick-start VGG16 (3 x 15 steps)", "window": p["inference"]["window"], "seconds": segmented.seconds,
            "slices_per_s": segmented.slices_per_second, "settings": f"socseg segment of the {z}x{h}x{w} sample, after model load",
            "model_uri": result.model_uri}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import pandas as pd

    models = pd.read_csv(args.models)
    models = models[models["model_uri"].notna() & (models["task"] == "ni")]
    if models.empty:
        raise SystemExit(f"{args.models}: no ni-task row with a model_uri")
    volume, split, slab = test_slab(import_socpristine(args.source, args.cache_dir), args.split, args.test_slices)
    metadata = run_metadata(__file__, argv)
    rows = [forest_row(volume, split, slab, args)]
    print(f"[{time.strftime('%H:%M:%S')}] forest: IoU Ni {rows[0]['iou_ni']:.4f} {rows[0]['slices_per_s']:.2f} slices/s", flush=True)
    for _, model in models.iterrows():
        rows += unet_rows(str(model["method"]), str(model["model_uri"]), slab, args.windows, args.precisions)
    if args.quickstart:
        with tempfile.TemporaryDirectory(prefix="socseg-inference-") as tmp:
            rows.append(quickstart_row(Path(tmp)))
    forest = rows[0]["slices_per_s"]
    for row in rows:
        row["x_forest"] = row["slices_per_s"] / forest if row.get("slices_per_s") else None
    settings = {"data": f"SOCPristine test slab z {slab.z_range[0]}-{slab.z_range[1] - 1} (split {args.split}), 501x501",
                "models": str(args.models), "tta": "off", "timing": "prediction only, after a 2-slice warm-up",
                "precisions": ", ".join(args.precisions)
                              + " (as_trained: the dtype policy saved with the model, whatever this CPU does natively)"}
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        settings["isa limit"] = (f"ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}: limits TensorFlow's oneDNN "
                                 "kernels (the U-Nets); the random forest (NumPy, scikit-learn) still uses every "
                                 "instruction of this CPU")
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        settings["onednn"] = ("TF_ENABLE_ONEDNN_OPTS=0: TensorFlow's own (Eigen) kernels instead of oneDNN's, so "
                              "ONEDNN_MAX_CPU_ISA does not apply to them")
    if args.note:
        settings["note"] = args.note
    columns = [("model", "model"), ("window", "window"), ("iou_ni", "IoU Ni", ".4f"), ("mean_iou", "mean IoU", ".4f"),
               ("slices_per_s", "slices/s"), ("x_forest", "x forest"), ("compute_dtype", "computes in"),
               ("settings", "settings")]
    failed = [f"- {r['model']}, {r['window']}, {r['compute_dtype']}: did not run ({r['error']})" for r in rows if r.get("error")]
    json_path, md_path = write_result(args.out, "inference", "Inference: window vs speed, against the random forest",
                                      metadata, settings, {}, columns, rows,
                                      notes=["Settings that failed (kept as rows, no figures):", *failed] if failed else ())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
