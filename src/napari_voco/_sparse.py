"""Sparse labels and the correct-and-retrain loop, the napari side.

*Annotated slices only* (:func:`voco_core.data.sparse.split_sparse`): along the
chosen axis, the slices of a training Labels layer that the user *reviewed* count as
fully annotated (their zeros are background); every other slice becomes the ignore
label, which the masked loss and Dice skip. The ignore value is
:func:`ignore_value` (nnU-Net's convention: an integer above the classes, 255 when
it fits). Which slices were reviewed is an :class:`AnnotationTracker`'s record:
the slices holding a label when tracking began (a layer painted before, or opened
from a file), every slice a paint event of the layer touched since (brush, fill,
eraser, polygon: napari's ``Labels.events.paint``), and the slices accepted with
*Accept slice*. Edits made by :func:`copy_prediction` are not paint of the user's:
a copied prediction marks no slice.

*Correct and retrain*: :func:`copy_prediction` writes a segmentation into a
training Labels layer (the whole volume, leaving reviewed slices as they are, or
one slice, which then needs review again) through napari's undoable
``data_setitem``, for the user to review: paint corrections or accept slices.
:class:`RoundsTable` lists each round's run folder, steps and best Dice on the
held-out slices, or why there is none; :class:`ReviewTable` the slices to review
next (:func:`voco_core.inference.suggest_slices`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QHeaderView, QTableWidget, QTableWidgetItem

from napari_voco._text import format_dice
from voco_core.data.sparse import annotated_slices, slice_mask, slices_to_sparse
from voco_core.errors import VoCoDataError

if TYPE_CHECKING:
    import napari
    from napari.layers import Labels

SLICING_AXIS = "axis napari is slicing"
"""The axis combo's first entry: resolved when the run starts (:func:`slicing_axis`)."""
COPY_VOLUME, COPY_SLICE = "whole volume", "current slice only"


def ignore_value(max_label: int, num_classes: int = 0) -> int:
    """The ignore label for painted values ``0..max_label`` and ``num_classes`` classes:
    255 when it lies above both (nnU-Net's convention), else the next free value."""
    return max(255, int(max_label) + 1, int(num_classes))


def slicing_axis(viewer: napari.Viewer, layer: Any) -> int:
    """The layer's data axis napari is slicing: the first of ``viewer.dims.not_displayed``
    (in the layer's own axes), else axis 0 (e.g. in 3-D view with nothing sliced).

    Layers from the reader are in the display order (:mod:`napari_voco._io`), so in
    the default 2-D view this is axis 0, superior: the axial slices the user painted
    on, which stay axial slices (one RAS+ ``z`` each) in the volume written for
    training (:func:`napari_voco._layers.layer_volume`)."""
    offset = viewer.dims.ndim - layer.ndim
    for axis in viewer.dims.not_displayed:
        if 0 <= axis - offset < layer.ndim:
            return int(axis - offset)
    return 0


def sparse_labels(name: str, labels: np.ndarray, axis: int,
                  ignore_label: int) -> tuple[np.ndarray, int]:
    """``(sparse map, number of annotated slices)`` of one labels volume: painted slices
    along ``axis`` kept, the rest ``ignore_label``. :class:`VoCoDataError` naming the
    layer ``name`` when nothing is painted."""
    count = int(annotated_slices(labels, axis).sum())
    if count == 0:
        raise VoCoDataError(f"labels layer {name!r} has no painted voxel: paint at least one "
                            f"slice along axis {axis} for 'annotated slices only'")
    return slices_to_sparse(labels, axis, ignore_label), count


def touched_slices(atom: Any, ndim: int) -> list[np.ndarray] | None:
    """The slice indices along each axis that one napari Labels history atom changed:
    a ``_MaskedPaintAtom`` (``slice_key`` bounding box and ``mask``, napari >= 0.6) or
    an ``(indices, old values, new values)`` tuple (``data_setitem``, older painting).
    None for an atom of an unknown kind."""
    key = getattr(atom, "slice_key", None)
    if key is not None:
        mask = getattr(atom, "mask", None)
        touched = []
        for axis, part in enumerate(key):
            start = part.start or 0
            if mask is None:
                stop = part.stop if part.stop is not None else start + 1
                touched.append(np.arange(start, stop))
            else:
                others = tuple(a for a in range(mask.ndim) if a != axis)
                touched.append(start + np.flatnonzero(np.any(mask, axis=others)))
        return touched
    if isinstance(atom, tuple) and atom and isinstance(atom[0], tuple) and (
            len(atom[0]) == ndim):
        return [np.unique(np.asarray(indices, dtype=np.int64)) for indices in atom[0]]
    return None


