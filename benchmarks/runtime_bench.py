"""CPU runtime of the served network: Keras as is vs XLA, ONNX Runtime and OpenVINO, and their labels.

    python benchmarks/runtime_bench.py [--model-uri URI] [--slices 16] [--repeat 2]
        [--variants keras,keras-float32,xla,onnxruntime,openvino,openvino-default] [--workloads tiles,slices]
        [--slice-batch N] [--encoder unet --base-filters 8 --tile 128 --precision auto]
        [--out benchmarks/results/runtime] [--note TEXT]

Issue 17 asks for a faster CPU runtime where it pays: a variant is worth adopting in the served
model only if it is >= 1.5x faster than Keras while its labels agree with Keras' on >= 99.9 % of
the pixels. This script measures exactly that, on the same inputs for every variant:

- **tiles**: the first ``--slices`` SOCPristine 501x501 slices cut into the sliding window's tiles
  (training tile size, ``step_fraction`` step, mirror-padded by half the overlap), in batches of
  the model's ``batch_size`` tiles: tiles/s;
- **slices**: the same slices whole, mirror-padded to a multiple of 32 (512x512 for 501x501: the
  network is fully convolutional and its deepest encoders pool 5 times), ``--slice-batch`` per pass
  (default: as many as hold ``batch_size`` tiles' pixels, at least 1): slices/s.

Variants, each a callable ``(B, H, W, C)`` float32 raw grey -> probabilities built here (no library
change until the numbers say so): ``keras`` (the exported model's ``predict_on_batch``, what the
predictor runs: in bf16 for a network trained ``mixed_bfloat16``, which ``precision: auto`` picks
on CPUs with AVX512-BF16/AMX), ``keras-float32`` (such a network's float32 copy, same weights:
shows what bf16 vs f32 alone changes; skipped for a float32 network), ``xla`` (TensorFlow backend:
``tf.function(jit_compile=True)`` around the model; on JAX ``predict_on_batch`` is XLA already),
``onnxruntime`` (``model.export(format="onnx")`` of the float32 network, run by ONNX Runtime's CPU
provider: a bf16 ONNX graph does not load), ``openvino`` (that ONNX file compiled by OpenVINO for
the CPU at f32 precision) and ``openvino-default`` (OpenVINO's default precision, which is bf16 on
CPUs with AVX512-BF16/AMX). A variant whose package is missing or whose export fails gets a row
saying why.

Each variant: one untimed pass over the whole workload (tracing, XLA compilation, one-off
allocations: its seconds are the ``first pass s`` column), then ``--repeat`` timed passes, the
best shown. Agreement: the fraction of pixels whose class (argmax; ``p > 0.5`` for the ``ni``
task) equals that of Keras ``predict_on_batch`` on the same input, and the largest absolute
difference of a probability. Without ``--model-uri`` the model is an untrained U-Net built as
``serving_bench.py`` builds it: its speed is representative, its agreement is not (near-uniform
probabilities flip their argmax on rounding differences a trained model's margins absorb).
Writes ``runtime.json`` and ``runtime.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import tifffile

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import RESULTS, run_metadata, write_result  # noqa: E402

from socseg.data.tasks import get_task  # noqa: E402
from socseg.model.precision import float32_network  # noqa: E402

Predict = Callable[[np.ndarray], np.ndarray]

VARIANTS = ("keras", "keras-float32", "xla", "onnxruntime", "openvino", "openvino-default")
# Issue 17: adopt a faster runtime in the served model only at this speed-up and this agreement.
ADOPT_SPEEDUP = 1.5
ADOPT_AGREEMENT = 0.999
WHOLE_SLICE_MULTIPLE = 32  # 5 poolings in the deepest encoders (VGG16, ResNet50)
RUNTIME_PACKAGES = ("onnx", "tf2onnx", "onnxruntime", "openvino")


class Unavailable(RuntimeError):
    """A variant that cannot run here (package missing, export failed): recorded, not fatal."""


# ---------------------------------------------------------------------------------------------- inputs


def tile_batches(stack: np.ndarray, context_slices: int, tile: int, step_fraction: float, batch: int) -> list[np.ndarray]:
    """The sliding window's tiles of every slice, ``batch`` at a time, float32 ``(B, s, s, 2k + 1)``."""
    from socseg.data.context import iter_with_context
    from socseg.data.tiling import tile_starts

    step = max(1, int(round(tile * step_fraction)))
    margin = (tile - step) // 2
    tiles = []
    for image in iter_with_context(stack, context_slices):
        image = np.asarray(image, dtype=np.float32).reshape(*image.shape[:2], -1)
        shorts = [max(0, tile - (n + 2 * margin)) for n in image.shape[:2]]  # a slice smaller than a tile
        pads = [(margin + short // 2, margin + short - short // 2) for short in shorts]
        padded = np.pad(image, [*pads, (0, 0)], mode="symmetric")
        tiles += [padded[y : y + tile, x : x + tile] for y in tile_starts(padded.shape[0], tile, step)
                  for x in tile_starts(padded.shape[1], tile, step)]
    everything = np.stack(tiles)
    return [everything[i : i + batch] for i in range(0, len(everything), batch)]


def slice_batches(stack: np.ndarray, context_slices: int, per_pass: int) -> tuple[list[np.ndarray], tuple[slice, slice]]:
    """Whole slices mirror-padded to a multiple of 32, ``per_pass`` at a time, and the crop back."""
    from socseg.data.context import iter_with_context

    images = np.stack([np.asarray(i, dtype=np.float32).reshape(*i.shape[:2], -1)
                       for i in iter_with_context(stack, context_slices)])
    h, w = images.shape[1:3]
    pads = [((-n % WHOLE_SLICE_MULTIPLE) // 2, -n % WHOLE_SLICE_MULTIPLE - (-n % WHOLE_SLICE_MULTIPLE) // 2) for n in (h, w)]
    padded = np.pad(images, [(0, 0), *pads, (0, 0)], mode="symmetric")
    crop = (slice(pads[0][0], pads[0][0] + h), slice(pads[1][0], pads[1][0] + w))
    return [padded[i : i + per_pass] for i in range(0, len(padded), per_pass)], crop


def load_slices(n: int, folder: Path) -> tuple[np.ndarray, str]:
    """The first ``n`` SOCPristine slices (the phantom where ../shared is missing), as serving_bench reads them."""
    from serving_bench import _volume

    path = folder / "grey.tif"
    described = _volume(n, path)
    return tifffile.imread(path), described


def load_predictor(args: argparse.Namespace, folder: Path):
    """The logged segmenter's predictor, or serving_bench's untrained U-Net saved as one."""
    from serving_bench import _model

    from socseg.inference.predictor import Predictor

    if args.model_uri is None:  # the precision training would log on this machine (params.yaml train.precision)
        from socseg.params import load_params, typed
        from socseg.training.runtime import set_precision

        precision = set_precision(args.precision or typed(load_params()).train.precision)
        try:
            uri, described = _model(args, folder)
        finally:
            set_precision("float32")
        described += f", {precision}"
    else:
        uri, described = _model(args, folder)
    return Predictor.load(uri), described


# -------------------------------------------------------------------------------------------- variants


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def build_keras(network: Any, work: Path) -> tuple[Predict, str]:
    """What the predictor runs today."""
    return (lambda x: np.asarray(network.predict_on_batch(x))), "predict_on_batch"


def build_keras_float32(network: Any, work: Path) -> tuple[Predict, str]:
    """A mixed-precision network's float32 copy in Keras: separates bf16 vs f32 from the runtime's effect."""
    copy, cast = float32_network(network)
    if not cast:
        raise Unavailable("the network is float32 already: the keras row is this one")
    return (lambda x: np.asarray(copy.predict_on_batch(x))), "predict_on_batch of the float32 copy"


def build_xla(network: Any, work: Path) -> tuple[Predict, str]:
    """The forward pass compiled by XLA (one program per input shape, traced on first use)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise Unavailable(f"{keras.backend.backend()} backend: predict_on_batch is already compiled by XLA")
    import tensorflow as tf

    forward = tf.function(lambda x: network(x, training=False), jit_compile=True)
    return (lambda x: forward(tf.constant(x)).numpy()), "tf.function(jit_compile=True)"


def export_onnx(network: Any, work: Path) -> Path:
    """``model.export(format="onnx")`` once per run (tf2onnx on TensorFlow), of the float32 network;
    dynamic batch and size."""
    path = work / "model.onnx"
    if path.is_file():
        return path
    missing = [p for p in ("onnx", "tf2onnx") if _version(p) is None]
    import keras

    if keras.backend.backend() != "tensorflow":
        missing = [p for p in missing if p != "tf2onnx"]
    if missing:
        raise Unavailable(f"ONNX export needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    started = time.perf_counter()
    network, cast = float32_network(network)
    if cast:
        print("  exporting a float32 copy of the mixed-precision network (bf16 ONNX convolutions do not load)")
    try:
        network.predict_on_batch(np.zeros((1, 32, 32, network.input_shape[-1]), np.float32))  # export needs a called model
        network.export(str(path), format="onnx", verbose=False)
    except Exception as exc:  # noqa: BLE001 - any exporter failure is a finding to record
        raise Unavailable(f"model.export(format='onnx') failed: {type(exc).__name__}: {str(exc)[:500]}") from exc
    print(f"  exported ONNX in {time.perf_counter() - started:.1f} s ({path.stat().st_size / 2**20:.1f} MiB)", flush=True)
    return path


def build_onnxruntime(network: Any, work: Path) -> tuple[Predict, str]:
    if _version("onnxruntime") is None:
        raise Unavailable("onnxruntime is not installed: pip install onnxruntime")
    path = export_onnx(network, work)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _cores()  # as TensorFlow: every usable core (ORT's default: physical ones)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return ((lambda x: session.run(None, {name: x})[0]),
            f"onnxruntime {ort.__version__}, CPUExecutionProvider, {_cores()} threads")


def _build_openvino(network: Any, work: Path, precision: str | None) -> tuple[Predict, str]:
    if _version("openvino") is None:
        raise Unavailable("openvino is not installed: pip install openvino")
    path = export_onnx(network, work)
    import openvino as ov

    core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": _cores()}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(str(path), "CPU", config)
    used = compiled.get_property("INFERENCE_PRECISION_HINT")
    used = used.get_type_name() if hasattr(used, "get_type_name") else str(used)
    request = compiled.create_infer_request()

    def predict(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: x})[0])  # a copy: the request reuses its output buffer

    return predict, f"openvino {_version('openvino')}, CPU, inference precision {used}, {_cores()} threads"


def build_openvino(network: Any, work: Path) -> tuple[Predict, str]:
    return _build_openvino(network, work, "f32")


def build_openvino_default(network: Any, work: Path) -> tuple[Predict, str]:
    return _build_openvino(network, work, None)


BUILDERS: dict[str, Callable[[Any, Path], tuple[Predict, str]]] = {
    "keras": build_keras, "keras-float32": build_keras_float32, "xla": build_xla, "onnxruntime": build_onnxruntime, "openvino": build_openvino,
    "openvino-default": build_openvino_default,
}


# --------------------------------------------------------------------------------------------- measure


def run_pass(predict: Predict, batches: Sequence[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """Seconds for one pass over ``batches`` and the outputs."""
    outputs = []
    started = time.perf_counter()
    for batch in batches:
        outputs.append(np.asarray(predict(batch)))
    return time.perf_counter() - started, outputs


def classes_of(outputs: Sequence[np.ndarray], task: str, crop: tuple[slice, slice] | None) -> np.ndarray:
    probs = np.concatenate(outputs)
    if crop is not None:
        probs = probs[:, crop[0], crop[1]]
    return get_task(task).to_classes(probs)


def meets_bar(variant: str, speedup: float, agreement: float) -> str:
    """Issue 17's adoption verdict for one row: ``"-"`` for Keras (the reference itself), else
    ``"yes"`` when the variant is at least :data:`ADOPT_SPEEDUP` times Keras' rate *and* its labels
    equal Keras' on at least :data:`ADOPT_AGREEMENT` of the pixels (a fraction), ``"no"`` otherwise."""
    if variant == "keras":
        return "-"
    return "yes" if speedup >= ADOPT_SPEEDUP and agreement >= ADOPT_AGREEMENT else "no"


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return ["keras"] + [v for v in names if v != "keras"]  # keras is the reference every row is compared with


COLUMNS = [("workload", "workload"), ("variant", "variant"), ("rate", "items/s", ".2f"), ("unit", "unit"),
           ("speedup", "x Keras", ".2f"), ("agreement_pct", "labels = Keras (%)", ".4f"),
           ("max_abs_prob_diff", "max abs prob diff", ".2e"), ("first_pass_s", "first pass s", ".1f"),
           ("meets_bar", "meets the bar"), ("detail", "runtime")]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=16, help="SOCPristine slices (first N)")
    parser.add_argument("--model-uri", default=None, help="a logged socseg segmenter (default: untrained U-Net)")
    parser.add_argument("--encoder", default="unet", choices=["unet", "vgg16", "resnet50"], help="untrained model only")
    parser.add_argument("--base-filters", type=int, default=8, help="untrained model only")
    parser.add_argument("--tile", type=int, default=128, help="untrained model only")
    parser.add_argument("--precision", default=None, choices=["auto", "float32", "mixed_bfloat16"],
                        help="untrained model only [params: train.precision]")
    parser.add_argument("--variants", type=parse_variants, default=list(VARIANTS), help=f"comma-separated: {','.join(VARIANTS)}")
    parser.add_argument("--workloads", default="tiles,slices", help="tiles, slices or both")
    parser.add_argument("--slice-batch", type=int, default=None,
                        help="whole slices per pass (default: as many as hold the model's batch_size tiles' pixels)")
    parser.add_argument("--repeat", type=int, default=2, help="timed passes per variant; the best is shown")
    parser.add_argument("--out", type=Path, default=RESULTS / "runtime", help="folder for runtime.json and runtime.md")
    parser.add_argument("--note", default="", help="free text for the result file (e.g. what else ran on the machine)")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not workloads or set(workloads) - {"tiles", "slices"}:
        parser.error(f"--workloads must name tiles and/or slices, got {args.workloads!r}")
    if args.slices < 1 or args.repeat < 1:
        parser.error("--slices and --repeat must be >= 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    metadata = run_metadata(__file__, argv)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stack, volume_text = load_slices(args.slices, work)
        predictor, described = load_predictor(args, work)
        config, network = predictor.config, predictor.network
        print(f"volume: {volume_text}\nmodel: {described}", flush=True)
        network.predict_on_batch(np.zeros((1, config.tile_size, config.tile_size, 2 * config.context_slices + 1), np.float32))

        inputs: dict[str, tuple[list[np.ndarray], tuple[slice, slice] | None, int, str]] = {}
        if "tiles" in workloads:
            batches = tile_batches(stack, config.context_slices, config.tile_size, config.step_fraction, config.batch_size)
            inputs["tiles"] = (batches, None, sum(len(b) for b in batches), "tiles/s")
            print(f"tiles: {inputs['tiles'][2]} tiles of {config.tile_size}x{config.tile_size}, {config.batch_size} per batch")
        per_pass = args.slice_batch
        if "slices" in workloads:
            h, w = stack.shape[1:]
            padded_pixels = (h + -h % WHOLE_SLICE_MULTIPLE) * (w + -w % WHOLE_SLICE_MULTIPLE)
            per_pass = per_pass or max(1, config.batch_size * config.tile_size**2 // padded_pixels)
            batches, crop = slice_batches(stack, config.context_slices, per_pass)
            inputs["slices"] = (batches, crop, len(stack), "slices/s")
            print(f"slices: {len(stack)} slices padded to {batches[0].shape[1]}x{batches[0].shape[2]}, {per_pass} per pass")

        reference: dict[str, tuple[float, np.ndarray, list[np.ndarray]]] = {}
        for variant in args.variants:
            print(f"{variant}:", flush=True)
            try:
                started = time.perf_counter()
                predict, detail = BUILDERS[variant](network, work)
                build_s = time.perf_counter() - started
            except Unavailable as exc:
                print(f"  unavailable: {exc}", flush=True)
                rows += [{"workload": name, "variant": variant, "rate": None, "unit": unit, "speedup": None,
                          "agreement_pct": None, "max_abs_prob_diff": None, "first_pass_s": None, "meets_bar": "-",
                          "detail": f"unavailable: {exc}", "error": str(exc)} for name, (_, _, _, unit) in inputs.items()]
                continue
            for name, (batches, crop, items, unit) in inputs.items():
                try:
                    first_s, outputs = run_pass(predict, batches)
                    best = min(run_pass(predict, batches)[0] for _ in range(args.repeat))
                except Exception as exc:  # noqa: BLE001 - a runtime failing on this input is a finding
                    print(f"  {name}: failed: {type(exc).__name__}: {exc}", flush=True)
                    rows.append({"workload": name, "variant": variant, "rate": None, "unit": unit, "speedup": None,
                                 "agreement_pct": None, "max_abs_prob_diff": None, "first_pass_s": None, "meets_bar": "-",
                                 "detail": detail, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
                    continue
                rate = items / best
                classes = classes_of(outputs, config.task, crop)
                if variant == "keras":
                    reference[name] = (rate, classes, outputs)
                ref_rate, ref_classes, ref_outputs = reference[name]
                agreement = float(np.mean(classes == ref_classes))
                diff = max(float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32))))
                           for a, b in zip(outputs, ref_outputs))
                speedup = rate / ref_rate
                rows.append({"workload": name, "variant": variant, "rate": rate, "unit": unit, "speedup": speedup,
                             "agreement_pct": 100 * agreement, "max_abs_prob_diff": diff, "first_pass_s": first_s,
                             "build_s": build_s, "best_pass_s": best, "items": items,
                             "meets_bar": meets_bar(variant, speedup, agreement), "detail": detail})
                print(f"  {name}: {rate:.2f} {unit} ({speedup:.2f}x Keras), labels = Keras on {100 * agreement:.4f} % "
                      f"of pixels, max |dp| {diff:.2e}, first pass {first_s:.1f} s", flush=True)

    order = {name: i for i, name in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (workloads.index(r["workload"]), order[r["variant"]]))
    untrained = args.model_uri is None
    settings = {"volume": volume_text, "model": described, "task": config.task,
                "tile": f"{config.tile_size}, step fraction {config.step_fraction}, {config.batch_size} tiles per batch",
                "whole slices per pass": per_pass if "slices" in workloads else None,
                "timed passes per variant (best shown)": args.repeat,
                "threads": f"{_cores()} (ONNX Runtime, OpenVINO; TensorFlow: its default, every usable core)"}
    if args.note:
        settings["note"] = args.note
    candidates = [r for r in rows if r["variant"] != "keras" and r.get("rate")]
    figures = {
        "adoption_bar": {"speedup": ADOPT_SPEEDUP, "agreement": ADOPT_AGREEMENT},
        "meets_bar": sorted({f"{r['variant']} ({r['workload']})" for r in candidates if r["meets_bar"] == "yes"}),
        "untrained_model": untrained,
        "runtime_versions": {p: _version(p) for p in RUNTIME_PACKAGES},
    }
    notes = [f"Bar (issue 17): adopt a runtime in the served model only if it is >= {ADOPT_SPEEDUP}x Keras with labels "
             f"equal to Keras' on >= {100 * ADOPT_AGREEMENT:g} % of pixels. Meets it: "
             + (", ".join(figures["meets_bar"]) or "none") + ".",
             "Runtime versions: " + ", ".join(f"{p} {v or 'not installed'}" for p, v in figures["runtime_versions"].items()) + "."]
    if untrained:
        notes.append("The model is untrained: its speed is representative, its agreement is not (near-uniform "
                     "probabilities flip their argmax on rounding differences that a trained model's margins absorb). "
                     "Rerun with --model-uri for the agreement that decides adoption.")
    notes += list(dict.fromkeys(f"{r['variant']}: {r['error']}" for r in rows if r.get("error")))
    json_path, md_path = write_result(args.out, "runtime", "CPU runtime benchmark", metadata, settings, figures,
                                      COLUMNS, rows, notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
