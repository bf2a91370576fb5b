"""The README's run command: napari with the VoCo widgets docked and the demo job."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from contextlib import contextmanager

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
    from napari_voco._jobs import JobState

    assert pretrain.run_state.status == JobState.DONE
    # from the first checkpoint on, the inspector shows sampled sub-volumes
    qtbot.waitUntil(lambda: positions.sample_result is not None and not positions.running,
                    timeout=120_000)
    assert len(positions.sample_result.predicted) == _launch.SAMPLED_SUB_VOLUMES
    assert positions.samples_layer.nshapes == _launch.SAMPLED_SUB_VOLUMES
    assert not errors, errors


# Runs the launcher's own main() in a child process on its own X screen and prints
# what its window looks like once the event loop has laid it out (napari.run replaced
# by a loop that measures and quits). NAPARI_SAVED_WINDOW: a window size napari saved
# last time (a second start).
MEASURE = """
import json, os, sys
import napari
from napari.settings import get_settings
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication, QMainWindow
from napari_voco import _launch

saved = os.environ.get("NAPARI_SAVED_WINDOW")
if saved:
    settings = get_settings().application
    settings.first_time = False
    settings.save_window_geometry = True
    settings.window_position = (0, 0)
    settings.window_size = tuple(int(n) for n in saved.split("x"))

def run():
    def measure():
        [window] = [w for w in QApplication.topLevelWidgets()
                    if isinstance(w, QMainWindow) and w.isVisible()]
        report = _launch.window_report(window)
        pretrain = napari.current_viewer().window.dock_widgets["VoCo pretrain (napari-voco)"]
        canvas = pretrain.panel.plot.canvas
        report["plot"] = [canvas.visibleRegion().boundingRect().height(),
                          canvas.minimumHeight()]
        print("WINDOW " + json.dumps(report), flush=True)
        QApplication.instance().quit()
    QTimer.singleShot(2000, measure)
    QApplication.instance().exec()

napari.run = run
sys.exit(_launch.main(sys.argv[1:]))
"""


@contextmanager
def x_screen(width: int, height: int):
    """An Xvfb server with one ``width`` x ``height`` screen; yields its DISPLAY."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb not installed")
    read, write = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", f"{width}x{height}x24",
         "-nolisten", "tcp"], pass_fds=(write,), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 30)
        number = os.read(read, 64).decode().strip() if ready else ""
        assert number, "Xvfb did not start"
        yield f":{number}"
    finally:
        os.close(read)
        server.terminate()
        server.wait(10)


