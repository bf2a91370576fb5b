"""Sparse labels and the correct-and-retrain loop, the napari side.

*Annotated slices only* (:func:`voco_core.data.sparse.slices_to_sparse`): along the
chosen axis, a slice of a training Labels layer with any painted voxel counts as
fully annotated (its zeros are background); every other slice becomes the ignore
label, which the masked loss and Dice skip. The ignore value is
:func:`ignore_value` (nnU-Net's convention: an integer above the classes, 255 when
it fits).

*Correct and retrain*: :func:`copy_prediction` writes a segmentation into a
training Labels layer (the whole volume or one slice) through napari's undoable
``data_setitem``, for the user to correct before continuing the run.
:class:`RoundsTable` lists each round's run folder, steps and best validation Dice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import QHeaderView, QTableWidget, QTableWidgetItem

from napari_voco._text import format_dice
from voco_core.data.sparse import annotated_slices, slices_to_sparse
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


def copy_prediction(prediction: Labels, target: Labels, axis: int | None = None,
                    index: int | None = None) -> int:
    """Copy the prediction layer's values into the training Labels layer ``target``
    (undoable with Ctrl+Z on ``target``): the whole volume, or when ``axis`` and
    ``index`` are given only that slice. Returns how many voxels changed.
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
    changed = np.nonzero(np.asarray(data[region]) != source[region])
    if axis is not None and index is not None:  # back to whole-volume indices
        changed = tuple(c + (int(index) if a == axis else 0) for a, c in enumerate(changed))
    if changed[0].size:
        target.data_setitem(changed, source[changed].astype(data.dtype))
        target.refresh()
    return int(changed[0].size)


@dataclass
class Round:
    """One finetuning round of the correct-and-retrain loop."""

    number: int
    run_dir: Path
    steps: int
    best_dice: float = math.nan


class RoundsTable(QTableWidget):
    """Round, run folder, steps and best validation mean Dice, one row per round."""

    def __init__(self) -> None:
        super().__init__(0, 4)
        self.rounds: list[Round] = []
        self.setHorizontalHeaderLabels(["round", "run folder", "steps", "best Dice"])
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.setMaximumHeight(120)

    def add(self, run_dir: Path, steps: int, best_dice: float | None, continued: bool) -> Round:
        """Record a finished round; a run that does not continue starts a new list."""
        if not continued:
            self.rounds.clear()
            self.setRowCount(0)
        best = math.nan if best_dice is None else float(best_dice)
        entry = Round(len(self.rounds) + 1, Path(run_dir), int(steps), best)
        self.rounds.append(entry)
        row = self.rowCount()
        self.insertRow(row)
        for column, text in enumerate((str(entry.number), entry.run_dir.name,
                                       str(entry.steps), format_dice(best))):
            item = QTableWidgetItem(text)
            if column == 1:
                item.setToolTip(str(entry.run_dir))
            self.setItem(row, column, item)
        return entry
