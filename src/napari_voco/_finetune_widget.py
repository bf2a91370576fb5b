"""The *VoCo finetune* widget: finetune a SwinUNETR segmenter from napari.

Data (:mod:`napari_voco._training_data`) is a list of image + labels layer pairs
(written as NIfTI files with their affine to ``RUN_DIR/layers/imagesTr`` and
``labelsTr`` when the run starts) or a folder (``imagesTr``/``labelsTr``) / Decathlon
datalist JSON. The encoder can start
from a VoCo checkpoint (an own pretraining run or released weights); the load report
(how many backbone tensors matched) is shown when the run starts. The run is
planned by :func:`voco_core.plan.plan_finetune`: the preset, then the fields as
overrides (steps ``train.total_steps``, learning rate ``train.lr``, validation
interval ``train.val_every``, device ``run.device``, class names from the first
labels layer), then :attr:`FinetuneWidget.overrides`. *Resume from* continues a
finetuning run folder or its ``last.pt``.

The loop is :func:`voco_core.train.iter_finetune`, run in a child process and
supervised by the same :class:`~napari_voco._run_panel.RunPanel` as pretraining (one
Start/Stop button, progress with ETA, live loss and validation Dice curves); the Dice of every class
at the latest validation is listed in a table. When a run ends with a best
checkpoint, *Segment <image> with best checkpoint* segments the chosen image layer
with it (the segment widget's job) into the Labels layer ``"<image> segmentation"``.

Sparse labels and the correct-and-retrain loop (:mod:`napari_voco._sparse`):
*annotated slices only* turns each pair's labels into a sparse map (the slices the
user painted on or accepted along the chosen axis, the rest ``data.ignore_label``)
before they are written, and holds some annotated slices out for validation
(``RUN_DIR/layers/labelsVal`` and ``dataset.json``'s ``validation`` section;
:func:`voco_core.data.sparse.holdout_slices`); *Copy prediction to training labels*
copies the segmentation into the pair's Labels layer for review (a copied slice is
no training label until painted on or accepted with *Accept slice*); *Continue
finetuning* starts a new run (``RUN_r2``, ...) from the last run's best checkpoint
with the current labels (:func:`voco_core.plan.plan_continue`); each round's best
Dice on held-out slices is listed, or why there is none. Each segmentation also
shows its uncertainty (``"<image> uncertainty"``, the softmax entropy) and the
slices to annotate next (:func:`voco_core.inference.suggest_slices`).
*Export MONAI Bundle…* (:mod:`napari_voco._export`) writes the last run (else the run
in *Resume from*) as a MONAI Bundle.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_voco._export import BundleExporter
from napari_voco._fields import MAX_STEPS, TrainingFields, spin
from napari_voco._inputs import (
    LayerCombo,
    PathEdit,
    ViewerEvents,
    narrow,
    release_viewer_events_on_close,
)
from napari_voco._jobs import JobContext, JobRunner, JobState
from napari_voco._layers import (
    current_slice,
    layer_to_record,
    safe_file_stem,
    show_segmentation,
    transform_kwargs,
    unwrap,
    write_training_volume,
)
from napari_voco._run_panel import TrainingJob
from napari_voco._sparse import (
    COPY_SLICE,
    COPY_VOLUME,
    ReviewTable,
    RoundsTable,
    copy_prediction,
    describe_slices,
    go_to_slice,
    slicing_axis,
)
from napari_voco._text import format_dice
from napari_voco._tooltips import TOOLTIPS
from napari_voco._training_data import TrainingData
from voco_core.config import FINETUNE_PRESETS, make_finetune_config, merge
from voco_core.data.datalists import DatalistEntry
from voco_core.errors import VoCoDataError
from voco_core.inference import SegmentationResult, SliceScore
from voco_core.plan import next_round_folder, plan_continue, plan_finetune
from voco_core.run_folder import RunFolder

# Imported with the widget, in the GUI thread: the training modules (MONAI among them)
# take seconds to import, and imported by the worker thread at a run's start they held
# the GIL long enough to stall napari's event loop (docs/benchmarks.md, GUI vs CLI).
from voco_core.train.child import iter_plan_in_child

if TYPE_CHECKING:
    import napari

DICE_SERIES = "val Dice"
NOT_HELD_OUT = "no held-out case or slice: validated on the training data"
"""The rounds table's note for a run that validated on what it trained on (dense
labels, one pair)."""


@dataclass
class FinetuneJob(TrainingJob):
    """A finetuning to run, and the image/labels layer pairs to train on."""

    pairs: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    """``(name, (image, affine), (labels, affine))`` to write first."""
    continue_from: Path | None = None
    """A finetuning run folder to continue from (:func:`voco_core.plan.plan_continue`,
    planned in the worker: it loads the checkpoint); ``out`` is the new run folder."""
    validation: list[tuple[int, tuple]] = field(default_factory=list)
    """``(index in pairs, (labels, affine))``: held-out slices of that pair (its
    validation map on the pair's image), written to ``layers/labelsVal`` and listed in
    ``layers/dataset.json``'s ``validation`` section."""


@dataclass
class ReviewMaps:
    """What a segmentation of the finetune widget says about where to look next:
    ``entropy`` (the image's grid, nats) and the ``ranking`` of slices along ``axis``
    (every slice; the table leaves out the annotated ones)."""

    entropy: np.ndarray
    ranking: list[SliceScore]
    axis: int


def finetune_job(job: FinetuneJob, context: JobContext) -> Iterator[Any]:
    """The worker's body: plan a resumed or continued run, write layer pairs, then the
    events of the finetuning, which runs in a child process
    (:func:`~voco_core.train.child.iter_plan_in_child`: napari survives it)."""
    if job.plan is not None:
        plan = job.plan
    elif job.continue_from is not None:
        plan = plan_continue(job.continue_from, overrides=job.overrides, out=job.out)
    else:
        plan = plan_finetune(resume=job.resume, overrides=job.overrides, out=job.out)
    data: Any = job.data
    if job.pairs:
        data = write_layer_pairs(plan.run_dir / "layers", job.pairs, job.validation)
    yield from iter_plan_in_child(plan, data, context.stop)


def write_layer_pairs(folder: Path, pairs: list, validation: list) -> Any:
    """Write the layer pairs to ``folder/imagesTr`` and ``labelsTr``; the entries, or
    with ``validation`` maps (``labelsVal``, on the pairs' images) a Decathlon
    ``dataset.json`` with both sections, which the trainer reads its validation from."""
    taken: set[str] = set()
    entries, held = [], dict(validation)
    listed: dict[str, list] = {"training": [], "validation": []}
    for row, (name, (image, image_affine), (labels, labels_affine)) in enumerate(pairs):
        stem = safe_file_stem(name, taken)
        image_file = write_training_volume(folder / "imagesTr" / f"{stem}.nii", image,
                                           image_affine)
        entries.append(DatalistEntry(image_file, write_training_volume(
            folder / "labelsTr" / f"{stem}.nii", labels, labels_affine, labels=True)))
        listed["training"].append({"image": f"imagesTr/{stem}.nii",
                                   "label": f"labelsTr/{stem}.nii"})
        if row in held:
            val_labels, val_affine = held[row]
            write_training_volume(folder / "labelsVal" / f"{stem}.nii", val_labels,
                                  val_affine, labels=True)
            listed["validation"].append({"image": f"imagesTr/{stem}.nii",
                                         "label": f"labelsVal/{stem}.nii"})
    if not listed["validation"]:
        return entries
    datalist = folder / "dataset.json"
    datalist.write_text(json.dumps(listed, indent=1), encoding="utf-8")
    return datalist


def review_segmentation_job(record: Any, checkpoint: str, device: str, axis: int,
                            context: JobContext) -> Iterator[Any]:
    """The finetune widget's segmentation (in a worker): the
    :class:`~voco_core.inference.SegmentationResult` (labels), then its
    :class:`ReviewMaps` (entropy of the softmax, slices ranked for review along
    ``axis``). Cancelling ends it without a result."""
    from voco_core.inference import (
        InferenceCancelled,
        load_segmenter,
        predictive_entropy,
        segment,
        suggest_slices,
    )

    segmenter = load_segmenter(checkpoint, device)
    try:
        if context.stop.is_set():
            return
        result = segment(record, segmenter, probabilities=True, stop=context.stop)
    except InferenceCancelled:
        return
    finally:
        segmenter.release()
    entropy = predictive_entropy(result.probabilities)
    result = replace(result, probabilities=None)  # the probabilities' memory goes now
    yield result
    ranking = suggest_slices(entropy, result.labels, None, axis, len(result.class_names))
    yield ReviewMaps(entropy, ranking, axis)


class FinetuneWidget(TrainingFields, ViewerEvents, QWidget):
    """SwinUNETR finetuning: layer pairs or a folder, optional VoCo weights, the run
    panel (Start/Stop, progress, live loss/Dice), per-class Dice, then segmentation
    with the best checkpoint (shared fields, start and stop:
    :class:`~napari_voco._fields.TrainingFields`).

    Signals:
        segmented(object): the Labels layer made by *Segment with best checkpoint*.
    """

    segmented = Signal(object)
    KIND, TITLE = "finetune", "Finetuning"
    RESUMED_FIELDS = ("pretrained",)
    job_body = staticmethod(finetune_job)

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)

        self.viewer = napari_viewer
        self.overrides: dict = {}
        """Nested config overrides merged last (e.g. ``{"train": {"samples_per_volume": 1}}``)."""
        self.best_checkpoint: Path | None = None
        self.class_dice: dict[str, float] = {}
        self.labels_layer = None
        self.segmented_image = None  # the image layer self.labels_layer segments
        self.last_run_dir: Path | None = None
        self._segment_job: tuple[Any, Any] | None = None  # (image layer, its record)
        self._continuing = False  # the running run continues the previous one
        self._run_note = ""  # parent and annotated slices, shown with the status
        self._holdout_note = ""  # sparse labels with no held-out slice: why
        self._inputs = None  # the TrainingInputs of the run being started
        self._from_random = False  # the running job starts from random weights
        self.uncertainty_layer = None  # "<image> uncertainty" of the last segmentation
        self._class_names: list[str] = []  # the last segmentation's classes

        # -- data (its rows go first in the settings form)
        self.data = TrainingData(napari_viewer, lambda err: self.panel.fail(err), self)

        # -- settings
        self.pretrained = PathEdit("optional: VoCo pretraining run, checkpoint or released "
                                   "weights", file_filter="Checkpoints (*.pt *.pth)")
        self.pretrained.setToolTip(TOOLTIPS["pretrained"])
        self.add_run_fields(FINETUNE_PRESETS, 1e-4,
                            "optional: finetuning run folder or its last.pt")
        self.val_every = spin(MAX_STEPS, TOOLTIPS["val_every"])
        self.choose_default_preset()

        # -- settings and run
        form = QFormLayout()
        self.data.add_rows(form)
        layout = self.add_settings(
            [("Pretrained", self.pretrained), "preset", "steps", "lr",
             ("Validate every", self.val_every), "device", "output", "resume"],
            form, loss_name="loss", ylabel="DiceCE loss", right=(DICE_SERIES,),
            right_label="validation mean Dice")
        self.panel.progressed.connect(self._on_event)
        self.panel.run_finished.connect(self._on_finished)
        self.report = QPlainTextEdit()
        self.report.setReadOnly(True)
        self.report.setPlaceholderText("pretrained-weights load report (when the run starts)")
        self.report.setMaximumHeight(80)
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

        # -- correct and retrain
        self.copy_scope = narrow(QComboBox(), 6)
        self.copy_scope.addItems([COPY_VOLUME, COPY_SLICE])
        self.copy_button = QPushButton("Copy prediction to training labels")
        self.copy_button.setToolTip(TOOLTIPS["copy_prediction_review"])
        self.copy_button.clicked.connect(self.copy_prediction)
        self.accept_button = QPushButton("Accept slice")
        self.accept_button.setCheckable(True)
        self.accept_button.setToolTip(TOOLTIPS["accept_slice"])
        self.accept_button.clicked.connect(self.accept_slice)
        self.review = ReviewTable(self.go_to_review_slice)
        self.review.setToolTip(TOOLTIPS["review_next"])
        self.continue_button = QPushButton("Continue finetuning")
        self.continue_button.setToolTip(TOOLTIPS["continue"])
        self.continue_button.clicked.connect(self.continue_finetuning)
        self.rounds = RoundsTable()
        copy_row = QHBoxLayout()
        copy_row.addWidget(self.copy_button, 1)
        copy_row.addWidget(self.copy_scope)
        segment_row.addRow(copy_row)
        segment_row.addRow("Review next", self.review)
        segment_row.addRow(self.accept_button)
        segment_row.addRow(self.continue_button)
        segment_row.addRow("Rounds", self.rounds)
        self.exporter = BundleExporter(self, self.export_source, self.panel.status,
                                       self.panel.fail)
        self.exporter.finished.connect(self._update_segment_button)
        self.resume.changed.connect(self._update_segment_button)
        segment_row.addRow(self.exporter.button)

        layout.addWidget(self.report)
        layout.addWidget(self.dice_label)
        layout.addWidget(self.dice_table)
        layout.addLayout(segment_row)

        self.data.annotations_changed.connect(self._on_annotations_changed)
        self.listen(napari_viewer.dims.events.current_step, self._update_accept_button)
        self.segment_runner = JobRunner("segment", self, on_event=self._on_segment_event,
                                        on_failed=self.panel.fail,
                                        on_finished=self._on_segment_finished)
        self.panel.state.events.status.connect(self._update_segment_button)
        self._update_segment_button()
        release_viewer_events_on_close(self)

    @property
    def segmenting(self) -> bool:
        """True while *Segment with best checkpoint* runs (:attr:`panel`'s ``running``:
        while a training runs)."""
        return self.segment_runner.running

    # ------------------------------------------------------------------ settings

    def apply_preset(self, preset: str) -> None:
        """Fill steps, learning rate and validation interval with the preset's values."""
        config = make_finetune_config(preset, check_device=False)
        self.steps.setValue(config.train.total_steps)
        self.lr.setValue(config.train.lr)
        self.val_every.setValue(config.train.val_every)

    def field_overrides(self, resuming: bool = False) -> dict:
        """The widget's fields as nested config overrides; when ``resuming``, only those
        a resumed run takes (the rest comes from its checkpoint)."""
        train = {"total_steps": self.steps.value(), "val_every": self.val_every.value()}
        if not resuming:
            train["lr"] = float(self.lr.value())
        return {"train": train, "run": {"device": self.device.device()}}

    def make_job(self, continue_from: Path | None = None) -> FinetuneJob:
        """Check the inputs and plan the run (GUI thread; typed errors for bad input);
        ``continue_from``: a finished run folder this run continues (new folder beside it)."""
        resume = (None if continue_from is not None
                  else self.resume_path("finetuning run folder or checkpoint"))
        fresh = resume is None and continue_from is None
        pretrained = self.pretrained.path() if fresh else None  # plan checks it
        self._from_random = fresh and pretrained is None
        out = (next_round_folder(continue_from) if continue_from is not None
               else self.output_folder(resume))
        overrides = self.field_overrides(resuming=resume is not None)
        inputs = self.data.gather(fresh, continuing=continue_from is not None)
        self._inputs = inputs
        self._run_note = inputs.note
        self._holdout_note = inputs.holdout_note
        if inputs.data_overrides:
            overrides = merge(overrides, {"data": inputs.data_overrides})
        if continue_from is not None:
            self._run_note = "; ".join(filter(None, (
                f"continues {continue_from.name} → {out.name}", self._run_note)))
        overrides = merge(overrides, self.overrides)
        # resumed or continued: planned in the worker (it loads a checkpoint)
        job = self.training_job(FinetuneJob, plan_finetune, fresh=fresh, overrides=overrides,
                                out=out, plan_options={"pretrained": pretrained},
                                resume=resume, continue_from=continue_from)
        job.pairs, job.data, job.validation = inputs.pairs, inputs.data, inputs.validation
        return job

    # ------------------------------------------------------------------ actions

    def start(self, continue_from: Path | None = None) -> bool:
        """Start finetuning (``continue_from``: see :meth:`make_job`); False (and a
        notification) when the inputs are bad."""
        if self.segmenting:
            return False
        job = self.planned_job(functools.partial(self.make_job, continue_from))
        if job is None:
            return False
        self.best_checkpoint = None
        self.last_run_dir = job.run_dir
        self._continuing = continue_from is not None
        self.report.setPlainText("")
        self.launch_job(job)
        if self._inputs is not None:
            self.data.record_rounds(self._inputs)  # trained / held-out slices, per layer
        if self._run_note:
            self.panel.status.setText(self._run_note)
        self._update_segment_button()
        return True

    def can_continue(self) -> bool:
        """A previous run of this widget left a best.pt or last.pt to continue from."""
        if self.last_run_dir is None:
            return False
        folder = RunFolder(self.last_run_dir)
        return folder.best.is_file() or folder.last.is_file()

    def export_source(self) -> Path | None:
        """The run *Export MONAI Bundle…* exports: this widget's last run, else the run
        in *Resume from* (None: neither)."""
        return self.last_run_dir if self.can_continue() else self.resume.path()

    def continue_finetuning(self) -> bool:
        """*Continue finetuning*: a new run (``RUN_r2``, ...) from the last run's best
        checkpoint, with the current labels and the widget's steps."""
        if not self.can_continue():
            self.panel.fail(VoCoDataError("nothing to continue: finetune first (a run "
                                          "folder with best.pt or last.pt)"))
            return False
        return self.start(continue_from=self.last_run_dir)

    def copy_prediction(self) -> int:
        """*Copy prediction to training labels* (whole volume, the annotated slices
        kept, or the current slice); returns the number of voxels changed (-1 and a
        notification on failure). The copy marks no slice annotated, and switches
        *annotated slices only* on: only reviewed slices train."""
        try:
            if self.labels_layer is None or not any(
                    unwrap(layer) is self.labels_layer for layer in self.viewer.layers):
                raise VoCoDataError("no prediction to copy: segment an image with the best "
                                    "checkpoint first")
            target = self.data.labels_paired_with(self.segmented_image)
            tracker = self.data.tracker_of(target)
            axis, index = self.data.sparse_axis_of(target), None
            if self.copy_scope.currentText() == COPY_SLICE:
                index = current_slice(self.viewer, target, axis)
            kept = tracker.annotated(axis)
            changed = copy_prediction(self.labels_layer, target, axis, index, tracker)
        except Exception as err:
            self.panel.fail(err)
            return -1
        switched = not self.data.sparse.isChecked()
        self.data.sparse.setChecked(True)
        if index is not None:
            where = f" (slice {index} of axis {axis})"
        elif kept.any():
            where = f" (annotated slices {describe_slices(np.flatnonzero(kept))} kept)"
        else:
            where = ""
        self.panel.status.setText(
            f"copied {self.labels_layer.name!r} into {target.name!r}{where}: {changed} voxels "
            "changed; a copied slice trains only once you review it: paint a correction or "
            "Accept slice, then Continue finetuning"
            + ("; 'annotated slices only' switched on" if switched else ""))
        self._update_accept_button()
        return changed

    def accept_slice(self, *args: Any) -> bool:
        """*Accept slice*: mark the slice shown of the training labels layer annotated as
        it is (the button checked), or take the mark back (unchecked)."""
        accepted = self.accept_button.isChecked()
        try:
            layer, axis, index = self.data.accept_current(self.segmented_image, accepted)
        except Exception as err:
            self.panel.fail(err)
            self._update_accept_button()
            return False
        count = self.data.tracker_of(layer).count(axis)
        self.panel.status.setText(
            f"{'accepted' if accepted else 'no longer annotated:'} slice {index} of "
            f"{layer.name!r} (axis {axis}); {count} annotated slice{'s' if count != 1 else ''}")
        self._update_accept_button()
        return True

    def go_to_review_slice(self, index: int) -> None:
        """A *Review next* row clicked: show that slice (along the ranking's axis)."""
        layer = self.segmented_image
        if layer is None or not any(unwrap(x) is layer for x in self.viewer.layers):
            return
        go_to_slice(self.viewer, layer, self.review.axis, index)
        self.panel.status.setText(f"slice {index} of axis {self.review.axis}: review it "
                                  "(paint a correction or Accept slice)")

    def segment_with_best(self) -> bool:
        """Segment the chosen image layer with the run's best checkpoint (in a worker),
        with its uncertainty and the slices to review next."""
        if self.segmenting or self.panel.running:
            return False
        try:
            if self.best_checkpoint is None:
                raise VoCoDataError("no best checkpoint yet: finetune first")
            image = self.segment_combo.layer()
            record = layer_to_record(image, self.viewer)
            axis = self._review_axis(image)
        except Exception as err:
            self.panel.fail(err)
            return False
        self._segment_job = (image, record)
        self.segment_button.setEnabled(False)
        self.segment_button.setText(f"Segmenting {image.name}…")
        self.panel.status.setText(f"segmenting {image.name!r} with {self.best_checkpoint}…")
        checkpoint, device = str(self.best_checkpoint), self.device.device()
        self.segment_runner.start(
            lambda context: review_segmentation_job(record, checkpoint, device, axis, context),
            f"VoCo segmentation of {image.name}")
        return True

    def _review_axis(self, image: Any) -> int:
        """The axis to rank slices along: the sparse axis of the image's training labels,
        else the axis napari is slicing."""
        try:
            return self.data.sparse_axis_of(self.data.labels_paired_with(image))
        except VoCoDataError:
            return slicing_axis(self.viewer, image)

    def _review_annotated(self) -> np.ndarray | None:
        """The annotated slices (along the ranking's axis) of the labels layer paired
        with the segmented image; None when there is none."""
        try:
            target = self.data.labels_paired_with(self.segmented_image)
        except VoCoDataError:
            return None
        return self.data.tracker_of(target).annotated(self.review.axis)

    # ------------------------------------------------------------------ worker events

    def _on_event(self, event: Any) -> None:
        if event.kind == "start":
            backbone = ("no pretrained weights: the SwinUNETR starts from random weights"
                        if self._from_random else "")
            self.report.setPlainText("\n".join(filter(None, (backbone, event.message))))
            self.panel.status.setText("; ".join(filter(None, (
                f"step {event.step}: training…", self._run_note))))
        elif event.kind == "validation":
            self.panel.plot.append(event.step, {DICE_SERIES: event.mean_dice})
            self._show_dice(event)
        elif event.kind == "done":
            self.panel.status.setText(
                f"done: {event.step} steps; best mean Dice {format_dice(event.best_dice)} "
                f"at step {event.best_step}")
        if event.best_checkpoint:
            self.best_checkpoint = Path(event.best_checkpoint)

    def _show_dice(self, event: Any) -> None:
        self.class_dice = dict(event.class_dice)
        on = f" on the training slices ({self._holdout_note})" if self._holdout_note else ""
        self.dice_label.setText(
            f"validation Dice{on} at step {event.step}: mean {format_dice(event.mean_dice)} "
            f"(best {format_dice(event.best_dice)} at step {event.best_step})")
        self.dice_table.setRowCount(len(self.class_dice))
        for row, (name, dice) in enumerate(self.class_dice.items()):
            self.dice_table.setItem(row, 0, QTableWidgetItem(name))
            item = QTableWidgetItem(format_dice(dice))
            item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.dice_table.setItem(row, 1, item)

    def _on_finished(self) -> None:
        last = self.panel.last_event
        if self.best_checkpoint is None and last is not None:
            best = RunFolder(self.panel.state.run_dir).best
            if best.is_file():
                self.best_checkpoint = best
        if last is not None and last.kind in ("done", "stopped") and self.last_run_dir:
            self.rounds.add(self.last_run_dir, last.step, last.best_dice, self._continuing,
                            note=self._validation_note(self.last_run_dir))
        self._update_segment_button()

    def _validation_note(self, run_dir: Path) -> str:
        """"" when the run validated on held-out slices or cases (its ``meta.json``:
        ``validated_on``), else why there is no held-out Dice."""
        try:
            meta = json.loads(RunFolder(run_dir).meta.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("validated_on") == "validation":
            return ""
        return self._holdout_note or NOT_HELD_OUT

    def _on_segment_event(self, event: Any) -> None:
        if self._segment_job is None:
            return
        image, record = self._segment_job
        if isinstance(event, ReviewMaps):
            self._show_review(image, event)
            return
        if not isinstance(event, SegmentationResult):
            return
        self.labels_layer = show_segmentation(self.viewer, image, record, event)
        self.data.track_prediction(self.labels_layer)  # a prediction: nothing reviewed
        self.segmented_image = image
        self._class_names = list(event.class_names)
        self.panel.status.setText(f"segmented {image.name!r} into {self.labels_layer.name!r}")
        self.segmented.emit(self.labels_layer)

    def _show_review(self, image: Any, maps: ReviewMaps) -> None:
        """The uncertainty layer ``"<image> uncertainty"`` and the *Review next* list."""
        from napari.layers import Image

        name = f"{image.name} uncertainty"
        classes = max(2, len(self._class_names))
        limits = (0.0, float(math.log(classes)))
        existing = next((unwrap(layer) for layer in self.viewer.layers
                         if layer.name == name and isinstance(layer, Image)
                         and layer.data.shape == maps.entropy.shape), None)
        if existing is None:
            self.uncertainty_layer = unwrap(self.viewer.add_image(
                maps.entropy, name=name, colormap="inferno", blending="additive",
                contrast_limits=limits, opacity=0.6,
                metadata={"voco_uncertainty": "predictive entropy of the softmax (nats)"},
                **transform_kwargs(image)))
        else:
            existing.data = maps.entropy
            existing.contrast_limits = limits
            self.uncertainty_layer = existing
        self.review.show_ranking(maps.ranking, self._class_names, maps.axis,
                                 self._review_annotated())
        if self.labels_layer is not None:  # the prediction stays the selected layer
            self.viewer.layers.selection.active = self.labels_layer
        top = ", ".join(str(r.index) for r in maps.ranking[:3])
        self.panel.status.setText(f"segmented {image.name!r}: uncertainty in {name!r}; "
                                  f"review next along axis {maps.axis}: {top} …")

    def _on_annotations_changed(self, layer: Any = None) -> None:
        if self.review.ranking:
            self.review.refresh(self._review_annotated())
        self._update_accept_button()

    def _update_accept_button(self, *args: Any) -> None:
        """Checked when the slice shown is annotated in the labels layer it works on."""
        try:
            layer = self.data.review_target(self.segmented_image)
            axis = self.data.sparse_axis_of(layer)
            index = current_slice(self.viewer, layer, axis)
            annotated = bool(self.data.tracker_of(layer).reviewed[axis][index])
        except Exception:
            self.accept_button.setEnabled(False)
            self.accept_button.setText("Accept slice")
            return
        self.accept_button.setEnabled(True)
        self.accept_button.setChecked(annotated)
        self.accept_button.setText(f"Slice {index} annotated (click: take back)"
                                   if annotated else f"Accept slice {index}")
        self.accept_button.setToolTip(f"{TOOLTIPS['accept_slice']} (labels layer "
                                      f"{layer.name!r}, axis {axis})")

    def _on_segment_finished(self) -> None:
        if self.segment_runner.state.status == JobState.STOPPED:
            self.panel.status.setText("segmentation cancelled")
        self._segment_job = None
        self._update_segment_button()

    def _update_segment_button(self, *args: Any) -> None:
        image = self.segment_combo.layer()
        name = image.name if image is not None else "<image>"
        self.segment_button.setText(f"Segment {name} with best checkpoint")
        self.segment_button.setToolTip(
            str(self.best_checkpoint) if self.best_checkpoint else
            "available when a finetuning run has written a best checkpoint")
        idle = not self.panel.running and not self.segmenting
        self.segment_button.setEnabled(self.best_checkpoint is not None and image is not None
                                       and idle)
        self.continue_button.setEnabled(idle and self.can_continue())
        self.copy_button.setEnabled(idle and self.labels_layer is not None)
        self.exporter.button.setEnabled(idle and not self.exporter.running
                                        and self.export_source() is not None)
