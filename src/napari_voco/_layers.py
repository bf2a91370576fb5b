"""Small helpers shared by the plugin's widgets: layers <-> :mod:`voco_core` objects.

Coordinates
-----------
An image layer's *data coordinates* are its voxel indices with voxel ``i``'s
centre at ``i`` (napari's convention). voco_core's image boxes are continuous
intervals ``[low, high)`` in which voxel ``i`` occupies ``[i, i + 1)`` (see
:mod:`voco_core.inference`), so a box's rectangle in data coordinates runs from
``low - 0.5`` to ``high - 0.5``. Every layer the widgets derive from an image
(grid, boxes, crops, labels) gets the image layer's own transform (``affine``,
``scale``, ``translate``, ``rotate``, ``shear``, units and axis labels), so
shapes drawn in the image's data coordinates overlay it in the world.

3-D boxes as napari rectangles
------------------------------
A napari rectangle lies in one plane. VoCo's base crops and sub-volumes are
full-depth boxes whose extent matters only in the x-y plane of the
pre-processed sample; pre-processing only permutes, flips, scales and shifts the
voxel axes, so the sample's x and y run along two image axes ``a`` and ``b``
(:func:`plane_axes`) and its z along the third, ``c``. Each box is drawn as a
rectangle spanning its extent on ``a`` and ``b``, placed on one slice of ``c``
(the slice being viewed; the widgets move it with the slider).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QWidget,
)

from voco_core.data.io import VolumeRecord
from voco_core.errors import VoCoDataError

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer


def unwrap(obj: Any) -> Any:
    """The napari object behind a ``PublicOnlyProxy`` (what npe2 hands plugin widgets),
    so that identity and ``id()`` are stable; anything else unchanged."""
    return getattr(obj, "__wrapped__", obj)


# --------------------------------------------------------------------------- geometry


def layer_data_to_world(layer: Layer) -> np.ndarray:
    """The layer's ``(D+1, D+1)`` data -> world matrix as napari applies it:
    ``affine @ (rotate @ shear @ diag(scale) + translate)``."""
    from napari.utils.transforms import CompositeAffine

    ndim = layer.ndim
    data_to_physical = CompositeAffine(
        scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear,
        ndim=ndim,
    ).affine_matrix
    return np.asarray(layer.affine.affine_matrix, dtype=np.float64) @ data_to_physical


def _metadata_affine(layer: Layer, shape: Sequence[int]) -> np.ndarray | None:
    """``metadata["voco"]["affine"]`` (the reader's source-file affine) when it is valid
    for an array of ``shape``, else None."""
    source = (layer.metadata or {}).get("voco") or {}
    if source.get("affine") is None or tuple(source.get("shape", shape)) != tuple(shape):
        return None
    try:
        affine = np.asarray(source["affine"], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return None
    return affine


def layer_to_record(layer: Any) -> VolumeRecord:
    """A :class:`VolumeRecord` of a 3-D image layer.

    ``array`` is the layer's (full-resolution) data; ``affine`` the source file's
    affine from ``metadata["voco"]`` (layers from this plugin's reader), else the
    layer's own data -> world transform (scale/translate/affine). Raises
    :class:`VoCoDataError` for anything but a single-channel 3-D image layer.
    """
    from napari.layers import Image

    if layer is None:
        raise VoCoDataError("no image layer chosen: open a 3-D image first")
    name = getattr(layer, "name", "?")
    if not isinstance(layer, Image):
        raise VoCoDataError(f"layer {name!r} is a {type(layer).__name__} layer: "
                            "expected a 3-D image layer")
    if layer.rgb:
        raise VoCoDataError(f"layer {name!r} is an RGB image: expected a 3-D image layer "
                            "(one channel)")
    data = layer.data[0] if layer.multiscale else layer.data
    array = np.asarray(data)
    if array.ndim != 3:
        raise VoCoDataError(f"layer {name!r} is {array.ndim}-D with shape {array.shape}: "
                            "expected a 3-D image layer")
    affine = _metadata_affine(layer, array.shape)
    if affine is None:
        affine = layer_data_to_world(layer)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    path = ((layer.metadata or {}).get("voco") or {}).get("path")
    return VolumeRecord(array, affine, spacing, Path(path) if path else None)  # type: ignore[arg-type]


def transform_kwargs(layer: Layer) -> dict[str, Any]:
    """Keyword arguments giving a new layer the transform (and units, axis labels) of
    ``layer``, so both share data coordinates."""
    return {
        "scale": np.array(layer.scale, dtype=np.float64),
        "translate": np.array(layer.translate, dtype=np.float64),
        "rotate": np.array(layer.rotate, dtype=np.float64),
        "shear": np.array(layer.shear, dtype=np.float64),
        "affine": np.array(layer.affine.affine_matrix, dtype=np.float64),
        "units": tuple(layer.units),
        "axis_labels": tuple(layer.axis_labels),
    }


def copy_transform(target: Layer, source: Layer) -> None:
    """Give the existing layer ``target`` the transform of ``source``."""
    for key, value in transform_kwargs(source).items():
        setattr(target, key, value)


def plane_axes(sample_to_image: np.ndarray) -> tuple[int, int, int]:
    """Image axes ``(a, b, c)`` along which the sample's x, y and z run.

    ``sample_to_image`` is a signed, scaled permutation (pre-processing reorients,
    resizes, crops); each sample axis maps to the image axis of its column's
    largest entry."""
    linear = np.abs(np.asarray(sample_to_image, dtype=np.float64)[:3, :3])
    a, b, c = (int(np.argmax(linear[:, axis])) for axis in range(3))
    if len({a, b, c}) != 3:  # an oblique mapping: fall back to the largest entries
        order = np.argsort(-linear, axis=None)
        used_rows: list[int] = []
        used_cols: list[int] = []
        pick = [0, 0, 0]
        for flat in order:
            row, col = divmod(int(flat), 3)
            if row not in used_rows and col not in used_cols:
                pick[col] = row
                used_rows.append(row)
                used_cols.append(col)
        a, b, c = pick
    return a, b, c


def box_rectangles(boxes: np.ndarray, axes: tuple[int, int, int],
                   slice_index: float) -> list[np.ndarray]:
    """Image boxes ``(m, 3, 2)`` -> ``m`` napari rectangles ``(4, 3)`` in the image's data
    coordinates: the extent on axes ``a, b`` (``low - 0.5 .. high - 0.5``), at
    ``slice_index`` on axis ``c``."""
    a, b, c = axes
    rectangles = []
    for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 3, 2):
        (a0, a1), (b0, b1) = box[a] - 0.5, box[b] - 0.5
        rect = np.zeros((4, 3))
        rect[:, a] = (a0, a0, a1, a1)
        rect[:, b] = (b0, b1, b1, b0)
        rect[:, c] = slice_index
        rectangles.append(rect)
    return rectangles


def rectangle_to_box(vertices: np.ndarray, axes: tuple[int, int, int],
                     image_shape: Sequence[int]) -> np.ndarray:
    """A shape's vertices (image data coordinates) -> an image box ``(3, 2)``: the
    bounding box on axes ``a, b`` and the whole extent of axis ``c``.

    Raises :class:`VoCoDataError` when the shape is not 3-D or is flat along ``a`` or
    ``b`` (drawn in another plane)."""
    vertices = np.asarray(vertices, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise VoCoDataError(f"the sub-volume shape has {vertices.shape[-1]}-D vertices: "
                            "expected a rectangle on the 3-D image")
    a, b, c = axes
    box = np.empty((3, 2))
    for axis in (a, b):
        low, high = vertices[:, axis].min() + 0.5, vertices[:, axis].max() + 0.5
        if high - low < 1.0:
            raise VoCoDataError(
                f"the sub-volume box is flat along image axis {axis}: draw it in the plane "
                f"of image axes {a} and {b} (the sample's x-y plane)")
        box[axis] = (low, high)
    box[c] = (0.0, float(image_shape[c]))
    return box


def crop_data_to_world(image_data_to_world: np.ndarray, sample_to_image: np.ndarray,
                       sample_box: np.ndarray, size: int) -> np.ndarray:
    """``(4, 4)`` data -> world matrix of a network-input crop ``(S, S, S)`` cut from the
    integer sample box ``(3, 2)`` and resized to ``S = size``.

    Resizing with ``align_corners=False`` maps crop voxel ``u`` to sample coordinate
    ``low - 0.5 + (u + 0.5) * L / S`` (``L`` the box length) along each axis."""
    box = np.asarray(sample_box, dtype=np.float64)
    length = box[:, 1] - box[:, 0]
    step = length / float(size)
    crop_to_sample = np.eye(4)
    crop_to_sample[:3, :3] = np.diag(step)
    crop_to_sample[:3, 3] = box[:, 0] - 0.5 + 0.5 * step
    return (np.asarray(image_data_to_world, dtype=np.float64)
            @ np.asarray(sample_to_image, dtype=np.float64) @ crop_to_sample)


def current_slice(viewer: napari.Viewer, layer: Layer, axis: int) -> int:
    """The index along the layer's data ``axis`` of the slice the viewer shows (clipped)."""
    try:
        position = np.asarray(layer.world_to_data(viewer.dims.point), dtype=np.float64)
        value = position[axis]
    except (IndexError, ValueError, TypeError):
        value = np.nan
    size = int(np.asarray(layer.data[0] if getattr(layer, "multiscale", False)
                          else layer.data).shape[axis])
    if not np.isfinite(value):
        return size // 2
    return int(np.clip(np.rint(value), 0, size - 1))


def show_plane(viewer: napari.Viewer, layer: Layer, axes: tuple[int, int]) -> None:
    """In 2-D view, turn the viewer so that the layer's data axes ``axes`` (rows, columns)
    are the displayed ones (only when they are not already)."""
    if viewer.dims.ndisplay != 2:
        return
    offset = viewer.dims.ndim - layer.ndim
    wanted = [offset + axes[0], offset + axes[1]]
    if sorted(viewer.dims.displayed) == sorted(wanted):
        return
    order = [axis for axis in viewer.dims.order if axis not in wanted] + wanted
    viewer.dims.order = tuple(order)


# --------------------------------------------------------------------------- widgets


class LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of one type (by name), kept in sync."""

    def __init__(self, viewer: napari.Viewer, layer_type: type | None = None,
                 parent: QWidget | None = None):
        super().__init__(parent)
        if layer_type is None:
            from napari.layers import Image

            layer_type = Image
        self._viewer = viewer
        self._type = layer_type
        self.setToolTip(f"{layer_type.__name__} layer to work on")
        events = viewer.layers.events
        events.inserted.connect(self._on_inserted)
        events.removed.connect(self.refresh)
        events.reordered.connect(self.refresh)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def _on_inserted(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def refresh(self, event=None) -> None:
        """Rebuild the list, keeping the current layer selected while it exists."""
        current = self.layer()
        layers = [unwrap(layer) for layer in self._viewer.layers
                  if isinstance(layer, self._type)]
        self.blockSignals(True)
        try:
            self.clear()
            for layer in layers:
                self.addItem(layer.name, unwrap(layer))
            if current is not None and current in layers:
                self.setCurrentIndex(layers.index(current))
        finally:
            self.blockSignals(False)
        if current is None or current not in layers:
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self) -> Layer | None:
        """The chosen layer (None when the list is empty)."""
        return self.currentData() if self.count() else None

    def set_layer(self, layer: Layer) -> None:
        for index in range(self.count()):
            if self.itemData(index) is unwrap(layer):
                self.setCurrentIndex(index)
                return
        raise ValueError(f"layer {getattr(layer, 'name', layer)!r} is not in the list")


class CheckpointEdit(QWidget):
    """A checkpoint path: a text field plus *File…* (a ``.pt`` file) and *Folder…*
    (a run folder) pickers."""

    changed = Signal(str)

    def __init__(self, placeholder: str = "run folder or .pt checkpoint",
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.line = QLineEdit()
        self.line.setPlaceholderText(placeholder)
        self.line.textChanged.connect(self.changed.emit)
        self.file_button = QPushButton("File…")
        self.folder_button = QPushButton("Folder…")
        self.file_button.setToolTip("choose a checkpoint file (.pt)")
        self.folder_button.setToolTip("choose a run folder (its checkpoints/ are used)")
        self.file_button.clicked.connect(self._choose_file)
        self.folder_button.clicked.connect(self._choose_folder)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.line, 1)
        layout.addWidget(self.file_button)
        layout.addWidget(self.folder_button)

    def path(self) -> str:
        return self.line.text().strip()

    def set_path(self, path: str | Path) -> None:
        self.line.setText(str(path))

    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a checkpoint", self.path(),
            "PyTorch checkpoints (*.pt *.pth);;All files (*)")
        if path:
            self.set_path(path)

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a run folder", self.path())
        if path:
            self.set_path(path)


def checkpoint_path(edit: CheckpointEdit, kind: str) -> Path:
    """The edit's path, or :class:`VoCoDataError` when it is empty or does not exist."""
    text = edit.path()
    if not text:
        raise VoCoDataError(f"no checkpoint chosen: pick a {kind} run folder or .pt file")
    path = Path(text).expanduser()
    if not path.exists():
        raise VoCoDataError("checkpoint or run folder not found", path)
    return path


def device_combo() -> QComboBox:
    """``auto`` (CUDA when available, else CPU), ``cpu`` and the accelerators torch sees."""
    import torch

    combo = QComboBox()
    combo.addItems(["auto", "cpu"])
    if torch.cuda.is_available():
        combo.addItems(["cuda"] + [f"cuda:{i}" for i in range(1, torch.cuda.device_count())])
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        combo.addItem("mps")
    combo.setToolTip("where the network runs (auto: CUDA when available, else CPU)")
    return combo
