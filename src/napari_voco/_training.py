"""Pieces shared by the *VoCo pretrain* and *VoCo finetune* widgets.

* :class:`TrainingRunner`: runs a training generator from :mod:`voco_core.train` in a
  napari thread worker and relays its typed events to the GUI thread (the worker
  plumbing: stop flag, failures, memory release);
* :class:`LossPlot`: a small live matplotlib plot of loss curves;
* :class:`DeviceCombo` / :func:`device_choices`: CPU and each CUDA device, with its
  name and free memory;
* :class:`ScientificSpinBox`: a learning-rate field shown as ``3.0e-04``;
* text helpers for durations, bytes, progress and status lines;
* :func:`write_layer_volume` / :func:`layer_affine`: layers -> NIfTI files for training.

Threads
-------
The training loop runs in a :func:`napari.qt.threading.create_worker` generator
worker, so napari registers it as a running task of the current viewer's window:
closing that window while a run is going asks for confirmation first, listing the
run. The worker class here maps napari's *cancel* request (made when the window
closes anyway, and when the application quits) onto the run's stop flag, so the
run ends at the next step with a checkpoint rather than being abandoned.

Every event the generator yields arrives in the GUI thread through the worker's
``yielded`` signal; the GUI never waits for the worker. An exception raised in the
worker does not reach napari's generic error handler: it is caught in the worker
and delivered as :attr:`TrainingRunner.failed` (the widgets show it with
:func:`napari_voco._notify.notify_error`). When the generator ends, whatever the
outcome, its frames (model, optimizer, data) are gone; the worker then runs
``gc.collect()`` and, on CUDA machines, ``torch.cuda.empty_cache()``.
"""

from __future__ import annotations

import functools
import gc
import math
import re
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtGui import QValidator
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QSizePolicy,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from voco_core.errors import VoCoDataError

if TYPE_CHECKING:
    from napari.layers import Layer

PRETRAIN_WIDGETS: weakref.WeakSet = weakref.WeakSet()
"""Every live :class:`~napari_voco._pretrain_widget.PretrainWidget`: the positions
inspector finds the running job of its viewer here (live inspection)."""


# --------------------------------------------------------------------------- text


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``; ``"?"`` when not finite."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_bytes(count: float) -> str:
    """Binary units: ``"512 B"``, ``"3.2 MiB"``, ``"1.5 GiB"``."""
    count = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"  # pragma: no cover - loop always returns


def format_lr(value: float) -> str:
    """A learning rate in scientific notation, ``3.0e-04``."""
    return f"{float(value):.1e}"


def progress_format(step: int, total: int, eta_seconds: float) -> str:
    """The progress bar's text: ``"12 / 40 steps · ETA 1 min 05 s"``."""
    text = f"{step} / {total} steps"
    if step < total and math.isfinite(eta_seconds):
        text += f" · ETA {format_duration(eta_seconds)}"
    return text


def step_status(event: Any) -> str:
    """Status line of a pretraining or finetuning step event: speed (crops/s when the
    event has it), memory and learning rate."""
    parts = []
    if math.isfinite(getattr(event, "crops_per_second", math.nan)):
        parts.append(f"{event.crops_per_second:.1f} crops/s")
    if math.isfinite(event.seconds_per_step):
        parts.append(f"{event.seconds_per_step:.2f} s/step")
    if event.peak_memory_bytes:
        parts.append(f"peak memory {format_bytes(event.peak_memory_bytes)}")
    if math.isfinite(event.lr):
        parts.append(f"lr {format_lr(event.lr)}")
    return " · ".join(parts)


class RunControls:
    """Start/Stop behaviour shared by the training widgets. The widget provides
    ``runner`` (a :class:`TrainingRunner`), ``start_button``, ``status``, ``settings``
    and ``start()``."""

    @property
    def running(self) -> bool:
        return self.runner.running

    def toggle(self) -> None:
        """The Start/Stop button."""
        if self.running:
            self.stop()
        else:
            self.start()

    def stop(self) -> None:
        """Stop the run before its next step (a checkpoint is written)."""
        if not self.running:
            return
        self.runner.stop()
        self.start_button.setEnabled(False)
        self.start_button.setText("Stopping…")
        self.status.setText("stopping after the current step…")

    def _set_running(self, running: bool) -> None:
        self.settings.setEnabled(not running)
        self.start_button.setEnabled(True)
        self.start_button.setText("Stop" if running else "Start")


