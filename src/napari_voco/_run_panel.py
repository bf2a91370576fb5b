"""The run panel of the *VoCo pretrain* and *VoCo finetune* widgets.

:class:`RunPanel` is one Start/Stop button, a progress bar with ETA, a status line
and a live :class:`LossPlot`, over a :class:`~napari_voco._jobs.JobRunner`. The
widget gives it the settings box (disabled while a run goes) and its ``start``
callable; it then only plans its run and calls :meth:`RunPanel.launch`. The plot
shows the total loss and every loss term a :class:`~voco_core.train.PretrainEvent`
carries in ``terms`` (v1: pos/neg/reg; v2: intra/inter/reg: whatever names
arrive), plus the widget's own series (finetuning's validation Dice). While a run
goes, the :class:`~napari_voco._inputs.DeviceCombo` in the settings box shows the
CUDA devices' free memory live, and the status line each step's peak memory.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from napari_voco import _notify
from napari_voco._inputs import DeviceCombo
from napari_voco._jobs import JobContext, JobRunner
from napari_voco._text import progress_format, step_status
from napari_voco._tooltips import TOOLTIPS
from voco_core.errors import ExistingRunError, VoCoDataError, VoCoError
from voco_core.plan import RunPlan
from voco_core.plan import default_run_dir as plan_default_run_dir
from voco_core.run_folder import RunFolder


def default_run_dir(kind: str) -> Path:
    """``~/napari-voco/runs/<kind>-<date>-<time>``: where a run goes when no output
    folder is given (the planner's rule, :func:`voco_core.plan.default_run_dir`, under
    the user's home: napari's working directory may be anywhere)."""
    return plan_default_run_dir(kind, Path.home() / "napari-voco" / "runs")


def follow_job(run_dir: Path, context: JobContext) -> Iterator[Any]:
    """The worker's body of *Follow run…*: the followed run's events until it ends or
    the user stops following."""
    from voco_core.run_follow import follow_run

    yield from follow_run(run_dir, context.stop)


def plan_new_run(plan: Callable[..., RunPlan], **options: Any) -> RunPlan:
    """``plan(**options)`` (``plan_pretrain``/``plan_finetune``), with the planner's
    refusal of an output folder that already holds a run in the widgets' words."""
    try:
        return plan(**options)
    except ExistingRunError as err:
        raise VoCoDataError("this output folder already holds a run: resume it (Resume from) "
                            "or choose another output folder", err.path) from None


@dataclass
class TrainingJob:
    """What a training worker needs, gathered in the GUI thread: the run's plan, or what
    to plan a resumed run with in the worker (planning a resume loads its checkpoint,
    too slow for the GUI thread with a large model), and the data folder/JSON (None
    when the widget writes layers first)."""

    plan: RunPlan | None = None
    resume: Path | None = None
    overrides: dict = field(default_factory=dict)
    out: Path | None = None
    data: Path | None = None

    @property
    def run_dir(self) -> Path:
        """The run folder: the plan's, else the output folder or the resumed run's."""
        if self.plan is not None:
            return self.plan.run_dir
        return self.out or run_dir_of(self.resume)


def run_dir_of(resume: Path | None) -> Path:
    """The run folder a resume target belongs to (the target itself for a loose file)."""
    folder = RunFolder.of(resume) if resume is not None else None
    return folder.root if folder is not None else Path(resume or ".")


