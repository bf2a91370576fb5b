"""The napari widget's training against the CLI's, on one machine, alternating.

For each round: ``voco pretrain`` (the CLI, a subprocess) and the *VoCo pretrain*
widget (napari in this process, the run in its child process) train the same tiny
config on the same phantoms. Reported per launcher: median seconds per step over
the steps after the first of each run (from the runs' ``log.jsonl``); for the
widget also the longest gap of a 10 ms QTimer in napari's event loop while the child
trains, and napari's resident memory once the plugin is loaded (a pretrain widget
docked, what a user has before pressing Start) and after each run (the child's memory
is not napari's).

Needs a display: run under ``xvfb-run -a`` (or on a desktop)::

    xvfb-run -a python benchmarks/gui_child_bench.py --steps 8 --rounds 2 \\
        --out benchmarks/results/gui_child_bench_cpu.json

Prints one JSON object and a last line with the headline numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

TINY = {
    "data": {"target_size": [80, 80, 40]},
    "geometry": {"grid_size": 2, "num_random_crops": 2, "input_size": 40,
                 "resize_crops": False},
    "model": {"feature_size": 12, "head_hidden_dim": 64, "head_out_dim": 64},
    "optim": {"warmup_steps": 1, "batch_size": 1},
    "run": {"tensorboard": False, "log_every": 1, "checkpoint_every": 1000, "device": "cpu"},
}


def step_seconds(run_dir: Path) -> list[float]:
    """Seconds per step of every logged step after the first (start-up excluded)."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
               if line.strip()]
    return [r["seconds_per_step"] for r in records if r["step"] > 1]


def run_cli(data: Path, run_dir: Path, steps: int) -> list[float]:
    from voco_core.config import make_pretrain_config, merge

    config = make_pretrain_config("tiny", merge(TINY, {"optim": {"total_steps": steps}}),
                         check_device=False).save(run_dir.with_suffix(".yaml"))
    subprocess.run([sys.executable, "-m", "voco_core.cli", "pretrain", "--data", str(data),
                    "--config", str(config), "--out", str(run_dir)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return step_seconds(run_dir)


def run_widget(viewer, data: Path, run_dir: Path,
               steps: int) -> tuple[list[float], float, float, dict]:
    """(seconds per step, longest event-loop gap in s while the child trains, seconds the
    Start click held the GUI thread: planning and spawning the child, where the longest
    gap fell) of one run from the widget. Where: its start in s after the click returned,
    and the last event of the run the GUI thread had received before it ended (the work
    that event set off in the GUI thread is the likely cause)."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_voco._pretrain_widget import PretrainWidget

    widget = PretrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="VoCo pretrain")
    widget.overrides = TINY
    widget.preset.setCurrentText("tiny")
    widget.steps.setValue(steps)
    widget.checkpoint_every.setValue(1000)
    widget.device.set_device("cpu")
    widget.source.setCurrentText("Folder or datalist JSON")
    widget.data_path.set_path(data)
    widget.output.set_path(run_dir)
    ticks: list[float] = []
    received: list[tuple[float, str, int]] = []
    widget.panel.progressed.connect(
        lambda event: received.append((time.perf_counter(), event.kind, event.step)))
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    clicked = time.perf_counter()
    if not widget.start():
        raise SystemExit(f"the widget refused to start: {widget.panel.status.text()}")
    started = time.perf_counter()
    app = QApplication.instance()
    while widget.panel.running:
        app.processEvents()
        time.sleep(0.002)
    timer.stop()
    error = widget.panel.last_error
    viewer.window.remove_dock_widget(widget)
    if error is not None:
        raise SystemExit(f"the widget's run failed: {error}")
    # The first tick after the click ends the gap the click itself made (the GUI thread
    # was planning the run); the gaps after it are the child's training.
    gaps = [(b - a, a, b) for a, b in itertools.pairwise(ticks) if a >= started]
    if not gaps:
        return step_seconds(run_dir), float("nan"), started - clicked, {}
    longest, begin, end = max(gaps)
    before = [(kind, step) for t, kind, step in received if t <= end]
    where = {"starts_s_after_click": round(begin - started, 3),
             "after_event": f"{before[-1][0]} (step {before[-1][1]})" if before else "none",
             "events_before": len(before)}
    return step_seconds(run_dir), longest, started - clicked, where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--phantoms", type=int, default=8)
    parser.add_argument("--out", type=Path, help="results JSON")
    args = parser.parse_args(argv)

    import napari

    from voco_core.data.phantoms import make_phantom_dataset

    work = Path(tempfile.mkdtemp(prefix="gui_child_bench_"))
    data = work / "phantoms"
    make_phantom_dataset(data, n=args.phantoms, seed=0)
    import gc

    from napari_voco._pretrain_widget import PretrainWidget

    viewer = napari.Viewer(show=True)
    me = psutil.Process()
    loaded = PretrainWidget(viewer)  # the plugin as a user has it before Start
    viewer.window.add_dock_widget(loaded, name="VoCo pretrain (loaded)")
    gc.collect()
    rss_before = me.memory_info().rss
    cli, gui, gaps, clicks, wheres, rss_after_runs = [], [], [], [], [], []
    for round_index in range(args.rounds):  # alternating: drifts of the machine hit both
        cli += run_cli(data, work / f"cli{round_index}", args.steps)
        seconds, gap, click, where = run_widget(viewer, data, work / f"gui{round_index}",
                                                args.steps)
        gui += seconds
        gaps.append(gap)
        wheres.append(where)
        clicks.append(click)
        gc.collect()
        rss_after_runs.append(me.memory_info().rss / 2**20)
    rss_after = me.memory_info().rss
    viewer.close()
    result = {
        "benchmark": "gui_child_bench", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "load_average_at_end": os.getloadavg(),
        "steps": args.steps, "rounds": args.rounds, "phantoms": args.phantoms,
        "cli_median_s_per_step": statistics.median(cli),
        "widget_median_s_per_step": statistics.median(gui),
        "widget_over_cli": statistics.median(gui) / statistics.median(cli),
        "longest_event_loop_gap_s": max(gaps),
        "event_loop_gap_each_run_s": gaps,
        "longest_gap_where_each_run": wheres,
        "start_click_s": clicks,
        "napari_rss_before_mb": rss_before / 2**20, "napari_rss_after_mb": rss_after / 2**20,
        "napari_rss_growth_mb": (rss_after - rss_before) / 2**20,
        "napari_rss_after_each_run_mb": rss_after_runs,
        "cli_step_seconds": cli, "widget_step_seconds": gui,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(f"widget {result['widget_median_s_per_step']:.2f} s/step vs CLI "
          f"{result['cli_median_s_per_step']:.2f} s/step ({result['widget_over_cli']:.2f}x); "
          f"longest event-loop gap while training {result['longest_event_loop_gap_s'] * 1000:.0f}"
          f" ms (the Start click {max(clicks) * 1000:.0f} ms); napari "
          f"RSS {result['napari_rss_growth_mb']:+.0f} MB after {args.rounds} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
