"""The finetune widget's training data: what it trains on, gathered from napari.

Either image + labels layer pairs (checked to share a voxel grid, dropped from the
list when a layer is deleted) or a folder (``imagesTr``/``labelsTr``) / Decathlon
datalist JSON. With *annotated slices only* each pair's labels become a sparse map
(:mod:`napari_voco._sparse`): the slices the user painted on or accepted along the
chosen axis (each labels layer's :class:`~napari_voco._sparse.AnnotationTracker`),
the rest the ignore label; some of those slices are held out for validation
(:func:`voco_core.data.sparse.holdout_slices`, :func:`~voco_core.data.sparse.split_sparse`).
:meth:`TrainingData.gather` turns the choice into what a
:class:`~napari_voco._finetune_widget.FinetuneJob` needs: the layer volumes to write
(with their affines) and the held-out validation maps, else the folder, plus the
``data`` overrides they imply (class names from the first labels layer, the ignore
label).

:class:`TrainingData` is a helper object of the widget, not a widget: its rows go into
the widget's own settings form (:meth:`TrainingData.add_rows`), so the labels line up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QWidget,
)

from napari_voco._inputs import CompactStack, LayerCombo, PathEdit, ViewerEvents, narrow
from napari_voco._layers import current_slice, layer_volume, unwrap
from napari_voco._sparse import (
    SLICING_AXIS,
    AnnotationTracker,
    describe_slices,
    ignore_value,
    slicing_axis,
)
from napari_voco._tooltips import TOOLTIPS
from voco_core.data.sparse import (
    annotated_slices,
    holdout_slices,
    slices_missing_for_holdout,
    split_sparse,
)
from voco_core.errors import VoCoDataError

if TYPE_CHECKING:
    import napari

SOURCE_PAIRS, SOURCE_FOLDER = "Image / labels layer pairs", "Folder or datalist JSON"


def class_names_of(label_names: Any, max_label: int) -> list[str] | None:
    """Class names from a labels layer's ``metadata["voco"]["label_names"]`` when they
    name every value ``0..n-1`` (n >= 2) and cover the largest label found."""
    if not label_names:
        return None
    try:
        by_value = {int(k): str(v) for k, v in label_names.items()}
    except (AttributeError, TypeError, ValueError):
        return None
    if sorted(by_value) != list(range(len(by_value))) or max_label >= len(by_value):
        return None
    return [by_value[i] for i in range(len(by_value))] if len(by_value) >= 2 else None


@dataclass
class TrainingInputs:
    """What one finetuning run trains on (:meth:`TrainingData.gather`)."""

    pairs: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    """``(name, (image, affine), (labels, affine))`` to write into the run folder."""
    data: Path | None = None
    """The folder or datalist JSON (when there are no pairs)."""
    data_overrides: dict = field(default_factory=dict)
    """``data`` config overrides the layers imply (``num_classes``, ``class_names``,
    ``ignore_label``)."""
    note: str = ""
    """The annotated slices per pair, for the status line ("" when dense)."""
    validation: list[tuple[int, tuple]] = field(default_factory=list)
    """``(index in pairs, (labels, affine))``: the held-out slices of that pair (its
    validation map; the image is the pair's), for each pair with a held-out slice."""
    holdout_note: str = ""
    """Sparse labels with no slice held out: why, and what to do (for the rounds
    table, which then shows this instead of a Dice)."""
    rounds: list[tuple[AnnotationTracker, int, np.ndarray, np.ndarray]] = field(
        default_factory=list)
    """``(tracker, axis, trained, held out)`` per pair: recorded when the run starts
    (:meth:`TrainingData.record_rounds`)."""


class TrainingData(ViewerEvents, QObject):
    """The finetune widget's data rows: source, layer pairs or folder, sparse labels.

    ``fail`` reports a bad *Add pair* (the widget's notification).

    Signals:
        annotations_changed(object): a tracked labels layer's annotated slices changed.
    """

    annotations_changed = Signal(object)

    def _label_names(self, training_labels: list) -> dict | None:
        """Class names for the training labels: those a training labels layer carries
        (read with its ``dataset.json``), else those of another Labels layer of the
        viewer on the same grid (the image's own label map), so that labels painted on
        a new layer keep the names (``liver``, not ``class_5``)."""
        def names_of(layer) -> dict | None:
            return ((getattr(layer, "metadata", None) or {}).get("voco") or {}).get(
                "label_names")

        for layer in training_labels:
            if names_of(layer):
                return names_of(layer)
        shape = tuple(training_labels[0].data.shape) if training_labels else None
        for layer in map(unwrap, self.viewer.layers):
            if (type(layer).__name__ == "Labels" and names_of(layer)
                    and tuple(layer.data.shape) == shape):
                return names_of(layer)
        return None

    def __init__(self, viewer: napari.Viewer, fail: Callable[[Exception], None],
                 parent: QObject | None = None):
        super().__init__(parent)
        from napari.layers import Labels

        self.viewer = viewer
        self.fail = fail
        self.pairs: list[tuple[Any, Any]] = []
        """The image + labels layer pairs, in the order of :attr:`pair_list`."""
        self.trackers: dict[int, AnnotationTracker] = {}
        """The annotated-slice record of each training labels layer, by ``id``."""

        self.source = narrow(QComboBox())
        self.source.addItems([SOURCE_PAIRS, SOURCE_FOLDER])
        self.image_combo = LayerCombo(viewer)
        self.labels_combo = LayerCombo(viewer, Labels)
        self.add_pair_button = QPushButton("Add pair")
        self.add_pair_button.setToolTip(TOOLTIPS["add_pair"])
        self.add_pair_button.clicked.connect(self.add_current_pair)
        self.remove_pair_button = QPushButton("Remove")
        self.remove_pair_button.clicked.connect(self.remove_selected_pair)
        self.pair_list = QListWidget()
        self.pair_list.setMaximumHeight(90)
        self.pair_list.setToolTip(TOOLTIPS["pairs"])
        pair_page = QWidget()
        pair_form = QFormLayout(pair_page)
        pair_form.setContentsMargins(0, 0, 0, 0)
        pair_form.addRow("Image", self.image_combo)
        pair_form.addRow("Labels", self.labels_combo)
        pair_buttons = QHBoxLayout()
        pair_buttons.addWidget(self.add_pair_button)
        pair_buttons.addWidget(self.remove_pair_button)
        pair_form.addRow("", pair_buttons)
        pair_form.addRow("Pairs", self.pair_list)
        self.data_path = PathEdit("folder with imagesTr/ and labelsTr/, or a datalist JSON",
                                  file_filter="Datalists (*.json)", file_button="JSON…")
        self.data_stack = CompactStack()
        self.data_stack.addWidget(pair_page)
        self.data_stack.addWidget(self.data_path)
        self.source.currentIndexChanged.connect(self.data_stack.setCurrentIndex)
        self.sparse = QCheckBox("annotated slices only")
        self.sparse.setToolTip(TOOLTIPS["sparse_reviewed"])
        self.sparse_axis = narrow(QComboBox(), 6)
        self.sparse_axis.addItems([SLICING_AXIS, "axis 0", "axis 1", "axis 2"])
        self.sparse_axis.setToolTip(TOOLTIPS["sparse_axis"])
        self.listen(viewer.layers.events.removed, self._prune_pairs)
        # the labels layer chosen is tracked from then on (its labels so far count)
        self.labels_combo.currentIndexChanged.connect(self._track_chosen)
        self._track_chosen()

    def add_rows(self, form: QFormLayout) -> None:
        """Put the data rows into ``form`` (the widget's settings)."""
        form.addRow("Data", self.source)
        form.addRow("", self.data_stack)
        form.addRow("Sparse labels", self.sparse)  # two rows: one would not fit a
        form.addRow("Slices along", self.sparse_axis)  # dock beside another (1600 px)

    # ------------------------------------------------------------------ pairs

    def add_pair(self, image: Any, labels: Any) -> None:
        """Add an image + labels layer pair (:class:`VoCoDataError` when they do not fit)."""
        image, labels = unwrap(image), unwrap(labels)
        if image is None or labels is None:
            raise VoCoDataError("choose an image layer and a labels layer to add a pair")
        image_shape = np.shape(image.data[0] if image.multiscale else image.data)
        labels_shape = np.shape(labels.data[0] if labels.multiscale else labels.data)
        if image_shape != labels_shape:
            raise VoCoDataError(f"labels layer {labels.name!r} has shape {labels_shape}, "
                                f"image layer {image.name!r} {image_shape}: a pair needs the "
                                "same voxel grid")
        self.tracker_of(labels)
        if any(pair[0] is image and pair[1] is labels for pair in self.pairs):
            return
        self.pairs.append((image, labels))
        self.pair_list.addItem(QListWidgetItem(f"{image.name}  +  {labels.name}"))

    def add_current_pair(self) -> None:
        """The *Add pair* button."""
        try:
            self.add_pair(self.image_combo.layer(), self.labels_combo.layer())
        except Exception as err:
            self.fail(err)

    def remove_selected_pair(self) -> None:
        row = self.pair_list.currentRow()
        if 0 <= row < len(self.pairs):
            del self.pairs[row]
            self.pair_list.takeItem(row)

    def _prune_pairs(self, event: Any = None) -> None:
        present = [unwrap(layer) for layer in self.viewer.layers]
        for row in reversed(range(len(self.pairs))):
            image, labels = self.pairs[row]
            if not any(image is p for p in present) or not any(labels is p for p in present):
                del self.pairs[row]
                self.pair_list.takeItem(row)
        for key, tracker in list(self.trackers.items()):
            if not any(tracker.layer is p for p in present):
                self._untrack(key)

    def layer_pairs(self) -> list[tuple[Any, Any]]:
        """The pairs to train on: the list, else the pair chosen in the combo boxes."""
        if not self.pairs:
            image, labels = self.image_combo.layer(), self.labels_combo.layer()
            if image is None or labels is None:
                raise VoCoDataError("no training pair: choose an image and a labels layer "
                                    "(Add pair), or a data folder")
            self.add_pair(image, labels)
        return list(self.pairs)

    def labels_paired_with(self, image: Any) -> Any:
        """The training Labels layer paired with ``image`` (the list, else the combo
        boxes); :class:`VoCoDataError` when there is none. Tracked from then on."""
        for pair_image, labels in self.pairs:
            if pair_image is image:
                self.tracker_of(labels)
                return labels
        if image is not None and self.image_combo.layer() is image:
            if self.labels_combo.layer() is not None:
                self.tracker_of(self.labels_combo.layer())
                return self.labels_combo.layer()
        raise VoCoDataError(f"no training labels layer is paired with image "
                            f"{getattr(image, 'name', '?')!r}: add its image + labels pair")

    def review_target(self, image: Any = None) -> Any:
        """The training Labels layer *Accept slice* works on: the selected layer when it
        is one (a pair's, or the chosen labels layer), else the one paired with
        ``image`` (the segmented image), else the chosen labels layer."""
        active = unwrap(self.viewer.layers.selection.active)
        candidates = [labels for _, labels in self.pairs] + [unwrap(self.labels_combo.layer())]
        if active is not None and any(active is layer for layer in candidates):
            self.tracker_of(active)
            return active
        if image is not None:
            try:
                return self.labels_paired_with(image)
            except VoCoDataError:
                pass
        if self.labels_combo.layer() is not None:
            return self.tracker_of(self.labels_combo.layer()).layer
        raise VoCoDataError("no training labels layer: choose a labels layer (or add an "
                            "image + labels pair) first")

    # ------------------------------------------------------------------ annotated slices

    def tracker_of(self, layer: Any, baseline: bool = True) -> AnnotationTracker:
        """The :class:`AnnotationTracker` of a training Labels layer, started now when
        there is none (``baseline``: the slices already holding a label count)."""
        layer = unwrap(layer)
        tracker = self.trackers.get(id(layer))
        if tracker is not None and tracker.layer is layer:
            return tracker
        tracker = AnnotationTracker(layer, baseline)
        self.trackers[id(layer)] = tracker
        self.listen(layer.events.paint, tracker.on_paint)
        self.listen(layer.events.data, tracker.on_data)
        tracker.changed.append(lambda: self.annotations_changed.emit(layer))
        return tracker

    def track_prediction(self, layer: Any) -> None:
        """``layer`` holds a prediction: none of its slices counts as annotated until
        painted or accepted (should it be used as training labels)."""
        tracker = self.tracker_of(layer, baseline=False)
        for mask in tracker.reviewed:
            mask[:] = False
        tracker.held_out.clear()
        tracker.trained.clear()

    def _untrack(self, key: int) -> None:
        tracker = self.trackers.pop(key)
        connections = self.__dict__.get("_viewer_connections", [])
        for emitter, callback in list(connections):
            if callback in (tracker.on_paint, tracker.on_data):
                try:
                    emitter.disconnect(callback)
                except (RuntimeError, ValueError, TypeError):
                    pass
                connections.remove((emitter, callback))

    def _track_chosen(self, *args: Any) -> None:
        layer = self.labels_combo.layer()
        if layer is not None:
            self.tracker_of(layer)

    def accept_current(self, image: Any = None, accepted: bool = True) -> tuple[Any, int, int]:
        """*Accept slice*: mark the slice shown along the sparse axis of the
        :meth:`review_target` annotated (``accepted`` False: not); returns
        ``(layer, axis, index)``."""
        layer = self.review_target(image)
        axis = self.sparse_axis_of(layer)
        index = current_slice(self.viewer, layer, axis)
        self.tracker_of(layer).accept(axis, index, accepted)
        return layer, axis, index

    def record_rounds(self, inputs: TrainingInputs) -> None:
        """A run started with ``inputs``: remember its trained and held-out slices."""
        for tracker, axis, trained, held in inputs.rounds:
            tracker.record_round(axis, trained, held)

    # ------------------------------------------------------------------ sparse labels

    def sparse_axis_of(self, layer: Any) -> int:
        """The axis of *annotated slices only* (and of *current slice only*) for ``layer``."""
        text = self.sparse_axis.currentText()
        return slicing_axis(self.viewer, layer) if text == SLICING_AXIS else int(text[-1])

    def _sparsify(self, layer_pairs: list, inputs: TrainingInputs, num_classes: int,
                  continuing: bool) -> int:
        """Turn ``inputs.pairs``' labels into "annotated slices only" training maps, in
        place, and the held-out slices into ``inputs.validation`` maps (the rule of
        :func:`voco_core.data.sparse.holdout_slices`; slices held out before stay held
        out, and when ``continuing``, slices an earlier round trained on are not held
        out now). Fills the status note and, when nothing is held out, the holdout
        note; returns the ignore label."""
        pairs = inputs.pairs
        max_label = max(int(labels.max()) if labels.size else 0 for _, _, (labels, _) in pairs)
        ignore = ignore_value(max_label, num_classes)
        counts, missing = [], []
        for row, ((_, labels_layer), (name, image, (labels, affine))) in enumerate(
                zip(layer_pairs, pairs, strict=True)):
            axis = self.sparse_axis_of(labels_layer)
            tracker = self.tracker_of(labels_layer)
            annotated = tracker.annotated(axis)
            count = int(annotated.sum())
            if count == 0:
                raise VoCoDataError(
                    f"labels layer {labels_layer.name!r} has no painted voxel and no accepted "
                    f"slice: paint at least one slice along axis {axis} (or accept one) for "
                    "'annotated slices only'")
            held = holdout_slices(annotated, foreground=annotated_slices(labels, axis),
                                  keep=tracker.held_out.get(axis),
                                  exclude=tracker.trained.get(axis) if continuing else None)
            train, validation = split_sparse(labels, axis, ignore, annotated, held)
            pairs[row] = (name, image, (train, affine))
            inputs.rounds.append((tracker, axis, annotated & ~held, held))
            text = f"{labels_layer.name} {count}/{labels.shape[axis]} (axis {axis})"
            if validation is not None:
                inputs.validation.append((row, (validation, affine)))
                text += f", held out {describe_slices(np.flatnonzero(held))}"
            else:
                missing.append(slices_missing_for_holdout(count))
            counts.append(text)
        inputs.note = f"annotated slices: {', '.join(counts)}; ignore label {ignore}"
        if not inputs.validation:
            more = min(missing)
            inputs.holdout_note = (
                f"no held-out slices: paint or accept at least {more} more "
                f"slice{'s' if more > 1 else ''}" if more else
                "no held-out slices: every annotated slice was trained on before; paint "
                "or accept a new slice")
        return ignore

    # ------------------------------------------------------------------ a run's inputs

    def gather(self, fresh: bool, continuing: bool = False) -> TrainingInputs:
        """What the next run trains on (GUI thread; typed errors for bad input).
        ``fresh``: a new run, not a resumed or continued one (only a new run takes its
        classes from the layers); ``continuing``: a run continuing an earlier round."""
        if self.source.currentText() != SOURCE_PAIRS:
            data = self.data_path.path()
            if data is None:
                raise VoCoDataError("no data chosen: pick a folder with imagesTr/ and "
                                    "labelsTr/, or a datalist JSON")
            return TrainingInputs(data=data)
        layer_pairs = self.layer_pairs()
        inputs = TrainingInputs(pairs=[
            (image.name, layer_volume(image), layer_volume(labels, "labels"))
            for image, labels in layer_pairs])
        label_names = self._label_names([labels for _, labels in layer_pairs])
        max_label = max(int(labels.max()) if labels.size else 0
                        for _, _, (labels, _) in inputs.pairs)
        names = class_names_of(label_names, max_label)
        if names and fresh:
            inputs.data_overrides.update(num_classes=len(names), class_names=names)
        if self.sparse.isChecked():
            inputs.data_overrides["ignore_label"] = self._sparsify(
                layer_pairs, inputs, len(names) if names else 0, continuing)
        return inputs