# --------------------------------------------------------------------------- devices


def device_choices() -> list[tuple[str, str]]:
    """``(label, device)`` pairs: ``("CPU", "cpu")``, then every CUDA device as
    ``("cuda:0 · NVIDIA H200 · 130.2 GiB free of 139.8 GiB", "cuda:0")`` (free memory
    from ``torch.cuda.mem_get_info``), then Apple ``mps`` when available."""
    import torch

    choices = [("CPU", "cpu")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            try:
                name = torch.cuda.get_device_name(index)
            except (RuntimeError, AssertionError):
                name = "CUDA device"
            try:
                free, total = torch.cuda.mem_get_info(index)
                memory = f"{format_bytes(free)} free of {format_bytes(total)}"
            except (RuntimeError, AssertionError):
                memory = "free memory unknown"
            choices.append((f"cuda:{index} · {name} · {memory}", f"cuda:{index}"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append(("Apple MPS", "mps"))
    return choices


class DeviceCombo(QComboBox):
    """Where training runs: CPU and each CUDA device (name, free memory). The first
    CUDA device is chosen when there is one. Free memory is re-read every time the
    list opens. :meth:`device` is the ``run.device`` value (``"cpu"``, ``"cuda:0"``…)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setToolTip("where training runs (free GPU memory is read when the list opens)")
        self.refresh()
        if self.count() > 1 and str(self.itemData(1)).startswith("cuda"):
            self.setCurrentIndex(1)

    def refresh(self) -> None:
        """Re-read the devices and their free memory, keeping the chosen one."""
        current = self.device() if self.count() else None
        self.blockSignals(True)
        try:
            self.clear()
            for label, spec in device_choices():
                self.addItem(label, spec)
            if current is not None:
                self.set_device(current, add=False)
        finally:
            self.blockSignals(False)

    def showPopup(self) -> None:
        self.refresh()
        super().showPopup()

    def device(self) -> str:
        """The chosen ``run.device`` value."""
        return str(self.currentData()) if self.count() else "cpu"

    def set_device(self, spec: str, add: bool = True) -> None:
        """Choose ``spec`` (e.g. ``"cuda:0"``); with ``add``, list it first when the
        machine does not have it (starting a run then reports the missing device)."""
        index = self.findData(spec)
        if index < 0:
            if not add:
                return
            self.addItem(f"{spec} (not found on this machine)", spec)
            index = self.count() - 1
        self.setCurrentIndex(index)


# --------------------------------------------------------------------------- inputs


class PathEdit(QWidget):
    """A path: a text field plus *Folder…* and/or *File…* pickers.

    ``file_filter`` (e.g. ``"Datalists (*.json)"``) adds a *File…* button;
    ``folder`` adds a *Folder…* button."""

    changed = Signal(str)

    def __init__(self, placeholder: str = "", *, folder: bool = True,
                 file_filter: str | None = None, file_button: str = "File…",
                 parent: QWidget | None = None):
        super().__init__(parent)
        from qtpy.QtWidgets import QHBoxLayout, QLineEdit, QPushButton

        self.line = QLineEdit()
        self.line.setPlaceholderText(placeholder)
        self.line.setToolTip(placeholder)
        self.line.textChanged.connect(self.changed.emit)
        self._filter = file_filter
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.line, 1)
        self.folder_button = self.file_button = None
        if folder:
            self.folder_button = QPushButton("Folder…")
            self.folder_button.clicked.connect(self._choose_folder)
            layout.addWidget(self.folder_button)
        if file_filter is not None:
            self.file_button = QPushButton(file_button)
            self.file_button.clicked.connect(self._choose_file)
            layout.addWidget(self.file_button)

    def text(self) -> str:
        return self.line.text().strip()

    def path(self) -> Path | None:
        """The path typed or chosen (``~`` expanded), or None when the field is empty."""
        return Path(self.text()).expanduser() if self.text() else None

    def set_path(self, path: str | Path | None) -> None:
        self.line.setText("" if path is None else str(path))

    def _choose_folder(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path = QFileDialog.getExistingDirectory(self, "Choose a folder", self.text())
        if path:
            self.set_path(path)

    def _choose_file(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(self, "Choose a file", self.text(),
                                              f"{self._filter};;All files (*)")
        if path:
            self.set_path(path)


class CompactStack(QStackedWidget):
    """A stacked widget as large as its current page (not its largest one)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.currentChanged.connect(lambda index: self.updateGeometry())

    def sizeHint(self):
        page = self.currentWidget()
        return page.sizeHint() if page is not None else super().sizeHint()

    def minimumSizeHint(self):
        page = self.currentWidget()
        return page.minimumSizeHint() if page is not None else super().minimumSizeHint()


class ScientificSpinBox(QDoubleSpinBox):
    """A positive number shown in scientific notation (``3.0e-04``); typing any float
    (``0.0003``, ``3e-4``) works, the arrows multiply or divide by 2."""

    def __init__(self, value: float = 1e-4, minimum: float = 1e-9, maximum: float = 10.0,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.setDecimals(15)
        self.setRange(minimum, maximum)
        self.setValue(value)
        self.setKeyboardTracking(False)

    def textFromValue(self, value: float) -> str:
        return format_lr(value)

    def valueFromText(self, text: str) -> float:
        try:
            return float(text.strip())
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int):
        stripped = text.strip()
        try:
            value = float(stripped)
        except ValueError:
            if re.fullmatch(r"[0-9.eE+-]*", stripped):
                return QValidator.State.Intermediate, text, pos
            return QValidator.State.Invalid, text, pos
        if self.minimum() <= value <= self.maximum():
            return QValidator.State.Acceptable, text, pos
        return QValidator.State.Intermediate, text, pos

    def fixup(self, text: str) -> str:
        return self.textFromValue(self.value())

    def stepBy(self, steps: int) -> None:
        self.setValue(min(self.maximum(), max(self.minimum(), self.value() * 2.0**steps)))


# --------------------------------------------------------------------------- plot


class LossPlot(QWidget):
    """Live curves against the optimizer step (matplotlib in a Qt canvas).

    ``names`` are drawn on the left axis (``ylabel``), ``right`` on a right axis fixed
    to 0..1 (``right_label``, e.g. a Dice score). :meth:`append` stores points at once
    (:attr:`series`); the canvas is redrawn at most every ``redraw_ms``. Drawing runs
    in the GUI thread, so it is kept cheap: the x axis spans the whole run
    (:meth:`set_steps`) and the left y axis only grows in coarse steps, so most updates
    redraw just the lines over a cached background (blitting); a full draw (about
    20 ms, 5 times more on a 2-core machine busy training) happens only when an axis
    range changes.
    """

    def __init__(self, names: Sequence[str], ylabel: str = "loss", redraw_ms: int = 300,
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
        self.canvas.setMinimumHeight(180)
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
        self.series: dict[str, tuple[list[float], list[float]]] = {}
        self._lines = {}
        for index, name in enumerate([*names, *right]):
            axes = self.right_axes if name in right else self.axes
            self.series[name] = ([], [])
            (self._lines[name],) = axes.plot([], [], color=f"C{index}" if index else "k",
                                             lw=1.2, label=name, animated=True,
                                             marker="o" if name in right else None, ms=3)
        self._left = [n for n in self.series if n not in right]
        self.figure.legend(handles=list(self._lines.values()), loc="upper center",
                           ncols=len(self._lines), fontsize=7, frameon=False)
        self._steps = 1
        self._ylim = (0.0, 1.0)
        self._background = None
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

    def set_steps(self, total: int) -> None:
        """Let the x axis span ``0 .. total`` steps."""
        total = max(int(total), 1)
        if total != self._steps:
            self._steps = total
            self._full_draw()

    def append(self, step: float, values: Mapping[str, float]) -> None:
        """Add one point per named series (non-finite values are skipped)."""
        changed = False
        for name, value in values.items():
            if name in self.series and value is not None and math.isfinite(value):
                xs, ys = self.series[name]
                xs.append(float(step))
                ys.append(float(value))
                changed = True
        if changed and not self._timer.isActive():
            self._timer.start()

    def clear(self) -> None:
        for xs, ys in self.series.values():
            xs.clear()
            ys.clear()
        self._ylim = (0.0, 1.0)
        self._full_draw()

    def _wanted_ylim(self) -> tuple[float, float]:
        values = [v for name in self._left for v in self.series[name][1]]
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
        if ylim != self._ylim or xmax != self._steps or self._background is None:
            self._ylim, self._steps = ylim, math.ceil(xmax)
            self._full_draw()
        else:
            self._blit()
        self.redraws += 1

    def _full_draw(self) -> None:
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


# --------------------------------------------------------------------------- layers -> files


def layer_affine(layer: Layer, shape: Sequence[int]) -> np.ndarray:
    """4 x 4 voxel -> world affine of a layer's data: the source file's (from
    ``metadata["voco"]``) when it fits ``shape``, else the layer's napari transform."""
    from napari_voco._io import layer_voxel_to_world

    meta = {
        "metadata": layer.metadata,
        "scale": np.asarray(layer.scale),
        "translate": np.asarray(layer.translate),
        "rotate": np.asarray(layer.rotate),
        "shear": np.asarray(layer.shear),
        "affine": np.asarray(layer.affine.affine_matrix),
    }
    return layer_voxel_to_world(meta, shape)


def layer_volume(layer: Layer, kind: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of a single-channel 3-D layer (full resolution), or
    :class:`VoCoDataError` naming the layer."""
    name = getattr(layer, "name", "?")
    if getattr(layer, "rgb", False):
        raise VoCoDataError(f"layer {name!r} is an RGB image: expected a 3-D {kind} layer")
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    array = np.asarray(data)
    if array.ndim != 3:
        raise VoCoDataError(f"layer {name!r} is {array.ndim}-D with shape {array.shape}: "
                            f"expected a 3-D {kind} layer")
    return array, layer_affine(layer, array.shape)


def default_run_dir(kind: str) -> Path:
    """``~/napari-voco/runs/<kind>-<date>-<time>``: where a run goes when no output
    folder is given."""
    import time

    return Path.home() / "napari-voco" / "runs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse to start a fresh run over an existing one (its checkpoints would be
    overwritten): :class:`VoCoDataError` when ``run_dir/checkpoints/last.pt`` exists."""
    if (run_dir / "checkpoints" / "last.pt").is_file():
        raise VoCoDataError("this output folder already holds a run: resume it (Resume from) "
                            "or choose another output folder", run_dir)


def safe_file_stem(name: str, taken: set[str]) -> str:
    """A file-name stem from a layer name (letters, digits, ``._-``), unique in ``taken``
    (which it is added to)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "layer"
    candidate, index = stem, 1
    while candidate.lower() in taken:
        index += 1
        candidate = f"{stem}_{index}"
    taken.add(candidate.lower())
    return candidate


def write_layer_volume(path: Path, array: np.ndarray, affine: np.ndarray,
                       labels: bool = False) -> Path:
    """Write a layer's array as NIfTI for training (labels as the smallest integer type).
    An unwritable folder is a :class:`VoCoDataError`."""
    from napari_voco._io import label_storage_dtype
    from voco_core.data.io import write_volume

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VoCoDataError(f"output folder is not writable ({err.strerror or err})",
                            path.parent) from err
    if labels:
        array = array.astype(label_storage_dtype(array), copy=False)
    elif array.dtype in (np.int64, np.uint64, np.float16):
        array = array.astype(np.float32)
    return write_volume(path, array, affine=affine)


# --------------------------------------------------------------------------- workers


class JobFailed:
    """Yielded by the worker in place of raising: the run ended with ``error``."""

    def __init__(self, error: BaseException):
        self.error = error


def release_memory() -> None:
    """Collect garbage and, where CUDA is used, return cached GPU memory to the driver."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # never let clean-up hide the run's own outcome
        pass


# While jobs run (see the module doc, "Threads"):
#
# * Full garbage collections hold the GIL for as long as they scan every tracked
#   object: with napari, torch and MONAI loaded that is millions of objects, 0.2-0.5 s
#   on a busy 2-core machine, during which the GUI thread cannot run either. The
#   objects that existed before the first job started are frozen (gc.freeze: left out
#   of collections), so the collections during a run and the one after it only scan
#   what the run made (model, optimizer, data...). They are unfrozen when the last
#   job ends.
# * torch's intra-op thread pool leaves one core to the GUI thread (at least one
#   thread). Measured on a busy 2-core machine, a tiny pretraining with 2 threads
#   stalled the GUI for up to 0.3 s and took 2.7 times as long as with 1 thread.
_jobs_lock = threading.Lock()
_running_jobs = 0
_saved_threads: int | None = None


def available_cpus() -> int:
    """CPU cores this process may run on."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gui_training_threads(current: int, cpus: int) -> int:
    """torch intra-op threads for a run started from the GUI: ``current``, but leaving
    one of ``cpus`` cores to the GUI thread, and at least 1."""
    return max(1, min(int(current), int(cpus) - 1))


def _job_started() -> None:
    """Freeze the heap and size torch's thread pool for a starting job. The first job
    also imports what torch loads lazily on a first training run (``torch._dynamo``,
    which pulls in sympy: about 800 modules) and freezes again, so that neither the
    collections these imports trigger nor those after the run scan those objects."""
    global _running_jobs, _saved_threads
    import torch

    with _jobs_lock:
        first = _running_jobs == 0
        _running_jobs += 1
        if first:
            gc.freeze()
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(gui_training_threads(_saved_threads, available_cpus()))
    if first:
        try:
            import torch._dynamo
        except Exception:  # an older or trimmed torch: nothing to preload
            pass
        with _jobs_lock:
            if _running_jobs == 1:  # no other job's objects would be frozen with them
                gc.freeze()


def _job_ended() -> None:
    global _running_jobs, _saved_threads
    import torch

    with _jobs_lock:
        _running_jobs -= 1
        if _running_jobs == 0:
            gc.unfreeze()
            if _saved_threads is not None:
                torch.set_num_threads(_saved_threads)
                _saved_threads = None


def _run_job(body: Callable[[threading.Event], Iterator[Any]],
             stop: threading.Event) -> Iterator[Any]:
    """The worker's generator: ``body(stop)``'s events, a :class:`JobFailed` instead of
    an exception, and memory released at the end whatever happened.

    After a run its model and optimizer are still reachable through reference cycles
    (frames kept by torch's optimizer set-up), so a full ``gc.collect()`` is what frees
    them (and their CUDA memory, before ``empty_cache``)."""
    _job_started()
    try:
        yield from body(stop)
    except Exception as err:
        # Drop the finished frames' locals (model, optimizer…) but keep the traceback.
        traceback.clear_frames(err.__traceback__)
        yield JobFailed(err)
    finally:
        try:
            release_memory()
        finally:
            _job_ended()


class _Job(functools.partial):
    """The worker's function, named for napari's task list (``str`` is the description
    napari shows when it asks before closing the window)."""

    description = "VoCo training"

    def __str__(self) -> str:
        return self.description


@functools.cache
def _worker_class() -> type:
    from napari.qt.threading import GeneratorWorker

    class TrainingWorker(GeneratorWorker):
        """napari's generator worker whose *quit* (napari cancels running tasks when
        its window closes or the application quits) sets the run's stop flag: the run
        ends at the next step with a checkpoint."""

        stop_event: threading.Event | None = None

        def quit(self) -> None:
            if self.stop_event is not None:
                self.stop_event.set()
            else:  # pragma: no cover - every worker made here has a flag
                super().quit()

    return TrainingWorker


def _set_flag(flag: threading.Event, *args: Any) -> None:
    flag.set()


class TrainingRunner(QObject):
    """Runs one training (or other long) job at a time in a napari thread worker.

    ``start(body, description)`` runs ``body(stop)``, a generator of events, in a
    worker; every event comes back as :attr:`event`, an exception as :attr:`failed`,
    and :attr:`finished` follows in every case. :meth:`stop` sets the flag that
    :mod:`voco_core` checks before every step.
    """

    event = Signal(object)
    failed = Signal(object)
    finished = Signal()

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.worker = None
        self.stop_flag = threading.Event()
        self.description = ""

    @property
    def running(self) -> bool:
        return self.worker is not None

    @property
    def stopping(self) -> bool:
        return self.running and self.stop_flag.is_set()

    def start(self, body: Callable[[threading.Event], Iterator[Any]],
              description: str) -> None:
        """Start ``body`` in a worker (a RuntimeError when a job is already running)."""
        if self.worker is not None:
            raise RuntimeError("a job is already running")
        from napari.qt.threading import create_worker

        self.stop_flag = threading.Event()
        self.description = description
        job = _Job(_run_job, body, self.stop_flag)
        job.description = description
        worker = create_worker(job, _worker_class=_worker_class(), _ignore_errors=True)
        worker.stop_event = self.stop_flag
        # A widget closed (deleted) during a run stops it at the next step.
        self.destroyed.connect(functools.partial(_set_flag, self.stop_flag))
        worker.yielded.connect(self._on_yielded)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        worker.start()

    def stop(self) -> None:
        """Ask the job to stop at its next step (no effect when none is running)."""
        if self.worker is not None:
            self.stop_flag.set()

    def _on_yielded(self, item: Any) -> None:
        if isinstance(item, JobFailed):
            self.failed.emit(item.error)
        else:
            self.event.emit(item)

    def _on_finished(self) -> None:
        self.worker = None
        self.finished.emit()
