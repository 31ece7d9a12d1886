"""The napari plugin on real data, end to end, with screenshots for the docs.

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/napari_screenshots.py \\
        [--minutes 6] [--out benchmarks/results/napari]

1. In a child process (TensorFlow never enters the viewer's process, see socseg.viewer.jobs):
   a 3-phase U-Net from scratch on SOCPristine's training slab (params.yaml's split and recipe
   with ``--minutes`` of training), registered as ``socseg-phases`` champion in a fresh MLflow
   store under ``--out``'s temporary folder.
2. A real napari viewer opens ``--slices`` of the test slab as an image layer, and the plugin's
   widget does what a user would: segment with ``models:/socseg-phases@champion``, list the most
   uncertain slices, open a correction layer and paint two slices (copied from the manual labels,
   as a careful annotator would), fine-tune (a challenger, gated on the held-out painted slice),
   and segment again with the fine-tuned model.
3. Both segmentations are scored against the manual labels on the slices nobody painted
   (per-class IoU from the one confusion-matrix scorer).

Writes into ``--out``: ``napari.json`` / ``.md`` (times, scores, the registry's verdict) and the
screenshots ``viewer_labels.png``, ``viewer_uncertainty.png``, ``viewer_finetuned.png``, which
benchmarks/render.py copies into the docs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import RESULTS, add_socpristine_arguments, import_socpristine, run_metadata, write_result  # noqa: E402

PAINTED = (4, 26)  # slices of the opened stack painted with corrections (0-based)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=6.0, help="training budget of the base model")
    p.add_argument("--slices", default="150,182", help="the stack opened in napari: z range start,stop of the volume")
    add_socpristine_arguments(p)
    p.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    p.add_argument("--out", type=Path, default=RESULTS / "napari")
    return p.parse_args(argv)


def train_base(params_path: str, data_dir: str, tracking: str, minutes: float) -> dict[str, Any]:
    """The base model, in a child: trained, registered as socseg-phases champion. Returns the
    params the widget runs with."""
    import mlflow

    from socseg.params import load_params, typed
    from socseg.training.promotion_lock import lock_for
    from socseg.training.registry import register_and_promote
    from socseg.training.train import train

    os.environ["MLFLOW_TRACKING_URI"] = tracking
    mlflow.set_tracking_uri(tracking)
    params = load_params(params_path)
    params["data"].update(dir=data_dir, volumes=["socpristine"])
    params["train"].update(task="phases", encoder="unet", epochs=200, max_minutes=minutes, patience=200)
    params["registry"]["model_name"] = "socseg-phases"
    params["mlflow"]["tracking_uri"] = tracking
    result = train(params, run_name="napari base", evaluate_test=False)
    register_and_promote(result.model_uri, "socseg-phases", result.metrics["val_mean_iou"], evaluate=lambda uri: 0.0,
                         lock=lock_for(typed(params), tracking), run_id=result.run_id)
    return params


def scores(labels: np.ndarray, truth: np.ndarray, phase_map: dict[int, str]) -> dict[str, float]:
    """Per-class and mean IoU of label values against the manual labels (the one scorer)."""
    from socseg.model.metrics import confusion_matrix, segmentation_scores

    values = sorted(phase_map)
    lut = np.zeros(256, np.int64)
    lut[values] = np.arange(len(values))
    cm = confusion_matrix(lut[truth], lut[labels], len(values))
    found = segmentation_scores(cm, [phase_map[v] for v in values])
    return {k: v for k, v in found.items() if k.startswith("iou_") or k == "mean_iou"}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    metadata = run_metadata(__file__, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    volume_dir = import_socpristine(args.source, args.cache_dir)
    work = Path(tempfile.mkdtemp(prefix="socseg-napari-"))
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    started = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        params = pool.submit(train_base, str(args.params), str(volume_dir.parent), tracking, args.minutes).result()
    train_seconds = time.perf_counter() - started
    os.environ["MLFLOW_TRACKING_URI"] = tracking

    import napari
    import tifffile
    from qtpy.QtWidgets import QApplication

    from socseg.viewer.widget import SegmentWidget

    start, stop = (int(t) for t in args.slices.split(","))
    grey = tifffile.imread(volume_dir / "image.tif")[start:stop]
    truth = tifffile.imread(volume_dir / "labels.tif")[start:stop]
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    viewer.add_image(grey, name="socpristine")
    widget = SegmentWidget(viewer, params)
    widget.model.setText("models:/socseg-phases@champion")
    widget.tracking.setText(tracking)
    viewer.window.add_dock_widget(widget, name="socseg", area="right")

    def wait(worker: Any) -> float:
        begun = time.perf_counter()
        done = []
        worker.finished.connect(lambda: done.append(True))
        while not done:
            QApplication.processEvents()
            time.sleep(0.05)
        return time.perf_counter() - begun

    def settle(until: Any) -> None:
        while not until():
            QApplication.processEvents()
            time.sleep(0.05)

    segment_seconds = wait(widget.segment())
    base = widget.segmentation
    values = sorted(base.phase_map)
    top = base.suggested_slices(1)[0].z
    viewer.dims.current_step = (top, *viewer.dims.current_step[1:])
    QApplication.processEvents()
    viewer.screenshot(str(args.out / "viewer_labels.png"), canvas_only=False, flash=False)
    viewer.layers["socpristine phases"].visible = False
    viewer.layers["socpristine uncertainty"].visible = True
    QApplication.processEvents()
    viewer.screenshot(str(args.out / "viewer_uncertainty.png"), canvas_only=False, flash=False)
    viewer.layers["socpristine uncertainty"].visible = False
    correction = widget.new_correction_layer()
    lut = np.zeros(256, np.uint8)
    for i, v in enumerate(values):
        lut[v] = i + 1
    for z in PAINTED:
        correction.data[z] = lut[truth[z]]
    correction.refresh()
    finetune_started = time.perf_counter()
    wait(widget.finetune())
    settle(lambda: widget.segmentation is not base and widget.segment_button.isEnabled())
    finetune_seconds = time.perf_counter() - finetune_started
    correction.visible = False
    viewer.dims.current_step = (top, *viewer.dims.current_step[1:])
    QApplication.processEvents()
    viewer.screenshot(str(args.out / "viewer_finetuned.png"), canvas_only=False, flash=False)
    scored = [z for z in range(len(grey)) if z not in PAINTED]
    summary = widget.finetune_result
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # the scorer loads Keras
        before = pool.submit(scores, base.labels[scored], truth[scored], base.phase_map).result()
        after = pool.submit(scores, widget.segmentation.labels[scored], truth[scored], base.phase_map).result()
    figures = {
        "train_seconds": train_seconds, "segment_seconds": segment_seconds, "finetune_and_resegment_seconds": finetune_seconds,
        "slices": len(grey), "most_uncertain_slice": int(start + top), "painted_slices": [int(start + z) for z in PAINTED],
        "scored_slices": len(scored), "base": before, "finetuned": after,
        "finetune_test_metrics": summary.metrics, "verdict": summary.verdict,
    }
    viewer.close()
    rows = [{"model": "base (champion)", **before}, {"model": "fine-tuned in the viewer", **after}]
    columns = [("model", "model")] + [(k, k, ".4f") for k in before]
    write_result(args.out, "napari", "The napari plugin on SOCPristine: segment, paint two slices, fine-tune", metadata,
                 {"minutes": args.minutes, "slices": args.slices, "painted": list(PAINTED),
                  "model": "models:/socseg-phases@champion"}, figures, columns, rows,
                 notes=[f"Scored on the {len(scored)} slices of the opened stack that were not painted."])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
