"""The *VoCo finetune* widget: finetune a SwinUNETR segmenter from napari.

Data is a list of image + labels layer pairs (written as NIfTI files with their
affine to ``RUN_DIR/layers/imagesTr`` and ``labelsTr`` when the run starts) or a
folder (``imagesTr``/``labelsTr``) / Decathlon datalist JSON. The encoder can start
from a VoCo checkpoint (an own pretraining run or released weights); the load report
(how many backbone tensors matched) is shown when the run starts. The settings map
onto :func:`voco_core.config.make_finetune_config`: preset, steps
(``train.total_steps``), learning rate (``train.lr``), validation interval
(``train.val_every``), device (``run.device``); :attr:`FinetuneWidget.overrides` is
merged last. *Resume from* continues a finetuning run folder or its ``last.pt``.

The loop is :func:`voco_core.train.finetune.iter_finetune` in a napari thread worker,
with the pretraining widget's pattern (one Start/Stop button, progress with ETA, live
loss and validation Dice curves); the Dice of every class at the latest validation
is listed in a table. When a run ends with a best checkpoint, *Segment <image> with
best checkpoint* segments the chosen image layer with it (in a worker) into a new
Labels layer ``"<image> segmentation"`` with the image's transform.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_voco._layers import LayerCombo, layer_to_record, transform_kwargs, unwrap
from napari_voco._notify import notify_error
from napari_voco._training import (
    CompactStack,
    DeviceCombo,
    LossPlot,
    PathEdit,
    RunControls,
    ScientificSpinBox,
    TrainingRunner,
    check_new_run_dir,
    default_run_dir,
    layer_volume,
    progress_format,
    safe_file_stem,
    step_status,
    write_layer_volume,
)
from voco_core.config import FINETUNE_PRESETS, make_finetune_config, merge
from voco_core.data.io import DatalistEntry, VolumeRecord
from voco_core.errors import VoCoDataError

if TYPE_CHECKING:
    import napari

SOURCE_PAIRS, SOURCE_FOLDER = "Image / labels layer pairs", "Folder or datalist JSON"
PLOT_SERIES = ("loss",)
DICE_SERIES = "val Dice"


@dataclass
class FinetuneJob:
    """Everything the worker needs, gathered in the GUI thread."""

    run_dir: Path
    config: Any = None
    """A :class:`FinetuneConfig`; None when resuming (built in the worker)."""
    data: Any = None
    pairs: list[tuple[str, tuple, tuple, dict | None]] = field(default_factory=list)
    """``(name, (image, affine), (labels, affine), label_names)`` to write first."""
    pretrained: Path | None = None
    resume: Path | None = None
    resume_overrides: dict = field(default_factory=dict)


def _class_names(pairs: list, max_label: int) -> tuple[str, ...] | None:
    """Class names from the first labels layer's ``metadata["voco"]["label_names"]`` when
    they name every value ``0..n-1`` and cover the largest label found."""
    names = pairs[0][3] if pairs else None
    if not names:
        return None
    try:
        by_value = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError):
        return None
    if sorted(by_value) != list(range(len(by_value))) or max_label >= len(by_value):
        return None
    return tuple(by_value[i] for i in range(len(by_value))) if len(by_value) >= 2 else None


def finetune_events(job: FinetuneJob, stop: threading.Event) -> Iterator[Any]:
    """The worker's body: write layer pairs, build a resumed config, then
    :func:`iter_finetune`'s events."""
    from voco_core.train.finetune import finetune_resume_config, iter_finetune

    data, config = job.data, job.config
    if job.pairs:
        taken: set[str] = set()
        folder = job.run_dir / "layers"
        data, max_label = [], 0
        for name, (image, image_affine), (labels, labels_affine), _ in job.pairs:
            stem = safe_file_stem(name, taken)
            data.append(DatalistEntry(
                write_layer_volume(folder / "imagesTr" / f"{stem}.nii", image, image_affine),
                write_layer_volume(folder / "labelsTr" / f"{stem}.nii", labels, labels_affine,
                                   labels=True)))
            max_label = max(max_label, int(labels.max()) if labels.size else 0)
        names = _class_names(job.pairs, max_label)
        if config is not None and names and not config.data.class_names:
            config = replace(config, data=replace(config.data, num_classes=len(names),
                                                  class_names=names)).validate()
    if config is None:
        config = finetune_resume_config(job.resume, **job.resume_overrides)
    yield from iter_finetune(config, data, job.run_dir, pretrained=job.pretrained,
                             resume=job.resume, stop=stop)


