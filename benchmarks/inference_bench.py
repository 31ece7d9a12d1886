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
inference). ``--quickstart`` also trains a model like the README quick start's (the encoder,
epochs and steps of ``scripts/quickstart.sh``, on the built-in sample) and times ``socseg segment``
of the 48x192x192 sample after model load. Writes ``inference.json`` and ``inference.md`` into ``--out``.

Precision: a logged model computes in the dtype policy it was trained with (``train.precision``;
``auto`` is bf16 on a CPU with AVX512-BF16 or AMX), whatever CPU loads it: the layers' policies
are saved in the .keras file. On a CPU without native bf16 (``ONEDNN_MAX_CPU_ISA=AVX2`` on this
one, or an AVX2 laptop) that bf16 is emulated. ``--precisions as_trained,float32`` scores the
model as it loads and also the same weights computing in float32 (what ``auto`` trains on such a
CPU); every U-Net row records the policy its layers computed in (``compute_dtype``).

Planes (``--planes``): each window is timed with the model's own ``inference.planes`` (``model``,
what ``socseg segment`` does with it; models saved since multi-axis fusion became the default fuse
z, y and x) and with any other planes setting listed (``z``: slice by slice, the quick look), so
the slices/s of the default path and of the quick look sit side by side. The row's ``planes``
names what ran; fusing costs about three forward passes per slice.

Runtimes (``--runtimes``): ``keras`` (the network through Keras), ``openvino`` (socseg's default
CPU runtime, :mod:`socseg.inference.runtime`: the same weights compiled by OpenVINO in the precision
Keras computes in), ``openvino-int8`` (that model quantised to int8 by NNCF's post-training
quantisation, calibrated on ``--calibration-slices`` slices of the training slab) and
``onnxruntime`` (``model.export(format="onnx")`` run by ONNX Runtime's CPU provider). Each row
records the share of test-slab pixels whose label equals the Keras row's (same model, precision
and window): a runtime is only worth adopting at >= 99.9 %. Under ``ONEDNN_MAX_CPU_ISA`` OpenVINO's
convolutions (its own oneDNN) are capped too: the row records the convolution kernels OpenVINO
picked (e.g. ``brgconv_avx2_f32``) as the check; ONNX Runtime's MLAS kernels ignore the cap.
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

from _common import RESULTS, add_socpristine_arguments, floats, import_socpristine, model_rows, quickstart_command, run_metadata, segment_volume_timing, write_result  # noqa: E402

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


def parse_planes(text: str) -> list[str | None]:
    """``model,z`` -> planes overrides (None: the model's own ``inference.planes``)."""
    from socseg.params import check_planes

    out: list[str | None] = []
    for item in (t.strip() for t in text.split(",")):
        try:
            out.append(None if item == "model" else check_planes(item))
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"planes {item!r}: {error} (or 'model')") from None
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


RUNTIME_CHOICES = ("keras", "openvino", "openvino-int8", "onnxruntime")


