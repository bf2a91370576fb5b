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

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QListWidget, QListWidgetItem, QWidget

from napari_voco._fields import MAX_STEPS, TrainingFields, combo, spin
from napari_voco._inputs import (
    CompactStack,
    PathEdit,
    ViewerEvents,
    cuda_device_names,
    narrow,
    release_viewer_events_on_close,
)
from napari_voco._jobs import JobContext
from napari_voco._layers import layer_volume, safe_file_stem, unwrap, write_training_volume
from napari_voco._run_panel import TrainingJob
from napari_voco._tooltips import TOOLTIPS
from voco_core.config import PRESETS, make_pretrain_config, merge
from voco_core.data.datalists import DatalistEntry
from voco_core.errors import VoCoDataError
from voco_core.plan import plan_pretrain

# Imported with the widget, in the GUI thread: the training modules (MONAI among them)
# take seconds to import, and imported by the worker thread at a run's start they held
# the GIL long enough to stall napari's event loop (docs/benchmarks.md, GUI vs CLI).
from voco_core.train.child import iter_plan_in_child, iter_plan_torchrun

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


class PretrainWidget(TrainingFields, QWidget):
    """VoCo pretraining: data, settings, and the run panel (Start/Stop, progress, live
    loss plot). :attr:`panel` runs and shows the run, :attr:`run_state` is its state
    (shared fields, start and stop: :class:`~napari_voco._fields.TrainingFields`)."""

    KIND, TITLE = "pretrain", "Pretraining"
    RESUMED_FIELDS = ("teacher", "variant")
    job_body = staticmethod(pretrain_job)

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
        self.add_run_fields(PRESETS, 3e-4, "optional: run folder or last.pt to continue")
        # 0 shows "auto" (optim.batch_size: auto, the default here): the run sizes its
        # micro-batches to the device; the status line says what it chose.
        self.batch = spin(1024, TOOLTIPS["batch"], minimum=0)
        self.batch.setSpecialValueText(AUTO_BATCH)
        self.batch.setValue(0)
        self.teacher = combo(["full", "head", "none"], TOOLTIPS["teacher"])
        self.variant = combo(["v1", "v2"], TOOLTIPS["variant"])
        self.variant.currentTextChanged.connect(self._on_variant_changed)
        self.checkpoint_every = spin(MAX_STEPS, TOOLTIPS["checkpoint_every"])
        gpus = len(cuda_device_names())
        self.processes = spin(max(gpus, 1), TOOLTIPS["processes"])
        self.processes.setValue(1)
        self.choose_default_preset()

        self.add_settings([
            ("Data", self.source), ("", self.data_stack), "preset", "steps",
            ("Batch", self.batch), "lr", ("Teacher", self.teacher), ("Loss", self.variant),
            ("Checkpoint every", self.checkpoint_every), "device",
            # one process per GPU through torchrun
            *([("GPUs (torchrun)", self.processes)] if gpus > 1 else []),
            "output", "resume"])
        release_viewer_events_on_close(self)

    # ------------------------------------------------------------------ settings

    def apply_preset(self, preset: str) -> None:
        """Fill steps, batch, learning rate, teacher, loss and checkpoint interval with
        the preset's values."""
        config = make_pretrain_config(preset, check_device=False)
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
        resume = self.resume_path("run folder or checkpoint")
        out = self.output_folder(resume)
        overrides = merge(self.field_overrides(resuming=resume is not None), self.overrides)
        job = self.training_job(PretrainJob, plan_pretrain, fresh=resume is None,
                                overrides=overrides, out=out, resume=resume)
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

