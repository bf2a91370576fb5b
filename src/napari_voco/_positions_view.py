"""What the *VoCo positions* inspector computes and draws besides the viewer layers.

* :func:`positions_job`: one request of the inspector, run by its
  :class:`~napari_voco._jobs.JobRunner`: load the model and pre-process the image
  (when not cached), then ask :mod:`voco_core.inference` for the base-crop boxes
  (:func:`~voco_core.inference.base_crop_boxes`), predictions
  (:func:`~voco_core.inference.positions`) or a network-input crop. Crop geometry
  (grid, sub-volume size) comes from :mod:`voco_core.geometry`; nothing here decides
  where crops lie.
* :class:`OverlapHeatmaps`: predicted and true overlap vectors as two heat maps,
  laid out as the base crops appear on screen (:func:`heatmap_layout`);
* :func:`add_crop_layer`: a network-input crop as an Image layer, in place;
* :func:`update_box_labels`: the boxes' labels stay legible at any zoom (a fixed
  size on screen, shown only where they fit inside their box without overlapping);
* :class:`FollowCombo`: the pretrain runs of the viewer the inspector can follow.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QVBoxLayout, QWidget

from napari_voco._io import DISPLAY_TO_RAS, display_affine, to_display_order
from napari_voco._jobs import JobContext, RunState
from napari_voco._layers import (
    box_rectangles,
    crop_data_to_world,
    layer_data_to_world,
    transform_kwargs,
    unwrap,
)
from voco_core.data.io import VolumeRecord
from voco_core.geometry import base_crop_grid, crop_boxes_from_centres
from voco_core.inference import (
    PositionModel,
    PositionResult,
    PreparedVolume,
    base_crop_boxes,
    crops_for_network,
    load_position_model,
    positions,
    prepare_volume,
)

if TYPE_CHECKING:
    import napari

SUBVOLUME = "placed sub-volume"


@dataclass
class PositionsJob:
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
class PositionsOutcome:
    job: PositionsJob
    model: PositionModel | None = None
    prepared: PreparedVolume | None = None
    base_boxes: np.ndarray | None = None
    result: PositionResult | None = None
    crop: np.ndarray | None = None
    crop_box: np.ndarray | None = None
    seconds: float = 0.0


def positions_job(job: PositionsJob, context: JobContext) -> Iterator[PositionsOutcome]:
    """Job body: load/prepare what is not cached, then the request's computation; yields
    one :class:`PositionsOutcome` (errors propagate to the runner)."""
    start = time.perf_counter()
    outcome = PositionsOutcome(job)
    model = job.model or load_position_model(job.checkpoint, job.device)
    outcome.model = model
    prepared = job.prepared or prepare_volume(job.record, model)
    outcome.prepared = prepared
    outcome.base_boxes = base_crop_boxes(prepared, model)
    size = tuple(prepared.sample.shape[1:])
    if job.kind == "place":  # one training-sized sub-volume at the sample's centre
        centre = np.array([[size[0] // 2, size[1] // 2]])
        sample_box = crop_boxes_from_centres(centre, model.config.random_crop_size, size)
        outcome.result = positions(prepared, model, boxes=prepared.boxes_to_image(sample_box))
    elif job.kind == "box":
        outcome.result = positions(prepared, model, boxes=job.boxes)
    elif job.kind == "sample":
        outcome.result = positions(prepared, model, n=job.n, seed=job.seed)
    elif job.kind == "crop":
        if job.crop == SUBVOLUME:
            sample_box = np.asarray(job.crop_box)
        else:
            grid = base_crop_grid(size, model.config.geometry.grid_size)
            sample_box = grid[int(job.crop.rsplit(" ", 1)[1])]
        crops = crops_for_network(prepared.sample, sample_box[None],
                                  model.config.geometry.input_size)
        outcome.crop = crops[0, 0].numpy().astype(np.float32)
        outcome.crop_box = sample_box
    outcome.seconds = time.perf_counter() - start
    yield outcome


@dataclass
class View:
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
        self.canvas.setMinimumWidth(240)  # narrower than the figure size: docks side by side
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




def edge_width(view: View) -> float:
    """Edge width of the boxes drawn on ``view``'s image (data units): 0.4 % of its
    larger in-plane size, at least 1 voxel."""
    a, b, _ = view.axes
    shape = view.prepared.image_shape
    return max(1.0, 0.004 * max(shape[a], shape[b]))


GRID_TEXT_SIZE = 12
SAMPLE_TEXT_SIZE = 10
"""Label sizes of the base crops and the sampled sub-volumes, in screen pixels (napari
draws Shapes text at a fixed size on screen, whatever the zoom)."""


def _label_pixels(texts: list[str], size: float) -> np.ndarray:
    """Approximate on-screen ``(width, height)`` of each label (napari's text ``size``
    is the font size in screen pixels)."""
    from qtpy.QtGui import QFont, QFontMetricsF

    metrics = QFontMetricsF(QFont("OpenSans", round(size)))
    widths = [metrics.horizontalAdvance(line) for line in texts]
    return np.array([[width + 4.0, metrics.height()] for width in widths])


def box_labels_shown(layer: Any, viewer: napari.Viewer, size: float,
                     avoid: list[np.ndarray] = ()) -> tuple[np.ndarray, list[np.ndarray]]:
    """Which of the Shapes ``layer``'s labels (its ``features["label"]``) to show on
    screen now, and the screen rectangles ``(x0, y0, x1, y1)`` (world units times the
    zoom) of those shown: a label shows when it fits inside its box at the current
    zoom and overlaps neither a label shown before it (in shape order) nor one of
    ``avoid`` (another layer's labels); at a zoom where the boxes are small, fewer or
    no labels show, instead of a pile of unreadable text."""
    n = layer.nshapes
    shown = np.zeros(n, dtype=bool)
    if n == 0 or "label" not in layer.features:
        return shown, []
    displayed = list(viewer.dims.displayed[-2:])
    offset = viewer.dims.ndim - layer.ndim
    if viewer.dims.ndisplay != 2 or min(displayed) < offset:
        return shown, []
    zoom = float(viewer.scene.camera.zoom)  # screen pixels per world unit
    texts = [str(text) for text in layer.features["label"]]
    label_size = _label_pixels(texts, size)
    others = list(avoid)
    placed: list[np.ndarray] = []  # (x0, y0, x1, y1) of the labels shown, on screen
    for index, vertices in enumerate(layer.data):
        world = np.array([layer.data_to_world(v) for v in np.asarray(vertices)])
        screen = world[:, displayed] * zoom
        low, high = screen.min(axis=0), screen.max(axis=0)
        extent = high - low  # (rows, columns) on screen
        width, height = label_size[index]
        if width > extent[1] or height > extent[0]:
            continue  # the label would spill out of its box
        centre = (low + high) / 2
        rect = np.array([centre[1] - width / 2, centre[0] - height / 2,
                         centre[1] + width / 2, centre[0] + height / 2])
        if any(rect[0] < other[2] and other[0] < rect[2] and rect[1] < other[3]
               and other[1] < rect[3] for other in [*others, *placed]):
            continue
        placed.append(rect)
        shown[index] = True
    return shown, placed


def update_box_labels(layer: Any, viewer: napari.Viewer,
                      avoid: list[np.ndarray] = ()) -> list[np.ndarray]:
    """Show the labels of ``layer`` (a grid or samples layer) that are legible at the
    current zoom (:func:`box_labels_shown`, clear of the label rectangles ``avoid``),
    the others blank; the label text is ``features["label"]``, shown through
    ``features["shown_label"]``. Returns the rectangles of the labels shown."""
    if layer is None or layer not in viewer.layers or "label" not in layer.features:
        return []
    shown, placed = box_labels_shown(layer, viewer, float(layer.text.size), avoid)
    labels = np.where(shown, layer.features["label"].astype(str), "")
    current = layer.features.get("shown_label")
    if current is None or not np.array_equal(current.to_numpy(dtype=str), labels):
        features = layer.features.copy()
        features["shown_label"] = labels
        layer.features = features
    return placed


def add_grid_layer(viewer: napari.Viewer, view: View, name: str) -> Any:
    """The base crops of ``view`` as a Shapes layer of rectangles on the viewed slice
    (text = crop index ``k``, the order of the overlap vectors), not editable; labels
    shown where legible (:func:`update_box_labels`)."""
    k = view.base_boxes.shape[0]
    labels = [str(i) for i in range(k)]
    layer = unwrap(viewer.add_shapes(
        box_rectangles(view.base_boxes, view.axes, view.slice_index), shape_type="rectangle",
        name=name, features={"index": np.arange(k), "label": labels, "shown_label": labels},
        text={"string": "{shown_label}", "color": "yellow", "size": GRID_TEXT_SIZE},
        edge_color="yellow", face_color="transparent", edge_width=edge_width(view),
        metadata={"voco": {"kind": "base crops", "image_boxes": view.base_boxes.tolist(),
                           "axes": list(view.axes)}},
        **transform_kwargs(view.image)))
    layer.editable = False
    update_box_labels(layer, viewer)
    return layer


def add_samples_layer(viewer: napari.Viewer, view: View, result: PositionResult,
                      name: str) -> Any:
    """Sampled sub-volumes as rectangles whose edge colour is the mean absolute error
    of their overlap vector (features: index, abs_error, top1_correct, predicted and
    true crop), not editable; labels ``index: |error|`` shown where legible
    (:func:`update_box_labels`)."""
    import pandas as pd

    errors = result.abs_error.astype(np.float64)
    labels = [f"{i}: {e:.2f}" for i, e in enumerate(errors)]
    features = pd.DataFrame({
        "index": np.arange(len(errors)),
        "abs_error": errors,
        "top1_correct": result.top1_correct,
        "predicted_crop": result.predicted.argmax(axis=1),
        "true_crop": result.true.argmax(axis=1),
        "label": labels,
        "shown_label": labels,
    })
    high = float(errors.max()) if errors.size and errors.max() > 0 else 1.0
    layer = unwrap(viewer.add_shapes(
        box_rectangles(result.boxes, view.axes, view.slice_index), shape_type="rectangle",
        name=name, features=features,
        edge_color="abs_error", edge_colormap="plasma", edge_contrast_limits=(0.0, high),
        face_color="transparent", edge_width=edge_width(view),
        text={"string": "{shown_label}", "color": "white", "size": SAMPLE_TEXT_SIZE},
        metadata={"voco": {"kind": "sampled sub-volumes",
                           "sample_boxes": result.sample_boxes.tolist()}},
        **transform_kwargs(view.image)))
    layer.editable = False
    update_box_labels(layer, viewer)
    return layer


def move_rectangles_to_slice(layer: Any, axis: int, index: int) -> None:
    """Put the layer's flat rectangles (constant along data ``axis``) on slice ``index``
    (the boxes span the full depth; napari shows a rectangle on its own slice only)."""
    if layer.nshapes == 0:
        return
    moved = []
    for vertices in layer.data:
        vertices = np.array(vertices, dtype=np.float64)
        if vertices.shape[1] == 3 and np.ptp(vertices[:, axis]) == 0:
            vertices[:, axis] = index
        moved.append(vertices)
    layer.data = moved


def heatmap_layout(viewer: napari.Viewer, view: View) -> tuple[bool, bool, bool]:
    """(transpose, flip rows, flip columns) that lay the heat-map cells out as the base
    crops appear in the 2-D view (sample -> world signs, camera orientation)."""
    dims = viewer.dims
    offset = dims.ndim - view.image.ndim
    rows, columns = (axis - offset for axis in dims.displayed[-2:])
    if dims.ndisplay != 2 or min(rows, columns) < 0:
        return (False, False, False)
    to_world = (layer_data_to_world(view.image) @ view.prepared.sample_to_image)[:3, :3]
    x_on_rows = abs(to_world[rows, 0]) >= abs(to_world[rows, 1])
    row_axis, column_axis = (0, 1) if x_on_rows else (1, 0)
    flip_rows = bool(to_world[rows, row_axis] < 0)
    flip_columns = bool(to_world[columns, column_axis] < 0)
    orientation = tuple(str(o) for o in getattr(viewer.camera, "orientation2d",
                                                 ("down", "right")))
    flip_rows ^= orientation[0].endswith("up")
    flip_columns ^= orientation[1].endswith("left")
    return (not x_on_rows, flip_rows, flip_columns)


def add_crop_layer(viewer: napari.Viewer, view: View, which: str, crop: np.ndarray,
                   sample_box: np.ndarray) -> Any:
    """Add a network-input crop ``(S, S, S)`` cut from ``sample_box`` as an Image layer
    placed where it lies in the world (``which`` names it), its voxels turned into the
    display order like the reader's layers (:func:`napari_voco._io.to_display_order`).
    Returns the layer."""
    matrix = crop_data_to_world(layer_data_to_world(view.image),
                                view.prepared.sample_to_image, sample_box, crop.shape[0])
    # the crop comes in the sample's (RAS-like) axis order, which napari cannot show in
    # the display world (a permuted 2-D plane is singular): reorient it as the reader
    # does; its metadata holds voxel -> RAS+ like every layer's
    crop, ras, _ = to_display_order(crop, DISPLAY_TO_RAS @ matrix)
    kwargs = transform_kwargs(view.image)
    return unwrap(viewer.add_image(
        crop, name=f"{view.image.name} {which} (network input)", affine=display_affine(ras),
        units=kwargs["units"], axis_labels=kwargs["axis_labels"], contrast_limits=(0.0, 1.0),
        colormap="gray", blending="translucent",
        metadata={"voco": {
            "affine": ras.tolist(), "shape": list(crop.shape), "path": None,
            "spacing": np.linalg.norm(ras[:3, :3], axis=0).tolist(),
            "crop": which, "sample_box": np.asarray(sample_box).tolist(),
            "source": view.image.name}}))


def pretrain_runs(viewer: napari.Viewer) -> list[tuple[str, RunState]]:
    """``(dock name, run state)`` of every VoCo pretrain widget docked in ``viewer``."""
    window = getattr(unwrap(viewer), "window", None)
    docked = getattr(window, "dock_widgets", {}) if window is not None else {}
    runs = []
    for name, widget in dict(docked).items():
        state = getattr(unwrap(widget), "run_state", None)
        if isinstance(state, RunState) and state.kind == "pretrain":
            runs.append((name, state))
    return runs


class FollowCombo(QComboBox):
    """*Follow*: "off", the VoCo pretrain widgets docked in this viewer (re-read every
    time the list opens), then "run folder…". :attr:`chosen` fires with the chosen
    run's :class:`RunState` (None for "off") when the user picks one;
    :attr:`folder_requested` when they pick "run folder…" (any run folder, whoever
    writes it)."""

    chosen = Signal(object)
    folder_requested = Signal()
    OFF = "off"
    FOLDER = "run folder…"

    def __init__(self, viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self._viewer = viewer
        self.addItem(self.OFF, None)
        self.addItem(self.FOLDER, self.FOLDER)
        self.activated.connect(self._on_activated)

    def _on_activated(self, index: int) -> None:
        data = self.itemData(index)
        if isinstance(data, str) and data == self.FOLDER:
            self.folder_requested.emit()
        else:
            self.chosen.emit(data)

    def refresh(self) -> None:
        """List "off" and the pretrain widgets of the viewer, keeping the shown run."""
        current = self.currentData()
        self.blockSignals(True)
        try:
            self.clear()
            self.addItem(self.OFF, None)
            for name, state in pretrain_runs(self._viewer):
                self.addItem(name, state)
            self.addItem(self.FOLDER, self.FOLDER)
            self._select(current)
        finally:
            self.blockSignals(False)

    def showPopup(self) -> None:
        self.refresh()
        super().showPopup()

    def show_followed(self, state: RunState | None) -> None:
        """Show ``state`` as the followed run (listed as its run folder when it is not a
        docked widget of this viewer)."""
        self.refresh()
        if not self._select(state):
            self.addItem(f"pretraining → {state.run_dir or '(not started)'}", state)
            self.setCurrentIndex(self.count() - 1)

    def _select(self, state: RunState | None) -> bool:
        for index in range(self.count()):
            if self.itemData(index) is state:
                self.setCurrentIndex(index)
                return True
        self.setCurrentIndex(0)
        return False