def parse_runtimes(text: str) -> list[str]:
    """``keras,openvino`` -> the runtimes each U-Net is scored with (keras first: the reference)."""
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in chosen if item not in RUNTIME_CHOICES]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"unknown runtime(s) {bad or text!r}: use {', '.join(RUNTIME_CHOICES)}")
    return ["keras", *[r for r in chosen if r != "keras"]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True, help="accuracy.py CSV: U-Net rows with a model_uri")
    p.add_argument("--split", type=lambda t: floats(t, 4), default=[0.6, 0.1, 0.3, 8], metavar="TRAIN,VAL,TEST,GAP",
                   help="the split the models were trained with (their test slab is scored)")
    add_socpristine_arguments(p)
    p.add_argument("--windows", type=parse_windows, default=parse_windows("sliding:0.5,sliding:0.75,sliding:1.0,whole_slice"))
    p.add_argument("--planes", type=parse_planes, default=[None], metavar="PLANES[,PLANES...]",
                   help="comma list of planes settings each window is timed with: model (the model's own "
                        "inference.planes, what socseg segment does), z (slice by slice), zyx (fused), ...")
    p.add_argument("--precisions", type=parse_precisions, default=["as_trained"],
                   help="comma list: as_trained (the logged model as it loads) and/or float32 (the same weights "
                        "computing in float32)")
    p.add_argument("--runtimes", type=parse_runtimes, default=["keras"],
                   help=f"comma list of {', '.join(RUNTIME_CHOICES)} (keras always runs: the reference)")
    p.add_argument("--calibration-slices", type=int, default=16,
                   help="openvino-int8: training-slab slices its quantisation is calibrated on")
    p.add_argument("--test-slices", type=int, default=0, help="score only the first N test slices (0: all)")
    p.add_argument("--rf-trees", type=int, default=100)
    p.add_argument("--rf-samples", type=int, default=150_000)
    p.add_argument("--rf-jobs", type=int, default=2)
    p.add_argument("--volume", action="store_true",
                   help="also time socseg segment of the whole SOCPristine volume with the first model, "
                        "planes z and the model's own (figures.volume_timing): what a user waits for")
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
              precisions: Sequence[str] = ("as_trained",), runtimes: Sequence[str] = ("keras",),
              calibration: Any = None) -> list[dict[str, Any]]:
    """Rows of one logged U-Net: every precision x runtime x window; ``calibration``: the training
    slab (an ``openvino-int8`` row quantises on some of its slices)."""
    from socseg.inference.predictor import Predictor

    loaded = Predictor.load(model_uri, runtime="keras")
    trained = compute_dtypes(loaded.network)
    rows = []
    for precision in precisions:
        if precision == "as_trained":
            network, dtype = loaded.network, f"{trained} (as trained)"
        else:
            network = float32_network(loaded.network)[0]
            dtype = f"{compute_dtypes(network)} (weights of the {trained} model)"
        reference: dict[str, Any] = {}  # window -> the Keras row's test-slab labels
        for runtime in runtimes:
            try:
                predictor = runtime_predictor(network, loaded.config, runtime, calibration)
            except Exception as error:  # noqa: BLE001 - a runtime that cannot run this model is a finding
                rows.append({"model": label, "window": "-", "model_uri": model_uri, "compute_dtype": dtype,
                             "runtime": runtime, "error": failure(error), "settings": f"did not run: {failure(error)}"})
                print(f"[{time.strftime('%H:%M:%S')}] {label:28s} {runtime:14s} FAILED: {failure(error)}", flush=True)
                continue
            rows += window_rows(label, model_uri, predictor, slab, windows, dtype, reference)
    return rows


def runtime_predictor(network: Any, config: Any, runtime: str, calibration: Any = None):
    """A predictor of ``network`` whose forward passes run on ``runtime`` (see the module doc)."""
    from types import SimpleNamespace

    from socseg.inference.predictor import Predictor
    from socseg.inference.runtime import RuntimeNetwork, runtime_network

    if runtime == "keras":
        return Predictor(network, config, runtime_network(network, "keras"))
    if runtime == "openvino":
        return Predictor(network, config, runtime_network(network, "openvino"))
    if runtime == "onnxruntime":
        from runtime_bench import build_onnxruntime

        work = Path(tempfile.mkdtemp(prefix="socseg-onnx-"))
        predict, description = build_onnxruntime(network, work)
        return Predictor(network, config, RuntimeNetwork(SimpleNamespace(predict_on_batch=predict), description))
    if runtime == "openvino-int8":
        return Predictor(network, config, int8_network(network, config, calibration))
    raise ValueError(f"unknown runtime {runtime!r}")


def int8_network(network: Any, config: Any, calibration: Any) -> Any:
    """``network`` in OpenVINO, quantised to int8 by NNCF (post-training, calibrated on the network
    inputs that segmenting ``calibration`` (a training Slab) produces)."""
    import nncf
    import numpy as np
    import openvino as ov

    from socseg.inference.predictor import Predictor
    from socseg.inference.runtime import OpenVinoNetwork, RuntimeNetwork, export_ir, openvino_version

    if calibration is None:
        raise ValueError("openvino-int8 needs calibration slices (the training slab)")
    inputs: list[np.ndarray] = []

    class Recorder:  # the network, remembering what the predictor feeds it
        def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
            inputs.append(np.array(x, np.float32))
            return network.predict_on_batch(x)

    recording = Predictor(network, config, RuntimeNetwork(Recorder(), "recorder"))
    volume, (start, stop) = calibration.volume, calibration.z_range
    request = recording.request(source=volume.image, check_range=False)
    k = config.context_slices
    recording.probabilities(np.asarray(volume.image[max(0, start - k):stop + k]), min(k, start),
                            min(k, volume.image.shape[0] - stop), request)
    with tempfile.TemporaryDirectory(prefix="socseg-int8-") as tmp:
        model = ov.Core().read_model(str(export_ir(network, Path(tmp) / "ir")))
        quantised = nncf.quantize(model, nncf.Dataset(inputs), subset_size=len(inputs))
        compiled = OpenVinoNetwork(quantised, "f32")  # int8 where quantised, f32 elsewhere
    return RuntimeNetwork(compiled, f"openvino {openvino_version()} (CPU, int8 NNCF {nncf.__version__}, "
                                    f"calibrated on {len(inputs)} training-slab passes)")


