"""``napari-voco``: open napari with the VoCo widgets docked and the main job running.

What ``make run`` starts: the phantom sample in the viewer, the four VoCo widgets
docked (pretrain, positions, finetune, segment), the pretrain widget set to the
embedded default (the tiny preset on the synthetic phantoms in ``--data``, written
there first when absent) and started, and the positions inspector following its
checkpoints (wired explicitly: ``positions.follow_run(pretrain.run_state)``):
from the first checkpoint on it shows sampled sub-volumes and their predicted
positions. The pretraining panel and the inspector show at once, side by side on a
wide screen and one above the other on a narrower one (finetune and segment are tabs
behind the inspector). The window fills the screen it opens on (maximised, and sized
to the screen's available area where no window manager maximises it:
:func:`fit_window_to_screen`), whatever size napari would give it or saved last time,
so the loss plot, the inspector's summary and the canvas have room on a 1280 x 1024
or 1600 x 1000 screen (the widgets scroll). ``voco demo`` is the headless twin of this
job.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from voco_core.errors import VoCoError

# The demo's settings (see voco_core.cli's demo): per-crop flips/rot90 make the
# pretext task need orientation invariance, which a few CPU minutes do not learn.
DEMO_OVERRIDES = {"augment": {"flip_prob": 0.0, "rot90_prob": 0.0}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-voco", description="napari with the VoCo widgets and the demo pretraining")
    parser.add_argument("--data", type=Path, default=Path("data/phantoms"),
                        help="phantom/data folder for pretraining (phantoms written if absent)")
    parser.add_argument("--out", type=Path, help="run folder (default runs/gui-<time>)")
    parser.add_argument("--steps", type=int, default=60, help="pretraining steps")
    parser.add_argument("--phantoms", type=int, default=8, help="phantoms to write if absent")
    parser.add_argument("--no-start", action="store_true",
                        help="dock and fill in the widgets, but do not start pretraining")
    return parser


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                or sys.platform in ("darwin", "win32"))


SAMPLED_SUB_VOLUMES = 12
"""Sub-volumes the inspector samples from the first checkpoint on."""


def dock_of(widget):
    """The dock holding a docked widget (napari's documented way: its Qt parent)."""
    return (widget.native if hasattr(widget, "native") else widget).parent()


def raise_dock_widget(widget) -> None:
    """Show a docked widget's tab in front (napari's documented way: the Qt parent of
    the inner widget is its dock)."""
    dock = dock_of(widget)
    dock.show()
    dock.raise_()


SIDE_BY_SIDE_WIDTH = 1500
"""Screens at least this wide (pixels) get the pretraining panel and the inspector side
by side; narrower ones (1280 x 1024) one above the other, leaving the canvas room."""


def fit_window_to_screen(window) -> None:
    """Size napari's main window to the available area of the screen it is on (less the
    task bar) and maximise it. Without a window manager (Xvfb) nothing maximises a
    window, so its geometry is set to that area first; with one, maximising keeps the
    title bar on screen."""
    from qtpy.QtWidgets import QApplication

    screen = window.screen() or QApplication.primaryScreen()
    if screen is None:
        return
    window.setGeometry(screen.availableGeometry())
    window.showMaximized()


def _rect(rect) -> list[int]:
    return [rect.x(), rect.y(), rect.width(), rect.height()]


def window_report(window) -> dict:
    """What a user sees of napari's main ``window`` (numbers for the launcher's test and
    the screenshot script): the screen's available area and the window's frame
    (``[x, y, width, height]``), its minimum size, the canvas (central widget) and
    status bar in window coordinates, and per visible dock (by title) its geometry, the
    docks it is tabbed with, whether it is the tab in front, its widget's size and
    minimum size and, for a scrolling VoCo widget, its content's minimum width and
    height against the scroll area's viewport."""
    from qtpy.QtWidgets import QApplication, QDockWidget, QScrollArea

    screen = window.screen() or QApplication.primaryScreen()
    central, status = window.centralWidget(), window.statusBar()
    report = {"screen": _rect(screen.availableGeometry()),
              "frame": _rect(window.frameGeometry()),
              "maximized": window.isMaximized(),
              "minimum": [window.minimumSizeHint().width(), window.minimumSizeHint().height()],
              "canvas": _rect(central.geometry()),
              "status_bar": _rect(status.geometry()) if status.isVisible() else None,
              "docks": {}}
    for dock in window.findChildren(QDockWidget):
        if dock.isHidden() or dock.isFloating():
            continue
        inner = dock.widget()
        hint = inner.minimumSizeHint()
        entry = {"geometry": _rect(dock.geometry()),
                 "tabbed": [other.windowTitle() for other in window.tabifiedDockWidgets(dock)],
                 "in_front": not inner.visibleRegion().isEmpty(),
                 "widget": [inner.width(), inner.height()],
                 "widget_minimum": [hint.width(), hint.height()]}
        scroll = inner.findChild(QScrollArea)
        if scroll is not None and scroll.widget() is not None:
            content = scroll.widget().minimumSizeHint()
            entry["content_minimum"] = [content.width(), content.height()]
            entry["viewport"] = [scroll.viewport().width(), scroll.viewport().height()]
        report["docks"][dock.windowTitle()] = entry
    return report


def show_both(first, second) -> None:
    """Dock ``second`` beside ``first`` on a wide screen, else below it, so both show at
    once (each scrolls when its dock is shorter than its content)."""
    from qtpy.QtCore import Qt, QTimer
    from qtpy.QtWidgets import QApplication, QScrollArea, QTabBar

    from napari_voco._inputs import MIN_DOCK_HEIGHT

    first_dock, second_dock = dock_of(first), dock_of(second)
    window = first_dock.parentWidget()
    screen = window.screen() or QApplication.primaryScreen()
    wide = screen is None or screen.availableGeometry().width() >= SIDE_BY_SIDE_WIDTH
    orientation = Qt.Orientation.Horizontal if wide else Qt.Orientation.Vertical
    window.splitDockWidget(first_dock, second_dock, orientation)
    if not wide:  # share the height (Qt would squeeze the first dock to its minimum)

        def share_height() -> None:
            # the screen's height when the window manager has not maximised it yet
            available = screen.availableGeometry().height() if screen is not None else 0
            tabs = max((bar.sizeHint().height() for bar in window.findChildren(QTabBar)
                        if bar.parent() is window and bar.count() > 1), default=0)
            height = (max(window.height(), available) - window.menuBar().height()
                      - window.statusBar().height() - tabs - 10)  # the docks' column
            scroll = first_dock.widget().findChild(QScrollArea)
            need = (scroll.widget().minimumSizeHint().height() + 30 if scroll is not None
                    else 0)  # the whole first widget (its plot at the bottom) and title
            second_height = max(int(height * 0.36), MIN_DOCK_HEIGHT + 60)
            first_height = min(max(int(height * 0.55), need), height - second_height)
            window.resizeDocks([first_dock, second_dock],
                               [first_height, height - first_height], orientation)

        QTimer.singleShot(0, share_height)  # once the window has its size


def set_up_viewer(viewer, args: argparse.Namespace) -> dict:
    """Load the sample, dock the widgets and set up the pretraining in ``viewer``
    (started unless ``--no-start``). Returns the widgets by display name."""
    from qtpy.QtCore import QTimer

    from napari_voco._inputs import keep_placement
    from voco_core.data.phantoms import make_phantom_dataset
    from voco_core.data.readers.sources import volume_sources

    has_volumes = args.data.is_dir() and bool(volume_sources(args.data, "image"))
    if not (args.data / "dataset.json").is_file() and not has_volumes:
        make_phantom_dataset(args.data, n=args.phantoms, seed=0)
        print(f"wrote {args.phantoms} phantoms to {args.data}")
    viewer.open_sample("napari-voco", "voco_phantom")
    widgets = {}
    for name in ("VoCo pretrain", "VoCo positions", "VoCo finetune", "VoCo segment"):
        _dock, widget = viewer.window.add_plugin_dock_widget(
            "napari-voco", name, tabify=name not in ("VoCo pretrain", "VoCo positions"))
        widgets[name] = widget
        keep_placement(dock_of(widget))  # laid out here, not as a tab of the others
        if name == "VoCo positions":  # with the pretraining; finetune/segment tab behind
            show_both(widgets["VoCo pretrain"], widget)
    pretrain, positions = widgets["VoCo pretrain"], widgets["VoCo positions"]
    fit_window_to_screen(dock_of(pretrain).parentWidget())  # napari's main window
    raise_dock_widget(positions)
    pretrain.overrides = DEMO_OVERRIDES
    pretrain.preset.setCurrentText("tiny")
    pretrain.steps.setValue(args.steps)
    pretrain.checkpoint_every.setValue(10)
    pretrain.device.set_device("cpu")
    pretrain.source.setCurrentText("Folder or datalist JSON")
    pretrain.data_path.set_path(args.data)
    pretrain.output.set_path(args.out or Path("runs") / f"gui-{time.strftime('%Y%m%d-%H%M%S')}")
    positions.image_combo.setCurrentText("VoCo phantom CT")
    widgets["VoCo segment"].image_combo.setCurrentText("VoCo phantom CT")
    positions.count.setValue(SAMPLED_SUB_VOLUMES)
    positions.follow_run(pretrain.run_state)  # live inspection of the run below

    def sample_once(path: str) -> None:  # then following re-samples at each checkpoint
        pretrain.run_state.checkpoint_written.disconnect(sample_once)
        positions.sample()

    pretrain.run_state.checkpoint_written.connect(sample_once)
    if not args.no_start:
        QTimer.singleShot(500, pretrain.start)
    return widgets


STOP_WAIT_SECONDS = 120
"""How long a SIGTERM/SIGINT waits for the running jobs to stop at their next step
(and save) before napari closes anyway: a tiny CPU step takes seconds, a base step on
a busy GPU well under a minute."""


def stop_on_signals(viewer, say: Callable[[str], None] = print) -> Callable[[], None]:
    """SIGTERM and SIGINT (``kill``, Ctrl-C in the terminal, a session's logout) stop
    every running VoCo job at its next step, where it saves its checkpoint and releases
    its run folder, then close napari; each step is said in one line. Returns a function
    that puts the previous handlers back."""
    import signal

    from qtpy.QtCore import QTimer

    def handler(signum, _frame) -> None:
        name = signal.Signals(signum).name
        QTimer.singleShot(0, lambda: stop_jobs_then_close(viewer, name, say))

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    # Python runs signal handlers between bytecodes only: while Qt's loop waits in C++,
    # a periodic no-op timer lets it in.
    ticker = QTimer(viewer.window._qt_window)
    ticker.timeout.connect(lambda: None)
    ticker.start(200)

    def restore() -> None:
        with contextlib.suppress(RuntimeError):  # gone with the closed window
            ticker.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def stop_jobs_then_close(viewer, reason: str, say: Callable[[str], None] = print,
                         wait_seconds: float = STOP_WAIT_SECONDS) -> None:
    """Stop the running jobs of ``viewer``'s VoCo widgets, wait (at most
    ``wait_seconds``, the GUI responsive) until they have, say where each run stands,
    and close the viewer."""
    from qtpy.QtCore import QTimer

    from napari_voco._jobs import JobRunner

    runners = [r for r in viewer.window._qt_window.findChildren(JobRunner) if r.running]
    say(f"napari-voco: {reason}: " + (
        f"stopping {len(runners)} running job(s) at their next step, then closing"
        if runners else "closing"))
    for runner in runners:
        runner.stop()
    deadline = time.monotonic() + wait_seconds

    def close_when_stopped() -> None:
        if any(r.running for r in runners) and time.monotonic() < deadline:
            QTimer.singleShot(100, close_when_stopped)
            return
        for runner in runners:
            state = runner.state
            if runner.running:
                say(f"napari-voco: the {state.kind or 'job'} did not stop within "
                    f"{wait_seconds:.0f} s; closing anyway")
            elif state.checkpoint:
                say(f"napari-voco: {state.kind} stopped at step {state.step}; checkpoint "
                    f"{state.checkpoint} (resume it from the widget, or --resume "
                    f"{state.run_dir})")
        viewer.close()

    close_when_stopped()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not has_display():
        print("napari-voco: error: no display (DISPLAY/WAYLAND_DISPLAY unset); run it on a "
              "desktop, or under Xvfb (xvfb-run napari-voco), or use the headless "
              "'voco demo'", file=sys.stderr)
        return 1
    try:
        import napari

        viewer = napari.Viewer(title="napari-voco")
        set_up_viewer(viewer, args)
        stop_on_signals(viewer)
        napari.run()
    except VoCoError as err:
        print(f"napari-voco: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
