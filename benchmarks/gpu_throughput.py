"""Throughput of the U-Nets against the card's limit: training and inference tiles/s, whole slices/s.

    KERAS_BACKEND=jax python benchmarks/gpu_throughput.py [--encoders unet,vgg16,resnet50]
        [--batch 64] [--tile 128] [--slice 512] [--precision mixed_bfloat16] [--peak-tflops 989]

For each encoder (socseg.model.unet.build_model, random weights: speed does not depend on them):
training tiles/s (``train_on_batch`` with the socseg loss, after warm-up and compilation),
inference tiles/s (``predict_on_batch``, the batch the predictor sends) and whole-slice slices/s
(one ``--slice``-square slice per forward pass: each pixel once, no overlap). The forward FLOPs per
tile are counted from the layers (2 x multiply-adds of every convolution and dense layer; training
~3x forward), so each figure is also given as a fraction of the card's dense bf16 peak
(``--peak-tflops``; known cards are recognised by name). Writes
``benchmarks/results/<out>/throughput.{json,md}`` with the command, commit and hardware.

On a GPU machine without TensorFlow: ``bash benchmarks/gpu_throughput.sh`` (carries keras).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, run_metadata, write_result  # noqa: E402

# Dense bf16 tensor-core peak (TFLOP/s, without sparsity) by the name the driver reports.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
COLUMNS = [("encoder", "encoder"), ("train_tiles_s", "train tiles/s", ",.0f"), ("train_peak", "train % of peak", ".1%"),
           ("infer_tiles_s", "inference tiles/s", ",.0f"), ("infer_peak", "inference % of peak", ".1%"),
           ("slices_s", "whole slices/s", ",.1f"), ("gflops_tile", "GFLOP / tile (fwd)", ".2f"),
           ("params_m", "params (M)", ".1f")]


def forward_flops(model: Any, batch: int = 1) -> float:
    """FLOPs of one forward pass: 2 x multiply-adds of every Conv2D, Conv2DTranspose and Dense
    layer (nested models included), from the layers' built input and output shapes."""
    import keras

    total = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += forward_flops(layer, 1)
            continue
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)):
            kh, kw = layer.kernel_size
            cin = int(layer.input.shape[-1])
            if isinstance(layer, keras.layers.Conv2DTranspose):
                h, w = layer.input.shape[1:3]  # each input pixel scatters a kernel
            else:
                h, w = layer.output.shape[1:3]
            total += 2.0 * kh * kw * cin * layer.filters * int(h) * int(w)
        elif isinstance(layer, keras.layers.Dense):
            positions = int(np.prod([d for d in layer.input.shape[1:-1]] or [1]))
            total += 2.0 * int(layer.input.shape[-1]) * layer.units * positions
    return total * batch


def fixed_size(model: Any, size: int) -> Any:
    """A copy of ``model`` whose inputs (nested models' too) are ``size`` x ``size``, so every
    layer has concrete shapes to count FLOPs on (the U-Nets take any slice size)."""
    import keras

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("class_name") == "InputLayer":
                shape = list(node["config"]["batch_shape"])
                node["config"]["batch_shape"] = [shape[0], size, size, *shape[3:]]
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    return model.__class__.from_config(fix(model.get_config()))


def card() -> tuple[str, float | None]:
    """The accelerator's name and its dense bf16 peak, where known."""
    from socseg.training.runtime import accelerator

    name = accelerator()
    peak = next((p for key, p in PEAK_BF16_TFLOPS.items() if key in name), None)
    return name, peak


def _rate(step, n_items: int, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        out = step()
    np.asarray(out if not isinstance(out, (list, tuple, dict)) else 0)  # wait for the device
    return n_items * steps / (time.perf_counter() - started)


def measure(encoder: str, args: argparse.Namespace) -> dict[str, Any]:
    import keras

    from socseg.model.losses import get_loss
    from socseg.model.unet import build_model

    keras.utils.set_random_seed(0)
    model = build_model(encoder, "phases", n_classes=3, encoder_weights="none", base_filters=args.base_filters)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=get_loss("ce", "phases"))
    rng = np.random.default_rng(0)
    tiles = rng.random((args.batch, args.tile, args.tile, 1), dtype=np.float32)
    targets = rng.integers(0, 3, (args.batch, args.tile, args.tile)).astype(np.uint8)
    train = _rate(lambda: model.train_on_batch(tiles, targets), args.batch, args.steps, args.warmup)
    infer = _rate(lambda: model.predict_on_batch(tiles), args.batch, args.steps, args.warmup)
    whole = rng.random((1, args.slice, args.slice, 1), dtype=np.float32)
    slices = _rate(lambda: model.predict_on_batch(whole), 1, args.steps, args.warmup)
    flops = forward_flops(fixed_size(model, args.tile))
    row = {"encoder": encoder, "train_tiles_s": train, "infer_tiles_s": infer, "slices_s": slices,
           "gflops_tile": flops / 1e9, "params_m": model.count_params() / 1e6}
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
        row["train_peak"] = 3 * flops * train / peak
        row["infer_peak"] = flops * infer / peak
    print(row, flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", default="unet,vgg16,resnet50")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--slice", type=int, default=512)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="mixed_bfloat16", help="float32 | mixed_bfloat16 | mixed_float16")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card (default: by name)")
    parser.add_argument("--out", default="gpu_throughput")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    metadata = run_metadata(__file__, argv)

    import keras

    from socseg.training.runtime import set_precision

    set_precision(args.precision)
    name, known_peak = card()
    args.peak_tflops = args.peak_tflops or known_peak
    rows = [measure(encoder, args) for encoder in args.encoders.split(",")]
    settings = {"card": name, "backend": keras.backend.backend(), "precision": args.precision, "batch": args.batch,
                "tile": args.tile, "whole slice": args.slice, "steps": args.steps, "warm-up steps": args.warmup,
                "peak bf16 TFLOP/s": args.peak_tflops, "note": args.note,
                "FLOPs": "2 x multiply-adds of conv/dense layers per forward pass; training counted as 3x forward"}
    write_result(RESULTS / args.out, "throughput", "U-Net throughput against the card's limit", metadata, settings,
                 figures={r["encoder"]: {k: v for k, v in r.items() if k != "encoder"} for r in rows},
                 columns=COLUMNS, rows=rows)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
