"""Sparse labels and the correct-and-retrain loop in the finetune widget, as a user
drives it: paint two slices, finetune on "annotated slices only", segment, copy the
prediction into the training labels, correct a voxel, continue.

Tiny runs (SwinUNETR feature size 12, 64^3 crops, 2 steps) on a 64 x 64 x 48 phantom,
on CPU.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

WAIT_MS = 180_000
GAP_LIMIT_S = 0.25  # as tests/test_widgets_training.py
TINY_FINETUNE = {
    "train": {"samples_per_volume": 1, "warmup_steps": 1, "sw_batch_size": 1},
    "run": {"tensorboard": False},
}
PAINTED = (20, 40)  # axial slices: axis 0, the axis napari slices in the default 2-D view


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


@pytest.mark.serial
def test_sparse_finetune_segment_copy_correct_continue(make_napari_viewer_proxy, qtbot,
                                                       train_dataset, tmp_path, notified):
    from qtpy.QtCore import QTimer

    from napari_voco._finetune_widget import FinetuneWidget
    from napari_voco._io import read_nifti
    from napari_voco._sparse import COPY_SLICE, COPY_VOLUME
    from voco_core.data.io import read_volume

    viewer = make_napari_viewer_proxy()
    name = "phantom_000.nii.gz"
    data, kwargs, _ = read_nifti(str(train_dataset / "imagesTr" / name))[0]
    image = viewer.add_image(data, **kwargs)
    truth = np.asarray(read_nifti(str(train_dataset / "labelsTr" / name))[0][0])
    painted = np.zeros(truth.shape, np.uint8)
    painted[list(PAINTED)] = truth[list(PAINTED)]  # the user paints two slices
    labels = viewer.add_labels(painted, name="painted", **{
        k: v for k, v in kwargs.items() if k in ("scale", "translate", "affine", "metadata")})

    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="VoCo finetune")
    widget.overrides = TINY_FINETUNE
    widget.preset.setCurrentText("tiny")
    widget.steps.setValue(2)
    widget.val_every.setValue(2)
    widget.device.set_device("cpu")
    widget.output.set_path(tmp_path / "ft")
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

    # round 1: annotated slices only, along the axis napari slices (0)
    marks["start"] = time.perf_counter()
    _click(qtbot, widget.panel.start_button)
    marks["started"] = time.perf_counter()
    assert "painted 2/48 (axis 0)" in widget.panel.status.text()  # 48 axial slices
    _wait_idle(qtbot, widget)
    marks["trained"] = time.perf_counter()
    assert not notified, notified
    written_record = read_volume(tmp_path / "ft" / "layers" / "labelsTr" / "phantom_000.nii")
    written = written_record.array
    assert (written[[0, 30, 47]] == 255).all()
    np.testing.assert_array_equal(written[list(PAINTED)], truth[list(PAINTED)])
    # what voco_core trains on: each painted slice is one axial plane (one RAS z)
    np.testing.assert_allclose(written_record.affine[2, 1:3], 0.0, atol=1e-9)
    assert written_record.affine[2, 0] > 0
    assert json.loads((tmp_path / "ft" / "meta.json").read_text())["ignore_label"] == 255
    assert widget.continue_button.isEnabled()

    # segment, copy the prediction (one slice, then the whole volume), correct a voxel
    widget.segment_combo.set_layer(image)
    marks["segment"] = time.perf_counter()
    _click(qtbot, widget.segment_button)
    _wait_idle(qtbot, widget)
    marks["segmented"] = time.perf_counter()
    assert not notified, notified
    prediction = np.asarray(widget.labels_layer.data)
    viewer.dims.set_current_step(0, 30)
    widget.copy_scope.setCurrentText(COPY_SLICE)
    _click(qtbot, widget.copy_button)
    np.testing.assert_array_equal(labels.data[30], prediction[30])
    assert not labels.data[[10, 45]].any()
    widget.copy_scope.setCurrentText(COPY_VOLUME)
    _click(qtbot, widget.copy_button)
    np.testing.assert_array_equal(labels.data, prediction)
    labels.data_setitem((np.array([30]), np.array([32]), np.array([24])), 1)  # a correction
    assert "voxels changed" in widget.panel.status.text()

    # round 2: continue from round 1's best checkpoint with the corrected labels
    marks["copied"] = time.perf_counter()
    _click(qtbot, widget.continue_button)
    marks["continued"] = time.perf_counter()
    assert "continues ft → ft_r2" in widget.panel.status.text()
    _wait_idle(qtbot, widget)
    marks["end"] = time.perf_counter()
    timer.stop()
    assert not notified, notified
    meta = json.loads((tmp_path / "ft_r2" / "meta.json").read_text())
    assert meta["parent"]["run"] == str(tmp_path / "ft") and meta["step"] == 2
    assert meta["parent"]["checkpoint"].endswith("best.pt")
    corrected = read_volume(tmp_path / "ft_r2" / "layers" / "labelsTr" / "phantom_000.nii")
    assert corrected.array[30, 32, 24] == 1
    rounds = widget.rounds.rounds
    assert [(r.number, r.run_dir.name, r.steps) for r in rounds] == [(1, "ft", 2),
                                                                     (2, "ft_r2", 2)]
    assert widget.rounds.rowCount() == 2 and widget.rounds.item(1, 1).text() == "ft_r2"
    assert all(np.isfinite(r.best_dice) for r in rounds)
    assert widget.panel.start_button.isEnabled() and widget.continue_button.isEnabled()


    def longest_gap(begin: str, end: str) -> float:
        inside = [t for t in ticks if marks[begin] <= t <= marks[end]]
        return float(np.diff(inside).max())

    training = max(longest_gap("started", "trained"), longest_gap("continued", "end"))
    segmenting = longest_gap("segment", "segmented")
    print(f"\nGUI responsiveness, longest gap of a 10 ms timer: {training * 1000:.0f} ms while "
          f"the two sparse rounds train, {segmenting * 1000:.0f} ms while segmenting (incl. "
          "adding the segmentation Labels layer in the GUI thread); Start click "
          f"{(marks['started'] - marks['start']) * 1000:.0f} ms, Continue click "
          f"{(marks['continued'] - marks['copied']) * 1000:.0f} ms")
    assert training < GAP_LIMIT_S


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