class AnnotationTracker:
    """The reviewed slices of one training Labels layer, along each of its axes.

    A slice is *annotated* (reviewed) when it held a label when tracking began, when a
    paint event of the layer touched it since (the user's brush, fill, eraser or
    polygon: ``layer.events.paint``), or when it was accepted (:meth:`accept`). Edits
    made while :meth:`suspended` (a copied prediction) mark nothing. The layer's data
    replaced by one of another shape starts the record again from its labels.

    ``changed`` callbacks run after every change of the record. The owner connects
    :meth:`on_paint` and :meth:`on_data` to the layer's events (and disconnects them).
    """

    def __init__(self, layer: Labels, baseline: bool = True) -> None:
        self.layer = layer
        self.changed: list[Callable[[], None]] = []
        self.held_out: dict[int, np.ndarray] = {}
        """Slices held out for validation before, per axis (sticky across rounds)."""
        self.trained: dict[int, np.ndarray] = {}
        """Slices an earlier round of this loop trained on, per axis."""
        self._suspended = 0
        self._reset(baseline)

    def _reset(self, baseline: bool) -> None:
        data = np.asarray(self.layer.data)
        self.shape = data.shape
        self.reviewed = [annotated_slices(data, axis) if baseline
                         else np.zeros(size, bool) for axis, size in enumerate(data.shape)]
        self.held_out.clear()
        self.trained.clear()

    def _notify(self) -> None:
        for callback in list(self.changed):
            callback()

    def annotated(self, axis: int) -> np.ndarray:
        """Bool ``(shape[axis],)``: the annotated slices along ``axis``."""
        return self.reviewed[axis].copy()

    def count(self, axis: int) -> int:
        return int(self.reviewed[axis].sum())

    def accept(self, axis: int, index: int, accepted: bool = True) -> None:
        """Mark slice ``index`` along ``axis`` annotated (``accepted`` False: not)."""
        self.reviewed[axis][int(index)] = bool(accepted)
        if not accepted:
            self.held_out.get(axis, np.zeros(0, bool))[int(index):int(index) + 1] = False
        self._notify()

    def record_round(self, axis: int, trained, held_out) -> None:
        """Remember a run's training and held-out slices along ``axis`` (masks)."""
        size = self.shape[axis]
        self.trained[axis] = self.trained.get(axis, np.zeros(size, bool)) | slice_mask(
            trained, size)
        self.held_out[axis] = self.held_out.get(axis, np.zeros(size, bool)) | slice_mask(
            held_out, size)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Edits inside mark no slice (a copied prediction is not the user's review)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def on_paint(self, event: Any) -> None:
        """``layer.events.paint``: mark the slices the history item changed."""
        if self._suspended:
            return
        marked = False
        for atom in getattr(event, "value", None) or []:
            touched = touched_slices(atom, len(self.shape))
            if touched is None:
                continue
            for axis, indices in enumerate(touched):
                indices = indices[(indices >= 0) & (indices < self.shape[axis])]
                self.reviewed[axis][indices] = True
                marked = marked or bool(indices.size)
        if marked:
            self._notify()

    def on_data(self, event: Any = None) -> None:
        """``layer.events.data``: new data of another shape starts a new record."""
        if np.shape(self.layer.data) != self.shape:
            self._reset(baseline=not self._suspended)
            self._notify()


def go_to_slice(viewer: napari.Viewer, layer: Any, axis: int, index: int) -> None:
    """Show slice ``index`` along the layer's data ``axis``: the viewer's point moves
    there (the other coordinates stay); in 2-D view, when ``axis`` is displayed, the
    view turns to show the other two axes."""
    from napari_voco._layers import show_plane

    offset = viewer.dims.ndim - layer.ndim
    if viewer.dims.ndisplay == 2 and offset + axis in viewer.dims.displayed:
        show_plane(viewer, layer, tuple(a for a in range(layer.ndim) if a != axis)[-2:])
    point = np.asarray(layer.world_to_data(viewer.dims.point), dtype=np.float64)
    point[axis] = int(index)
    world = np.asarray(layer.data_to_world(point), dtype=np.float64)
    viewer.dims.set_point(tuple(range(offset, offset + layer.ndim)), tuple(world.tolist()))


def describe_slices(indices: Sequence[int], limit: int = 8) -> str:
    """``20, 30, 40`` (the first ``limit``, then ``… (12 in all)``)."""
    indices = [int(i) for i in indices]
    text = ", ".join(str(i) for i in indices[:limit])
    return text + (f", … ({len(indices)} in all)" if len(indices) > limit else "")


def copy_prediction(prediction: Labels, target: Labels, axis: int | None = None,
                    index: int | None = None, tracker: AnnotationTracker | None = None
                    ) -> int:
    """Copy the prediction layer's values into the training Labels layer ``target``
    (undoable with Ctrl+Z on ``target``): the whole volume, or when ``axis`` and
    ``index`` are given only that slice. Returns how many voxels changed.

    With a ``tracker`` of ``target`` the copy marks no slice annotated; a whole-volume
    copy leaves the slices annotated along ``axis`` as they are (the user's work), and
    a copied slice that was annotated is annotated no more (it holds the prediction
    now: paint on it or accept it again).
    :class:`VoCoDataError` when the grids differ or a value does not fit ``target``."""
    source, data = np.asarray(prediction.data), target.data
    if source.shape != data.shape:
        raise VoCoDataError(f"prediction {prediction.name!r} has shape {source.shape}, labels "
                            f"layer {target.name!r} {data.shape}: they need the same grid")
    if source.size and np.issubdtype(data.dtype, np.integer) and (
            int(source.max()) > np.iinfo(data.dtype).max):
        raise VoCoDataError(f"labels layer {target.name!r} stores {data.dtype}: too narrow "
                            f"for prediction values up to {int(source.max())}")
    region = [slice(None)] * source.ndim
    if axis is not None and index is not None:
        region[axis] = slice(int(index), int(index) + 1)
    region = tuple(region)
    differs = np.asarray(data[region]) != source[region]
    if tracker is not None and axis is not None and index is None:  # keep reviewed slices
        shape = [1] * source.ndim
        shape[axis] = source.shape[axis]
        differs &= ~tracker.annotated(axis).reshape(shape)
    changed = np.nonzero(differs)
    if axis is not None and index is not None:  # back to whole-volume indices
        changed = tuple(c + (int(index) if a == axis else 0) for a, c in enumerate(changed))
    if changed[0].size:
        with tracker.suspended() if tracker is not None else contextlib.nullcontext():
            target.data_setitem(changed, source[changed].astype(data.dtype))
        target.refresh()
        if tracker is not None and axis is not None and index is not None and (
                tracker.reviewed[axis][int(index)]):
            tracker.accept(axis, int(index), accepted=False)
    return int(changed[0].size)


@dataclass
class Round:
    """One finetuning round of the correct-and-retrain loop. ``best_dice``: the best
    validation mean Dice on held-out slices or cases (NaN when nothing was held out,
    then ``note`` says why)."""

    number: int
    run_dir: Path
    steps: int
    best_dice: float = math.nan
    note: str = ""


class RoundsTable(QTableWidget):
    """Round, run folder, steps and best held-out mean Dice (or why there is none),
    one row per round."""

    def __init__(self) -> None:
        super().__init__(0, 4)
        self.rounds: list[Round] = []
        self.setHorizontalHeaderLabels(["round", "run folder", "steps", "held-out Dice"])
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.setMaximumHeight(120)

    def add(self, run_dir: Path, steps: int, best_dice: float | None, continued: bool,
            note: str = "") -> Round:
        """Record a finished round; a run that does not continue starts a new list.
        ``note`` (the round validated on what it trained on): shown instead of a Dice."""
        if not continued:
            self.rounds.clear()
            self.setRowCount(0)
        best = math.nan if best_dice is None or note else float(best_dice)
        entry = Round(len(self.rounds) + 1, Path(run_dir), int(steps), best, note)
        self.rounds.append(entry)
        row = self.rowCount()
        self.insertRow(row)
        for column, text in enumerate((str(entry.number), entry.run_dir.name,
                                       str(entry.steps), note or format_dice(best))):
            item = QTableWidgetItem(text)
            if column == 1:
                item.setToolTip(str(entry.run_dir))
            elif column == 3:
                item.setToolTip(note or "best validation mean Dice on the held-out slices "
                                        "or cases (never on what the round trained on)")
            self.setItem(row, column, item)
        return entry


class ReviewTable(QTableWidget):
    """The slices to review next (:func:`voco_core.inference.suggest_slices`): slice,
    predicted class, mean entropy; annotated slices are left out. ``on_pick(index)``
    runs when a row is clicked."""

    ROWS = 10

    def __init__(self, on_pick: Callable[[int], None]) -> None:
        super().__init__(0, 3)
        self.ranking: list[Any] = []  # SliceScore rows, best first
        self.class_names: list[str] = []
        self.axis = 0
        self.setHorizontalHeaderLabels(["slice", "class", "entropy"])
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.setMaximumHeight(150)
        self._on_pick = on_pick
        self.cellClicked.connect(self._picked)

    def show_ranking(self, ranking: Sequence[Any], class_names: Sequence[str], axis: int,
                     annotated: np.ndarray | None = None) -> None:
        """Show the first :attr:`ROWS` rows of ``ranking`` not ``annotated``."""
        self.ranking, self.class_names, self.axis = list(ranking), list(class_names), axis
        self.refresh(annotated)

    def refresh(self, annotated: np.ndarray | None = None) -> None:
        """Leave out the slices annotated since (a bool mask along :attr:`axis`)."""
        rows = [r for r in self.ranking
                if annotated is None or not (r.index < len(annotated) and annotated[r.index])]
        rows = rows[:self.ROWS]
        self.setRowCount(len(rows))
        for row, entry in enumerate(rows):
            name = (self.class_names[entry.label] if entry.label < len(self.class_names)
                    else str(entry.label))
            for column, text in enumerate((str(entry.index), name, f"{entry.score:.3f}")):
                item = QTableWidgetItem(text)
                if column != 1:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight
                                          | Qt.AlignmentFlag.AlignVCenter)
                self.setItem(row, column, item)

    def slice_at(self, row: int) -> int:
        return int(self.item(row, 0).text())

    def _picked(self, row: int, column: int = 0) -> None:
        if 0 <= row < self.rowCount():
            self._on_pick(self.slice_at(row))