def window_rows(label: str, model_uri: str, predictor, slab, windows: list[dict[str, Any]],
                dtype: str, reference: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per window setting: IoU and slices/s of ``predictor`` on the slab (after a warm-up);
    ``reference`` (window -> labels) holds the Keras row's labels (filled by it) that later
    runtimes' labels are compared with."""
    import numpy as np

    from socseg.data.prepare import Slab
    from socseg.inference.evaluate import score_slabs
    from socseg.inference.request import InferenceOptions

    reference = {} if reference is None else reference
    rows = []
    for settings in windows:
        name = settings["window"] + (f", step {settings['step_fraction']:g}" if settings["step_fraction"] else "")
        planes = settings.get("planes") or predictor.config.planes
        name += f", planes {planes}"
        row = {"model": label, "window": name, "model_uri": model_uri, "compute_dtype": dtype,
               "runtime": predictor.runtime, "conv_kernels": convolution_kernels(predictor), "planes": planes,
               "settings": f"batch {predictor.config.batch_size} tiles of {predictor.config.tile_size}^2, "
                           f"context {predictor.config.context_slices}, planes {planes}, smoothing sigma "
                           f"{predictor.config.smoothing_sigma:g}"}
        try:
            options = InferenceOptions(tta=False, **settings)
            score_slabs(predictor, [Slab(slab.volume, (slab.z_range[0], slab.z_range[0] + 2))], "ni", options=options)
            evaluation = score_slabs(predictor, [slab], "ni", options=options, keep_predictions=True)
        except Exception as error:  # e.g. a bf16 model under ONEDNN_MAX_CPU_ISA=AVX2: recorded, the others still run
            row.update(iou_ni=None, mean_iou=None, seconds=None, slices_per_s=None, error=failure(error))
            row["settings"] += f"; did not run: {row['error']}"
            print(f"[{time.strftime('%H:%M:%S')}] {label:28s} {name:22s} {dtype.split()[0]:15s} FAILED: {row['error']}",
                  flush=True)
            rows.append(row)
            continue
        labels = evaluation.predictions[0]
        reference.setdefault(name, labels)  # the first runtime scored (keras) is the reference
        row.update(iou_ni=evaluation.scores["iou_ni"], mean_iou=evaluation.scores["mean_iou"], seconds=evaluation.seconds,
                   slices_per_s=evaluation.n_slices / evaluation.seconds,
                   agreement=100.0 * float(np.mean(labels == reference[name])))
        rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {label:28s} {name:22s} {dtype.split()[0]:15s} {predictor.runtime[:24]:24s} "
              f"IoU Ni {row['iou_ni']:.4f} {row['slices_per_s']:.2f} slices/s, labels = Keras {row['agreement']:.3f} %",
              flush=True)
    return rows


def convolution_kernels(predictor: Any) -> str:
    """The kernels OpenVINO runs the convolutions with (its profiling), e.g. ``brgconv_avx2_f32``:
    shows which instructions it really used; "" for other runtimes."""
    from socseg.inference.runtime import OpenVinoNetwork

    runner = getattr(getattr(predictor, "_predict", None), "__self__", None)
    if not isinstance(runner, OpenVinoNetwork):
        return ""
    kernels = set()
    for op in runner.compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "layerType" in info and str(info["layerType"].astype(str)) == "Convolution":
            kernels.add(str(info["primitiveType"].astype(str)))
    return ", ".join(sorted(kernels))


