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
* opens any base crop or the placed sub-volume as an Image layer exactly as the
  network sees it (resampled, normalised), placed where it lies in the world.

Boxes are drawn as rectangles on the image axes that carry the pre-processed
sample's x and y, on the slice being viewed; see :mod:`napari_voco._layers`.
Every computation runs in a napari thread worker; the loaded model and the
pre-processed volume are cached per (checkpoint, layer), so moving the box
re-runs only :func:`voco_core.inference.positions`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
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

from napari_voco._layers import (
    CheckpointEdit,
    LayerCombo,
    box_rectangles,
    checkpoint_path,
    copy_transform,
    crop_data_to_world,
    current_slice,
    device_combo,
    layer_data_to_world,
    layer_to_record,
    plane_axes,
    rectangle_to_box,
    show_plane,
    transform_kwargs,
    unwrap,
)
from napari_voco._notify import notify_error
from voco_core.checkpoint import find_checkpoint
from voco_core.data.io import VolumeRecord
from voco_core.errors import VoCoDataError
from voco_core.geometry import base_crop_grid, crop_boxes_from_centres
from voco_core.inference import (
    PositionModel,
    PositionResult,
    PreparedVolume,
    crops_for_network,
    load_position_model,
    positions,
    prepare_volume,
)

if TYPE_CHECKING:
    import napari

GRID_LAYER = "VoCo base crops"
BOX_LAYER = "VoCo sub-volume"
SAMPLES_LAYER = "VoCo sampled sub-volumes"
SUBVOLUME = "placed sub-volume"

_MAX_PREPARED = 4  # pre-processed volumes kept in the cache


# --------------------------------------------------------------------------- jobs


@dataclass
class _Job:
    """One request for the worker thread (built in the GUI thread)."""

    kind: str  # "grid" | "place" | "box" | "sample" | "crop"
    image: Any  # the napari image layer (only read in the GUI thread)
    checkpoint: str
    device: str
    model_key: tuple
    volume_key: tuple
    record: VolumeRecord
    model: PositionModel | None = None
    prepared: PreparedVolume | None = None
    boxes: np.ndarray | None = None  # "box": image boxes (m, 3, 2)
    n: int = 16
    seed: int = 0
    crop: str = SUBVOLUME  # "crop": SUBVOLUME or "base crop k"
    crop_box: np.ndarray | None = None  # "crop": the placed box's sample box (3, 2)


@dataclass
class _Outcome:
    job: _Job
    model: PositionModel | None = None
    prepared: PreparedVolume | None = None
    base_boxes: np.ndarray | None = None
    result: PositionResult | None = None
    crop: np.ndarray | None = None
    crop_box: np.ndarray | None = None
    seconds: float = 0.0
    error: Exception | None = None


