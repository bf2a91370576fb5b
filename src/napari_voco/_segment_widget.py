"""The *VoCo segment* widget: a finetuned SwinUNETR checkpoint + an image -> a Labels layer.

The label map comes back on the image's own voxel grid
(:func:`voco_core.inference.segment` undoes orientation, resampling and cropping),
so the Labels layer ``"<image> segmentation"`` gets the image layer's transform
and overlays it exactly. Class names go into the layer's ``features`` (napari
shows the class under the cursor) and ``metadata["voco"]["label_names"]`` (the
NIfTI writer keeps them). Inference runs in a napari thread worker with a
progress bar; *Cancel* stops it before the next window batch. The model is
released when the run ends (and the CUDA cache emptied), whatever the outcome.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QObject, Qt, Signal
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
    QVBoxLayout,
    QWidget,
)

from napari_voco._io import volume_metadata
from napari_voco._layers import (
    CheckpointEdit,
    LayerCombo,
    checkpoint_path,
    copy_transform,
    device_combo,
    layer_to_record,
    transform_kwargs,
    unwrap,
)
from napari_voco._notify import notify_error
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
class _Outcome:
    result: SegmentationResult | None = None
    info: dict | None = None
    seconds: float = 0.0
    error: Exception | None = None

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, InferenceCancelled)


class _Relay(QObject):
    """Carries the worker thread's news to the GUI thread (queued signals)."""

    progressed = Signal(float)
    loaded = Signal(object)


def _run_segmentation(record: VolumeRecord, checkpoint: str, device: str,
                      overlap: float | None, stop: threading.Event, relay: _Relay) -> _Outcome:
    """The worker's body. Never raises: errors (and cancellation) come back in the outcome.
    The segmenter is released in every case."""
    start = time.perf_counter()
    outcome = _Outcome()
    segmenter = None
    try:
        segmenter = load_segmenter(checkpoint, device)
        outcome.info = model_info(segmenter)
        relay.loaded.emit(outcome.info)
        if stop.is_set():
            raise InferenceCancelled("segmentation cancelled")
        outcome.result = segment(record, segmenter, overlap=overlap,
                                 progress=relay.progressed.emit, stop=stop)
    except Exception as err:  # reported in the GUI thread
        outcome.error = err
    finally:
        if segmenter is not None:
            segmenter.release()
    outcome.seconds = time.perf_counter() - start
    return outcome


class SegmentWidget(QWidget):
    """Segment a 3-D image layer with a finetuning checkpoint."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._worker = None
        self._stop = threading.Event()
        self._job_image = None
        self._job_record: VolumeRecord | None = None
        self.labels_layer = None
        self.info: dict | None = None
        self.counts: dict[str, int] = {}
        self.last_status = ""

        self.image_combo = LayerCombo(napari_viewer)
        self.checkpoint = CheckpointEdit("finetuning run folder, best.pt or last.pt")
        self.device = device_combo()
        self.overlap = QDoubleSpinBox()
        self.overlap.setRange(-0.05, 0.95)
        self.overlap.setSingleStep(0.05)
        self.overlap.setDecimals(2)
        self.overlap.setSpecialValueText("from checkpoint")
        self.overlap.setValue(-0.05)
        self.overlap.setToolTip("sliding-window overlap (more: smoother, slower)")
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

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.model_label)
        layout.addWidget(self.table, 1)

        self._relay = _Relay(self)
        self._relay.progressed.connect(self._on_progress)
        self._relay.loaded.connect(self._on_loaded)

    # ------------------------------------------------------------------ actions

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def run(self) -> None:
        """Start segmenting the chosen image (nothing happens while a run is going)."""
        if self._worker is not None:
            return
        try:
            layer = self.image_combo.layer()
            record = layer_to_record(layer)
            path = checkpoint_path(self.checkpoint, "finetuning")
        except Exception as err:
            self._fail(err)
            return
        from napari.qt.threading import create_worker

        overlap = self.overlap.value()
        overlap = None if overlap < 0 else float(overlap)
        self._stop = threading.Event()
        self._job_image, self._job_record = layer, record
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setValue(0)
        self._set_status("loading model…")
        worker = create_worker(_run_segmentation, record, str(path),
                               self.device.currentText(), overlap, self._stop, self._relay,
                               _ignore_errors=True)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        worker.start()

    def cancel(self) -> None:
        """Ask the running segmentation to stop (before its next window batch)."""
        if self._worker is None:
            return
        self._stop.set()
        self.cancel_button.setEnabled(False)
        self._set_status("cancelling…")

    # ------------------------------------------------------------------ worker signals

    def _on_progress(self, fraction: float) -> None:
        if self._worker is not None and not self._stop.is_set():
            self.progress.setValue(round(float(fraction) * _PROGRESS_STEPS))
            self._set_status(f"segmenting… {100 * float(fraction):.0f} %")

    def _on_loaded(self, info: dict) -> None:
        self.info = info
        classes = info["classes"]
        spacing = ("the file's own spacing" if info["spacing"] is None
                   else " × ".join(f"{s:g}" for s in info["spacing"]) + " mm")
        self.model_label.setText(
            f"{len(classes)} classes: {', '.join(classes)}\n"
            f"SwinUNETR, feature size {info['feature_size']}, windows "
            f"{' × '.join(str(s) for s in info['roi_size'])} at {spacing}, on {info['device']}")
        if self._worker is not None and not self._stop.is_set():
            self._set_status("segmenting…")

    def _on_returned(self, outcome: _Outcome) -> None:
        if outcome.cancelled:
            self.progress.setValue(0)
            self._set_status("cancelled")
            return
        try:
            if outcome.error is not None:
                raise outcome.error
            self._show_result(outcome)
        except Exception as err:
            self._fail(err)

    def _on_finished(self) -> None:
        self._worker = None
        self._job_image = self._job_record = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _fail(self, err: BaseException) -> None:
        notify_error(err)
        self.progress.setValue(0)
        self._set_status(f"failed: {err}")

    def _set_status(self, text: str) -> None:
        self.last_status = text
        self.status.setText(text)

    # ------------------------------------------------------------------ results

    def _show_result(self, outcome: _Outcome) -> None:
        from napari.layers import Labels

        result, image, record = outcome.result, self._job_image, self._job_record
        names = list(result.class_names)
        label_names = dict(enumerate(names))
        labels_record = VolumeRecord(result.labels, record.affine, record.spacing, None)
        metadata = {"voco": volume_metadata(labels_record, label_names)}
        features = {"index": np.arange(len(names)), "name": np.asarray(names, dtype=object)}
        name = f"{image.name} segmentation"
        existing = next((unwrap(layer) for layer in self.viewer.layers
                         if layer.name == name and isinstance(layer, Labels)
                         and layer.data.shape == result.labels.shape), None)
        if existing is not None:
            copy_transform(existing, image)
            existing.data = result.labels
            existing.features = features
            existing.metadata = metadata
            layer = existing
        else:
            layer = unwrap(self.viewer.add_labels(result.labels, name=name, features=features,
                                                  metadata=metadata, **transform_kwargs(image)))
        self.labels_layer = layer
        self._show_counts(result, record)
        self.progress.setValue(_PROGRESS_STEPS)
        self._set_status(f"done in {outcome.seconds:.1f} s: {name!r}, "
                         f"{' × '.join(str(s) for s in result.labels.shape)} voxels")

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