def launcher_window(tmp_path, width: int, height: int, saved: str = "") -> dict:
    """``napari-voco --no-start`` on a ``width`` x ``height`` screen, as a user starts
    it (napari's settings in ``tmp_path``): :func:`napari_voco._launch.window_report`
    of its window as it opens, nothing resized, plus the loss plot's visible height."""
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "dataset.json").write_text("{}")  # no phantoms written
    with x_screen(width, height) as display:
        env = {**os.environ, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb",
               "NAPARI_CONFIG": str(tmp_path / "napari.yaml"), "OMP_NUM_THREADS": "1",
               "NAPARI_SAVED_WINDOW": saved}
        env.pop("WAYLAND_DISPLAY", None)
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, "--data", str(tmp_path / "data"),
             "--out", str(tmp_path / "run"), "--no-start"],
            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("WINDOW ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("WINDOW "))


def inside(inner: list[int], outer: list[int]) -> bool:
    """Whether rectangle ``inner`` ``[x, y, width, height]`` lies within ``outer``."""
    return (inner[0] >= outer[0] and inner[1] >= outer[1]
            and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


@pytest.mark.slow
@pytest.mark.parametrize(("width", "height", "saved"),
                         [(1280, 1024, ""), (1600, 1000, ""), (1600, 1000, "1100x630")])
def test_launcher_window_fills_the_screen_with_both_panels(tmp_path, width, height, saved):
    """The launcher's own window, measured as it opens on a 1280 x 1024 and a
    1600 x 1000 screen (a new user's first start; a start after napari saved a small
    window): it fills the screen (>= 90 % of the available area, all of it on screen);
    the pretraining panel and the inspector show at once (side by side on the wide
    screen, one above the other on the other, both with a useful share of the height);
    the loss plot shows; every VoCo dock's widget gets at least its minimum size and no
    widget is wider than its dock (its right side would be cut off: the docks scroll
    vertically only); canvas and status bar are on screen."""
    report = launcher_window(tmp_path, width, height, saved)
    screen, frame = report["screen"], report["frame"]
    assert screen[2:] == [width, height]
    assert inside(frame, screen), report
    assert frame[2] >= 0.9 * screen[2] and frame[3] >= 0.9 * screen[3], report
    assert report["minimum"][0] <= screen[2] and report["minimum"][1] <= screen[3]
    window = [0, 0, frame[2], frame[3]]
    assert report["status_bar"] is not None and inside(report["status_bar"], window)
    canvas = report["canvas"]
    assert inside(canvas, window) and canvas[2] >= 0.3 * width, canvas
    docks = report["docks"]
    pretrain, positions = (docks[f"VoCo {name} (napari-voco)"]
                           for name in ("pretrain", "positions"))
    assert pretrain["in_front"] and positions["in_front"]
    assert pretrain["tabbed"] == []  # not hidden behind a tab
    (px, py, pw, ph), (qx, qy, _, qh) = pretrain["geometry"], positions["geometry"]
    wide = width >= 1500
    assert (qx >= px + pw) if wide else (qy >= py + ph), (pretrain, positions)
    if not wide:  # both get a useful share of the height
        assert min(ph, qh) > 0.3 * height, (ph, qh)
    visible, minimum = report["plot"]
    assert visible >= 0.75 * minimum, report["plot"]  # not cut to its legend
    for name, dock in docks.items():
        if not name.startswith("VoCo "):
            continue
        assert inside(dock["geometry"], window) or not dock["in_front"], (name, dock)
        assert dock["widget"][0] >= dock["widget_minimum"][0], (name, dock)
        assert dock["widget"][1] >= dock["widget_minimum"][1], (name, dock)
        assert dock["content_minimum"][0] <= dock["viewport"][0], (name, dock)


def test_launcher_without_display_says_so(monkeypatch, capsys):
    from napari_voco import _launch

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(_launch.sys, "platform", "linux")
    assert _launch.main([]) == 1
    assert "no display" in capsys.readouterr().err


@pytest.mark.gui
def test_sigterm_stops_the_job_at_its_next_step_then_closes(make_napari_viewer, qtbot):
    """``kill`` / Ctrl-C on the launcher: the running job stops at its next step and
    saves, napari closes, and each stage is said in one line."""
    import signal
    import time
    from types import SimpleNamespace

    from napari_voco import _launch
    from napari_voco._jobs import JobRunner, JobState

    viewer = make_napari_viewer()
    runner = JobRunner("pretrain", viewer.window._qt_window)

    def training(context):  # a step every 50 ms until stopped; the stop step saves
        step = 0
        while not context.stop.is_set():
            step += 1
            yield SimpleNamespace(kind="step", step=step, total_steps=10_000)
            time.sleep(0.05)
        yield SimpleNamespace(kind="stopped", step=step, total_steps=10_000,
                              checkpoint=f"/runs/r/checkpoints/last.pt@{step}")

    runner.start(training, "tiny pretraining", run_dir="/runs/r")
    qtbot.waitUntil(lambda: runner.state.step >= 3, timeout=10_000)
    said: list[str] = []
    before = signal.getsignal(signal.SIGTERM)
    restore = _launch.stop_on_signals(viewer, say=said.append)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        qtbot.waitUntil(lambda: len(said) >= 2, timeout=20_000)
    finally:
        restore()
    assert said[0] == ("napari-voco: SIGTERM: stopping 1 running job(s) at their next step, "
                       "then closing")
    assert runner.state.status is JobState.STOPPED
    step = runner.state.step
    assert said[1] == (f"napari-voco: pretrain stopped at step {step}; checkpoint "
                       f"/runs/r/checkpoints/last.pt@{step} (resume it from the widget, or "
                       "--resume /runs/r)")
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