def _run_job(job: _Job) -> _Outcome:
    """The worker's body: load/prepare what is not cached, then the job's computation.
    Never raises: an error comes back in :attr:`_Outcome.error`."""
    start = time.perf_counter()
    outcome = _Outcome(job)
    try:
        model = job.model or load_position_model(job.checkpoint, job.device)
        outcome.model = model
        prepared = job.prepared or prepare_volume(job.record, model)
        outcome.prepared = prepared
        size = tuple(prepared.sample.shape[1:])
        grid = base_crop_grid(size, model.config.geometry.grid_size)
        outcome.base_boxes = prepared.boxes_to_image(grid)
        if job.kind == "place":
            crop = model.config.random_crop_size
            centre = np.array([[size[0] // 2, size[1] // 2]])
            box = prepared.boxes_to_image(crop_boxes_from_centres(centre, crop, size))
            outcome.result = positions(prepared, model, boxes=box)
        elif job.kind == "box":
            outcome.result = positions(prepared, model, boxes=job.boxes)
        elif job.kind == "sample":
            outcome.result = positions(prepared, model, n=job.n, seed=job.seed)
        elif job.kind == "crop":
            if job.crop == SUBVOLUME:
                sample_box = job.crop_box
            else:
                sample_box = grid[int(job.crop.rsplit(" ", 1)[1])]
            s = model.config.geometry.input_size
            crops = crops_for_network(prepared.sample, np.asarray(sample_box)[None], s)
            outcome.crop = crops[0, 0].numpy().astype(np.float32)
            outcome.crop_box = np.asarray(sample_box)
    except Exception as err:  # reported in the GUI thread
        outcome.error = err
    outcome.seconds = time.perf_counter() - start
    return outcome


@dataclass
class _View:
    """What the widget currently shows: one image with one model's grid."""

    image: Any
    model_key: tuple
    volume_key: tuple
    model: PositionModel
    prepared: PreparedVolume
    base_boxes: np.ndarray
    axes: tuple[int, int, int]
    slice_index: int = 0

    @property
    def grid_size(self) -> int:
        return int(self.model.config.geometry.grid_size)


# --------------------------------------------------------------------------- heat maps


class OverlapHeatmaps(QWidget):
    """Predicted and true overlap vectors as two ``n x n`` heat maps with numbers.

    Cell ``k = i * n + j`` (row ``i`` = the sample's x, column ``j`` = its y) unless a
    ``layout`` ``(transpose, flip_rows, flip_columns)`` rearranges the cells to match
    the grid as it appears in the viewer; each cell then shows its index ``#k``."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4.0, 2.2), constrained_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setFixedHeight(210)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.predicted: np.ndarray | None = None
        self.true: np.ndarray | None = None
        self.caption = ""
        self._n = 0
        self.clear()

    def clear(self) -> None:
        self.predicted = self.true = None
        self.caption = ""
        self.figure.clear()
        self.figure.text(0.5, 0.5, "no prediction yet", ha="center", va="center",
                         fontsize=9, color="0.5")
        self.canvas.draw_idle()

    def relayout(self, layout: tuple[bool, bool, bool]) -> None:
        """Redraw the current vectors with another cell layout."""
        if self.predicted is not None and self.true is not None:
            self.show_vectors(self.predicted, self.true, self._n, self.caption, layout)

    @staticmethod
    def arrange(values: np.ndarray, n: int,
                layout: tuple[bool, bool, bool] = (False, False, False)) -> np.ndarray:
        """``(K,)`` -> ``(n, n)`` cells in display order (see the class doc)."""
        grid = np.asarray(values).reshape(n, n)
        transpose, flip_rows, flip_columns = layout
        if transpose:
            grid = grid.T
        if flip_rows:
            grid = grid[::-1]
        if flip_columns:
            grid = grid[:, ::-1]
        return grid

    def show_vectors(self, predicted: np.ndarray, true: np.ndarray, n: int,
                     caption: str = "",
                     layout: tuple[bool, bool, bool] = (False, False, False)) -> None:
        self.predicted = np.asarray(predicted, dtype=np.float64)
        self.true = np.asarray(true, dtype=np.float64)
        self.caption = caption
        self._n = n
        self.figure.clear()
        axes = self.figure.subplots(1, 2)
        index = self.arrange(np.arange(n * n), n, layout)
        for ax, title, values in ((axes[0], "predicted", self.predicted),
                                  (axes[1], "true overlap", self.true)):
            grid = self.arrange(values, n, layout)
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
            if n <= 8:
                size = 7 if n <= 4 else 5
                for (i, j), value in np.ndenumerate(grid):
                    text = f"#{index[i, j]}\n{value:.2f}" if n <= 4 else f"{value:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=size,
                            color="w" if value < 0.6 else "k")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=9)
        if caption:
            self.figure.suptitle(caption, fontsize=8)
        self.canvas.draw_idle()


# --------------------------------------------------------------------------- widget


class PositionsWidget(QWidget):
    """Inspect a VoCo pretraining checkpoint's position predictions on an image."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._models: dict[tuple, PositionModel] = {}
        self._prepared: dict[tuple, PreparedVolume] = {}
        self._view: _View | None = None
        self._worker = None
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
        self.checkpoint = CheckpointEdit("pretraining run folder or .pt file")
        self.device = device_combo()
        self.grid_button = QPushButton("Show base-crop grid")
        self.grid_button.setToolTip("load the model, pre-process the image and draw the grid")
        inputs = QFormLayout()
        inputs.addRow("Image", self.image_combo)
        inputs.addRow("Checkpoint", self.checkpoint)
        inputs.addRow("Device", self.device)
        self.follow = QCheckBox("Follow the running pretraining")
        self.follow.setToolTip(
            "use the newest checkpoint of the VoCo pretrain widget's run in this viewer and "
            "re-predict whenever it writes one (lower its 'Checkpoint every' for fresh weights)")
        self.follow.toggled.connect(self.follow_pretraining)
        self._followed: list = []
        inputs.addRow(self.follow)
        inputs.addRow(self.grid_button)

        # placed sub-volume
        self.place_button = QPushButton("Place sub-volume box")
        self.place_button.setToolTip(
            f"put one training-sized sub-volume in the centre of the {BOX_LAYER!r} layer; "
            "drag or resize it and the prediction follows")
        self.predict_button = QPushButton("Predict for box")
        self.predict_button.setToolTip(f"predict for the selected (or last) shape in {BOX_LAYER!r}")
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
        self.sample_button.setToolTip("draw N random sub-volumes as in training and colour "
                                      "them by the error of their predicted overlap")
        self.show_sample = QSpinBox()
        self.show_sample.setRange(0, 0)
        self.show_sample.setEnabled(False)
        self.show_sample.setToolTip("show this sampled sub-volume's overlap in the heat maps")
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
        self.crop_button.setToolTip("the crop exactly as the network sees it (resampled to "
                                    "the input size, intensities normalised), in place")
        crop_group = QGroupBox("Network input")
        crop_layout = QHBoxLayout(crop_group)
        crop_layout.addWidget(self.crop_combo, 1)
        crop_layout.addWidget(self.crop_button)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        layout = QVBoxLayout(self)
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
        napari_viewer.dims.events.current_step.connect(self._on_slice)
        napari_viewer.dims.events.order.connect(self._on_view_turned)
        napari_viewer.dims.events.ndisplay.connect(self._on_view_turned)
        napari_viewer.camera.events.orientation.connect(self._on_view_turned)

    # ------------------------------------------------------------------ public actions

    @property
    def busy(self) -> bool:
        """True while a computation runs (or one is queued)."""
        return self._worker is not None or self._pending is not None

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

    def follow_pretraining(self, on: bool = True) -> None:
        """Live inspection: take checkpoints from this viewer's VoCo pretrain widget(s)
        as they are written, and re-run the last prediction (box, else samples)."""
        from napari_voco._training import PRETRAIN_WIDGETS

        for widget in self._followed:
            widget.checkpoint_written.disconnect(self.on_checkpoint_written)
        self._followed = []
        if not on:
            return
        viewer = unwrap(self.viewer)
        self._followed = [w for w in PRETRAIN_WIDGETS if unwrap(w.viewer) is viewer]
        if not self._followed:
            self.follow.setChecked(False)
            notify_error(VoCoDataError("no VoCo pretrain widget in this viewer: open "
                                       "Plugins > VoCo > VoCo pretrain and start a run"))
            return
        for widget in self._followed:
            widget.checkpoint_written.connect(self.on_checkpoint_written)
        latest = [w.latest_checkpoint for w in self._followed if w.latest_checkpoint]
        if latest:
            self.checkpoint.set_path(latest[-1])
            self._set_status(f"following {latest[-1]}")
        else:
            self._set_status("following the pretrain widget: waiting for its first checkpoint")

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
        if self._worker is not None:  # one at a time: the latest request runs next
            self._pending = (kind, params)
            return
        try:
            job = self._make_job(kind, params)
        except Exception as err:
            self._fail(err)
            return
        if job is None:
            return
        self._start(job)

    def _make_job(self, kind: str, params: dict) -> _Job | None:
        layer = self.image_combo.layer()
        record = layer_to_record(layer)
        path = checkpoint_path(self.checkpoint, "pretraining")
        found = find_checkpoint(path)
        device = self.device.currentText()
        model_key = (str(found.resolve()), found.stat().st_mtime_ns, device)
        volume_key = (model_key[:2], id(layer), id(layer.data), record.shape,
                      np.asarray(record.affine).tobytes())
        job = _Job(kind, layer, str(path), device, model_key, volume_key, record,
                   model=self._models.get(model_key), prepared=self._prepared.get(volume_key),
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

    def _current_view(self, job: _Job) -> _View | None:
        view = self._view
        if view is not None and view.model_key == job.model_key \
                and view.volume_key == job.volume_key:
            return view
        return None

    def _start(self, job: _Job) -> None:
        from napari.qt.threading import create_worker

        for button in self.buttons:
            button.setEnabled(False)
        loading = [] if job.model else ["loading model"]
        if not job.prepared:
            loading.append("pre-processing image")
        work = {"grid": "drawing the grid", "place": "predicting", "box": "predicting",
                "sample": f"predicting for {job.n} sub-volumes", "crop": "cutting the crop"}
        self._set_status(", ".join([*loading, work[job.kind]]) + "…")
        worker = create_worker(_run_job, job, _ignore_errors=True)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        worker.start()

    def _on_finished(self) -> None:
        self._worker = None
        for button in self.buttons:
            button.setEnabled(True)
        if self._pending is not None:
            kind, params = self._pending
            self._pending = None
            self._submit(kind, **params)

    def _on_returned(self, outcome: _Outcome) -> None:
        try:
            if outcome.error is not None:
                raise outcome.error
            self._show_outcome(outcome)
        except Exception as err:
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        notify_error(err)
        self._set_status(f"failed: {err}")

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    # ------------------------------------------------------------------ showing results

    def _show_outcome(self, outcome: _Outcome) -> None:
        job = outcome.job
        self._models = {job.model_key: outcome.model}  # one model at a time
        self._prepared[job.volume_key] = outcome.prepared
        while len(self._prepared) > _MAX_PREPARED:
            self._prepared.pop(next(iter(self._prepared)))
        view = self._current_view(job)
        if view is None:
            view = _View(job.image, job.model_key, job.volume_key, outcome.model,
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
            self._add_crop_layer(view, job.crop, outcome.crop, outcome.crop_box)
        self._set_status(f"{job.kind}: done in {outcome.seconds:.1f} s")

    def _set_view(self, view: _View) -> None:
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

    def _edge_width(self, view: _View) -> float:
        a, b, _ = view.axes
        shape = view.prepared.image_shape
        return max(1.0, 0.004 * max(shape[a], shape[b]))

    def _draw_grid(self, view: _View) -> None:
        k = view.base_boxes.shape[0]
        rectangles = box_rectangles(view.base_boxes, view.axes, view.slice_index)
        if self.grid_layer is not None and self.grid_layer in self.viewer.layers:
            self.viewer.layers.remove(self.grid_layer)
        self.grid_layer = unwrap(self.viewer.add_shapes(
            rectangles, shape_type="rectangle", name=GRID_LAYER,
            features={"index": np.arange(k)},
            text={"string": "{index}", "color": "yellow", "size": 12},
            edge_color="yellow", face_color="transparent", edge_width=self._edge_width(view),
            metadata={"voco": {"kind": "base crops", "image_boxes": view.base_boxes.tolist(),
                               "axes": list(view.axes)}},
            **transform_kwargs(view.image)))
        self.grid_layer.editable = False

    def _ensure_box_layer(self, view: _View):
        layer = self.box_layer
        if layer is None or layer not in self.viewer.layers:
            layer = unwrap(self.viewer.add_shapes(
                ndim=3, name=BOX_LAYER, edge_color="cyan", face_color="transparent",
                edge_width=self._edge_width(view), **transform_kwargs(view.image)))
            layer.events.data.connect(self._on_box_data)
            self.box_layer = layer
        else:
            copy_transform(layer, view.image)
        return layer

    def _box_from_layer(self, view: _View) -> np.ndarray | None:
        layer = self.box_layer
        if layer is None or layer not in self.viewer.layers or layer.nshapes == 0:
            return None
        selected = sorted(layer.selected_data)
        index = selected[0] if len(selected) == 1 else layer.nshapes - 1
        return rectangle_to_box(layer.data[index], view.axes, view.prepared.image_shape)

    def _heatmap_layout(self, view: _View) -> tuple[bool, bool, bool]:
        """(transpose, flip rows, flip columns) that lay the heat-map cells out as the
        base crops appear in the 2-D view (sample -> world signs, camera orientation)."""
        dims = self.viewer.dims
        offset = dims.ndim - view.image.ndim
        rows, columns = (axis - offset for axis in dims.displayed[-2:])
        if dims.ndisplay != 2 or min(rows, columns) < 0:
            return (False, False, False)
        to_world = (layer_data_to_world(view.image) @ view.prepared.sample_to_image)[:3, :3]
        x_on_rows = abs(to_world[rows, 0]) >= abs(to_world[rows, 1])
        row_axis, column_axis = (0, 1) if x_on_rows else (1, 0)
        flip_rows = bool(to_world[rows, row_axis] < 0)
        flip_columns = bool(to_world[columns, column_axis] < 0)
        orientation = tuple(str(o) for o in getattr(self.viewer.camera, "orientation2d",
                                                     ("down", "right")))
        flip_rows ^= orientation[0].endswith("up")
        flip_columns ^= orientation[1].endswith("left")
        return (not x_on_rows, flip_rows, flip_columns)

    def _show_box_result(self, view: _View, result: PositionResult, place: bool) -> None:
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
                                     edge_width=self._edge_width(view))
            finally:
                self._moving = False
            layer.mode = "select"
            self.viewer.layers.selection.active = layer
        predicted, true = result.predicted[0], result.true[0]
        self.heatmaps.show_vectors(predicted, true, result.grid_size, SUBVOLUME,
                                   self._heatmap_layout(view))
        best_p, best_t = int(predicted.argmax()), int(true.argmax())
        verdict = "correct" if best_p == best_t else "wrong"
        box = result.boxes[0]
        extent = " × ".join(f"{lo:.1f}–{hi:.1f}" for lo, hi in box)
        self.box_label.setText(
            f"top-1: predicted crop {best_p}, true crop {best_t} ({verdict}) · "
            f"mean |error| {float(result.abs_error[0]):.3f}\nimage box (voxels): {extent}")

    def _show_sample_result(self, view: _View, result: PositionResult) -> None:
        import pandas as pd

        self.sample_result = result
        errors = result.abs_error.astype(np.float64)
        features = pd.DataFrame({
            "index": np.arange(len(errors)),
            "abs_error": errors,
            "top1_correct": result.top1_correct,
            "predicted_crop": result.predicted.argmax(axis=1),
            "true_crop": result.true.argmax(axis=1),
        })
        if self.samples_layer is not None and self.samples_layer in self.viewer.layers:
            self.viewer.layers.remove(self.samples_layer)
        high = float(errors.max()) if errors.size and errors.max() > 0 else 1.0
        self.samples_layer = unwrap(self.viewer.add_shapes(
            box_rectangles(result.boxes, view.axes, view.slice_index), shape_type="rectangle",
            name=SAMPLES_LAYER, features=features,
            edge_color="abs_error", edge_colormap="plasma", edge_contrast_limits=(0.0, high),
            face_color="transparent", edge_width=self._edge_width(view),
            text={"string": "{index}: {abs_error:.2f}", "color": "white", "size": 8},
            metadata={"voco": {"kind": "sampled sub-volumes",
                               "sample_boxes": result.sample_boxes.tolist()}},
            **transform_kwargs(view.image)))
        self.samples_layer.editable = False
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
        layout = self._heatmap_layout(self._view) if self._view else (False, False, False)
        self.heatmaps.show_vectors(result.predicted[index], result.true[index],
                                   result.grid_size, f"sample #{index} (top-1 {verdict})",
                                   layout)

    def _add_crop_layer(self, view: _View, which: str, crop: np.ndarray,
                        sample_box: np.ndarray) -> None:
        size = crop.shape[0]
        matrix = crop_data_to_world(layer_data_to_world(view.image),
                                    view.prepared.sample_to_image, sample_box, size)
        kwargs = transform_kwargs(view.image)
        layer = unwrap(self.viewer.add_image(
            crop, name=f"{view.image.name} {which} (network input)", affine=matrix,
            units=kwargs["units"], axis_labels=kwargs["axis_labels"], contrast_limits=(0.0, 1.0),
            colormap="gray", blending="translucent",
            metadata={"voco": {
                "affine": matrix.tolist(), "shape": list(crop.shape), "path": None,
                "spacing": np.linalg.norm(matrix[:3, :3], axis=0).tolist(),
                "crop": which, "sample_box": np.asarray(sample_box).tolist(),
                "source": view.image.name}}))
        self.crop_layers.append(layer)

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

    def _on_view_turned(self, event=None) -> None:
        """Re-arrange the heat-map cells when the displayed axes or the camera change."""
        if self._view is not None and self._view.image in self.viewer.layers:
            self.heatmaps.relayout(self._heatmap_layout(self._view))

    def _on_slice(self, event=None) -> None:
        """Keep the rectangles on the slice being viewed (the boxes span the full depth)."""
        view = self._view
        if view is None or view.image not in self.viewer.layers:
            return
        index = current_slice(self.viewer, view.image, view.axes[2])
        if index == view.slice_index:
            return
        view.slice_index = index
        c = view.axes[2]
        self._moving = True
        try:
            for layer in (self.grid_layer, self.samples_layer, self.box_layer):
                if layer is None or layer not in self.viewer.layers or layer.nshapes == 0:
                    continue
                moved = []
                for vertices in layer.data:
                    vertices = np.array(vertices, dtype=np.float64)
                    if vertices.shape[1] == 3 and np.ptp(vertices[:, c]) == 0:
                        vertices[:, c] = index
                    moved.append(vertices)
                layer.data = moved
        finally:
            self._moving = False
