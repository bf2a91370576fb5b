"""The *VoCo pretrain* widget: VoCo self-supervised pretraining from napari.

Data is a folder of NIfTI files / a Decathlon datalist JSON, or the open 3-D image
layers (written as NIfTI files with their affine to ``RUN_DIR/layers/`` when the
run starts). The settings map onto :func:`voco_core.config.make_config`: preset,
steps (``optim.total_steps``), batch (``optim.batch_size``), learning rate
(``optim.lr``), teacher (``model.teacher``), checkpoint interval
(``run.checkpoint_every``), device (``run.device``); :attr:`PretrainWidget.overrides`
(a nested dict, for scripts and tests) is merged last. *Resume from* continues a run
folder or checkpoint with its own stored config (steps, batch, device and checkpoint
interval from the widget).

The loop is :func:`voco_core.train.pretrain.iter_pretrain`, run in a napari thread
worker (:class:`napari_voco._training.TrainingRunner`); the GUI only displays its
events: progress with ETA, live total/pos/neg/reg loss curves, crops/s and memory.
*Stop* takes effect before the next step and writes ``RUN_DIR/checkpoints/last.pt``.

Live inspection: :attr:`PretrainWidget.latest_checkpoint` is the run's newest
checkpoint and :attr:`PretrainWidget.checkpoint_written` fires (with its path) each
time the run writes one, e.g. for the positions widget to reload it.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_voco._layers import unwrap
from napari_voco._notify import notify_error
from napari_voco._training import (
    PRETRAIN_WIDGETS,
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
from voco_core.config import PRESETS, make_config, merge
from voco_core.data.io import DatalistEntry
from voco_core.errors import VoCoDataError

if TYPE_CHECKING:
    import napari

SOURCE_FOLDER, SOURCE_LAYERS = "Folder or datalist JSON", "Open image layers"
PLOT_SERIES = ("total", "pos", "neg", "reg")


@dataclass
class PretrainJob:
    """Everything the worker needs, gathered in the GUI thread."""

    run_dir: Path
    config: Any = None
    """A :class:`VoCoConfig`; None when resuming (built in the worker from the checkpoint)."""
    data: Any = None
    """A folder / JSON path, or None when ``layers`` are written first."""
    layers: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    """``(name, array, affine)`` of image layers to write to ``run_dir/layers``."""
    resume: Path | None = None
    resume_overrides: dict = field(default_factory=dict)


def pretrain_events(job: PretrainJob, stop: threading.Event) -> Iterator[Any]:
    """The worker's body: write layer volumes, build a resumed config, then
    :func:`iter_pretrain`'s events."""
    from voco_core.train.pretrain import iter_pretrain, resume_config

    data = job.data
    if job.layers:
        taken: set[str] = set()
        entries = []
        for name, array, affine in job.layers:
            path = job.run_dir / "layers" / f"{safe_file_stem(name, taken)}.nii"
            entries.append(DatalistEntry(write_layer_volume(path, array, affine)))
        data = entries
    config = job.config
    if config is None:
        config = resume_config(job.resume, **job.resume_overrides)
    yield from iter_pretrain(config, data, job.run_dir, resume=job.resume, stop=stop)


class ImageLayerList(QListWidget):
    """Checkable list of the viewer's 3-D single-channel image layers (new ones checked)."""

    def __init__(self, viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self._viewer = viewer
        self._unchecked: set[int] = set()
        self.setToolTip("3-D image layers to pretrain on (written to RUN_DIR/layers/)")
        self.setMaximumHeight(110)
        events = viewer.layers.events
        events.inserted.connect(self.refresh)
        events.removed.connect(self.refresh)
        events.reordered.connect(self.refresh)
        self.itemChanged.connect(self._on_item_changed)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    @staticmethod
    def _eligible(layer: Any) -> bool:
        from napari.layers import Image

        return isinstance(layer, Image) and not layer.rgb and layer.ndim == 3

    def refresh(self, event: Any = None) -> None:
        value = getattr(event, "value", None)
        if value is not None and hasattr(value, "events"):
            value.events.name.connect(self.refresh)
        self.blockSignals(True)
        try:
            self.clear()
            for layer in self._viewer.layers:
                layer = unwrap(layer)
                if not self._eligible(layer):
                    continue
                item = QListWidgetItem(layer.name)
                item.setData(Qt.ItemDataRole.UserRole, layer)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                checked = id(layer) not in self._unchecked
                item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
                self.addItem(item)
        finally:
            self.blockSignals(False)

    def _on_item_changed(self, item: QListWidgetItem) -> None:
        layer = item.data(Qt.ItemDataRole.UserRole)
        if item.checkState() == Qt.CheckState.Checked:
            self._unchecked.discard(id(layer))
        else:
            self._unchecked.add(id(layer))

    def layers(self) -> list[Any]:
        """All listed layers."""
        return [self.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.count())]

    def checked_layers(self) -> list[Any]:
        return [self.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.count())
                if self.item(i).checkState() == Qt.CheckState.Checked]

    def set_checked(self, layers: list[Any]) -> None:
        """Check exactly ``layers``."""
        wanted = {id(unwrap(layer)) for layer in layers}
        for i in range(self.count()):
            item = self.item(i)
            on = id(item.data(Qt.ItemDataRole.UserRole)) in wanted
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)


