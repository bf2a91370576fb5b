"""Screenshots of the napari plugin for docs/gui.md, taken in a real window.

    xvfb-run -s "-screen 0 1600x1000x24" nice -n 19 .venv/bin/python scripts/gui_screenshots.py

Opens napari as ``make run`` does (sample loaded, widgets docked with the pretraining
panel and the inspector side by side, tiny pretraining on phantoms running) and keeps
the launcher's own window as it opens: nothing here resizes it. On the Xvfb screen
above the launcher fills the 1600 x 1000 screen; the script prints the window's
geometry (:func:`napari_voco._launch.window_report`) and stops when it does not fill
at least 90 % of the screen's available area, so the pictures show the window users
get. It saves the whole window: pretraining in progress with the loss plot; the
positions inspector (grid, placed sub-volume, heat maps, sampled boxes coloured by
error) with the finished run; a segmentation overlay of the sample phantom, by the
finetuned run ``--finetuned`` (one that did not train on the sample: the docs use a
150-step ``tiny`` finetuning on another phantom population, docs/gui.md) or else by a
short finetuning run on the script's phantoms (which include the sample). Takes about
5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def wait(app, condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the GUI did not reach the expected state in time")
        app.processEvents()
        time.sleep(0.02)


def settle(app) -> None:
    """Let the event loop lay out what just changed (a status line's new height)."""
    for _ in range(50):
        app.processEvents()
        time.sleep(0.02)


def check_window(app, window) -> dict:
    """The launcher's window as the user gets it (printed); SystemExit when it does not
    fill at least 90 % of its screen's available area or sticks out of it."""
    from napari_voco import _launch

    settle(app)  # the window and its docks laid out
    report = _launch.window_report(window)
    screen, frame = report["screen"], report["frame"]
    print(f"screen (available) {screen[2]} x {screen[3]} at ({screen[0]}, {screen[1]}); "
          f"window frame {frame[2]} x {frame[3]} at ({frame[0]}, {frame[1]}), "
          f"maximised {report['maximized']}; canvas {report['canvas'][2]} x "
          f"{report['canvas'][3]}")
    for name, dock in report["docks"].items():
        if name.startswith("VoCo ") and dock["in_front"]:
            print(f"  {name}: {dock['widget'][0]} x {dock['widget'][1]} "
                  f"(minimum {dock['widget_minimum'][0]} x {dock['widget_minimum'][1]})")
    fits = (frame[0] >= screen[0] and frame[1] >= screen[1]
            and frame[0] + frame[2] <= screen[0] + screen[2]
            and frame[1] + frame[3] <= screen[1] + screen[3])
    if not fits or frame[2] < 0.9 * screen[2] or frame[3] < 0.9 * screen[3]:
        raise SystemExit("the launcher's window does not fill its screen: not taking "
                         "screenshots of a window users do not get")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--finetuned", type=Path, metavar="RUN",
                        help="segment with this finetuned run (folder or checkpoint) "
                             "instead of a 40-step finetuning on the sample's population")
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_voco import _launch
    from voco_core.config import make_finetune_config
    from voco_core.data.phantoms import make_phantom_dataset
    from voco_core.train.finetune import finetune

    work = Path(tempfile.mkdtemp(prefix="voco-shots-"))
    data = work / "phantoms"
    make_phantom_dataset(data, n=6, seed=0, shape=(128, 128, 80))
    viewer = napari.Viewer(title="napari-voco", show=True)
    app = QApplication.instance()
    launch = _launch.build_parser().parse_args(
        ["--data", str(data), "--out", str(work / "pretrain"), "--steps", str(args.steps)])
    widgets = _launch.set_up_viewer(viewer, launch)  # sizes the window to the screen
    pretrain, positions = widgets["VoCo pretrain"], widgets["VoCo positions"]
    check_window(app, _launch.dock_of(pretrain).parentWidget())
    pretrain.checkpoint_every.setValue(4)
    viewer.layers["VoCo phantom labels"].opacity = 0.35
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. pretraining in progress: progress bar, ETA, live loss plot
    wait(app, lambda: pretrain.run_state.active, 30)
    wait(app, lambda: pretrain.run_state.step >= 10, 600)
    settle(app)
    viewer.screenshot(args.out / "gui_pretraining.png", canvas_only=False)

    # 2. the inspector on the finished run: grid, a placed box, sampled boxes
    wait(app, lambda: not pretrain.run_state.active, 900)
    positions.follow_run(None)
    _launch.raise_dock_widget(positions)
    positions.show_grid()
    wait(app, lambda: not positions.running, 300)
    positions.place_box()
    wait(app, lambda: not positions.running, 300)
    positions.count.setValue(12)
    positions.sample()
    wait(app, lambda: not positions.running, 300)
    positions.show_sample.setValue(0)
    positions.place_box()
    wait(app, lambda: not positions.running, 300)
    settle(app)
    viewer.screenshot(args.out / "gui_positions.png", canvas_only=False)

    # 3. a segmentation overlay
    if args.finetuned is not None:
        checkpoint, note = args.finetuned, f"segmented with {args.finetuned}"
    else:
        config = make_finetune_config("tiny", {"train": {"total_steps": 40, "val_every": 40},
                                               "run": {"device": "cpu", "tensorboard": False}})
        result = finetune(config, data, work / "finetune")
        checkpoint = result.best_checkpoint or result.last_checkpoint
        note = f"finetune best Dice {result.best_dice:.3f}"
    segment = widgets["VoCo segment"]
    for layer in [layer for layer in viewer.layers if layer.name.startswith("VoCo ")
                  and layer.name not in ("VoCo phantom CT",)]:
        layer.visible = False
    _launch.raise_dock_widget(segment)
    segment.checkpoint.set_path(checkpoint)
    segment.run()
    wait(app, lambda: not segment.running, 600)
    viewer.reset_view()  # the whole slice (the inspector may have zoomed onto a box)
    settle(app)
    viewer.screenshot(args.out / "gui_segment.png", canvas_only=False)
    print(f"screenshots in {args.out}; {note}")
    viewer.close()


if __name__ == "__main__":
    main()
