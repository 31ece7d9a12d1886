"""Normalisation against another reconstruction: fixed vs per-volume models on transformed copies of the test slab.

    python benchmarks/normalisation_bench.py --models benchmarks/results/normalisation_models/accuracy.csv \
        [--split 0.6,0.1,0.3,8] [--out benchmarks/results/normalisation]

The models are the ones ``benchmarks/accuracy.py`` trained (its CSV's ``model_uri`` column): one
with ``normalise.mode: fixed`` and one with ``per_volume`` (``--variant``/``--set``), same data and
settings otherwise. The SOCPristine volume is transformed as a whole (the per-volume range is the
whole volume's, as ``socseg segment`` estimates it) and every model is scored on the test slab of
each copy through its predictor (``socseg.inference.evaluate.score_slabs``), labels unchanged:

- original: uint16 as reconstructed;
- linear float32: ``2.5e-5 * x - 0.55`` (a phase reconstruction's scale);
- gamma 0.7: on the volume's own 0..max scale, back to uint16;
- Gaussian blur, sigma 1 voxel (3-D);
- noise 2x: Gaussian noise added so that the noise level is twice the native one (native sigma
  estimated from neighbouring-pixel differences, robust MAD).

A fixed model is also scored with the copy's grey range mapped onto its training range at
inference (``grey_range``, what ``socseg segment --grey-range`` / the request params do), to
separate what the mapping does from what per-volume training does. Writes ``normalisation.json``
and ``normalisation.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import RESULTS, add_socpristine_arguments, floats, import_socpristine, model_rows, run_metadata, write_result  # noqa: E402


def native_noise_sigma(image: np.ndarray) -> float:
    """Noise sigma from horizontal neighbour differences: MAD / 0.6745 / sqrt(2) (edges are outliers)."""
    sample = np.asarray(image[:: max(1, image.shape[0] // 16)], dtype=np.float64)
    diff = np.diff(sample, axis=2).ravel()
    mad = np.median(np.abs(diff - np.median(diff)))
    return float(mad / 0.6745 / np.sqrt(2.0))


def gamma(x: np.ndarray, exponent: float) -> np.ndarray:
    """Gamma on the volume's own 0..max scale, back to uint16 (another contrast curve)."""
    top = float(x.max())
    return np.clip(np.round(top * (x.astype(np.float64) / top) ** exponent), 0, 65535).astype(np.uint16)


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """3-D Gaussian blur (a coarser resolution), back to uint16."""
    from scipy.ndimage import gaussian_filter

    return np.round(gaussian_filter(x.astype(np.float32), sigma)).astype(np.uint16)


def add_noise(x: np.ndarray, factor: float, seed: int = 0) -> np.ndarray:
    """Gaussian noise added so that the noise level is ``factor`` x the native one (a lower dose)."""
    sigma = native_noise_sigma(x) * np.sqrt(factor**2 - 1.0)  # sqrt(native^2 + added^2) = factor x native
    out = x.astype(np.float32) + np.random.default_rng(seed).normal(0.0, sigma, x.shape).astype(np.float32)
    return np.clip(np.round(out), 0, 65535).astype(np.uint16)


def transforms(seed: int = 0) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    return {
        "original (uint16)": lambda x: x,
        "linear float32 (2.5e-5 x - 0.55)": lambda x: (2.5e-5 * x.astype(np.float32) - 0.55).astype(np.float32),
        "gamma 0.7": lambda x: gamma(x, 0.7),
        "Gaussian blur sigma 1": lambda x: blur(x, 1.0),
        "noise 2x native": lambda x: add_noise(x, 2.0, seed),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True, help="accuracy.py CSV: U-Net rows with a model_uri")
    p.add_argument("--split", type=lambda t: floats(t, 4), default=[0.6, 0.1, 0.3, 8], metavar="TRAIN,VAL,TEST,GAP")
    add_socpristine_arguments(p)
    p.add_argument("--out", type=Path, default=RESULTS / "normalisation")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from socseg.data.prepare import Slab
    from socseg.data.split import slab_split
    from socseg.data.volumes import Volume, VolumeMeta, load_volume
    from socseg.inference.evaluate import score_slabs
    from socseg.inference.predictor import Predictor
    from socseg.inference.request import InferenceOptions

    models = model_rows(args.models)
    volume = load_volume(import_socpristine(args.source, args.cache_dir))
    train, val, test, gap = args.split
    z_range = slab_split(volume.image.shape[0], train, val, test, int(gap)).test
    predictors = {str(m["method"]): Predictor.load(str(m["model_uri"])) for _, m in models.iterrows()}
    metadata = run_metadata(__file__, argv)
    rows: list[dict[str, Any]] = []
    for name, transform in transforms().items():
        image = transform(volume.image)
        copy = Volume(image, volume.labels, VolumeMeta(**{**volume.meta.__dict__, "image_dtype": image.dtype.name, "checksums": {}}))
        slab = Slab(copy, z_range)
        for label, predictor in predictors.items():
            normalisation = predictor.config.normalisation
            variants = [(label, InferenceOptions(tta=False))]
            if normalisation.source_range(image) is None:  # a fixed model: also with the volume's range mapped
                variants.append((f"{label}, range mapped at inference",
                                 InferenceOptions(tta=False, grey_range=normalisation.estimate_range(image))))
            for shown, options in variants:
                evaluation = score_slabs(predictor, [slab], "ni", options=options)
                rows.append({"transform": name, "model": shown, "mode": normalisation.mode,
                             "iou_ni": evaluation.scores["iou_ni"], "mean_iou": evaluation.scores["mean_iou"],
                             "grey": f"{float(np.min(image)):.4g}..{float(np.max(image)):.4g} {image.dtype}"})
                print(f"[{time.strftime('%H:%M:%S')}] {name:34s} {shown:50s} IoU Ni {rows[-1]['iou_ni']:.4f}", flush=True)
    settings = {"data": f"SOCPristine test slab z {z_range[0]}-{z_range[1] - 1} (split {args.split}), 501x501",
                "models": str(args.models), "scoring": "score_slabs, no TTA, the model's window"}
    if args.note:
        settings["note"] = args.note
    columns = [("transform", "transform"), ("model", "model"), ("mode", "normalise.mode"), ("iou_ni", "IoU Ni", ".4f"),
               ("mean_iou", "mean IoU", ".4f"), ("grey", "grey values")]
    json_path, md_path = write_result(args.out, "normalisation", "Normalisation: fixed vs per-volume on other reconstructions",
                                      metadata, settings, {}, columns, rows)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