class PretrainWidget(RunControls, QWidget):
    """VoCo pretraining: data, settings, one Start/Stop button, progress, live loss plot.

    Signals:
        checkpoint_written(str): a checkpoint was written (path), at the
            checkpoint interval, at the end, and on stop.
        progressed(object): every :class:`~voco_core.train.pretrain.PretrainEvent`.
        run_finished(): the worker ended (done, stopped or failed).
    """

    checkpoint_written = Signal(str)
    progressed = Signal(object)
    run_finished = Signal()

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        PRETRAIN_WIDGETS.add(self)
        self.overrides: dict = {}
        """Nested config overrides merged last (e.g. ``{"data": {"target_size": [...]}}``)."""
        self.last_event = None
        self.run_dir: Path | None = None
        self.last_error: BaseException | None = None
        self._latest: Path | None = None
        self._emitted: tuple[str, int] | None = None

        # -- data
        self.source = QComboBox()
        self.source.addItems([SOURCE_FOLDER, SOURCE_LAYERS])
        self.data_path = PathEdit("folder of NIfTI files (or imagesTr/), or a datalist JSON",
                                  file_filter="Datalists (*.json)", file_button="JSON…")
        self.layer_list = ImageLayerList(napari_viewer)
        self.data_stack = CompactStack()
        self.data_stack.addWidget(self.data_path)
        self.data_stack.addWidget(self.layer_list)
        self.source.currentIndexChanged.connect(self.data_stack.setCurrentIndex)
        if self.layer_list.count():
            self.source.setCurrentText(SOURCE_LAYERS)

        # -- settings
        self.preset = QComboBox()
        self.preset.addItems(list(PRESETS))
        self.steps = QSpinBox()
        self.steps.setRange(1, 100_000_000)
        self.steps.setToolTip("optimizer steps in total (optim.total_steps)")
        self.batch = QSpinBox()
        self.batch.setRange(1, 1024)
        self.batch.setToolTip("volumes per step (optim.batch_size)")
        self.lr = ScientificSpinBox(3e-4)
        self.lr.setToolTip("peak learning rate (optim.lr), after warm-up")
        self.teacher = QComboBox()
        self.teacher.addItems(["full", "head", "none"])
        self.teacher.setToolTip("EMA teacher: full (backbone + head), head only, or none")
        self.checkpoint_every = QSpinBox()
        self.checkpoint_every.setRange(1, 100_000_000)
        self.checkpoint_every.setToolTip(
            "steps between checkpoints (run.checkpoint_every): fresh weights for live "
            "inspection; one is also written at the end and on Stop")
        self.device = DeviceCombo()
        self.output = PathEdit("run folder (default: ~/napari-voco/runs/pretrain-<time>)")
        self.resume = PathEdit("optional: run folder or last.pt to continue",
                               file_filter="Checkpoints (*.pt)")
        self.resume.changed.connect(self._on_resume_changed)
        self.preset.currentTextChanged.connect(self.apply_preset)
        self.preset.setCurrentText("base" if self.device.device().startswith("cuda")
                                   else "tiny")
        self.apply_preset(self.preset.currentText())

        form = QFormLayout()
        form.addRow("Data", self.source)
        form.addRow("", self.data_stack)
        form.addRow("Preset", self.preset)
        form.addRow("Steps", self.steps)
        form.addRow("Batch", self.batch)
        form.addRow("Learning rate", self.lr)
        form.addRow("Teacher", self.teacher)
        form.addRow("Checkpoint every", self.checkpoint_every)
        form.addRow("Device", self.device)
        form.addRow("Output folder", self.output)
        form.addRow("Resume from", self.resume)
        self.settings = QGroupBox("Pretraining")
        self.settings.setLayout(form)

        # -- run
        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("start pretraining; while it runs: stop at the next step "
                                     "(a checkpoint is written)")
        self.start_button.clicked.connect(self.toggle)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("not started")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.plot = LossPlot(PLOT_SERIES)

        layout = QVBoxLayout(self)
        layout.addWidget(self.settings)
        layout.addWidget(self.start_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.plot, 1)

        self.runner = TrainingRunner(self)
        self.runner.event.connect(self._on_event)
        self.runner.failed.connect(self._on_failed)
        self.runner.finished.connect(self._on_finished)

    # ------------------------------------------------------------------ properties

    @property
    def latest_checkpoint(self) -> Path | None:
        """The run's newest checkpoint (``RUN_DIR/checkpoints/last.pt``) once one was
        written, else None."""
        return self._latest

    # ------------------------------------------------------------------ settings

    def apply_preset(self, preset: str) -> None:
        """Fill steps, batch, learning rate, teacher and checkpoint interval with the
        preset's values."""
        config = make_config(preset, check_device=False)
        self.steps.setValue(config.optim.total_steps)
        self.batch.setValue(config.optim.batch_size)
        self.lr.setValue(config.optim.lr)
        self.teacher.setCurrentText(config.model.teacher)
        self.checkpoint_every.setValue(config.run.checkpoint_every)

    def _on_resume_changed(self, text: str) -> None:
        resuming = bool(text.strip())
        for widget in (self.preset, self.lr, self.teacher):
            widget.setEnabled(not resuming)
            widget.setToolTip("taken from the run being resumed" if resuming else "")

    def field_overrides(self) -> dict:
        """The widget's fields as nested config overrides."""
        return {
            "model": {"teacher": self.teacher.currentText()},
            "optim": {"total_steps": self.steps.value(), "batch_size": self.batch.value(),
                      "lr": float(self.lr.value())},
            "run": {"device": self.device.device(),
                    "checkpoint_every": self.checkpoint_every.value()},
        }

    def make_job(self) -> PretrainJob:
        """Check the inputs and gather the run (GUI thread; typed errors for bad input)."""
        resume = self.resume.path()
        if resume is not None and not resume.exists():
            raise VoCoDataError("run folder or checkpoint to resume not found", resume)
        run_dir = self.output.path()
        if run_dir is None and resume is not None:
            from voco_core.train.pretrain import run_folder_of

            run_dir = run_folder_of(resume)
        if run_dir is None:
            run_dir = default_run_dir("pretrain")
            self.output.set_path(run_dir)
        job = PretrainJob(run_dir=run_dir, resume=resume)
        fields = self.field_overrides()
        if resume is None:
            check_new_run_dir(run_dir)
            job.config = make_config(self.preset.currentText(), merge(fields, self.overrides))
        else:
            from voco_core.config import resolve_device

            resolve_device(self.device.device())  # a missing GPU is reported at once
            keep = {"optim": {k: fields["optim"][k] for k in ("total_steps", "batch_size")},
                    "run": fields["run"]}
            job.resume_overrides = merge(keep, self.overrides)
        if self.source.currentText() == SOURCE_LAYERS:
            layers = self.layer_list.checked_layers()
            if not layers:
                raise VoCoDataError("no image layer chosen: tick at least one 3-D image layer")
            job.layers = [(layer.name, *layer_volume(layer)) for layer in layers]
        else:
            data = self.data_path.path()
            if data is None:
                raise VoCoDataError("no data chosen: pick a folder of NIfTI files or a "
                                    "datalist JSON")
            job.data = data
        return job

    # ------------------------------------------------------------------ actions

    def start(self) -> bool:
        """Start a run with the current settings; False (and a notification) when the
        inputs are bad or a run is already going."""
        if self.running:
            return False
        try:
            job = self.make_job()
        except Exception as err:
            self._fail(err)
            return False
        if self.run_dir is None or Path(job.run_dir) != self.run_dir or job.resume is None:
            self.plot.clear()
            self._latest = None
        self.run_dir = Path(job.run_dir)
        self.last_error = None
        self._emitted = None
        self._set_running(True)
        self.progress.setRange(0, 0)  # busy until the start event
        self.progress.setFormat("starting…")
        self.status.setText(f"preparing data and model… (run folder {self.run_dir})")
        self.runner.start(functools.partial(pretrain_events, job),
                          f"VoCo pretraining → {self.run_dir}")
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
            self._load_history(event)
            self.status.setText(f"step {event.step}: loading the first batch…")
        elif event.kind == "step":
            self.plot.append(event.step, {"total": event.loss, "pos": event.pos,
                                          "neg": event.neg, "reg": event.reg})
            self.status.setText(f"loss {event.loss:.4f} · {step_status(event)}")
        elif event.kind == "stopped":
            self.status.setText(f"stopped at step {event.step}; checkpoint {event.checkpoint}")
        elif event.kind == "done":
            self.plot.redraw()
            self.status.setText(f"done: {event.step} steps; checkpoint {event.checkpoint}")
        if event.checkpoint and self._emitted != (event.checkpoint, event.step):
            self._emitted = (event.checkpoint, event.step)
            self._latest = Path(event.checkpoint)
            self.checkpoint_written.emit(str(event.checkpoint))
        self.progressed.emit(event)

    def _load_history(self, event: Any) -> None:
        """On resume, show the curves logged so far (``log.jsonl``) when the plot is empty."""
        if event.step == 0 or self.plot.series["total"][0]:
            return
        from voco_core.train.pretrain import read_log

        try:
            records = read_log(Path(event.run_dir) / "log.jsonl")
        except (OSError, ValueError, KeyError):
            return
        for record in records:
            if record.get("step", math.inf) <= event.step:
                self.plot.append(record["step"], {"total": record.get("loss"),
                                                  "pos": record.get("pos"),
                                                  "neg": record.get("neg"),
                                                  "reg": record.get("reg")})

    def _on_failed(self, err: BaseException) -> None:
        self._fail(err)

    def _on_finished(self) -> None:
        self._set_running(False)
        if self.progress.maximum() == 0:  # ended before the start event
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.progress.setFormat("not started")
        self.plot.redraw()
        self.run_finished.emit()

    def _fail(self, err: BaseException) -> None:
        self.last_error = err
        notify_error(err)
        self.status.setText(f"failed: {err}")
