"""The README's run command: napari with the VoCo widgets docked and the demo job."""

from __future__ import annotations

import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui


def test_launcher_docks_the_widgets_and_runs_the_main_job(make_napari_viewer_proxy, qtbot,
                                                          train_dataset, tmp_path, monkeypatch):
    from napari_voco import _launch, _notify
    from voco_core.checkpoint import load_checkpoint

    errors: list = []
    monkeypatch.setattr(_notify, "notify_error", errors.append)
    viewer = make_napari_viewer_proxy()
    args = _launch.build_parser().parse_args(
        ["--data", str(train_dataset), "--out", str(tmp_path / "run"), "--steps", "1"])
    widgets = _launch.set_up_viewer(viewer, args)
    assert set(widgets) == {"VoCo pretrain", "VoCo positions", "VoCo finetune", "VoCo segment"}
    assert [layer.name for layer in viewer.layers] == ["VoCo phantom CT", "VoCo phantom labels"]
    pretrain = widgets["VoCo pretrain"]
    assert pretrain.preset.currentText() == "tiny" and pretrain.steps.value() == 1
    positions = widgets["VoCo positions"]
    assert positions.followed is pretrain.run_state  # wired explicitly by the launcher
    assert positions.follow.currentText().startswith("VoCo pretrain")  # its dock's name
    # a smaller sample than the tiny preset's keeps this test quick
    pretrain.overrides = {**_launch.DEMO_OVERRIDES, "data": {"target_size": [80, 80, 40]},
                          "geometry": {"grid_size": 2, "num_random_crops": 2},
                          "model": {"head_hidden_dim": 64, "head_out_dim": 64},
                          "run": {"tensorboard": False}}
    qtbot.waitUntil(lambda: pretrain.panel.running, timeout=10_000)  # started by the launcher
    qtbot.waitUntil(lambda: not pretrain.panel.running, timeout=180_000)
    assert not errors, errors
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 1
    assert positions.checkpoint.path() == tmp_path / "run" / "checkpoints" / "last.pt"
    assert pretrain.run_state.status == "done"
    # from the first checkpoint on, the inspector shows sampled sub-volumes
    qtbot.waitUntil(lambda: positions.sample_result is not None and not positions.busy,
                    timeout=120_000)
    assert len(positions.sample_result.predicted) == _launch.SAMPLED_SUB_VOLUMES
    assert positions.samples_layer.nshapes == _launch.SAMPLED_SUB_VOLUMES
    assert not errors, errors


@pytest.mark.parametrize(("width", "height", "wide"), [(1280, 1024, False), (1600, 1000, True)])
def test_launcher_window_fits_the_screen_with_both_panels(make_napari_viewer_proxy, qtbot,
                                                          tmp_path, monkeypatch, width,
                                                          height, wide):
    """The pretraining panel and the inspector show at once (side by side on a wide
    screen, else one above the other) and the window fits: dims slider, status bar and
    dock tab bar on screen; no widget is wider than its dock (its right side would be
    cut off: the docks scroll vertically only)."""
    from qtpy.QtWidgets import QApplication, QScrollArea

    from napari_voco import _launch
    from napari_voco._layers import unwrap

    monkeypatch.setattr(_launch, "SIDE_BY_SIDE_WIDTH", 0 if wide else 10**6)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text("{}")  # no phantoms written
    viewer = make_napari_viewer_proxy(show=True)
    args = _launch.build_parser().parse_args(
        ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--no-start"])
    widgets = _launch.set_up_viewer(viewer, args)
    window = unwrap(viewer).window._qt_window
    window.resize(width, height)
    qtbot.wait(200)
    QApplication.processEvents()
    hint = window.minimumSizeHint()
    assert hint.width() <= width and hint.height() <= height, hint
    assert (window.width(), window.height()) == (width, height)
    pretrain, positions = (_launch.dock_of(widgets[name])
                           for name in ("VoCo pretrain", "VoCo positions"))
    assert pretrain.isVisible() and positions.isVisible()
    assert window.tabifiedDockWidgets(pretrain) == []  # not hidden behind a tab
    beside = positions.geometry().left() >= pretrain.geometry().right()
    below = positions.geometry().top() >= pretrain.geometry().bottom()
    assert beside if wide else below
    if not wide:  # both get a useful share of the height
        assert min(pretrain.height(), positions.height()) > 0.3 * height
    qt_viewer = unwrap(viewer).window._qt_viewer
    for widget in (window.statusBar(), qt_viewer.dims, positions):
        bottom = widget.mapTo(window, widget.rect().bottomRight()).y()
        assert widget.isVisible() and bottom < height, (widget, bottom)
    for name, widget in widgets.items():
        _launch.raise_dock_widget(widget)  # finetune and segment are tabs
        qtbot.wait(50)
        scroll = unwrap(widget).findChild(QScrollArea)
        content = scroll.widget()
        assert content.minimumSizeHint().width() <= scroll.viewport().width(), (
            name, content.minimumSizeHint().width(), scroll.viewport().width())


def test_launcher_without_display_says_so(monkeypatch, capsys):
    from napari_voco import _launch

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(_launch.sys, "platform", "linux")
    assert _launch.main([]) == 1
    assert "no display" in capsys.readouterr().err
