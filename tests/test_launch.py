"""The README's run command: napari with the VoCo widgets docked and the demo job."""

from __future__ import annotations

import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui


def test_launcher_docks_the_widgets_and_runs_the_main_job(make_napari_viewer_proxy, qtbot,
                                                          train_dataset, tmp_path, monkeypatch):
    from napari_voco import _launch
    from voco_core.checkpoint import load_checkpoint

    errors: list = []
    import napari_voco._pretrain_widget as pretrain_module

    monkeypatch.setattr(pretrain_module, "notify_error", errors.append)
    viewer = make_napari_viewer_proxy()
    args = _launch.build_parser().parse_args(
        ["--data", str(train_dataset), "--out", str(tmp_path / "run"), "--steps", "1"])
    widgets = _launch.set_up_viewer(viewer, args)
    assert set(widgets) == {"VoCo pretrain", "VoCo positions", "VoCo finetune", "VoCo segment"}
    assert [layer.name for layer in viewer.layers] == ["VoCo phantom CT", "VoCo phantom labels"]
    pretrain = widgets["VoCo pretrain"]
    assert pretrain.preset.currentText() == "tiny" and pretrain.steps.value() == 1
    assert widgets["VoCo positions"].follow.isChecked()
    # a smaller sample than the tiny preset's keeps this test quick
    pretrain.overrides = {**_launch.DEMO_OVERRIDES, "data": {"target_size": [80, 80, 40]},
                          "geometry": {"grid_size": 2, "num_random_crops": 2},
                          "model": {"head_hidden_dim": 64, "head_out_dim": 64},
                          "run": {"tensorboard": False}}
    qtbot.waitUntil(lambda: pretrain.running, timeout=10_000)  # started by the launcher
    qtbot.waitUntil(lambda: not pretrain.running, timeout=180_000)
    assert not errors, errors
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 1
    assert widgets["VoCo positions"].checkpoint.path().endswith("last.pt")


def test_launcher_without_display_says_so(monkeypatch, capsys):
    from napari_voco import _launch

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(_launch.sys, "platform", "linux")
    assert _launch.main([]) == 1
    assert "no display" in capsys.readouterr().err