def failure(error: Exception) -> str:
    """``Type: the error's first meaningful line`` (TensorFlow's messages run over many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for word in ("exception", "could not", "error") for line in lines if word in line.lower()),
                  lines[0] if lines else "")
    return f"{type(error).__name__}: {detail[:300]}"


def quickstart_row(tmp: Path) -> dict[str, Any]:
    """A model like the README quick start's (one training run with the encoder, epochs and steps
    of ``scripts/quickstart.sh``, params.yaml for the rest, on the sample), then ``socseg segment``
    of the sample with it: seconds after model load (SegmentResult.seconds)."""
    import mlflow

    from socseg.data.prepare import load_labelled_volumes
    from socseg.inference.segment import segment
    from socseg.params import load_params
    from socseg.training.train import train

    p = load_params()
    _, quickstart = quickstart_command()
    p["train"]["encoder"] = quickstart.get("encoder", p["train"]["encoder"])
    p["train"]["epochs"] = int(quickstart.get("epochs", p["train"]["epochs"]))
    p["tiles"]["steps_per_epoch"] = int(quickstart.get("steps_per_epoch", p["tiles"]["steps_per_epoch"]))
    p["mlflow"]["experiment"] = "socseg-inference-bench"
    volume = load_labelled_volumes(p, ["sample"])[0]
    result = train(p, ["sample"], run_name="quickstart-model")
    image = Path(p["data"]["dir"]) / "sample" / "image.tif"
    mlflow.end_run()
    segmented = segment(result.model_uri, image, tmp / "sample-labels.tif", slice_batch=p["inference"]["slice_batch"],
                        progress=False)
    z, h, w = volume.image.shape
    return {"model": f"quick-start {p['train']['encoder']} ({p['train']['epochs']} x {p['tiles']['steps_per_epoch']} steps)",
            "window": p["inference"]["window"], "seconds": segmented.seconds,
            "slices_per_s": segmented.slices_per_second, "settings": f"socseg segment of the {z}x{h}x{w} sample, after model load",
            "model_uri": result.model_uri}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    models = model_rows(args.models, "ni")
    volume, split, slab = test_slab(import_socpristine(args.source, args.cache_dir), args.split, args.test_slices)
    metadata = run_metadata(__file__, argv)
    rows = [forest_row(volume, split, slab, args)]
    print(f"[{time.strftime('%H:%M:%S')}] forest: IoU Ni {rows[0]['iou_ni']:.4f} {rows[0]['slices_per_s']:.2f} slices/s", flush=True)
    from socseg.data.prepare import Slab

    calibration = Slab(volume, (split.train[1] - args.calibration_slices, split.train[1])) if "openvino-int8" in args.runtimes else None
    for _, model in models.iterrows():
        windows = [{**window, "planes": planes} for window in args.windows for planes in args.planes]
        rows += unet_rows(str(model["method"]), str(model["model_uri"]), slab, windows, args.precisions,
                          args.runtimes, calibration)
    if args.quickstart:
        with tempfile.TemporaryDirectory(prefix="socseg-inference-") as tmp:
            rows.append(quickstart_row(Path(tmp)))
    figures: dict[str, Any] = {}
    if args.volume:
        import numpy as np

        first = models.iloc[0]
        figures["volume_timing"] = segment_volume_timing(str(first["model_uri"]), np.asarray(volume.image), ["z", None])
        for timing in figures["volume_timing"]:
            timing["model"] = str(first["method"])
    forest = rows[0]["slices_per_s"]
    for row in [*rows, *figures.get("volume_timing", [])]:
        row["x_forest"] = row["slices_per_s"] / forest if row.get("slices_per_s") else None
    settings = {"data": f"SOCPristine test slab z {slab.z_range[0]}-{slab.z_range[1] - 1} (split {args.split}), 501x501",
                "models": str(args.models), "tta": "off", "timing": "prediction only, after a 2-slice warm-up",
                "runtimes": ", ".join(args.runtimes) + " (labels = Keras: share of test-slab pixels labelled as by the "
                            "keras row of the same model, precision and window)",
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
    if args.volume:
        settings["volume"] = (f"figures.volume_timing: socseg segment of the whole {volume.image.shape[0]}-slice volume "
                              "(TIFF in and out, the model's runtime, smoothing and chunked fusion), first model only; "
                              "x_forest against the forest row's slices/s")
    columns = [("model", "model"), ("window", "window"), ("iou_ni", "IoU Ni", ".4f"), ("mean_iou", "mean IoU", ".4f"),
               ("slices_per_s", "slices/s"), ("x_forest", "x forest"), ("agreement", "labels = Keras (%)", ".3f"),
               ("runtime", "runtime"), ("conv_kernels", "convolution kernels"), ("compute_dtype", "computes in"),
               ("settings", "settings")]
    failed = [f"- {r['model']}, {r['window']}, {r['compute_dtype']}, {r.get('runtime', 'keras')}: did not run ({r['error']})"
              for r in rows if r.get("error")]
    json_path, md_path = write_result(args.out, "inference", "Inference: window vs speed, against the random forest",
                                      metadata, settings, figures, columns, rows,
                                      notes=["Settings that failed (kept as rows, no figures):", *failed] if failed else ())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
