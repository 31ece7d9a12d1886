"""The napari dock widget: segment, look where the model is unsure, correct, fine-tune, look again.

Every step runs in a child process (:mod:`socseg.viewer.jobs`: TensorFlow is never loaded into
the viewer's process) watched by a napari background worker, so the viewer stays responsive;
segmentation shows a progress bar and can be cancelled, and nothing is added to the viewer until
a step has finished.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from socseg.params import load_params, typed
from socseg.training.tracking import tracking_uri
from socseg.viewer.jobs import run_in_child
from socseg.viewer.layers import CORRECTION_ROLE, UNCERTAINTY_COLORMAP, correction_layer, labels_layer
from socseg.viewer.results import FinetuneSummary, Segmentation

USER_ROLE = Qt.ItemDataRole.UserRole  # where a suggestion keeps its slice index


class SegmentWidget(QWidget):
    """Model (tracking URI + model URI), image layer, Segment / Cancel, suggested slices,
    correction layer, Fine-tune. Settings not on the form come from params.yaml
    (``inference.slice_batch``, ``finetune.*``), as for the CLI."""

    def __init__(self, napari_viewer: Any, params: dict[str, Any] | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.params = params if params is not None else load_params()
        p = typed(self.params)
        self.tracking = QLineEdit(tracking_uri(p))
        self.model = QLineEdit(f"models:/{p.registry.model_name}@champion")
        self.image_layer = QComboBox()
        self.segment_button = QPushButton("Segment")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.top = QSpinBox()
        self.top.setRange(1, 100)
        self.top.setValue(5)
        self.suggestions = QListWidget()
        self.correct_button = QPushButton("New correction layer")
        self.finetune_button = QPushButton("Fine-tune on painted slices")
        self.scores = QLabel("")
        self.scores.setWordWrap(True)
        self._layout()
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button.clicked.connect(self.cancel)
        self.correct_button.clicked.connect(self.new_correction_layer)
        self.finetune_button.clicked.connect(self.finetune)
        self.suggestions.itemClicked.connect(self._go_to_slice)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self.worker: Any = None
        self.segmentation: Segmentation | None = None
        self.finetune_result: Any = None

    def _layout(self) -> None:
        form = QFormLayout()
        form.addRow("tracking URI", self.tracking)
        form.addRow("model", self.model)
        form.addRow("image layer", self.image_layer)
        buttons = QHBoxLayout()
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.cancel_button)
        suggest = QHBoxLayout()
        suggest.addWidget(QLabel("most uncertain slices (click to go):"))
        suggest.addWidget(self.top)
        column = QVBoxLayout(self)
        for part in (form, buttons):
            column.addLayout(part)
        column.addWidget(self.progress)
        column.addWidget(self.status)
        column.addLayout(suggest)
        column.addWidget(self.suggestions)
        column.addWidget(self.correct_button)
        column.addWidget(self.finetune_button)
        column.addWidget(self.scores)
        column.addStretch()

    # ------------------------------------------------------------------ layers

    def _refresh_layers(self, *_: Any) -> None:
        from napari.layers import Image

        current = self.image_layer.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image) and layer.rgb is False
                 and layer.ndim in (2, 3)]
        self.image_layer.clear()
        self.image_layer.addItems(names)
        if current in names:
            self.image_layer.setCurrentText(current)

    def _image(self) -> Any:
        name = self.image_layer.currentText()
        if not name or name not in self.viewer.layers:
            raise ValueError("no grey image layer: open a scan (napari scan.tif) and choose it")
        return self.viewer.layers[name]

    def _correction(self) -> Any:
        for layer in reversed(list(self.viewer.layers)):
            if (layer.metadata.get("socseg") or {}).get("role") == CORRECTION_ROLE:
                return layer
        raise ValueError("no correction layer: press 'New correction layer' and paint a few slices")

    # ------------------------------------------------------------------ segment

    def _busy(self, busy: bool) -> None:
        for button in (self.segment_button, self.finetune_button, self.correct_button):
            button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    def _fail(self, error: BaseException) -> None:
        self.status.setText(f"error: {' '.join(str(error).split())}")
        self._busy(False)

    def segment(self, model_uri: str | None = None) -> Any:
        """Segment the chosen image layer in a background worker; returns the worker (started)."""
        from napari.qt.threading import create_worker

        try:
            image = self._image()
        except ValueError as error:
            self._fail(error)
            return None
        uri, store = model_uri or self.model.text().strip(), self.tracking.text().strip()
        slice_batch = typed(self.params).inference.slice_batch

        data = layer_source(image)
        slices = image.data.shape[0] if image.data.ndim == 3 else 1

        def job():
            return (yield from run_in_child("segment", model_uri=uri, tracking_uri=store, image=data,
                                            slices=slices, slice_batch=slice_batch))

        self.worker = create_worker(job, _start_thread=False)
        self.worker.yielded.connect(self._progress)
        self.worker.returned.connect(lambda result: self._show(result, image))
        self.worker.errored.connect(self._fail)
        self.worker.aborted.connect(lambda: (self.status.setText("cancelled: nothing was added"), self._busy(False)))
        self._busy(True)
        self.status.setText(f"segmenting {image.name} with {uri}")
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.quit()

    def _progress(self, update: tuple[str, int, int]) -> None:
        stage, done, total = update
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(done)
        if stage == "starting":
            self.status.setText("loading the model")

    def _show(self, result: Segmentation, image: Any) -> None:
        self.segmentation = result
        scale = list(image.scale)
        labels, uncertainty = result.labels, result.uncertainty
        if image.data.ndim == 2:  # a single image was segmented as a stack of one slice
            labels, uncertainty = labels[0], uncertainty[0]
        data, kwargs, _ = labels_layer(labels, result.phase_map, f"{image.name} phases",
                                       model_uri=result.model_uri, source=image.name)
        self.viewer.add_labels(data, scale=scale, **kwargs)
        self.viewer.add_image(uncertainty, name=f"{image.name} uncertainty", scale=scale,
                              colormap=UNCERTAINTY_COLORMAP, contrast_limits=[0, 255], opacity=0.5, visible=False,
                              metadata={"socseg": {"role": "uncertainty", "model_uri": result.model_uri}})
        self.suggestions.clear()
        for entry in result.suggested_slices(self.top.value()):
            item = QListWidgetItem(f"z {entry.z}: mean uncertainty {entry.mean:.3f}")
            item.setData(USER_ROLE, entry.z)
            self.suggestions.addItem(item)
        self.status.setText(f"{image.name}: segmented with {result.model_uri}")
        self.progress.setValue(self.progress.maximum())
        self._busy(False)

    def _go_to_slice(self, item: QListWidgetItem) -> None:
        if self.viewer.dims.ndim < 3:
            return  # a single image: nothing to go to
        z = int(item.data(USER_ROLE))
        step = list(self.viewer.dims.current_step)
        step[0] = z
        self.viewer.dims.current_step = tuple(step)

    # ------------------------------------------------------------------ correct and fine-tune

    def new_correction_layer(self) -> Any:
        """An empty Labels layer over the chosen image: paint class k of the model as k + 1."""
        try:
            image = self._image()
            if self.segmentation is None:
                raise ValueError("segment first: the correction layer takes the model's phases")
        except ValueError as error:
            self._fail(error)
            return None
        data, kwargs, _ = correction_layer(image.data.shape, self.segmentation.phase_map, f"{image.name} corrections",
                                           image.name)
        layer = self.viewer.add_labels(data, scale=list(image.scale), **kwargs)
        names = ", ".join(f"{i + 1} = {name}" for i, name in enumerate(self.segmentation.phase_map.values()))
        self.status.setText(f"paint {names} (0 = unlabelled) on a few slices, then fine-tune")
        return layer

    def finetune(self) -> Any:
        """Fine-tune the model on the painted slices (a registered challenger), then segment the
        image with the new model and show its held-out scores; returns the worker (started)."""
        from napari.qt.threading import create_worker

        try:
            image, correction = self._image(), self._correction()
            if self.segmentation is None:
                raise ValueError("segment first: fine-tuning starts from the model that segmented the image")
        except ValueError as error:
            self._fail(error)
            return None
        parent, store, params = self.segmentation.model_uri, self.tracking.text().strip(), self.params
        phase_map = self.segmentation.phase_map
        painted = correction.data.copy()

        def job():
            return (yield from run_in_child("finetune", model_uri=parent, tracking_uri=store, params=params,
                                            image=np.asarray(image.data), painted=painted, phase_map=phase_map,
                                            run_name=f"napari {image.name}"))

        self.worker = create_worker(job, _start_thread=False)
        self.worker.returned.connect(self._finetuned)
        self.worker.errored.connect(self._fail)
        self._busy(True)
        self.cancel_button.setEnabled(False)  # a training run is not cancelled half-way
        self.status.setText(f"fine-tuning {parent} on the painted slices")
        self.worker.start()
        return self.worker

    def _finetuned(self, result: FinetuneSummary) -> None:
        self.finetune_result = result
        self.scores.setText(f"{result.verdict or result.model_uri}\n"
                            f"trained on {result.train_slices}, held out {result.test_slices or 'none'}\n"
                            f"{scores_text(result.metrics)}")
        self._busy(False)
        self.segment(result.model_uri)


def scores_text(metrics: Mapping[str, float]) -> str:
    """The held-out scores of a fine-tuned run, one per line."""
    rows = [f"{key.removeprefix('test_')}: {value:.4f}" for key, value in sorted(metrics.items())
            if key.startswith(("test_iou_", "test_mean_iou"))]
    return "\n".join(rows) if rows else "no held-out painted slice: no scores (paint at least two slices)"


def layer_source(layer: Any) -> Any:
    """What the child segments: the file an image layer was opened from, when the layer still
    holds that file's whole stack (the child then reads it a chunk at a time, as ``socseg segment``
    does), else the layer's array."""
    from socseg.data.stacks import SliceReader
    from socseg.data.volumes import VolumeError

    path = getattr(getattr(layer, "source", None), "path", None)
    if path:
        try:
            with SliceReader(path) as reader:
                if tuple(reader.shape) == tuple(layer.data.shape) and np.dtype(reader.dtype) == np.dtype(layer.data.dtype):
                    return str(path)
        except (VolumeError, OSError):
            pass  # not a file socseg reads (another plugin's format): the array it is
    return np.asarray(layer.data)
