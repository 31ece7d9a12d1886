"""CPU training throughput per CPU class: tiles/s of the training step users run, and what raises it.

    python benchmarks/train_throughput.py [--models 2p5d,vgg16] [--variants keras,float32,xla,jax]
        [--classes native,avx2] [--steps 20] [--warmup-steps 4] [--slices 40]
        [--out benchmarks/results/train_throughput] [--note TEXT]

Each (CPU class, variant, model) runs in its own process, because the Keras backend and oneDNN's
instruction-set cap are fixed when a process starts. A worker builds the network as ``socseg train``
does for that model (params.yaml's training settings, with the model's encoder and context slices),
compiles it through :func:`socseg.training.trainer.compile_network`, and fits it on
:class:`socseg.data.dataset.RandomCrops` of the first ``--slices`` real SOCPristine slices (Ni task):
one warm-up epoch of ``--warmup-steps`` (tracing, compilation), then one timed epoch of ``--steps``
steps; tiles/s = batch size x steps / that epoch's seconds. Validation is not part of the step.

Models: ``2p5d`` (the README's from-scratch U-Net, 1 neighbour slice per side) and ``vgg16`` (VGG16
encoder from scratch, 2-D). Variants:

- ``keras``: the TensorFlow backend as training runs it (``train.precision: auto``: bf16 where the
  CPU does it natively; no XLA, which Keras leaves off on CPU-only machines);
- ``float32``: the same in float32 (not run under the AVX2 cap beside ``keras``, which trains in
  float32 there);
- ``xla``: TensorFlow with the training step compiled by XLA (``jit_compile=True``);
- ``jax``: the JAX backend (its step is always XLA-compiled); needs ``jax`` installed.

CPU classes: ``native`` (no cap) and ``avx2`` (``ONEDNN_MAX_CPU_ISA=AVX2`` for TensorFlow's oneDNN
kernels and ``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` for XLA's own code, the approximation of an AVX2-only
CPU on an AVX-512 one). A worker that fails gets a row saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, cpu_class, cpu_info, run_metadata, write_result  # noqa: E402

MODELS = {"2p5d": {"train.encoder": "unet", "train.context_slices": 1},
          "vgg16": {"train.encoder": "vgg16", "train.context_slices": 0}}
VARIANTS = ("keras", "float32", "xla", "jax")
CLASSES = ("native", "avx2")
ROW_MARK = "TRAIN_THROUGHPUT_ROW "
COLUMNS = [("cpu_class", "CPU class"), ("model", "model"), ("variant", "variant"), ("backend", "backend"),
           ("precision", "precision"), ("tiles_s", "training tiles/s", ".2f"), ("vs_keras", "x keras", ".2f"),
           ("warmup_s", "warm-up epoch (s)", ".1f"), ("error", "error")]


def class_environment(cpu: str) -> dict[str, str]:
    """Environment variables that make this CPU look like ``cpu`` to TensorFlow and XLA."""
    if cpu == "native":
        return {}
    if cpu == "avx2":
        return {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}
    raise ValueError(f"unknown CPU class {cpu!r}: choose from {', '.join(CLASSES)}")


def variant_environment(variant: str) -> dict[str, str]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")
    return {"KERAS_BACKEND": "jax" if variant == "jax" else "tensorflow"}


def worker(model: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time the training step of ``model`` in this process (backend and caps already set)."""
    import keras
    import numpy as np
    import tifffile

    from socseg.data.dataset import RandomCrops
    from socseg.data.normalise import Normalisation
    from socseg.data.tasks import get_task
    from socseg.model.unet import build_model
    from socseg.params import load_params, set_dotted, typed
    from socseg.training.runtime import seed_everything, set_precision
    from socseg.training.trainer import compile_network

    tree = load_params()
    for dotted, value in MODELS[model].items():
        set_dotted(tree, dotted, value)
    params = typed(tree)
    train = params.train
    precision = set_precision("float32" if variant == "float32" else train.precision)
    seed_everything(train.seed)

    source = Path(args.data)
    names = sorted((source / "data").glob("*.tif*"))[: args.slices]
    labels = sorted((source / "labels").glob("*.tif*"))[: args.slices]
    if not names or len(names) != len(labels):
        raise FileNotFoundError(f"no matching data/ and labels/ TIFFs under {source}")
    raw = np.stack([tifffile.imread(p) for p in names])
    normalisation = Normalisation.fit(params.normalise.mode, [raw], params.normalise.low_percentile,
                                      params.normalise.high_percentile)  # as training fits it
    image = normalisation.unit_mapping(normalisation.source_range(raw)).apply(raw)  # the 0..1 training feeds
    target = (np.stack([tifffile.imread(p) for p in labels]) == 255).astype(np.uint8)

    task = get_task("ni")
    network = build_model(train.encoder, task, n_classes=task.n_classes(3), dropout=train.dropout,
                          encoder_weights="none", base_filters=train.base_filters,
                          context_slices=train.context_slices, encoder_batchnorm=train.encoder_batchnorm,
                          bn_momentum=train.bn_momentum)
    compile_network(network, learning_rate=train.learning_rate, loss=train.loss, task=task,
                    n_classes=task.n_classes(3))
    if variant == "xla":
        network.jit_compile = True

    def crops(steps: int) -> RandomCrops:
        return RandomCrops([image], [target], size=params.tiles.size, batch_size=train.batch_size, steps=steps,
                           seed=train.seed, context_slices=train.context_slices)

    started = time.perf_counter()
    network.fit(crops(args.warmup_steps), epochs=1, verbose=0)
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    network.fit(crops(args.steps), epochs=1, verbose=0)
    seconds = time.perf_counter() - started
    backend = keras.backend.backend()
    version = __import__(backend).__version__
    return {"model": model, "variant": variant, "backend": f"{backend} {version}", "precision": precision,
            "jit_compile": bool(getattr(network, "jit_compile", False)), "encoder": train.encoder,
            "context_slices": train.context_slices, "batch": train.batch_size, "tile": params.tiles.size,
            "steps": args.steps, "tiles_s": train.batch_size * args.steps / seconds, "warmup_s": warmup,
            "params_m": network.count_params() / 1e6}


