"""The *VoCo segment* widget: a finetuned SwinUNETR checkpoint + an image -> a Labels layer.

The label map comes back on the image's own voxel grid
(:func:`voco_core.inference.segment` undoes orientation, resampling and cropping),
so the Labels layer ``"<image> segmentation"`` gets the image layer's transform
and overlays it exactly. Class names go into the layer's ``features`` (napari
shows the class under the cursor) and ``metadata["voco"]["label_names"]`` (the
NIfTI writer keeps them). Inference runs in a napari thread worker with a
progress bar (:class:`~napari_voco._jobs.JobRunner`); *Cancel* stops it before the
next window batch. The model is released when the run ends (and the CUDA cache
emptied), whatever the outcome. :func:`segmentation_job` is also what the finetune
widget's *Segment with best checkpoint* runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_voco import _notify
from napari_voco._inputs import (
    DeviceCombo,
    LayerCombo,
    checkpoint_edit,
    checkpoint_path,
    release_viewer_events_on_close,
    reveal,
    scrolling_layout,
)
from napari_voco._jobs import JobContext, JobRunner, JobState
from napari_voco._layers import layer_to_record, show_segmentation
from napari_voco._tooltips import TOOLTIPS
from voco_core.data.io import VolumeRecord
from voco_core.inference import (
    InferenceCancelled,
    SegmentationResult,
    Segmenter,
    load_segmenter,
    segment,
)

if TYPE_CHECKING:
    import napari

_PROGRESS_STEPS = 1000


def model_info(segmenter: Segmenter) -> dict[str, Any]:
    """Plain summary of a loaded segmenter (what the widget shows after loading)."""
    config = segmenter.config
    return {
        "classes": list(segmenter.class_names),
        "feature_size": int(config.model.feature_size),
        "roi_size": [int(s) for s in config.train.roi_size],
        "spacing": None if config.data.spacing is None else [float(s)
                                                             for s in config.data.spacing],
        "device": str(segmenter.device),
    }


@dataclass
class SegmenterLoaded:
    """Event: the checkpoint is loaded (:func:`model_info`)."""

    info: dict


@dataclass
class SegmentProgress:
    """Event: the fraction of sliding windows done, 0..1."""

    fraction: float


def segmentation_job(record: VolumeRecord, checkpoint: str, device: str,
                     overlap: float | None, context: JobContext) -> Iterator[Any]:
    """Job body: :class:`SegmenterLoaded`, :class:`SegmentProgress` events (emitted from
    the window loop), then the :class:`~voco_core.inference.SegmentationResult`.
    Cancelling (the stop flag) ends it without a result; the segmenter is released in
    every case."""
    segmenter = load_segmenter(checkpoint, device)
    try:
        yield SegmenterLoaded(model_info(segmenter))
        if context.stop.is_set():
            return
        result = segment(record, segmenter, overlap=overlap, stop=context.stop,
                         progress=lambda fraction: context.emit(SegmentProgress(fraction)))
    except InferenceCancelled:
        return
    finally:
        segmenter.release()
    yield result


class SegmentWidget(QWidget):
    """Segment a 3-D image layer with a finetuning checkpoint."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._job_image = None
        self._job_record: VolumeRecord | None = None
        self._started = 0.0
        self.labels_layer = None
        self.info: dict | None = None
        self.counts: dict[str, int] = {}
        self.last_status = ""

        self.image_combo = LayerCombo(napari_viewer)
        self.checkpoint = checkpoint_edit("finetuning run folder, best.pt or last.pt")
        self.device = DeviceCombo(auto=True)
        self.overlap = QDoubleSpinBox()
        self.overlap.setRange(-0.05, 0.95)
        self.overlap.setSingleStep(0.05)
        self.overlap.setDecimals(2)
        self.overlap.setSpecialValueText("from checkpoint")
        self.overlap.setValue(-0.05)
        self.overlap.setToolTip(TOOLTIPS["overlap"])
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Checkpoint", self.checkpoint)
        form.addRow("Device", self.device)
        form.addRow("Window overlap", self.overlap)

        self.run_button = QPushButton("Segment")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)

        self.progress = QProgressBar()
        self.progress.setRange(0, _PROGRESS_STEPS)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.model_label = QLabel("")
        self.model_label.setWordWrap(True)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["class", "voxels", "volume (mL)"])
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)

        layout = scrolling_layout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.model_label)
        layout.addWidget(self.table, 1)

        self.runner = JobRunner("segment", self, on_event=self._on_event, on_failed=self.fail,
                                on_finished=self._on_finished)
        release_viewer_events_on_close(self)

    # ------------------------------------------------------------------ actions

    @property
    def running(self) -> bool:
        """True while a segmentation runs."""
        return self.runner.running

    def run(self) -> None:
        """Start segmenting the chosen image (nothing happens while a run is going)."""
        if self.running:
            return
        try:
            layer = self.image_combo.layer()
            record = layer_to_record(layer, self.viewer)
            path = checkpoint_path(self.checkpoint, "finetuning")
        except Exception as err:
            self.fail(err)
            return
        overlap = self.overlap.value()
        overlap = None if overlap < 0 else float(overlap)
        self._job_image, self._job_record = layer, record
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setValue(0)
        self._set_status("loading model…")
        self._started = time.perf_counter()
        self.runner.start(
            lambda context: segmentation_job(record, str(path), self.device.device(), overlap,
                                             context),
            f"VoCo segmentation of {layer.name}")

    def cancel(self) -> None:
        """Ask the running segmentation to stop (before its next window batch)."""
        if not self.running:
            return
        self.runner.stop()
        self.cancel_button.setEnabled(False)
        self._set_status("cancelling…")

    # ------------------------------------------------------------------ job events

    def _on_event(self, event: Any) -> None:
        if isinstance(event, SegmenterLoaded):
            self._show_model(event.info)
        elif isinstance(event, SegmentProgress):
            if not self.runner.stopping:
                self.progress.setValue(round(float(event.fraction) * _PROGRESS_STEPS))
                self._set_status(f"segmenting… {100 * float(event.fraction):.0f} %")
        elif isinstance(event, SegmentationResult):
            self._show_result(event)

    def _show_model(self, info: dict) -> None:
        self.info = info
        classes = info["classes"]
        spacing = ("the file's own spacing" if info["spacing"] is None
                   else " × ".join(f"{s:g}" for s in info["spacing"]) + " mm")
        self.model_label.setText(
            f"{len(classes)} classes: {', '.join(classes)}\n"
            f"SwinUNETR, feature size {info['feature_size']}, windows "
            f"{' × '.join(str(s) for s in info['roi_size'])} at {spacing}, on {info['device']}")
        if not self.runner.stopping:
            self._set_status("segmenting…")

    def _on_finished(self) -> None:
        if self.runner.state.status == JobState.STOPPED and self.runner.last_error is None:
            self.progress.setValue(0)
            self._set_status("cancelled")
        self._job_image = self._job_record = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def fail(self, err: BaseException) -> None:
        """A notification, and the whole message in the status line (scrolled to)."""
        _notify.notify_error(err)
        self.progress.setValue(0)
        self._set_status(f"failed: {_notify.error_message(err)}")
        reveal(self.status)

    def _set_status(self, text: str) -> None:
        self.last_status = text
        self.status.setText(text)

    # ------------------------------------------------------------------ results

    def _show_result(self, result: SegmentationResult) -> None:
        if self.runner.stopping:  # cancelled after the last window: keep nothing
            return
        image, record = self._job_image, self._job_record
        self.labels_layer = show_segmentation(self.viewer, image, record, result)
        self._show_counts(result, record)
        self.progress.setValue(_PROGRESS_STEPS)
        self._set_status(f"done in {time.perf_counter() - self._started:.1f} s: "
                         f"{self.labels_layer.name!r}, "
                         f"{' × '.join(str(s) for s in result.labels.shape)} voxels; "
                         f"intensity: {result.intensity}")

    def _show_counts(self, result: SegmentationResult, record: VolumeRecord) -> None:
        names = list(result.class_names)
        counts = np.bincount(result.labels.ravel(), minlength=len(names))
        voxel_ml = abs(float(np.linalg.det(np.asarray(record.affine)[:3, :3]))) / 1000.0
        self.counts = {}
        rows = []
        for index, count in enumerate(counts.tolist()):
            name = names[index] if index < len(names) else f"class {index}"
            self.counts[name] = int(count)
            if count:
                rows.append((f"{index}: {name}", int(count), count * voxel_ml))
        self.table.setRowCount(len(rows))
        for row, (label, count, volume) in enumerate(rows):
            for column, text in enumerate((label, f"{count:,}", f"{volume:,.1f}")):
                item = QTableWidgetItem(text)
                if column:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight
                                          | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(row, column, item)