class LossPlot(QWidget):
    """Live curves against the optimizer step (matplotlib in a Qt canvas).

    Series on the left axis (``ylabel``) are added as their names first arrive;
    ``right`` series go on a right axis fixed to 0..1 (``right_label``, e.g. a Dice
    score). :meth:`append` stores points at once (:attr:`series`); the canvas is
    redrawn at most every ``redraw_ms``. Drawing runs in the GUI thread, so it is kept
    cheap: the x axis spans the whole run (:meth:`set_steps`) and the left y axis
    only grows in coarse steps, so most updates redraw just the lines over a cached
    background (blitting); a full draw (tens of milliseconds, far more on a machine busy
    training) happens only when an axis range or the set of series changes, at
    most once per redraw.
    """

    def __init__(self, names: Sequence[str] = (), ylabel: str = "loss", redraw_ms: int = 300,
                 right: Sequence[str] = (), right_label: str = "",
                 parent: QWidget | None = None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.4))
        self.figure.subplots_adjust(left=0.16, right=0.86 if right else 0.97, bottom=0.2,
                                    top=0.86)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.canvas.setMinimumSize(240, 160)  # narrower than the figure size: docks side by side
        self.axes = self.figure.add_subplot()
        self.axes.set_xlabel("step", fontsize=8)
        self.axes.set_ylabel(ylabel, fontsize=8)
        self.axes.tick_params(labelsize=7)
        self.right_axes = None
        if right:
            self.right_axes = self.axes.twinx()
            self.right_axes.set_ylim(0, 1)
            self.right_axes.set_ylabel(right_label, fontsize=8)
            self.right_axes.tick_params(labelsize=7)
        self._right = tuple(right)
        self.series: dict[str, tuple[list[float], list[float]]] = {}
        self._lines: dict[str, Any] = {}
        self._legend = None
        for name in [*names, *right]:
            self._add_series(name)
        self._update_legend()
        self._steps = 1
        self._ylim = (0.0, 1.0)
        self._background = None
        self._stale = False  # axes limits or legend changed since the last full draw
        self.axes.set_xlim(0, self._steps)
        self.axes.set_ylim(*self._ylim)
        self.full_draws = 0
        self.redraws = 0
        self.canvas.mpl_connect("draw_event", self._on_draw)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(redraw_ms)
        self._timer.timeout.connect(self.redraw)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        # A figure's first draw costs several later ones (fonts, ticks): pay it when the
        # widget opens, not in the GUI thread mid-run.
        self._full_draw()

    def _add_series(self, name: str) -> None:
        index = len(self._lines)
        on_right = name in self._right
        axes = self.right_axes if on_right else self.axes
        self.series[name] = ([], [])
        (self._lines[name],) = axes.plot([], [], color=f"C{index}" if index else "k", lw=1.2,
                                         label=name, animated=True,
                                         marker="o" if on_right else None, ms=3)

    def _update_legend(self) -> None:
        if self._legend is not None:
            self._legend.remove()
        self._legend = self.figure.legend(handles=list(self._lines.values()),
                                          loc="upper center", ncols=max(len(self._lines), 1),
                                          fontsize=7, frameon=False)

    def set_steps(self, total: int) -> None:
        """Let the x axis span ``0 .. total`` steps."""
        total = max(int(total), 1)
        if total != self._steps:
            self._steps = total
            self._schedule_full_draw()

    def append(self, step: float, values: Mapping[str, float | None]) -> None:
        """Add one point per named series (non-finite values are skipped; a new name
        becomes a new curve)."""
        changed = False
        for name, value in values.items():
            if value is None or not math.isfinite(value):
                continue
            if name not in self.series:
                self._add_series(name)
                self._update_legend()
                self._schedule_full_draw()
            xs, ys = self.series[name]
            xs.append(float(step))
            ys.append(float(value))
            changed = True
        if changed and not self._timer.isActive():
            self._timer.start()

    def clear(self) -> None:
        if not any(xs for xs, _ in self.series.values()) and self._ylim == (0.0, 1.0):
            return  # nothing to take off the canvas
        for xs, ys in self.series.values():
            xs.clear()
            ys.clear()
        self._ylim = (0.0, 1.0)
        self._schedule_full_draw()

    def _schedule_full_draw(self) -> None:
        """Redraw everything at the next timer tick: a full draw costs 20-200 ms in the
        GUI thread, so changes that come together (run length, new curves, first
        points) share one."""
        self._stale = True
        if not self._timer.isActive():
            self._timer.start()

    def _wanted_ylim(self) -> tuple[float, float]:
        values = [v for name, (_, ys) in self.series.items() if name not in self._right
                  for v in ys]
        if not values:
            return self._ylim
        low, high = min(values), max(values)
        lim_low, lim_high = self._ylim
        if low >= lim_low and high <= lim_high:
            return self._ylim
        span = max(high - low, abs(high) * 0.1, 1e-3)
        return (min(lim_low, low - 0.25 * span) if low < lim_low else lim_low,
                max(lim_high, high + 0.25 * span) if high > lim_high else lim_high)

    def redraw(self) -> None:
        """Show the stored points now."""
        self._timer.stop()
        for name, (xs, ys) in self.series.items():
            self._lines[name].set_data(xs, ys)
        xmax = max([self._steps] + [xs[-1] for xs, _ in self.series.values() if xs])
        ylim = self._wanted_ylim()
        if (self._stale or ylim != self._ylim or xmax != self._steps
                or self._background is None):
            self._ylim, self._steps = ylim, math.ceil(xmax)
            self._full_draw()
        else:
            self._blit()
        self.redraws += 1

    def _full_draw(self) -> None:
        self._stale = False
        self.axes.set_xlim(0, self._steps)
        self.axes.set_ylim(*self._ylim)
        self.full_draws += 1
        self.canvas.draw()  # _on_draw caches the background and draws the lines

    def _on_draw(self, event: Any = None) -> None:
        """After every full draw (also on resize): cache the background, add the lines."""
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_lines()

    def _blit(self) -> None:
        self.canvas.restore_region(self._background)
        self._draw_lines()
        self.canvas.blit(self.figure.bbox)

    def _draw_lines(self) -> None:
        for line in self._lines.values():
            line.axes.draw_artist(line)