def segment_events(record: VolumeRecord, checkpoint: str, device: str,
                   stop: threading.Event) -> Iterator[Any]:
    """Worker body of *Segment with best checkpoint*: yields one
    :class:`~voco_core.inference.SegmentationResult`."""
    from voco_core.inference import load_segmenter, segment

    segmenter = load_segmenter(checkpoint, device)
    try:
        result = segment(record, segmenter, stop=stop)
    finally:
        segmenter.release()
    yield result


class FinetuneWidget(RunControls, QWidget):
    """SwinUNETR finetuning: layer pairs or a folder, optional VoCo weights, one
    Start/Stop button, progress, live loss/Dice, per-class Dice, then segmentation
    with the best checkpoint.

    Signals:
        progressed(object): every :class:`~voco_core.train.finetune.FinetuneEvent`.
        run_finished(): the training worker ended (done, stopped or failed).
        segmented(object): the Labels layer made by *Segment with best checkpoint*.
    """

    progressed = Signal(object)
    run_finished = Signal()
    segmented = Signal(object)

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        from napari.layers import Labels

        self.viewer = napari_viewer
        self.overrides: dict = {}
        """Nested config overrides merged last (e.g. ``{"train": {"samples_per_volume": 1}}``)."""
        self.pairs: list[tuple[Any, Any]] = []
        self.last_event = None
        self.last_error: BaseException | None = None
        self.run_dir: Path | None = None
        self.best_checkpoint: Path | None = None
        self.class_dice: dict[str, float] = {}
        self.labels_layer = None
        self._segment_image = None

        # -- data
        self.source = QComboBox()
        self.source.addItems([SOURCE_PAIRS, SOURCE_FOLDER])
        self.image_combo = LayerCombo(napari_viewer)
        self.labels_combo = LayerCombo(napari_viewer, Labels)
        self.add_pair_button = QPushButton("Add pair")
        self.add_pair_button.setToolTip("add the chosen image and labels layers to the list")
        self.add_pair_button.clicked.connect(self.add_current_pair)
        self.remove_pair_button = QPushButton("Remove")
        self.remove_pair_button.clicked.connect(self.remove_selected_pair)
        self.pair_list = QListWidget()
        self.pair_list.setMaximumHeight(90)
        self.pair_list.setToolTip("training cases; when empty, the pair chosen above is used")
        pair_page = QWidget()
        pair_form = QFormLayout(pair_page)
        pair_form.setContentsMargins(0, 0, 0, 0)
        pair_form.addRow("Image", self.image_combo)
        pair_form.addRow("Labels", self.labels_combo)
        pair_buttons = QHBoxLayout()
        pair_buttons.addWidget(self.add_pair_button)
        pair_buttons.addWidget(self.remove_pair_button)
        pair_form.addRow("", pair_buttons)
        pair_form.addRow("Pairs", self.pair_list)
        self.data_path = PathEdit("folder with imagesTr/ and labelsTr/, or a datalist JSON",
                                  file_filter="Datalists (*.json)", file_button="JSON…")
        self.data_stack = CompactStack()
        self.data_stack.addWidget(pair_page)
        self.data_stack.addWidget(self.data_path)
        self.source.currentIndexChanged.connect(self.data_stack.setCurrentIndex)
        napari_viewer.layers.events.removed.connect(self._prune_pairs)

        # -- settings
        self.pretrained = PathEdit("optional: VoCo pretraining run, checkpoint or released "
                                   "weights", file_filter="Checkpoints (*.pt *.pth)")
        self.preset = QComboBox()
        self.preset.addItems(list(FINETUNE_PRESETS))
        self.steps = QSpinBox()
        self.steps.setRange(1, 100_000_000)
        self.steps.setToolTip("optimizer steps in total (train.total_steps)")
        self.lr = ScientificSpinBox(1e-4)
        self.lr.setToolTip("peak learning rate (train.lr)")
        self.val_every = QSpinBox()
        self.val_every.setRange(1, 100_000_000)
        self.val_every.setToolTip("steps between validations (train.val_every); one is also "
                                  "run at the end")
        self.device = DeviceCombo()
        self.output = PathEdit("run folder (default: ~/napari-voco/runs/finetune-<time>)")
        self.resume = PathEdit("optional: finetuning run folder or its last.pt",
                               file_filter="Checkpoints (*.pt)")
        self.resume.changed.connect(self._on_resume_changed)
        self.preset.currentTextChanged.connect(self.apply_preset)
        self.preset.setCurrentText("base" if self.device.device().startswith("cuda")
                                   else "tiny")
        self.apply_preset(self.preset.currentText())

        form = QFormLayout()
        form.addRow("Data", self.source)
        form.addRow("", self.data_stack)
        form.addRow("Pretrained", self.pretrained)
        form.addRow("Preset", self.preset)
        form.addRow("Steps", self.steps)
        form.addRow("Learning rate", self.lr)
        form.addRow("Validate every", self.val_every)
        form.addRow("Device", self.device)
        form.addRow("Output folder", self.output)
        form.addRow("Resume from", self.resume)
        self.settings = QGroupBox("Finetuning")
        self.settings.setLayout(form)

        # -- run
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.toggle)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("not started")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.report = QPlainTextEdit()
        self.report.setReadOnly(True)
        self.report.setPlaceholderText("pretrained-weights load report (when the run starts)")
        self.report.setMaximumHeight(80)
        self.plot = LossPlot(PLOT_SERIES, ylabel="DiceCE loss", right=(DICE_SERIES,),
                             right_label="validation mean Dice")
        self.dice_label = QLabel("validation Dice: –")
        self.dice_table = QTableWidget(0, 2)
        self.dice_table.setHorizontalHeaderLabels(["class", "Dice"])
        self.dice_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.dice_table.verticalHeader().setVisible(False)
        self.dice_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.dice_table.setMaximumHeight(160)

        self.segment_combo = LayerCombo(napari_viewer)
        self.segment_button = QPushButton()
        self.segment_button.clicked.connect(self.segment_with_best)
        self.segment_combo.currentIndexChanged.connect(self._update_segment_button)
        segment_row = QFormLayout()
        segment_row.addRow("Segment image", self.segment_combo)
        segment_row.addRow(self.segment_button)

        layout = QVBoxLayout(self)
        layout.addWidget(self.settings)
        layout.addWidget(self.start_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.report)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.dice_label)
        layout.addWidget(self.dice_table)
        layout.addLayout(segment_row)

        self.runner = TrainingRunner(self)
        self.runner.event.connect(self._on_event)
        self.runner.failed.connect(self._fail)
        self.runner.finished.connect(self._on_finished)
        self.segment_runner = TrainingRunner(self)
        self.segment_runner.event.connect(self._on_segmented)
        self.segment_runner.failed.connect(self._on_segment_failed)
        self.segment_runner.finished.connect(self._on_segment_finished)
        self._update_segment_button()

    # ------------------------------------------------------------------ properties

    @property
    def segmenting(self) -> bool:
        return self.segment_runner.running

    # ------------------------------------------------------------------ data

    def add_pair(self, image: Any, labels: Any) -> None:
        """Add an image + labels layer pair (:class:`VoCoDataError` when they do not fit)."""
        image, labels = unwrap(image), unwrap(labels)
        if image is None or labels is None:
            raise VoCoDataError("choose an image layer and a labels layer to add a pair")
        image_shape = np.shape(image.data[0] if image.multiscale else image.data)
        labels_shape = np.shape(labels.data[0] if labels.multiscale else labels.data)
        if image_shape != labels_shape:
            raise VoCoDataError(f"labels layer {labels.name!r} has shape {labels_shape}, "
                                f"image layer {image.name!r} {image_shape}: a pair needs the "
                                "same voxel grid")
        if any(pair[0] is image and pair[1] is labels for pair in self.pairs):
            return
        self.pairs.append((image, labels))
        self.pair_list.addItem(QListWidgetItem(f"{image.name}  +  {labels.name}"))

    def add_current_pair(self) -> None:
        """The *Add pair* button."""
        try:
            self.add_pair(self.image_combo.layer(), self.labels_combo.layer())
        except Exception as err:
            self._fail(err)

    def remove_selected_pair(self) -> None:
        row = self.pair_list.currentRow()
        if 0 <= row < len(self.pairs):
            del self.pairs[row]
            self.pair_list.takeItem(row)

    def _prune_pairs(self, event: Any = None) -> None:
        present = [unwrap(layer) for layer in self.viewer.layers]
        for row in reversed(range(len(self.pairs))):
            image, labels = self.pairs[row]
            if not any(image is p for p in present) or not any(labels is p for p in present):
                del self.pairs[row]
                self.pair_list.takeItem(row)

    # ------------------------------------------------------------------ settings

    def apply_preset(self, preset: str) -> None:
        """Fill steps, learning rate and validation interval with the preset's values."""
        config = make_finetune_config(preset, check_device=False)
        self.steps.setValue(config.train.total_steps)
        self.lr.setValue(config.train.lr)
        self.val_every.setValue(config.train.val_every)

    def _on_resume_changed(self, text: str) -> None:
        resuming = bool(text.strip())
        for widget in (self.preset, self.lr, self.pretrained):
            widget.setEnabled(not resuming)
            widget.setToolTip("taken from the run being resumed" if resuming else "")

    def field_overrides(self) -> dict:
        return {
            "train": {"total_steps": self.steps.value(), "lr": float(self.lr.value()),
                      "val_every": self.val_every.value()},
            "run": {"device": self.device.device()},
        }

    def make_job(self) -> FinetuneJob:
        """Check the inputs and gather the run (GUI thread; typed errors for bad input)."""
        resume = self.resume.path()
        if resume is not None and not resume.exists():
            raise VoCoDataError("finetuning run folder or checkpoint to resume not found",
                                resume)
        pretrained = self.pretrained.path() if resume is None else None
        if pretrained is not None and not pretrained.exists():
            raise VoCoDataError("pretrained checkpoint or run folder not found", pretrained)
        run_dir = self.output.path()
        if run_dir is None and resume is not None:
            run_dir = resume if resume.is_dir() else (
                resume.parent.parent if resume.parent.name == "checkpoints" else None)
        if run_dir is None:
            run_dir = default_run_dir("finetune")
            self.output.set_path(run_dir)
        job = FinetuneJob(run_dir=run_dir, resume=resume, pretrained=pretrained)
        fields = self.field_overrides()
        if resume is None:
            check_new_run_dir(run_dir)
            job.config = make_finetune_config(self.preset.currentText(),
                                              merge(fields, self.overrides))
        else:
            from voco_core.config import resolve_device

            resolve_device(self.device.device())
            keep = {"train": {k: fields["train"][k] for k in ("total_steps", "val_every")},
                    "run": fields["run"]}
            job.resume_overrides = merge(keep, self.overrides)
        if self.source.currentText() == SOURCE_PAIRS:
            pairs = list(self.pairs)
            if not pairs:
                image, labels = self.image_combo.layer(), self.labels_combo.layer()
                if image is None or labels is None:
                    raise VoCoDataError("no training pair: choose an image and a labels layer "
                                        "(Add pair), or a data folder")
                self.add_pair(image, labels)
                pairs = list(self.pairs)
            for image, labels in pairs:
                names = ((labels.metadata or {}).get("voco") or {}).get("label_names")
                job.pairs.append((image.name, layer_volume(image),
                                  layer_volume(labels, "labels"), names))
        else:
            data = self.data_path.path()
            if data is None:
                raise VoCoDataError("no data chosen: pick a folder with imagesTr/ and "
                                    "labelsTr/, or a datalist JSON")
            job.data = data
        return job

    # ------------------------------------------------------------------ actions

    def start(self) -> bool:
        """Start finetuning; False (and a notification) when the inputs are bad."""
        if self.running:
            return False
        try:
            job = self.make_job()
        except Exception as err:
            self._fail(err)
            return False
        if self.run_dir is None or Path(job.run_dir) != self.run_dir or job.resume is None:
            self.plot.clear()
        self.run_dir = Path(job.run_dir)
        self.last_error = None
        self.best_checkpoint = None
        self.report.setPlainText("")
        self._set_running(True)
        self.progress.setRange(0, 0)
        self.progress.setFormat("starting…")
        self.status.setText(f"preparing data and model… (run folder {self.run_dir})")
        self.runner.start(functools.partial(finetune_events, job),
                          f"VoCo finetuning → {self.run_dir}")
        return True

    def segment_with_best(self) -> bool:
        """Segment the chosen image layer with the run's best checkpoint (in a worker)."""
        if self.segmenting or self.running:
            return False
        try:
            if self.best_checkpoint is None:
                raise VoCoDataError("no best checkpoint yet: finetune first")
            image = self.segment_combo.layer()
            record = layer_to_record(image)
        except Exception as err:
            self._fail(err)
            return False
        self._segment_image = image
        self.segment_button.setEnabled(False)
        self.segment_button.setText(f"Segmenting {image.name}…")
        self.status.setText(f"segmenting {image.name!r} with {self.best_checkpoint}…")
        self.segment_runner.start(
            functools.partial(segment_events, record, str(self.best_checkpoint),
                              self.device.device()),
            f"VoCo segmentation of {image.name}")
        return True

    # ------------------------------------------------------------------ worker events

    def _on_event(self, event: Any) -> None:
        self.last_event = event
        total = max(int(event.total_steps), 1)
        self.progress.setRange(0, total)
        self.progress.setValue(min(int(event.step), total))
        self.progress.setFormat(progress_format(event.step, event.total_steps,
                                                event.eta_seconds))
        if event.kind == "start":
            self.plot.set_steps(event.total_steps)
            self.report.setPlainText(event.message or "no pretrained weights: the SwinUNETR "
                                     "starts from random weights")
            self.status.setText(f"step {event.step}: training…")
        elif event.kind == "step":
            self.plot.append(event.step, {"loss": event.loss})
            self.status.setText(f"loss {event.loss:.4f} · {step_status(event)}")
        elif event.kind == "validation":
            self.plot.append(event.step, {DICE_SERIES: event.mean_dice})
            self._show_dice(event)
        elif event.kind == "stopped":
            self.status.setText(f"stopped at step {event.step}; checkpoint {event.checkpoint}")
        elif event.kind == "done":
            self.status.setText(f"done: {event.step} steps; best mean Dice "
                                f"{_dice_text(event.best_dice)} at step {event.best_step}")
        if event.best_checkpoint:
            self.best_checkpoint = Path(event.best_checkpoint)
        self.progressed.emit(event)

    def _show_dice(self, event: Any) -> None:
        self.class_dice = dict(event.class_dice)
        self.dice_label.setText(
            f"validation Dice at step {event.step}: mean {_dice_text(event.mean_dice)} "
            f"(best {_dice_text(event.best_dice)} at step {event.best_step})")
        self.dice_table.setRowCount(len(self.class_dice))
        for row, (name, dice) in enumerate(self.class_dice.items()):
            self.dice_table.setItem(row, 0, QTableWidgetItem(name))
            item = QTableWidgetItem(_dice_text(dice))
            item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.dice_table.setItem(row, 1, item)

    def _on_finished(self) -> None:
        self._set_running(False)
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.progress.setFormat("not started")
        if self.best_checkpoint is None and self.run_dir is not None:
            best = self.run_dir / "checkpoints" / "best.pt"
            if best.is_file() and self.last_event is not None:
                self.best_checkpoint = best
        self.plot.redraw()
        self._update_segment_button()
        self.run_finished.emit()

    def _on_segmented(self, result: Any) -> None:
        from napari_voco._io import volume_metadata

        image = self._segment_image
        names = list(result.class_names)
        record = layer_to_record(image)
        labels_record = VolumeRecord(result.labels, record.affine, record.spacing, None)
        layer = self.viewer.add_labels(
            result.labels, name=f"{image.name} segmentation",
            features={"index": np.arange(len(names)), "name": np.asarray(names, dtype=object)},
            metadata={"voco": volume_metadata(labels_record, dict(enumerate(names)))},
            **transform_kwargs(image))
        self.labels_layer = unwrap(layer)
        self.status.setText(f"segmented {image.name!r} into {self.labels_layer.name!r}")
        self.segmented.emit(self.labels_layer)

    def _on_segment_failed(self, err: BaseException) -> None:
        from voco_core.inference import InferenceCancelled

        if isinstance(err, InferenceCancelled):
            self.status.setText("segmentation cancelled")
            return
        self._fail(err)

    def _on_segment_finished(self) -> None:
        self._segment_image = None
        self._update_segment_button()

    def _update_segment_button(self, *args: Any) -> None:
        image = self.segment_combo.layer()
        name = image.name if image is not None else "<image>"
        self.segment_button.setText(f"Segment {name} with best checkpoint")
        self.segment_button.setToolTip(
            str(self.best_checkpoint) if self.best_checkpoint else
            "available when a finetuning run has written a best checkpoint")
        self.segment_button.setEnabled(self.best_checkpoint is not None and image is not None
                                       and not self.running and not self.segmenting)

    def _fail(self, err: BaseException) -> None:
        self.last_error = err
        notify_error(err)
        self.status.setText(f"failed: {err}")

    def _set_running(self, running: bool) -> None:
        super()._set_running(running)
        self._update_segment_button()


def _dice_text(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.3f}"
