"""The pretrain and finetune widgets, driven as a user would in napari.

Runs are tiny (feature size 12, 40^3 crops on an 80 x 80 x 40 sample, a 64-wide
head; a SwinUNETR of feature size 12 on 64^3 crops) on 64 x 64 x 48 phantoms, on CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_voco._jobs import JobState

from conftest import TEST_SWIN

pytestmark = pytest.mark.gui

WAIT_MS = 180_000
GAP_LIMIT_S = 0.25

# As tests/conftest.py::tiny_config.
TINY_PRETRAIN = {
    "data": {"target_size": [80, 80, 40]},
    "geometry": {"grid_size": 2, "num_random_crops": 2, "input_size": 40,
                 "resize_crops": False},
    "model": {"feature_size": 12, "head_hidden_dim": 64, "head_out_dim": 64, **TEST_SWIN},
    "optim": {"warmup_steps": 1},
    "run": {"tensorboard": False, "log_every": 1},
}
TINY_FINETUNE = {
    "data": {"spacing": None},  # as tests/conftest.py: the small phantoms at their own grid
    "train": {"samples_per_volume": 1, "warmup_steps": 1, "sw_batch_size": 1},
    "model": TEST_SWIN,
    "run": {"tensorboard": False},
}


@pytest.fixture
def notified(monkeypatch):
    """Errors the widgets report (``napari_voco._notify.notify_error``), in order."""
    from napari_voco import _notify

    seen: list[BaseException] = []
    monkeypatch.setattr(_notify, "notify_error", seen.append)
    return seen


@pytest.fixture(scope="module")
def released_weights(tmp_path_factory) -> Path:
    """A random SwinUNETR (feature size 12) saved like a released backbone:
    a raw state dict under ``state_dict`` with ``module.`` prefixes."""
    import torch

    from voco_core.config import make_finetune_config
    from voco_core.models import build_swin_unetr

    model = build_swin_unetr(make_finetune_config("tiny", check_device=False).model, 2)
    path = tmp_path_factory.mktemp("released") / "voco_released.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def _pretrain_widget(viewer, run_dir: Path | None, data: Path | None = None, steps: int = 3):
    from napari_voco._pretrain_widget import PretrainWidget

    widget = PretrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="VoCo pretrain")
    widget.overrides = TINY_PRETRAIN
    widget.preset.setCurrentText("tiny")
    widget.steps.setValue(steps)
    widget.checkpoint_every.setValue(100)
    widget.device.set_device("cpu")
    if data is not None:
        widget.source.setCurrentText("Folder or datalist JSON")
        widget.data_path.set_path(data)
    if run_dir is not None:
        widget.output.set_path(run_dir)
    return widget


def _click(qtbot, button) -> None:
    from qtpy.QtCore import Qt

    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def _wait_idle(qtbot, widget, timeout: int = WAIT_MS) -> None:
    qtbot.waitUntil(lambda: not widget.panel.running, timeout=timeout)


def _assert_usable(widget) -> None:
    assert not widget.panel.running and not widget.run_state.active
    button = widget.panel.start_button
    assert button.isEnabled() and button.text() == "Start"
    assert widget.settings.isEnabled()


def _task_status(viewer) -> list[str]:
    from napari_voco._layers import unwrap

    return unwrap(viewer).window._task_status_manager.get_status()


def test_text_helpers_and_lr_field(qtbot):
    from napari_voco._inputs import ScientificSpinBox, device_choices
    from napari_voco._text import format_bytes, format_duration, progress_format

    assert format_duration(42.2) == "42 s" and format_duration(185) == "3 min 05 s"
    assert format_duration(2 * 3600 + 7 * 60) == "2 h 07 min"
    assert format_duration(float("nan")) == "?"
    assert format_bytes(512) == "512 B" and format_bytes(1.5 * 2**30) == "1.5 GiB"
    assert progress_format(12, 40, 65) == "12 / 40 steps · ETA 1 min 05 s"
    assert progress_format(40, 40, 0) == "40 / 40 steps"
    assert device_choices()[0] == ("CPU", "cpu")
    assert device_choices(auto=True)[:2] == [("auto (CUDA when available)", "auto"),
                                             ("CPU", "cpu")]

    lr = ScientificSpinBox(3e-4)
    qtbot.addWidget(lr)
    assert lr.text() == "3.0e-04"
    lr.lineEdit().setText("0.001")
    lr.interpretText()
    assert lr.value() == pytest.approx(1e-3) and lr.text() == "1.0e-03"
    lr.stepBy(1)
    assert lr.value() == pytest.approx(2e-3)


def test_loss_plot_axes_follow_the_run_whatever_draws_come_between(qtbot):
    """Run length, new loss terms and the first points share one full redraw at the next
    plot tick, also when something else (a resize) draws the canvas in between."""
    from napari_voco._run_panel import LossPlot

    plot = LossPlot(("total",))
    qtbot.addWidget(plot)
    draws = plot.full_draws
    plot.set_steps(24)
    plot.append(1, {"total": 0.6, "pos": 0.3, "neg": float("nan")})  # inside the y range
    assert plot.full_draws == draws  # nothing drawn yet, in the caller's time
    plot.canvas.draw()  # e.g. the dock was resized before the plot's timer fired
    qtbot.waitUntil(lambda: plot.redraws > 0, timeout=5_000)
    assert plot.full_draws == draws + 1
    assert plot.axes.get_xlim() == (0.0, 24.0)
    assert set(plot.series) == {"total", "pos"} and plot.series["pos"] == ([1.0], [0.3])
    assert [t.get_text() for t in plot._legend.get_texts()] == ["total", "pos"]


def test_pretrain_progress_plot_stop_and_resume(make_napari_viewer_proxy, qtbot, train_dataset,
                                                tmp_path, notified):
    from voco_core.checkpoint import load_checkpoint

    viewer = make_napari_viewer_proxy()
    run = tmp_path / "run"
    widget = _pretrain_widget(viewer, run, train_dataset, steps=3)
    assert widget.lr.text() == "3.0e-04"  # the tiny preset's, in scientific notation
    assert widget.batch.text() == "auto"  # the default: sized by the run, kept by presets
    assert widget.field_overrides()["optim"]["batch_size"] == "auto"
    panel, state = widget.panel, widget.run_state
    assert state.status == JobState.IDLE and state.checkpoint == ""
    written: list[str] = []
    statuses: list[JobState] = []
    events = []
    tasks: list[list[str]] = []
    state.checkpoint_written.connect(written.append)
    state.events.status.connect(statuses.append)

    def on_event(event):
        events.append(event)
        if event.kind == "step":
            tasks.append(_task_status(viewer))
            if panel.start_button.text() == "Stop":
                _click(qtbot, panel.start_button)  # Stop after the first step

    panel.progressed.connect(on_event)
    _click(qtbot, panel.start_button)
    assert panel.running and panel.start_button.text() == "Stop"
    assert not widget.settings.isEnabled()
    assert state.status == JobState.RUNNING and state.run_dir == str(run)
    _wait_idle(qtbot, widget)
    assert not notified, notified

    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stopped" and "step" in kinds
    assert events[0].message.startswith("optim.batch_size auto: 1 volume(s)")
    stopped = events[-1].step
    assert 1 <= stopped < 3
    checkpoint = run / "checkpoints" / "last.pt"
    assert load_checkpoint(checkpoint)["step"] == stopped  # weights_only load
    assert state.checkpoint == str(checkpoint) and written[-1] == str(checkpoint)
    assert statuses == [JobState.RUNNING, JobState.STOPPING, JobState.STOPPED]
    assert (state.step, state.total) == (stopped, 3)
    assert panel.progress.value() == stopped and panel.progress.maximum() == 3
    assert len(panel.plot.series["total"][0]) == stopped
    # the loss terms of the v1 loss, as the events name them
    assert set(panel.plot.series) == {"total", *events[-2].terms} == {"total", "pos", "neg",
                                                                       "reg"}
    assert all(np.isfinite(panel.plot.series[k][1]).all() for k in ("total", "pos", "neg"))
    assert f"stopped at step {stopped}" in panel.status.text()
    # napari listed the run as a task (so closing the window asks first)
    assert any(any("VoCo pretraining" in line for line in status) for status in tasks)
    _assert_usable(widget)

    # resume: the step count continues from the checkpoint
    events.clear()
    widget.resume.set_path(run)
    assert not widget.preset.isEnabled()  # taken from the run being resumed
    widget.checkpoint_every.setValue(1)  # fresh weights every step for live inspection
    panel.progressed.disconnect(on_event)
    panel.progressed.connect(events.append)
    assert widget.start()
    _wait_idle(qtbot, widget)
    assert not notified, notified
    assert events[0].kind == "start" and events[0].step == stopped
    assert [e.step for e in events if e.kind == "step"] == list(range(stopped + 1, 4))
    assert events[-1].kind == "done" and load_checkpoint(checkpoint)["step"] == 3
    assert written == [str(checkpoint)] * (1 + 3 - stopped)  # stop, then every step
    assert panel.progress.value() == 3 and "done: 3 steps" in panel.status.text()
    assert panel.plot.series["total"][0] == [float(s) for s in range(1, 4)]
    # what is on screen: the x axis spans the run, the y axis holds every loss
    panel.plot.redraw()
    assert panel.plot.axes.get_xlim() == (0.0, 3.0)
    low, high = panel.plot.axes.get_ylim()
    assert all(low <= value <= high for value in panel.plot.series["total"][1])
    assert state.status == JobState.DONE and state.step == 3
    _assert_usable(widget)


@pytest.mark.serial
def test_gui_stays_responsive_during_pretraining(make_napari_viewer_proxy, qtbot,
                                                 train_dataset, tmp_path, notified):
    """The longest gap between ticks of a 10 ms QTimer while a tiny pretraining runs."""
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer_proxy()
    widget = _pretrain_widget(viewer, tmp_path / "run", train_dataset, steps=2)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    qtbot.wait(100)
    clicked = time.perf_counter()
    _click(qtbot, widget.panel.start_button)
    start_call = time.perf_counter() - clicked
    _wait_idle(qtbot, widget)
    qtbot.wait(100)
    timer.stop()
    assert not notified, notified
    assert widget.panel.last_event.kind == "done" and widget.panel.last_event.step == 2
    gaps = np.diff(ticks)
    longest = float(gaps.max())
    print(f"\nGUI responsiveness: {len(ticks)} ticks of a 10 ms timer over "
          f"{ticks[-1] - ticks[0]:.1f} s of tiny pretraining; longest gap {longest * 1000:.0f} ms "
          f"(median {np.median(gaps) * 1000:.1f} ms, 99th percentile "
          f"{np.percentile(gaps, 99) * 1000:.0f} ms); Start click {start_call * 1000:.0f} ms")
    assert longest < GAP_LIMIT_S


def test_pretrain_on_image_layers_and_napari_cancel(make_napari_viewer_proxy, qtbot,
                                                    train_dataset, tmp_path, notified,
                                                    rotated_affine):
    """Open image layers are written with their affine to RUN_DIR/layers; napari's task
    cancel (what closing the window does) stops the run with a checkpoint."""
    from napari_voco._io import DISPLAY_TO_RAS, read_volumes
    from napari_voco._layers import unwrap
    from voco_core.checkpoint import load_checkpoint
    from voco_core.data.io import read_volume

    viewer = make_napari_viewer_proxy()
    data, kwargs, _ = read_volumes(str(train_dataset / "imagesTr" / "phantom_000.nii.gz"))[0]
    viewer.add_image(data, **kwargs)
    viewer.add_image(np.asarray(data)[::-1].copy(), name="scaled/copy", scale=(2.0, 1.5, 3.0),
                     translate=(10.0, -4.0, 7.0), units="mm")
    viewer.add_image(np.zeros((8, 8, 3)), name="rgb", rgb=True, units="mm")  # not listed
    run = tmp_path / "layers_run"
    widget = _pretrain_widget(viewer, run)
    assert widget.source.currentText() == "Open image layers"
    assert [layer.name for layer in widget.layer_list.checked_layers()] == [
        "phantom_000", "scaled/copy"]

    widget.layer_list.set_checked([])
    assert not widget.start()
    assert "no image layer chosen" in str(notified.pop())
    widget.layer_list.set_checked(widget.layer_list.layers())

    assert widget.start()
    unwrap(viewer).window._task_status_manager.cancel_all()  # as when napari closes
    _wait_idle(qtbot, widget)
    assert not notified, notified
    assert widget.panel.last_event.kind == "stopped" and widget.panel.last_event.step == 0
    assert widget.run_state.status == JobState.STOPPED
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 0
    first = read_volume(run / "layers" / "phantom_000.nii")
    np.testing.assert_allclose(first.affine, kwargs["metadata"]["voco"]["affine"])
    np.testing.assert_array_equal(first.array, data)
    second = read_volume(run / "layers" / "scaled_copy.nii")
    expected = np.diag([2.0, 1.5, 3.0, 1.0])
    expected[:3, 3] = (10.0, -4.0, 7.0)
    # a plain layer's transform is in napari's display world (S, P, L mm): back to RAS
    np.testing.assert_allclose(second.affine, DISPLAY_TO_RAS @ expected)
    _assert_usable(widget)


def test_pretrain_bad_inputs_notify_and_leave_gui_usable(make_napari_viewer_proxy, qtbot,
                                                         train_dataset, tmp_path, notified):
    from voco_core.errors import VoCoConfigError, VoCoDataError

    viewer = make_napari_viewer_proxy()
    empty = tmp_path / "empty"
    empty.mkdir()
    widget = _pretrain_widget(viewer, tmp_path / "run1", empty)
    assert widget.start()  # the folder is read in the worker
    _wait_idle(qtbot, widget)
    assert isinstance(notified[-1], VoCoDataError) and "no NIfTI files" in str(notified[-1])
    assert "failed" in widget.panel.status.text() and widget.run_state.status == JobState.FAILED
    _assert_usable(widget)

    widget.data_path.set_path(train_dataset)
    widget.device.set_device("cuda:0")  # not on this machine
    assert widget.device.device() == "cuda:0"
    assert not widget.start()
    assert isinstance(notified[-1], VoCoConfigError) and "CUDA" in str(notified[-1])
    _assert_usable(widget)

    widget.device.set_device("cpu")
    blocker = tmp_path / "a_file.txt"
    blocker.write_text("not a folder")
    widget.output.set_path(blocker / "run")
    assert widget.start()
    _wait_idle(qtbot, widget)
    assert isinstance(notified[-1], VoCoDataError) and "not writable" in str(notified[-1])
    _assert_usable(widget)

    widget.output.set_path(tmp_path / "run2")
    widget.resume.set_path(tmp_path / "missing_run")
    assert not widget.start()
    assert "not found" in str(notified[-1])
    assert len(notified) == 4
    _assert_usable(widget)


def test_finetune_layer_pairs_dice_and_segment(make_napari_viewer_proxy, qtbot, train_dataset,
                                               tmp_path, notified, released_weights):
    from napari.layers import Labels

    from napari_voco._finetune_widget import FinetuneWidget
    from napari_voco._io import read_volumes
    from voco_core.checkpoint import load_checkpoint

    viewer = make_napari_viewer_proxy()
    for index in (0, 1):
        name = f"phantom_{index:03d}.nii.gz"
        for folder in ("imagesTr", "labelsTr"):
            data, kwargs, kind = read_volumes(str(train_dataset / folder / name))[0]
            if folder == "labelsTr":
                kwargs["name"] = f"{kwargs['name']} labels"
            getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="VoCo finetune")
    widget.overrides = TINY_FINETUNE
    widget.preset.setCurrentText("tiny")
    widget.steps.setValue(2)
    widget.val_every.setValue(1)
    widget.device.set_device("cpu")
    widget.output.set_path(tmp_path / "ft")
    widget.pretrained.set_path(released_weights)
    assert not widget.segment_button.isEnabled()

    for index in (0, 1):
        widget.data.image_combo.set_layer(viewer.layers[f"phantom_{index:03d}"])
        widget.data.labels_combo.set_layer(viewer.layers[f"phantom_{index:03d} labels"])
        _click(qtbot, widget.data.add_pair_button)
    assert len(widget.data.pairs) == 2 and widget.data.pair_list.count() == 2

    events = []
    widget.panel.progressed.connect(events.append)
    _click(qtbot, widget.panel.start_button)
    assert widget.panel.running
    _wait_idle(qtbot, widget)
    assert not notified, notified
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("validation") == 2
    assert "loaded" in widget.report.toPlainText()
    assert "voco_released.pt" in widget.report.toPlainText()
    assert widget.dice_table.rowCount() == 10  # foreground classes, named from dataset.json
    assert widget.dice_table.item(0, 0).text() == "body"
    assert "validation Dice at step 2" in widget.dice_label.text()
    plot = widget.panel.plot
    assert len(plot.series["loss"][0]) == 2 and len(plot.series["val Dice"][0])
    best = tmp_path / "ft" / "checkpoints" / "best.pt"
    assert widget.best_checkpoint == best and load_checkpoint(best)["kind"] == "best"
    _assert_usable(widget)

    widget.segment_combo.set_layer(viewer.layers["phantom_001"])
    assert widget.segment_button.isEnabled()
    assert widget.segment_button.text() == "Segment phantom_001 with best checkpoint"
    segmented = []
    widget.segmented.connect(segmented.append)
    _click(qtbot, widget.segment_button)
    qtbot.waitUntil(lambda: not widget.segmenting, timeout=WAIT_MS)
    assert not notified, notified
    layer = segmented[0]
    assert isinstance(layer, Labels) and layer.name == "phantom_001 segmentation"
    image = viewer.layers["phantom_001"]
    assert layer.data.shape == image.data.shape
    np.testing.assert_allclose(layer.affine.affine_matrix, image.affine.affine_matrix)
    assert layer.metadata["voco"]["label_names"][1] == "body"
    assert widget.segment_button.isEnabled()


def test_finetune_bad_inputs_notify_and_leave_gui_usable(make_napari_viewer_proxy, qtbot,
                                                         train_dataset, tmp_path, notified):
    from napari_voco._finetune_widget import FinetuneWidget
    from voco_core.errors import VoCoConfigError, VoCoDataError

    viewer = make_napari_viewer_proxy()
    viewer.add_image(np.zeros((64, 64, 48), np.float32), name="image")
    viewer.add_labels(np.zeros((32, 32, 24), np.uint8), name="small labels")
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="VoCo finetune")
    widget.overrides = TINY_FINETUNE
    widget.preset.setCurrentText("tiny")
    widget.device.set_device("cpu")
    widget.output.set_path(tmp_path / "ft")

    _click(qtbot, widget.data.add_pair_button)
    assert isinstance(notified[-1], VoCoDataError) and "same voxel grid" in str(notified[-1])
    assert not widget.data.pairs

    widget.data.source.setCurrentText("Folder or datalist JSON")
    empty = tmp_path / "empty"
    empty.mkdir()
    widget.data.data_path.set_path(empty)
    assert widget.start()
    _wait_idle(qtbot, widget)
    assert isinstance(notified[-1], VoCoDataError) and "no NIfTI files" in str(notified[-1])
    _assert_usable(widget)

    widget.data.data_path.set_path(train_dataset)
    widget.device.set_device("cuda")
    assert not widget.start()
    assert isinstance(notified[-1], VoCoConfigError) and "CUDA" in str(notified[-1])
    _assert_usable(widget)

    widget.device.set_device("cpu")
    widget.pretrained.set_path(tmp_path / "no_such_weights.pt")
    assert not widget.start()
    assert "not found" in str(notified[-1])
    assert not widget.segment_button.isEnabled()
    assert len(notified) == 4


def test_positions_widget_follows_the_running_pretraining(make_napari_viewer_proxy, qtbot,
                                                          train_dataset, tmp_path, notified):
    """Live inspection: the inspector takes each new checkpoint of the running job and
    re-predicts its sub-volume box with the new weights."""
    from napari_voco._positions_widget import PositionsWidget

    viewer = make_napari_viewer_proxy()
    viewer.open(train_dataset / "imagesTr" / "phantom_000.nii.gz", plugin="napari-voco")
    positions = PositionsWidget(viewer)
    viewer.window.add_dock_widget(positions, name="VoCo positions")
    pretrain = _pretrain_widget(viewer, tmp_path / "run", train_dataset, steps=3)
    pretrain.checkpoint_every.setValue(1)
    seen_models: list[tuple] = []

    def on_checkpoint(path: str) -> None:
        if positions._view is not None:
            seen_models.append(positions._view.model_key)

    # the user opens Follow and picks the pretrain widget docked in this viewer
    positions.follow.refresh()
    index = positions.follow.findText("VoCo pretrain")
    assert index > 0 and positions.follow.itemData(index) is pretrain.run_state
    positions.follow.activated.emit(index)
    assert positions.followed is pretrain.run_state
    assert "waiting" in positions.status.text()
    boxes_placed = []

    def place_once(path: str) -> None:  # after the first checkpoint, place a box
        if not boxes_placed:
            boxes_placed.append(path)
            qtbot.waitUntil(lambda: not positions.running, timeout=WAIT_MS)
            positions.place_box()

    pretrain.run_state.checkpoint_written.connect(place_once)
    pretrain.run_state.checkpoint_written.connect(on_checkpoint)
    assert pretrain.start()
    _wait_idle(qtbot, pretrain)
    qtbot.waitUntil(lambda: not positions.running, timeout=WAIT_MS)
    assert not notified, notified
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert positions.checkpoint.path() == last
    assert positions.box_result is not None
    # the box was re-predicted with later checkpoints: the cached model changed with them
    model_keys = {key for key in seen_models} | {positions._view.model_key}
    assert len(model_keys) >= 2, model_keys
    positions.follow.activated.emit(0)  # "off"
    assert positions.followed is None and positions.follow.currentText() == "off"


def test_napari_survives_a_killed_trainer_and_resumes_the_run(
        make_napari_viewer_proxy, qtbot, train_dataset, tmp_path, notified):
    """kill -9 of the training process (what the out-of-memory killer does): one
    notification naming the last checkpoint, every layer intact, the widget usable and
    the run resumable from it."""
    import multiprocessing
    import os
    import signal

    from voco_core.checkpoint import load_checkpoint
    from voco_core.train.child import TrainerDied

    viewer = make_napari_viewer_proxy()
    painted = viewer.add_labels(np.zeros((16, 16, 8), np.uint8), name="painted")
    painted.data[3, 4, 5] = 2  # unsaved work of the user
    run = tmp_path / "run"
    widget = _pretrain_widget(viewer, run, train_dataset, steps=20)
    widget.checkpoint_every.setValue(1)
    killed: list[int] = []

    def kill_after_two_steps(event):
        if event.kind == "step" and event.step >= 2 and not killed:
            (child,) = multiprocessing.active_children()
            os.kill(child.pid, signal.SIGKILL)
            killed.append(child.pid)

    widget.panel.progressed.connect(kill_after_two_steps)
    assert widget.start()
    _wait_idle(qtbot, widget)
    assert killed and len(notified) == 1 and isinstance(notified[0], TrainerDied)
    last = run / "checkpoints" / "last.pt"
    assert "SIGKILL" in str(notified[0]) and str(last) in str(notified[0])
    assert widget.run_state.status == JobState.FAILED and "failed" in widget.panel.status.text()
    assert [layer.name for layer in viewer.layers] == ["painted"]
    assert painted.data[3, 4, 5] == 2
    _assert_usable(widget)

    saved = load_checkpoint(last)["step"]
    widget.panel.progressed.disconnect(kill_after_two_steps)
    widget.resume.set_path(run)
    widget.steps.setValue(saved + 1)
    assert widget.start()
    _wait_idle(qtbot, widget)
    assert len(notified) == 1, notified
    assert widget.panel.last_event.kind == "done"
    assert load_checkpoint(last)["step"] == saved + 1
    _assert_usable(widget)


def test_follow_run_shows_a_run_started_elsewhere(make_napari_viewer_proxy, qtbot,
                                                  pretrain_run, finetune_run, notified):
    from voco_core.errors import VoCoDataError

    viewer = make_napari_viewer_proxy()
    widget = _pretrain_widget(viewer, None)
    panel = widget.panel
    written: list[str] = []
    widget.run_state.checkpoint_written.connect(written.append)
    assert not panel.follow(finetune_run)  # another kind of run: one line, nothing runs
    assert isinstance(notified[-1], VoCoDataError) and "finetune widget" in str(notified[-1])
    notified.clear()
    assert panel.follow(pretrain_run)
    assert panel.start_button.text() == "Stop following" and not panel.follow_button.isEnabled()
    _wait_idle(qtbot, widget)
    assert not notified, notified
    assert panel.last_event.kind == "done" and panel.plot.series["total"][0] == [1.0]
    assert written == [str(pretrain_run / "checkpoints" / "last.pt")]
    assert widget.run_state.status == JobState.DONE and "done: 1 steps" in panel.status.text()
    _assert_usable(widget)
    assert panel.follow_button.isEnabled()


def test_pretrain_widget_starts_torchrun_with_two_processes(make_napari_viewer_proxy, qtbot,
                                                            train_dataset, tmp_path, notified,
                                                            monkeypatch):
    """Where several GPUs are visible the widget offers one process per GPU; here, on a
    CPU, two gloo ranks stand in for them."""
    from voco_core.checkpoint import load_checkpoint

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    viewer = make_napari_viewer_proxy()
    run = tmp_path / "ddp"
    widget = _pretrain_widget(viewer, run, train_dataset, steps=2)
    widget.processes.setMaximum(2)
    widget.processes.setValue(2)
    assert widget.start()
    _wait_idle(qtbot, widget)
    assert not notified, notified
    assert widget.panel.last_event.kind == "done" and widget.run_state.status == JobState.DONE
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 2 and state["world_size"] == 2
    assert widget.panel.plot.series["total"][0] == [1.0, 2.0]
    _assert_usable(widget)


def test_positions_inspector_follows_a_run_folder(make_napari_viewer_proxy, qtbot,
                                                  train_dataset, pretrain_run, finetune_run,
                                                  notified):
    """Follow → run folder…: a run written by any process (here a finished one) feeds
    the inspector its checkpoints like a docked pretrain widget's."""
    from napari_voco._positions_widget import PositionsWidget
    from voco_core.errors import VoCoDataError

    viewer = make_napari_viewer_proxy()
    viewer.open(train_dataset / "imagesTr" / "phantom_000.nii.gz", plugin="napari-voco")
    positions = PositionsWidget(viewer)
    viewer.window.add_dock_widget(positions, name="VoCo positions")
    positions.follow.refresh()
    assert positions.follow.itemText(positions.follow.count() - 1) == "run folder…"
    assert not positions.follow_folder(finetune_run)
    assert isinstance(notified[-1], VoCoDataError) and "finetuning run" in str(notified[-1])
    notified.clear()
    assert positions.follow_folder(pretrain_run)
    assert positions.followed is positions.folder_runner.state
    last = pretrain_run / "checkpoints" / "last.pt"
    qtbot.waitUntil(lambda: positions.checkpoint.path() == last, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: not positions.folder_runner.running and not positions.running,
                    timeout=WAIT_MS)
    assert not notified, notified
    assert positions._view is not None  # the grid was drawn with the followed checkpoint
    positions.follow.activated.emit(0)  # "off"
    assert positions.followed is None