class RunPanel(QWidget):
    """Start/Stop, progress, status and loss plot of one training widget.

    ``start`` is the widget's start method (the button calls it; it plans the run
    and calls :meth:`launch`, or :meth:`fail` on bad input). ``settings`` is disabled
    while a run goes; its :class:`~napari_voco._inputs.DeviceCombo` (the run's device,
    :attr:`run_device`) then re-reads the free memory every ``LIVE_MEMORY_MS``.
    ``loss_name`` names the total-loss curve.

    Signals:
        progressed(object): every training event, after the panel showed it.
        run_finished(): the worker ended (done, stopped or failed).
    """

    progressed = Signal(object)
    run_finished = Signal()
    LIVE_MEMORY_MS = 2000

    def __init__(self, kind: str, start: Callable[[], Any], settings: QWidget, *,
                 loss_name: str = "total", ylabel: str = "loss", right: Sequence[str] = (),
                 right_label: str = "", parent: QWidget | None = None):
        super().__init__(parent)
        self._start = start
        self.settings = settings
        self.loss_name = loss_name
        self.last_event = None
        self.run_device: str | None = None  # the device of the last run launched
        self.runner = JobRunner(kind, self, on_event=self._on_event, on_failed=self.fail,
                                on_finished=self._on_finished)
        self.state = self.runner.state

        self.start_button = QPushButton("Start")
        self.start_button.setToolTip(TOOLTIPS["start"])
        self.start_button.clicked.connect(self.toggle)
        self.follow_button = QPushButton("Follow run…")
        self.follow_button.setToolTip(TOOLTIPS["follow_run"])
        self.follow_button.clicked.connect(self.ask_follow)
        self.following = False  # the running job follows a folder (not our own run)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.plot = LossPlot((loss_name,), ylabel=ylabel, right=right,
                             right_label=right_label)
        self._show_not_started()

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button, 1)
        buttons.addWidget(self.follow_button)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.plot, 1)

    # ------------------------------------------------------------------ state

    @property
    def running(self) -> bool:
        """True while a run (or following a run folder) goes."""
        return self.runner.running

    @property
    def last_error(self) -> BaseException | None:
        return self.runner.last_error

    def toggle(self) -> None:
        """The Start/Stop button."""
        if self.running:
            self.stop()
        else:
            self._start()

    def stop(self) -> None:
        """Stop the run before its next step (a checkpoint is written)."""
        if not self.running:
            return
        self.runner.stop()
        self.start_button.setEnabled(False)
        self.start_button.setText("Stopping…")
        self.status.setText("stopping after the current step…")

    def launch(self, body: Callable[[JobContext], Iterator[Any]], description: str,
               run_dir: Path, *, resumed: bool) -> None:
        """Run ``body`` (a generator of training events) for ``run_dir``. The plot keeps
        its curves when the same run is resumed, else starts empty."""
        if not resumed or Path(self.state.run_dir or ".") != Path(run_dir):
            self.plot.clear()
        self.last_event = None
        combos = self._device_combos()
        self.run_device = combos[0].device() if combos else None
        self._set_running(True)
        self.progress.setRange(0, 0)  # busy until the start event
        self.progress.setFormat("starting…")
        self.status.setText(f"preparing data and model… (run folder {run_dir})")
        self.runner.start(body, description, run_dir=str(run_dir))

    def ask_follow(self) -> None:
        """*Follow run…*: pick a run folder and :meth:`follow` it."""
        chosen = QFileDialog.getExistingDirectory(self, "Follow a run folder")
        if chosen:
            self.follow(Path(chosen))

    def follow(self, run_dir: Path) -> bool:
        """Show the run in ``run_dir`` as it is written, whoever writes it
        (:func:`voco_core.run_follow.follow_run`): loss, progress, validation, notes, and
        each new checkpoint on :attr:`state` (an inspector following this widget
        refreshes). False (and the failure shown) when it is not a run of this widget's
        kind, or a job runs."""
        from voco_core.run_follow import run_kind

        if self.running:
            return False
        try:
            kind = run_kind(RunFolder(run_dir))
            if kind != self.state.kind:
                what = "pretraining" if kind == "pretrain" else "finetuning"
                raise VoCoDataError(f"is a {what} run: follow it from the VoCo {kind} widget",
                                    run_dir)
        except VoCoError as err:
            self.fail(err)
            return False
        self.following = True
        self.launch(functools.partial(follow_job, Path(run_dir)), f"following {run_dir}",
                    Path(run_dir), resumed=False)
        self.status.setText(f"following {run_dir}")
        return True

    def fail(self, err: BaseException) -> None:
        """Show a failure: one notification, and the status line says it."""
        self.runner.last_error = err
        _notify.notify_error(err)
        self.status.setText(f"failed: {_notify.error_message(err)}")

    # ------------------------------------------------------------------ events

    def _on_event(self, event: Any) -> None:
        self.last_event = event
        total = max(int(event.total_steps), 1)
        self.progress.setRange(0, total)
        self.progress.setValue(min(int(event.step), total))
        self.progress.setFormat(progress_format(event.step, event.total_steps,
                                                event.eta_seconds))
        if event.kind == "start":
            self.plot.set_steps(event.total_steps)
            self._load_history(event)
            # The start's message says what the run chose (batch_size auto's split,
            # the weights finetuning loaded): kept on the status until the first step.
            waiting = f"step {event.step}: loading the first batch…"
            self.status.setText(f"{waiting}\n{event.message}" if event.message else waiting)
        elif event.kind == "step":
            self.plot.append(event.step, {self.loss_name: event.loss,
                                          **getattr(event, "terms", {})})
            self.status.setText(step_status(event, self.run_device))
            # What pre-processing chose for newly loaded volumes ("intensity auto: ..."):
            # written once into the status line and kept under each step's status for
            # the rest of the run, not a notification covering the canvas; warnings are
            # notified as well.
            run_dir, notes = self.__dict__.get("_notes", (None, []))
            if run_dir != event.run_dir:
                notes = []
            self.__dict__["_notes"] = (event.run_dir, notes)
            if event.message:
                infos, warnings = _notify.split_notes(event.message)
                notes += [line for line in infos + warnings if line not in notes]
                if warnings:
                    _notify.notify_notes("\n".join(warnings), information=False)
            self.status.setText(_notify.status_with_notes(self.status.text(), notes))
        elif event.kind == "stopped":
            self.status.setText(f"stopped at step {event.step}; checkpoint {event.checkpoint}")
        elif event.kind == "done":
            self.plot.redraw()
            self.status.setText(f"done: {event.step} steps; checkpoint {event.checkpoint}")
        self.progressed.emit(event)

    def _load_history(self, event: Any) -> None:
        """On resume, show the curves logged so far (``log.jsonl``) when the plot is empty."""
        if event.step == 0 or self.plot.series[self.loss_name][0]:
            return
        from voco_core.run_folder import read_log

        try:
            records = read_log(RunFolder(event.run_dir or self.state.run_dir).log)
        except (OSError, ValueError, KeyError):
            return
        for record in records:
            if record.get("step", math.inf) <= event.step and "loss" in record:
                self.plot.append(record["step"], {self.loss_name: record["loss"],
                                                  **(record.get("terms") or {})})

    def _on_finished(self) -> None:
        self._set_running(False)
        if self.progress.maximum() == 0:  # ended before the start event
            self._show_not_started()
        self.plot.redraw()
        self.run_finished.emit()

    def _show_not_started(self) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("not started")

    def _device_combos(self) -> list[DeviceCombo]:
        return self.settings.findChildren(DeviceCombo)

    def _set_running(self, running: bool) -> None:
        self.settings.setEnabled(not running)
        for combo in self._device_combos():
            if running:
                combo.start_live(self.LIVE_MEMORY_MS)
            else:
                combo.stop_live()
                combo.update_memory()  # what the finished run left free
        if not running:
            self.following = False
        self.follow_button.setEnabled(not running)
        self.start_button.setEnabled(True)
        self.start_button.setText(("Stop following" if self.following else "Stop")
                                  if running else "Start")