def run_worker(cpu: str, model: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **class_environment(cpu), **variant_environment(variant)}
    command = [sys.executable, __file__, "--worker", f"{model}:{variant}", "--steps", str(args.steps),
               "--warmup-steps", str(args.warmup_steps), "--slices", str(args.slices), "--data", args.data]
    print(f"[{cpu} {model} {variant}] ...", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line[len(ROW_MARK):] for line in done.stdout.splitlines() if line.startswith(ROW_MARK)]
    if done.returncode != 0 or not lines:
        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        row = {"model": model, "variant": variant, "error": reason[:200]}
    else:
        row = json.loads(lines[-1])
    print(f"[{cpu} {model} {variant}] {row.get('tiles_s', row.get('error'))}", flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="2p5d,vgg16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--classes", default=",".join(CLASSES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--slices", type=int, default=40, help="real slices the crops are cut from")
    parser.add_argument("--data", default=os.environ.get("SOCSEG_SHARED_DATA", "../shared/data/socpristine"))
    parser.add_argument("--out", default=str(RESULTS / "train_throughput"))
    parser.add_argument("--note", default="")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        model, variant = args.worker.split(":")
        print(ROW_MARK + json.dumps(worker(model, variant, args)), flush=True)
        return

    metadata = run_metadata(__file__, argv)
    flags = cpu_info()["flags"]
    variants, rows = args.variants.split(","), []
    for cpu in args.classes.split(","):
        label = cpu_class(flags, class_environment(cpu).get("ONEDNN_MAX_CPU_ISA"))
        for model in args.models.split(","):
            if model not in MODELS:
                raise SystemExit(f"unknown model {model!r}: choose from {', '.join(MODELS)}")
            base = None
            for variant in variants:
                if variant == "float32" and cpu == "avx2" and "keras" in variants:
                    continue  # under the cap `auto` trains in float32 already: the keras row is this row
                row = run_worker(cpu, model, variant, args)
                row["cpu"], row["cpu_class"] = cpu, label
                if variant == "keras":
                    base = row.get("tiles_s")
                if base and row.get("tiles_s"):
                    row["vs_keras"] = row["tiles_s"] / base
                rows.append(row)
    figures = {f"{r['cpu']}_{r['model']}_{r['variant']}": r.get("tiles_s") for r in rows}
    settings = {"models": {m: MODELS[m] for m in args.models.split(",")}, "steps": args.steps,
                "warm-up steps": args.warmup_steps, "slices": args.slices,
                "avx2 class": class_environment("avx2"), "note": args.note}
    write_result(Path(args.out), "throughput", "CPU training throughput per CPU class", metadata, settings,
                 figures=figures, columns=COLUMNS, rows=rows)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
