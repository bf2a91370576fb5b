"""The *VoCo pretrain* widget: VoCo self-supervised pretraining from napari.

Data is a folder of NIfTI files / a Decathlon datalist JSON, or the open 3-D image
layers (written as NIfTI files with their affine to ``RUN_DIR/layers/`` when the
run starts). The run is planned by :func:`voco_core.plan.plan_pretrain`, as the
CLI plans it: the preset, then the fields as overrides (steps ``optim.total_steps``,
batch ``optim.batch_size``, ``auto`` by default, learning rate ``optim.lr``, teacher
``model.teacher``, loss ``loss.variant``, checkpoint interval ``run.checkpoint_every``, device
``run.device``), then :attr:`PretrainWidget.overrides` (a nested dict, for scripts
and tests). *Resume from* continues a run folder or checkpoint with its own stored
config (steps, batch, device and checkpoint interval from the widget).

The loop is :func:`voco_core.train.iter_pretrain`, run in a child process
(:func:`voco_core.train.child.iter_plan_in_child`: it uses every core, its memory goes
with it, and napari survives it being killed) that the widget's
:class:`~napari_voco._run_panel.RunPanel` supervises from a napari thread worker; the
GUI only displays its events: progress with ETA, live total loss and loss-term curves,
crops/s and memory. *Stop* takes effect before the next step and writes the run's
``last.pt``.

Live inspection: :attr:`PretrainWidget.run_state` (a
:class:`~napari_voco._jobs.RunState`) holds the run's status, step and newest
checkpoint; its ``checkpoint_written`` signal fires (with the path) each time the
run writes one. The positions inspector follows a pretraining through it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QListWidget,
    QListWidgetItem,
    QSpinBox,
    QWidget,
)

from napari_voco._inputs import (
    CompactStack,
    DeviceCombo,
    PathEdit,
    ScientificSpinBox,
    ViewerEvents,
    cuda_device_names,
    narrow,
    release_viewer_events_on_close,
    scrolling_layout,
)
from napari_voco._jobs import JobContext, RunState
from napari_voco._layers import layer_volume, safe_file_stem, unwrap, write_training_volume
from napari_voco._run_panel import RunPanel, TrainingJob, default_run_dir, plan_new_run
from napari_voco._tooltips import TOOLTIPS
from voco_core.config import PRESETS, make_config, merge
from voco_core.data.datalists import DatalistEntry
from voco_core.errors import VoCoDataError
from voco_core.plan import default_preset, plan_pretrain

if TYPE_CHECKING:
    import napari

SOURCE_FOLDER, SOURCE_LAYERS = "Folder or datalist JSON", "Open image layers"


@dataclass
class PretrainJob(TrainingJob):
    """A pretraining to run, and the image layers to train on."""

    layers: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    """``(name, array, affine)`` of image layers to write to ``RUN_DIR/layers``."""
    processes: int = 1
    """Training processes: more than 1 runs ``torchrun --nproc_per_node N`` (DDP)."""


def pretrain_job(job: PretrainJob, context: JobContext) -> Iterator[Any]:
    """The worker's body: plan a resumed run, write layer volumes, then the events of
    the pretraining, which runs in a child process
    (:func:`~voco_core.train.child.iter_plan_in_child`: napari survives it)."""
    from voco_core.train.child import iter_plan_in_child, iter_plan_torchrun

    plan = job.plan or plan_pretrain(resume=job.resume, overrides=job.overrides, out=job.out)
    data: Any = job.data
    if job.layers:
        taken: set[str] = set()
        data = [DatalistEntry(write_training_volume(
                    plan.run_dir / "layers" / f"{safe_file_stem(name, taken)}.nii", array,
                    affine))
                for name, array, affine in job.layers]
    if job.processes > 1:  # the ranks read the data themselves: a folder
        yield from iter_plan_torchrun(plan, plan.run_dir / "layers" if job.layers else data,
                                      job.processes, context.stop)
    else:
        yield from iter_plan_in_child(plan, data, context.stop)


class ImageLayerList(ViewerEvents, QListWidget):
    """Checkable list of the viewer's 3-D single-channel image layers (new ones checked)."""

    def __init__(self, viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self._viewer = viewer
        self._unchecked: set[int] = set()
        self.setToolTip(TOOLTIPS["pretrain_layers"])
        self.setMaximumHeight(110)
        events = viewer.layers.events
        self.listen(events.inserted, self.refresh)
        self.listen(events.removed, self.refresh)
        self.listen(events.reordered, self.refresh)
        self.itemChanged.connect(self._on_item_changed)
        for layer in viewer.layers:
            self.listen(layer.events.name, self.refresh)
        self.refresh()

    @staticmethod
    def _eligible(layer: Any) -> bool:
        from napari.layers import Image

        return isinstance(layer, Image) and not layer.rgb and layer.ndim == 3

    def refresh(self, event: Any = None) -> None:
        value = getattr(event, "value", None)
        if getattr(event, "type", "") == "inserted" and hasattr(value, "events"):
            self.listen(value.events.name, self.refresh)
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


AUTO_BATCH = "auto"
"""The batch spin box's text at 0, and the ``optim.batch_size`` value it stands for."""


def _spin(maximum: int, tooltip: str) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(1, maximum)
    spin.setToolTip(tooltip)
    return spin


def _combo(items: list[str], tooltip: str) -> QComboBox:
    combo = QComboBox()
    combo.addItems(items)
    combo.setToolTip(tooltip)
    return combo


class PretrainWidget(QWidget):
    """VoCo pretraining: data, settings, and the run panel (Start/Stop, progress, live
    loss plot). :attr:`panel` runs and shows the run, :attr:`run_state` is its state."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.overrides: dict = {}
        """Nested config overrides merged last (e.g. ``{"data": {"target_size": [...]}}``)."""

        # -- data
        self.source = narrow(QComboBox())
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
        self.steps = _spin(100_000_000, TOOLTIPS["pretrain_steps"])
        self.batch = _spin(1024, TOOLTIPS["batch"])
        # 0 shows "auto" (optim.batch_size: auto, the default here): the run sizes its
        # micro-batches to the device; the status line says what it chose.
        self.batch.setMinimum(0)
        self.batch.setSpecialValueText(AUTO_BATCH)
        self.batch.setValue(0)
        self.lr = ScientificSpinBox(3e-4)
        self.lr.setToolTip(TOOLTIPS["pretrain_lr"])
        self.teacher = _combo(["full", "head", "none"], TOOLTIPS["teacher"])
        self.variant = _combo(["v1", "v2"], TOOLTIPS["variant"])
        self.variant.currentTextChanged.connect(self._on_variant_changed)
        self.checkpoint_every = _spin(100_000_000, TOOLTIPS["checkpoint_every"])
        self.device = DeviceCombo()
        gpus = len(cuda_device_names())
        self.processes = _spin(max(gpus, 1), TOOLTIPS["processes"])
        self.processes.setMinimum(1)
        self.processes.setValue(1)
        self.output = PathEdit("run folder (default: ~/napari-voco/runs/pretrain-<time>)")
        self.output.setToolTip(TOOLTIPS["output"])
        self.resume = PathEdit("optional: run folder or last.pt to continue",
                               file_filter="Checkpoints (*.pt)")
        self.resume.setToolTip(TOOLTIPS["resume"])
        self.resume.changed.connect(self._on_resume_changed)
        self.preset.currentTextChanged.connect(self.apply_preset)
        self.preset.setCurrentText(default_preset(self.device.device())[0])
        self.apply_preset(self.preset.currentText())

        form = QFormLayout()
        form.addRow("Data", self.source)
        form.addRow("", self.data_stack)
        form.addRow("Preset", self.preset)
        form.addRow("Steps", self.steps)
        form.addRow("Batch", self.batch)
        form.addRow("Learning rate", self.lr)
        form.addRow("Teacher", self.teacher)
        form.addRow("Loss", self.variant)
        form.addRow("Checkpoint every", self.checkpoint_every)
        form.addRow("Device", self.device)
        if gpus > 1:  # one process per GPU through torchrun
            form.addRow("GPUs (torchrun)", self.processes)
        form.addRow("Output folder", self.output)
        form.addRow("Resume from", self.resume)
        self.settings = QGroupBox("Pretraining")
        self.settings.setLayout(form)

        self.panel = RunPanel("pretrain", self.start, self.settings)
        layout = scrolling_layout(self)
        layout.addWidget(self.settings)
        layout.addWidget(self.panel, 1)
        release_viewer_events_on_close(self)

    @property
    def run_state(self) -> RunState:
        """The run's evented state (status, step, total, newest checkpoint)."""
        return self.panel.state

    # ------------------------------------------------------------------ settings

    def apply_preset(self, preset: str) -> None:
        """Fill steps, batch, learning rate, teacher, loss and checkpoint interval with
        the preset's values."""
        config = make_config(preset, check_device=False)
        self.steps.setValue(config.optim.total_steps)
        if self.batch.value() != 0:  # auto stays auto: it adapts to the preset itself
            self.batch.setValue(config.optim.batch_size)
        self.lr.setValue(config.optim.lr)
        self.teacher.setCurrentText(config.model.teacher)
        self.variant.setCurrentText(config.loss.variant)
        self.checkpoint_every.setValue(config.run.checkpoint_every)

    def _on_variant_changed(self, variant: str) -> None:
        # v2 compares the student with the teacher's base crops: it needs a teacher.
        if variant == "v2" and self.teacher.currentText() == "none":
            self.teacher.setCurrentText("head")

    def _on_resume_changed(self, text: str) -> None:
        resuming = bool(text.strip())
        for widget, key in ((self.preset, ""), (self.lr, "pretrain_lr"),
                            (self.teacher, "teacher"), (self.variant, "variant")):
            widget.setEnabled(not resuming)
            widget.setToolTip(TOOLTIPS["resumed"] if resuming else TOOLTIPS.get(key, ""))

    def field_overrides(self, resuming: bool = False) -> dict:
        """The widget's fields as nested config overrides; when ``resuming``, only those
        a resumed run takes (the rest comes from its checkpoint)."""
        run = {"device": self.device.device(), "checkpoint_every": self.checkpoint_every.value()}
        optim = {"total_steps": self.steps.value(),
                 "batch_size": self.batch.value() or AUTO_BATCH}
        if resuming:
            return {"optim": optim, "run": run}
        return {"model": {"teacher": self.teacher.currentText()},
                "loss": {"variant": self.variant.currentText()},
                "optim": {**optim, "lr": float(self.lr.value())}, "run": run}

    def make_job(self) -> PretrainJob:
        """Check the inputs and plan the run (GUI thread; typed errors for bad input)."""
        resume = self.resume.path()
        if resume is not None and not resume.exists():
            raise VoCoDataError("run folder or checkpoint to resume not found", resume)
        out = self.output.path()
        if out is None and resume is None:
            out = default_run_dir("pretrain")
            self.output.set_path(out)
        overrides = merge(self.field_overrides(resuming=resume is not None), self.overrides)
        if resume is None:
            job = PretrainJob(plan_new_run(plan_pretrain, preset=self.preset.currentText(),
                                           overrides=overrides, out=out))
        else:
            from voco_core.config import resolve_device

            resolve_device(self.device.device())  # a missing GPU is reported at once
            job = PretrainJob(resume=resume, overrides=overrides, out=out)
        job.processes = int(self.processes.value())
        if self.source.currentText() == SOURCE_LAYERS:
            layers = self.layer_list.checked_layers()
            if not layers:
                raise VoCoDataError("no image layer chosen: tick at least one 3-D image layer")
            job.layers = [(layer.name, *layer_volume(layer)) for layer in layers]
        else:
            job.data = self.data_path.path()
            if job.data is None:
                raise VoCoDataError("no data chosen: pick a folder of NIfTI files or a "
                                    "datalist JSON")
        return job

    # ------------------------------------------------------------------ actions

    def start(self) -> bool:
        """Start a run with the current settings; False (and a notification) when the
        inputs are bad or a run is already going."""
        if self.panel.running:
            return False
        try:
            job = self.make_job()
        except Exception as err:
            self.panel.fail(err)
            return False
        self.panel.launch(functools.partial(pretrain_job, job),
                          f"VoCo pretraining → {job.run_dir}", job.run_dir,
                          resumed=job.resume is not None)
        return True

    def stop(self) -> None:
        """Stop the run before its next step (a checkpoint is written)."""
        self.panel.stop()

