"""The *VoCo positions* inspector: what a pretrained VoCo network believes about position.

Pick a 3-D image layer and a pretraining checkpoint (run folder or ``.pt``). The
widget then

* shows the base-crop grid as a Shapes layer (``"VoCo base crops"``, text = crop
  index ``k``, the order of the overlap vectors);
* for a sub-volume box in the ``"VoCo sub-volume"`` Shapes layer (placed with
  *Place sub-volume box*, then dragged or resized), shows the network's predicted
  overlap vector next to the true overlap as two ``n x n`` heat maps;
* samples ``N`` random sub-volumes as in training (``"VoCo sampled sub-volumes"``,
  edge colour = mean absolute error of the overlap vector);
* keeps the boxes' labels legible at any zoom: a fixed size on screen, shown only
  where they fit inside their box without overlapping another label (zoom in for
  more; :func:`~napari_voco._positions_view.update_box_labels`);
* opens any base crop or the placed sub-volume as an Image layer exactly as the
  network sees it (resampled, normalised), placed where it lies in the world.

Boxes are drawn as rectangles on the image axes that carry the pre-processed
sample's x and y, on the slice being viewed; see :mod:`napari_voco._layers`.
Every computation runs in the widget's job runner (a napari thread worker,
:mod:`napari_voco._jobs`); the loaded model and the pre-processed volume are
cached per (checkpoint, layer), so moving the box re-runs only
:func:`voco_core.inference.positions`. What is computed where is in
:mod:`napari_voco._positions_view`; the crop geometry comes from the core.

Live inspection: *Follow* lists the VoCo pretrain widgets docked in this viewer
(the list is read when it opens); choosing one makes the inspector take each
checkpoint that run writes and re-predict what is on screen. Scripts (and the
``napari-voco`` launcher) connect them directly with
``positions.follow_run(pretrain.run_state)``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_voco import _notify
from napari_voco._inputs import (
    DeviceCombo,
    LayerCombo,
    ViewerEvents,
    checkpoint_edit,
    checkpoint_path,
    release_viewer_events_on_close,
    reveal,
    scrolling_layout,
)
from napari_voco._jobs import JobRunner, RunState
from napari_voco._layers import (
    box_rectangles,
    copy_transform,
    current_slice,
    layer_to_record,
    plane_axes,
    rectangle_to_box,
    show_plane,
    transform_kwargs,
    unwrap,
)
from napari_voco._positions_view import (
    SUBVOLUME,
    FollowCombo,
    OverlapHeatmaps,
    PositionsJob,
    PositionsOutcome,
    View,
    add_crop_layer,
    add_grid_layer,
    add_samples_layer,
    edge_width,
    heatmap_layout,
    move_rectangles_to_slice,
    positions_job,
    update_box_labels,
)
from napari_voco._tooltips import TOOLTIPS
from voco_core.checkpoint import find_checkpoint
from voco_core.errors import VoCoDataError, VoCoError
from voco_core.inference import PositionModel, PositionResult, PreparedVolume

if TYPE_CHECKING:
    import napari

GRID_LAYER = "VoCo base crops"
BOX_LAYER = "VoCo sub-volume"
SAMPLES_LAYER = "VoCo sampled sub-volumes"

_MAX_PREPARED = 4  # pre-processed volumes kept in the cache


class PositionsWidget(ViewerEvents, QWidget):
    """Inspect a VoCo pretraining checkpoint's position predictions on an image."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._models: dict[tuple, PositionModel] = {}
        self._prepared: dict[tuple, PreparedVolume] = {}
        self._view: View | None = None
        self._pending: tuple[str, dict] | None = None
        self._moving = False  # True while the widget itself edits the box layer
        self.grid_layer = None
        self.box_layer = None
        self.samples_layer = None
        self.crop_layers: list = []
        self.box_result: PositionResult | None = None
        self.sample_result: PositionResult | None = None

        # inputs
        self.image_combo = LayerCombo(napari_viewer)
        self.checkpoint = checkpoint_edit("pretraining run folder or .pt file")
        self.device = DeviceCombo(auto=True)
        self.grid_button = QPushButton("Show base-crop grid")
        self.grid_button.setToolTip(TOOLTIPS["grid"])
        inputs = QFormLayout()
        inputs.addRow("Image", self.image_combo)
        inputs.addRow("Checkpoint", self.checkpoint)
        inputs.addRow("Device", self.device)
        self.follow = FollowCombo(napari_viewer)
        self.follow.setToolTip(TOOLTIPS["follow"])
        self.follow.chosen.connect(self.follow_run)
        self.follow.folder_requested.connect(self.ask_follow_folder)
        self.followed: RunState | None = None
        inputs.addRow("Follow", self.follow)
        inputs.addRow(self.grid_button)

        # placed sub-volume
        self.place_button = QPushButton("Place sub-volume box")
        self.place_button.setToolTip(TOOLTIPS["place"])
        self.predict_button = QPushButton("Predict for box")
        self.predict_button.setToolTip(TOOLTIPS["predict"])
        self.auto_update = QCheckBox("update when the box moves")
        self.auto_update.setChecked(True)
        self.heatmaps = OverlapHeatmaps()
        self.box_label = QLabel("")
        self.box_label.setWordWrap(True)
        box_group = QGroupBox("Sub-volume")
        box_layout = QVBoxLayout(box_group)
        row = QHBoxLayout()
        row.addWidget(self.place_button)
        row.addWidget(self.predict_button)
        box_layout.addLayout(row)
        box_layout.addWidget(self.auto_update)
        box_layout.addWidget(self.heatmaps)
        box_layout.addWidget(self.box_label)

        # random sub-volumes
        self.count = QSpinBox()
        self.count.setRange(1, 512)
        self.count.setValue(16)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.sample_button = QPushButton("Sample sub-volumes")
        self.sample_button.setToolTip(TOOLTIPS["sample"])
        self.show_sample = QSpinBox()
        self.show_sample.setRange(0, 0)
        self.show_sample.setEnabled(False)
        self.show_sample.setToolTip(TOOLTIPS["show_sample"])
        self.show_sample.valueChanged.connect(self._show_sample)
        self.sample_label = QLabel("")
        self.sample_label.setWordWrap(True)
        sample_group = QGroupBox("Random sub-volumes")
        sample_form = QFormLayout(sample_group)
        sample_form.addRow("N", self.count)
        sample_form.addRow("Seed", self.seed)
        sample_form.addRow(self.sample_button)
        sample_form.addRow("Show sample #", self.show_sample)
        sample_form.addRow(self.sample_label)

        # network inputs
        self.crop_combo = QComboBox()
        self.crop_combo.addItem(SUBVOLUME)
        self.crop_button = QPushButton("Open as image layer")
        self.crop_button.setToolTip(TOOLTIPS["crop"])
        crop_group = QGroupBox("Network input")
        crop_layout = QHBoxLayout(crop_group)
        crop_layout.addWidget(self.crop_combo, 1)
        crop_layout.addWidget(self.crop_button)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        layout = scrolling_layout(self)
        layout.addLayout(inputs)
        layout.addWidget(box_group)
        layout.addWidget(sample_group)
        layout.addWidget(crop_group)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.buttons = (self.grid_button, self.place_button, self.predict_button,
                        self.sample_button, self.crop_button)
        self.grid_button.clicked.connect(self.show_grid)
        self.place_button.clicked.connect(self.place_box)
        self.predict_button.clicked.connect(self.predict_box)
        self.sample_button.clicked.connect(self.sample)
        self.crop_button.clicked.connect(self.open_crop)

        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(300)
        self._debounce.timeout.connect(self._auto_predict)
        self.listen(napari_viewer.dims.events.current_step, self._on_slice)
        self.listen(napari_viewer.dims.events.order, self._on_view_turned)
        self.listen(napari_viewer.dims.events.ndisplay, self._on_view_turned)
        self.listen(napari_viewer.camera.events.orientation, self._on_view_turned)
        self.listen(napari_viewer.scene.camera.events.zoom, self._update_labels)
        self.runner = JobRunner("positions", self, on_event=self._on_outcome,
                                on_failed=self.fail, on_finished=self._on_finished)
        # follows a run folder written by any process (Follow → run folder…)
        self.folder_runner = JobRunner("pretrain", self, on_failed=self.fail,
                                       on_finished=self._follow_next_folder)
        self._next_folder: Path | None = None
        release_viewer_events_on_close(self)

    # ------------------------------------------------------------------ public actions

    @property
    def running(self) -> bool:
        """True while a computation runs (or one is queued)."""
        return self.runner.running or self._pending is not None

    def show_grid(self) -> None:
        """Load the model and the pre-processed image (cached) and draw the grid."""
        self._submit("grid")

    def place_box(self) -> None:
        """Put a training-sized sub-volume at the sample's centre and predict for it."""
        self._submit("place")

    def predict_box(self) -> None:
        """Predict for the selected (else the last) shape of the sub-volume layer."""
        self._submit("box")

    def sample(self) -> None:
        """Sample N random sub-volumes (seeded) and colour them by prediction error."""
        self._submit("sample", n=self.count.value(), seed=self.seed.value())

    def open_crop(self) -> None:
        """Open the crop chosen in the combo box as an Image layer (network input)."""
        self._submit("crop", crop=self.crop_combo.currentText())

    def follow_run(self, state: RunState | None) -> None:
        """Live inspection: take the checkpoints of the run behind ``state`` (a
        pretrain widget's :attr:`~napari_voco._pretrain_widget.PretrainWidget.run_state`)
        as they are written and re-run what is on screen; None stops following."""
        if self.followed is not None:
            self.followed.checkpoint_written.disconnect(self.on_checkpoint_written)
            if self.followed is self.folder_runner.state and state is not self.followed:
                self.folder_runner.stop()  # following a folder ends with it
        self.followed = state
        self.follow.show_followed(state)
        if state is None:
            return
        state.checkpoint_written.connect(self.on_checkpoint_written)
        if state.checkpoint:
            self.checkpoint.set_path(state.checkpoint)
            self._set_status(f"following {state.checkpoint}")
        else:
            self._set_status("following the pretraining: waiting for its first checkpoint")

    def ask_follow_folder(self) -> None:
        """*Follow → run folder…*: pick a pretraining run folder and follow it."""
        from qtpy.QtWidgets import QFileDialog

        chosen = QFileDialog.getExistingDirectory(self, "Follow a pretraining run folder")
        if chosen:
            self.follow_folder(Path(chosen))
        else:
            self.follow.show_followed(self.followed) if self.followed else self.follow_run(None)

    def follow_folder(self, run_dir: Path) -> bool:
        """Follow the pretraining run in ``run_dir``, whoever writes it (a terminal,
        ``torchrun``, a cluster job on a shared folder): each checkpoint it writes is
        taken as a followed widget's would be. False (and the failure shown) when the
        folder holds no pretraining run."""
        from voco_core.run_folder import RunFolder
        from voco_core.run_follow import run_kind

        try:
            if run_kind(RunFolder(run_dir)) != "pretrain":
                raise VoCoDataError("is a finetuning run: the inspector follows pretraining "
                                    "runs", run_dir)
        except VoCoError as err:
            self.fail(err)
            return False
        self._next_folder = Path(run_dir)
        if self.folder_runner.running:  # the previous folder's follower ends first
            self.folder_runner.stop()
        else:
            self._follow_next_folder()
        return True

    def _follow_next_folder(self) -> None:
        from napari_voco._run_panel import follow_job

        run_dir, self._next_folder = self._next_folder, None
        if run_dir is None:
            return
        self.follow_run(None)
        self.folder_runner.start(functools.partial(follow_job, run_dir),
                                 f"following {run_dir}", run_dir=str(run_dir))
        self.follow_run(self.folder_runner.state)

    def release_viewer_events(self) -> None:
        """Closing the widget also stops following a run."""
        super().release_viewer_events()
        self.follow_run(None)

    def on_checkpoint_written(self, path: str) -> None:
        """A followed run wrote ``path``: use it, and refresh what is on screen (the model
        cache is keyed by the file's modification time, so the new weights load)."""
        self.checkpoint.set_path(path)
        if self.box_result is not None:
            self._submit("box")
        elif self.sample_result is not None:
            self._submit("sample", n=self.count.value(), seed=self.seed.value())
        elif self._view is None:
            self._submit("grid")

    # ------------------------------------------------------------------ running jobs

    def _submit(self, kind: str, **params: Any) -> None:
        if self.runner.running:  # one at a time: the latest request runs next
            self._pending = (kind, params)
            return
        try:
            job = self._make_job(kind, params)
        except Exception as err:
            self.fail(err)
            return
        if job is None:
            return
        self._start(job)

    def _make_job(self, kind: str, params: dict) -> PositionsJob | None:
        layer = self.image_combo.layer()
        record = layer_to_record(layer, self.viewer)
        path = checkpoint_path(self.checkpoint, "pretraining")
        found = find_checkpoint(path)
        device = self.device.device()
        model_key = (str(found.resolve()), found.stat().st_mtime_ns, device)
        volume_key = (model_key[:2], id(layer), id(layer.data), record.shape,
                      np.asarray(record.affine).tobytes())
        job = PositionsJob(kind, layer, str(path), device, model_key, volume_key, record,
                           model=self._models.get(model_key),
                           prepared=self._prepared.get(volume_key),
                           **{k: v for k, v in params.items() if k in ("n", "seed", "crop")})
        if kind == "box":
            view = self._current_view(job)
            if view is None:  # no grid yet for this image and model: place a box first
                job.kind = "place"
                return job
            box = self._box_from_layer(view)
            if box is None:
                job.kind = "place"
                return job
            sample_box = view.prepared.boxes_to_sample(box[None])
            sample_box[:, 2] = (0, view.prepared.sample.shape[3])
            last = self.box_result
            if (params.get("skip_same") and last is not None
                    and np.array_equal(last.sample_boxes, sample_box)):
                return None  # e.g. the box only moved to another slice
            job.boxes = box[None]
        elif kind == "crop" and job.crop == SUBVOLUME:
            view = self._current_view(job)
            if self.box_result is None or view is None:
                raise VoCoDataError("no sub-volume yet: place a sub-volume box first "
                                    "(or choose a base crop)")
            job.crop_box = self.box_result.sample_boxes[0]
        return job

    def _current_view(self, job: PositionsJob) -> View | None:
        view = self._view
        if view is not None and view.model_key == job.model_key \
                and view.volume_key == job.volume_key:
            return view
        return None

    def _start(self, job: PositionsJob) -> None:
        for button in self.buttons:
            button.setEnabled(False)
        loading = [] if job.model else ["loading model"]
        if not job.prepared:
            loading.append("pre-processing image")
        work = {"grid": "drawing the grid", "place": "predicting", "box": "predicting",
                "sample": f"predicting for {job.n} sub-volumes", "crop": "cutting the crop"}
        self._set_status(", ".join([*loading, work[job.kind]]) + "…")
        self.runner.start(lambda context: positions_job(job, context),
                          f"VoCo positions: {work[job.kind]}")

    def _on_finished(self) -> None:
        for button in self.buttons:
            button.setEnabled(True)
        if self._pending is not None:
            kind, params = self._pending
            self._pending = None
            self._submit(kind, **params)

    def _on_outcome(self, outcome: PositionsOutcome) -> None:
        try:
            self._show_outcome(outcome)
        except Exception as err:
            self.fail(err)

    def fail(self, err: BaseException) -> None:
        """A notification, and the whole message in the status line (scrolled to)."""
        _notify.notify_error(err)
        self._set_status(f"failed: {_notify.error_message(err)}")
        reveal(self.status)

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    # ------------------------------------------------------------------ showing results

    def _show_outcome(self, outcome: PositionsOutcome) -> None:
        job = outcome.job
        self._models = {job.model_key: outcome.model}  # one model at a time
        self._prepared[job.volume_key] = outcome.prepared
        while len(self._prepared) > _MAX_PREPARED:
            self._prepared.pop(next(iter(self._prepared)))
        view = self._current_view(job)
        if view is None:
            view = View(job.image, job.model_key, job.volume_key, outcome.model,
                        outcome.prepared, outcome.base_boxes,
                        plane_axes(outcome.prepared.sample_to_image))
            self._set_view(view)
        elif self.grid_layer is None or self.grid_layer not in self.viewer.layers:
            self._draw_grid(view)
        if job.kind == "grid":
            self.viewer.layers.selection.active = self.grid_layer
        elif job.kind in ("place", "box"):
            self._show_box_result(view, outcome.result, place=job.kind == "place")
        elif job.kind == "sample":
            self._show_sample_result(view, outcome.result)
        elif job.kind == "crop":
            self.crop_layers.append(add_crop_layer(self.viewer, view, job.crop, outcome.crop,
                                                   outcome.crop_box))
        self._set_status(f"{job.kind}: done in {outcome.seconds:.1f} s")

    def _set_view(self, view: View) -> None:
        self._view = view
        a, b, _ = view.axes
        show_plane(self.viewer, view.image, (a, b))
        view.slice_index = current_slice(self.viewer, view.image, view.axes[2])
        self._draw_grid(view)
        if self.samples_layer is not None and self.samples_layer in self.viewer.layers:
            self.viewer.layers.remove(self.samples_layer)  # they belong to the old view
        self.samples_layer = None
        self.sample_result = None
        self.show_sample.setEnabled(False)
        self.sample_label.setText("")
        self.box_result = None
        self.heatmaps.clear()
        self.box_label.setText("")
        k = view.base_boxes.shape[0]
        self.crop_combo.clear()
        self.crop_combo.addItems([SUBVOLUME] + [f"base crop {i}" for i in range(k)])

    def _draw_grid(self, view: View) -> None:
        if self.grid_layer is not None and self.grid_layer in self.viewer.layers:
            self.viewer.layers.remove(self.grid_layer)
        self.grid_layer = add_grid_layer(self.viewer, view, GRID_LAYER)
        self._update_labels()

    def _ensure_box_layer(self, view: View):
        layer = self.box_layer
        if layer is None or layer not in self.viewer.layers:
            layer = unwrap(self.viewer.add_shapes(
                ndim=3, name=BOX_LAYER, edge_color="cyan", face_color="transparent",
                edge_width=edge_width(view), **transform_kwargs(view.image)))
            self.listen(layer.events.data, self._on_box_data)
            self.box_layer = layer
        else:
            copy_transform(layer, view.image)
        return layer

    def _box_from_layer(self, view: View) -> np.ndarray | None:
        layer = self.box_layer
        if layer is None or layer not in self.viewer.layers or layer.nshapes == 0:
            return None
        selected = sorted(layer.selected_data)
        index = selected[0] if len(selected) == 1 else layer.nshapes - 1
        return rectangle_to_box(layer.data[index], view.axes, view.prepared.image_shape)

    def _show_box_result(self, view: View, result: PositionResult, place: bool) -> None:
        self.box_result = result
        if place:
            layer = self._ensure_box_layer(view)
            rectangle = box_rectangles(result.boxes, view.axes, view.slice_index)[0]
            self._moving = True
            try:
                if layer.nshapes:
                    layer.selected_data = set(range(layer.nshapes))
                    layer.remove_selected()
                layer.add_rectangles([rectangle], edge_color="cyan", face_color="transparent",
                                     edge_width=edge_width(view))
            finally:
                self._moving = False
            layer.mode = "select"
            self.viewer.layers.selection.active = layer
        predicted, true = result.predicted[0], result.true[0]
        self.heatmaps.show_vectors(predicted, true, result.grid_size, SUBVOLUME,
                                   heatmap_layout(self.viewer, view))
        best_p, best_t = int(predicted.argmax()), int(true.argmax())
        verdict = "correct" if best_p == best_t else "wrong"
        box = result.boxes[0]
        extent = " × ".join(f"{lo:.1f}–{hi:.1f}" for lo, hi in box)
        self.box_label.setText(
            f"top-1: predicted crop {best_p}, true crop {best_t} ({verdict}) · "
            f"mean |error| {float(result.abs_error[0]):.3f}\nimage box (voxels): {extent}")

    def _show_sample_result(self, view: View, result: PositionResult) -> None:
        self.sample_result = result
        if self.samples_layer is not None and self.samples_layer in self.viewer.layers:
            self.viewer.layers.remove(self.samples_layer)
        self.samples_layer = add_samples_layer(self.viewer, view, result, SAMPLES_LAYER)
        self._update_labels()  # clear of the base crops' labels
        errors = result.abs_error.astype(np.float64)
        high = float(self.samples_layer.edge_contrast_limits[1])
        chance = 1.0 / result.grid_size**2
        self.sample_label.setText(
            f"{len(errors)} sub-volumes: top-1 accuracy {result.top1_correct.mean():.2f} "
            f"(chance {chance:.2f}) · mean |error| {errors.mean():.3f} "
            f"(edge colour: |error|, 0 to {high:.2f})")
        self.show_sample.blockSignals(True)
        self.show_sample.setRange(0, len(errors) - 1)
        self.show_sample.setValue(0)
        self.show_sample.blockSignals(False)
        self.show_sample.setEnabled(True)
        self._show_sample(0)

    def _show_sample(self, index: int) -> None:
        result = self.sample_result
        if result is None or not 0 <= index < len(result.predicted):
            return
        verdict = "correct" if result.top1_correct[index] else "wrong"
        layout = heatmap_layout(self.viewer, self._view) if self._view else (False, False, False)
        self.heatmaps.show_vectors(result.predicted[index], result.true[index],
                                   result.grid_size, f"sample #{index} (top-1 {verdict})",
                                   layout)

    # ------------------------------------------------------------------ viewer events

    def _on_box_data(self, event=None) -> None:
        if self._moving or not self.auto_update.isChecked():
            return
        action = str(getattr(event, "action", "changed"))
        if action in ("added", "changed"):
            self._debounce.start()

    def _auto_predict(self) -> None:
        if self.box_layer is None or self.box_layer.nshapes == 0:
            return
        self._submit("box", skip_same=True)

    def _update_labels(self, event=None) -> None:
        """Show the box labels that are legible at this zoom (zoom and axes changes):
        the base crops' first, then the sampled sub-volumes' clear of them."""
        placed: list = []
        for layer in (self.grid_layer, self.samples_layer):
            if layer is not None and layer in self.viewer.layers:
                placed += update_box_labels(layer, self.viewer, placed)

    def _on_view_turned(self, event=None) -> None:
        """Re-arrange the heat-map cells when the displayed axes or the camera change."""
        if self._view is not None and self._view.image in self.viewer.layers:
            self.heatmaps.relayout(heatmap_layout(self.viewer, self._view))
        self._update_labels()

    def _on_slice(self, event=None) -> None:
        """Keep the rectangles on the slice being viewed (the boxes span the full depth)."""
        view = self._view
        if view is None or view.image not in self.viewer.layers:
            return
        index = current_slice(self.viewer, view.image, view.axes[2])
        if index == view.slice_index:
            return
        view.slice_index = index
        self._moving = True
        try:
            for layer in (self.grid_layer, self.samples_layer, self.box_layer):
                if layer is not None and layer in self.viewer.layers:
                    move_rectangles_to_slice(layer, view.axes[2], index)
        finally:
            self._moving = False
