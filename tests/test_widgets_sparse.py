"""Sparse labels and the correct-and-retrain loop in the finetune widget, as a user
drives it: paint three slices, finetune on "annotated slices only" (one slice held out
for validation), segment (uncertainty, slices to review next), copy the prediction
into the training labels, continue without review (no slice added), then accept and
correct slices.

Tiny runs (SwinUNETR feature size 12, 64^3 crops, 2 steps) on a 64 x 64 x 48 phantom,
on CPU.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip("napari")

from conftest import TEST_SWIN

pytestmark = pytest.mark.gui

WAIT_MS = 180_000
GAP_LIMIT_S = 0.25  # as tests/test_widgets_training.py
TINY_FINETUNE = {
    "train": {"samples_per_volume": 1, "warmup_steps": 1, "sw_batch_size": 1},
    "model": TEST_SWIN,
    "run": {"tensorboard": False},
}
PAINTED = (20, 40)  # axial slices: axis 0, the axis napari slices in the default 2-D view
PAINTED3 = (20, 30, 40)  # three: the middle one is held out for validation


@pytest.fixture
def notified(monkeypatch):
    """Errors the widgets report (``napari_voco._notify.notify_error``), in order."""
    from napari_voco import _notify

    seen: list[BaseException] = []
    monkeypatch.setattr(_notify, "notify_error", seen.append)
    return seen


def _click(qtbot, button) -> None:
    from qtpy.QtCore import Qt

    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def _wait_idle(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: not widget.panel.running and not widget.segmenting,
                    timeout=WAIT_MS)


def test_helpers_ignore_value_and_copy_one_slice(make_napari_viewer_proxy):
    from napari_voco._sparse import copy_prediction, ignore_value, sparse_labels
    from voco_core.errors import VoCoDataError

    assert ignore_value(3) == 255 and ignore_value(255) == 256 and ignore_value(2, 300) == 300
    labels = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(VoCoDataError, match="'empty' has no painted voxel"):
        sparse_labels("empty", labels, 0, 255)
    labels[1, 2, 3] = 2
    sparse, count = sparse_labels("a", labels, 0, 255)
    assert count == 1 and (sparse[[0, 2, 3]] == 255).all() and sparse[1, 2, 3] == 2

    viewer = make_napari_viewer_proxy()
    target = viewer.add_labels(labels.copy(), name="target")
    prediction = viewer.add_labels(np.full(labels.shape, 1, np.int32), name="prediction")
    assert copy_prediction(prediction, target, axis=0, index=3) == 30
    assert (target.data[3] == 1).all() and (target.data[[0, 2]] == 0).all()
    target.undo()
    np.testing.assert_array_equal(target.data, labels)


def test_tracker_counts_paint_and_accept_never_a_copied_prediction(make_napari_viewer_proxy):
    from napari_voco._layers import current_slice
    from napari_voco._sparse import AnnotationTracker, copy_prediction, go_to_slice

    viewer = make_napari_viewer_proxy()
    painted = np.zeros((12, 8, 8), np.uint8)
    painted[2, 3, 3] = 1  # painted before tracking began: counts
    labels = viewer.add_labels(painted, name="painted", scale=(2.0, 1.0, 1.0))
    tracker = AnnotationTracker(labels)
    labels.events.paint.connect(tracker.on_paint)
    assert np.flatnonzero(tracker.annotated(0)).tolist() == [2]

    go_to_slice(viewer, labels, 0, 7)
    assert current_slice(viewer, labels, 0) == 7
    labels.brush_size = 1
    labels.paint((7, 4, 4), 2)  # the user's brush on slice 7
    labels.paint((9, 4, 4), 0)  # erasing counts too (nothing changed: no paint event)
    assert np.flatnonzero(tracker.annotated(0)).tolist() == [2, 7]

    prediction = viewer.add_labels(np.full(painted.shape, 3, np.uint8), name="prediction")
    before = np.asarray(labels.data).copy()
    changed = copy_prediction(prediction, labels, axis=0, tracker=tracker)
    assert changed == 10 * 64  # every slice but the annotated 2 and 7
    np.testing.assert_array_equal(labels.data[[2, 7]], before[[2, 7]])  # the user's kept
    assert (labels.data[[0, 5, 11]] == 3).all()
    assert np.flatnonzero(tracker.annotated(0)).tolist() == [2, 7]  # the copy marks nothing
    copy_prediction(prediction, labels, axis=0, index=7, tracker=tracker)
    assert (labels.data[7] == 3).all()
    assert np.flatnonzero(tracker.annotated(0)).tolist() == [2]  # 7 needs review again
    tracker.accept(0, 5)
    labels.paint((11, 1, 1), 1)
    assert np.flatnonzero(tracker.annotated(0)).tolist() == [2, 5, 11]
    labels.undo()
    labels.undo()
    labels.undo()  # the copies undone: the data comes back, the record is the user's
    assert (labels.data[0] == 0).all()


def _painted_pair(viewer, dataset, name: str, slices: tuple[int, ...]):
    """The phantom ``name`` as the reader opens it, and a Labels layer on its grid where
    the user painted the true labels of ``slices`` (axial, axis 0); returns
    ``(image, labels, truth)``."""
    from napari_voco._io import read_volumes

    data, kwargs, _ = read_volumes(str(dataset / "imagesTr" / name))[0]
    image = viewer.add_image(data, **kwargs)
    truth = np.asarray(read_volumes(str(dataset / "labelsTr" / name))[0][0])
    painted = np.zeros(truth.shape, np.uint8)
    painted[list(slices)] = truth[list(slices)]
    labels = viewer.add_labels(painted, name="painted", **{
        k: v for k, v in kwargs.items() if k in ("scale", "translate", "affine", "metadata")})
    return image, labels, truth


def _sparse_widget(viewer, out, steps: int):
    """A docked finetune widget for a tiny sparse run of ``steps`` (validating at the
    end) into ``out``."""
    from napari_voco._finetune_widget import FinetuneWidget

    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="VoCo finetune")
    widget.overrides = TINY_FINETUNE
    widget.preset.setCurrentText("tiny")
    widget.steps.setValue(steps)
    widget.val_every.setValue(steps)
    widget.device.set_device("cpu")
    widget.output.set_path(out)
    return widget


def _held_out_dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """The validation mean Dice of one fully annotated slice, computed here with numpy:
    per class present in the truth (background left out), then the mean."""
    dice = [2.0 * np.sum((prediction == c) & (truth == c))
            / (np.sum(prediction == c) + np.sum(truth == c))
            for c in np.unique(truth) if c != 0]
    return float(np.mean(dice))


def _annotated(path) -> list[int]:
    from voco_core.data.io import read_volume

    array = read_volume(path).array
    return [z for z in range(array.shape[0]) if (array[z] != 255).any()]


@pytest.mark.serial
def test_sparse_finetune_holds_out_a_slice_and_learns_only_from_review(
        make_napari_viewer_proxy, qtbot, train_dataset, tmp_path, notified):
    from qtpy.QtCore import QTimer

    from napari_voco._layers import current_slice
    from napari_voco._sparse import COPY_SLICE, COPY_VOLUME
    from napari_voco._text import format_dice
    from voco_core.data.io import read_volume

    viewer = make_napari_viewer_proxy()
    # the user paints three slices
    image, labels, truth = _painted_pair(viewer, train_dataset, "phantom_000.nii.gz", PAINTED3)
    widget = _sparse_widget(viewer, tmp_path / "ft", steps=2)
    widget.data.image_combo.set_layer(image)
    widget.data.labels_combo.set_layer(labels)
    widget.data.sparse.setChecked(True)
    assert not widget.continue_button.isEnabled() and not widget.copy_button.isEnabled()

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    marks: dict[str, float] = {}

    # round 1: annotated slices only, along the axis napari slices (0); of 3 annotated
    # slices the middle one is held out for validation
    marks["start"] = time.perf_counter()
    _click(qtbot, widget.panel.start_button)
    marks["started"] = time.perf_counter()
    assert "painted 3/48 (axis 0), held out 30" in widget.panel.status.text()  # 48 axial
    _wait_idle(qtbot, widget)
    marks["trained"] = time.perf_counter()
    assert not notified, notified
    layers = tmp_path / "ft" / "layers"
    written_record = read_volume(layers / "labelsTr" / "phantom_000.nii")
    written = written_record.array
    assert _annotated(layers / "labelsTr" / "phantom_000.nii") == [20, 40]
    np.testing.assert_array_equal(written[[20, 40]], truth[[20, 40]])
    assert _annotated(layers / "labelsVal" / "phantom_000.nii") == [30]  # held out
    np.testing.assert_array_equal(read_volume(layers / "labelsVal" / "phantom_000.nii")
                                  .array[30], truth[30])
    listed = json.loads((layers / "dataset.json").read_text())
    assert listed["validation"] == [{"image": "imagesTr/phantom_000.nii",
                                     "label": "labelsVal/phantom_000.nii"}]
    # what voco_core trains on: each painted slice is one axial plane (one RAS z)
    np.testing.assert_allclose(written_record.affine[2, 1:3], 0.0, atol=1e-9)
    assert written_record.affine[2, 0] > 0
    meta = json.loads((tmp_path / "ft" / "meta.json").read_text())
    assert meta["ignore_label"] == 255 and meta["validated_on"] == "validation"
    assert widget.continue_button.isEnabled()

    # segment: the prediction, its uncertainty and the slices to review next
    widget.segment_combo.set_layer(image)
    marks["segment"] = time.perf_counter()
    _click(qtbot, widget.segment_button)
    _wait_idle(qtbot, widget)
    marks["segmented"] = time.perf_counter()
    assert not notified, notified
    prediction = np.asarray(widget.labels_layer.data)

    # the rounds table shows the Dice of the held-out slice 30, as computed here
    expected = _held_out_dice(prediction[30], truth[30])
    round1 = widget.rounds.rounds[0]
    assert round1.note == "" and abs(round1.best_dice - expected) < 5e-3, (round1, expected)
    assert widget.rounds.item(0, 3).text() == format_dice(round1.best_dice)

    uncertainty = viewer.layers["phantom_000 uncertainty"]
    assert uncertainty.data.shape == truth.shape and float(uncertainty.data.min()) >= 0
    rows = [widget.review.slice_at(r) for r in range(widget.review.rowCount())]
    assert len(rows) == 10 and not set(rows) & set(PAINTED3)  # annotated slices skipped
    widget.review.cellClicked.emit(1, 0)  # the second row: the viewer goes there
    assert current_slice(viewer, labels, 0) == rows[1]

    # copy the prediction (one slice, then the whole volume) without reviewing it
    widget.copy_scope.setCurrentText(COPY_SLICE)
    _click(qtbot, widget.copy_button)
    np.testing.assert_array_equal(labels.data[rows[1]], prediction[rows[1]])
    assert not labels.data[[10, 45]].any()
    widget.copy_scope.setCurrentText(COPY_VOLUME)
    _click(qtbot, widget.copy_button)
    assert "annotated slices 20, 30, 40 kept" in widget.panel.status.text()
    np.testing.assert_array_equal(labels.data[list(PAINTED3)], truth[list(PAINTED3)])
    others = np.setdiff1d(np.arange(48), PAINTED3)
    np.testing.assert_array_equal(labels.data[others], prediction[others])

    # round 2, retrained without review: the copy added no annotated slice
    marks["copied"] = time.perf_counter()
    _click(qtbot, widget.continue_button)
    marks["continued"] = time.perf_counter()
    assert "continues ft → ft_r2" in widget.panel.status.text()
    assert "painted 3/48 (axis 0), held out 30" in widget.panel.status.text()
    _wait_idle(qtbot, widget)
    marks["end"] = time.perf_counter()
    timer.stop()
    assert not notified, notified
    meta = json.loads((tmp_path / "ft_r2" / "meta.json").read_text())
    assert meta["parent"]["run"] == str(tmp_path / "ft") and meta["step"] == 2
    assert meta["parent"]["checkpoint"].endswith("best.pt")
    layers2 = tmp_path / "ft_r2" / "layers"
    assert _annotated(layers2 / "labelsTr" / "phantom_000.nii") == [20, 40]
    assert _annotated(layers2 / "labelsVal" / "phantom_000.nii") == [30]  # sticky
    rounds = widget.rounds.rounds
    assert [(r.number, r.run_dir.name, r.steps) for r in rounds] == [(1, "ft", 2),
                                                                     (2, "ft_r2", 2)]
    assert widget.rounds.rowCount() == 2 and widget.rounds.item(1, 1).text() == "ft_r2"
    assert all(np.isfinite(r.best_dice) for r in rounds)
    assert widget.panel.start_button.isEnabled() and widget.continue_button.isEnabled()

    # now the user reviews: accepts a suggested slice as it is, corrects another
    viewer.layers.selection.active = labels
    widget.review.cellClicked.emit(0, 0)
    accepted = current_slice(viewer, labels, 0)
    assert widget.accept_button.text() == f"Accept slice {accepted}"
    _click(qtbot, widget.accept_button)
    assert widget.accept_button.isChecked()
    assert accepted not in [widget.review.slice_at(r) for r in range(widget.review.rowCount())]
    corrected = 10 if accepted != 10 else 11
    widget.go_to_review_slice(corrected)
    labels.brush_size = 1
    labels.paint((corrected, 32, 24), 1)  # the brush: one voxel, the slice reviewed
    assert widget.accept_button.isChecked()
    job = widget.make_job(continue_from=tmp_path / "ft_r2")  # what round 3 would write
    (_, _, (train3, _)), = job.pairs
    assert [z for z in range(48) if (train3[z] != 255).any()] == sorted(
        [20, 40, accepted, corrected])
    np.testing.assert_array_equal(train3[accepted], prediction[accepted])
    assert train3[corrected, 32, 24] == 1
    (_, (val3, _)), = job.validation
    assert [z for z in range(48) if (val3[z] != 255).any()] == [30]

    def longest_gap(begin: str, end: str) -> float:
        inside = [t for t in ticks if marks[begin] <= t <= marks[end]]
        return float(np.diff(inside).max())

    training = max(longest_gap("started", "trained"), longest_gap("continued", "end"))
    segmenting = longest_gap("segment", "segmented")
    print(f"\nGUI responsiveness, longest gap of a 10 ms timer: {training * 1000:.0f} ms while "
          f"the two sparse rounds train, {segmenting * 1000:.0f} ms while segmenting (incl. "
          "adding the segmentation and uncertainty layers in the GUI thread); Start click "
          f"{(marks['started'] - marks['start']) * 1000:.0f} ms, Continue click "
          f"{(marks['continued'] - marks['copied']) * 1000:.0f} ms")
    assert training < GAP_LIMIT_S


@pytest.mark.serial
def test_rounds_table_says_so_when_no_slice_is_held_out(make_napari_viewer_proxy, qtbot,
                                                        train_dataset, tmp_path, notified):

    viewer = make_napari_viewer_proxy()
    # two slices: none can be held out
    image, labels, _ = _painted_pair(viewer, train_dataset, "phantom_001.nii.gz", PAINTED)
    widget = _sparse_widget(viewer, tmp_path / "ft", steps=1)
    widget.data.add_pair(image, labels)
    widget.data.sparse.setChecked(True)
    assert widget.start()
    assert "painted 2/48 (axis 0)" in widget.panel.status.text()
    _wait_idle(qtbot, widget)
    assert not notified, notified
    assert not (tmp_path / "ft" / "layers" / "labelsVal").exists()
    assert json.loads((tmp_path / "ft" / "meta.json").read_text())["validated_on"] == "training"
    (round1,) = widget.rounds.rounds
    assert round1.note == "no held-out slices: paint or accept at least 1 more slice"
    assert np.isnan(round1.best_dice)  # the Dice on the training slices is not shown
    assert widget.rounds.item(0, 3).text() == round1.note
    assert "on the training slices (no held-out slices" in widget.dice_label.text()


def test_sparse_without_painted_voxel_notifies_naming_the_layer(make_napari_viewer_proxy, qtbot,
                                                                tmp_path, notified):
    from napari_voco._finetune_widget import FinetuneWidget
    from voco_core.errors import VoCoDataError

    viewer = make_napari_viewer_proxy()
    viewer.add_image(np.zeros((64, 64, 48), np.float32), name="image")
    viewer.add_labels(np.zeros((64, 64, 48), np.uint8), name="unpainted")
    widget = FinetuneWidget(viewer)
    widget.device.set_device("cpu")
    widget.output.set_path(tmp_path / "ft")
    widget.data.sparse.setChecked(True)
    assert not widget.start()
    assert isinstance(notified[-1], VoCoDataError)
    assert "'unpainted' has no painted voxel" in str(notified[-1])
    assert not widget.continue_button.isEnabled()
    assert not widget.continue_finetuning() and "nothing to continue" in str(notified[-1])
    assert widget.panel.start_button.isEnabled() and not (tmp_path / "ft").exists()


def test_labels_painted_on_a_new_layer_keep_the_class_names(make_napari_viewer_proxy,
                                                            train_dataset):
    """A new Labels layer (napari's own, no metadata) painted over an image whose label
    map is open: the run's classes are named from that label map, not class_5."""
    import numpy as np

    from napari_voco._finetune_widget import FinetuneWidget

    viewer = make_napari_viewer_proxy()
    viewer.open(train_dataset / "imagesTr" / "phantom_000.nii.gz", plugin="napari-voco")
    [atlas] = viewer.open(train_dataset / "labelsTr" / "phantom_000.nii.gz",
                          plugin="napari-voco")
    painted = viewer.add_labels(np.zeros(atlas.data.shape, np.uint8), name="painted")
    painted.data[10, 20:30, 20:30] = 5
    widget = FinetuneWidget(viewer)
    names = widget.data._label_names([painted])
    assert names == atlas.metadata["voco"]["label_names"]
    assert names[5] == "liver" or names["5"] == "liver"
