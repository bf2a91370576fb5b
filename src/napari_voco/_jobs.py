"""One job runner for every VoCo widget: a generator in a napari thread worker.

A *job* is a generator function ``body(context)`` that does the slow work, or
supervises it, and yields typed events: trainings run in a child process
(:func:`voco_core.train.child.iter_plan_in_child`: every core, their memory gone with
them, napari unharmed when they are killed) whose events the body passes on;
following a run folder reads what another process writes
(:func:`voco_core.run_follow.follow_run`); segmentation and position predictions run
in this process (a few window batches of an already loaded model: a child would add
its start-up, seconds of importing torch and MONAI, to jobs that take about as long,
and could not share the loaded model between predictions). The body runs in
a :func:`napari.qt.threading.create_worker` generator worker, so napari lists it
as a running task of the current viewer's window (closing that window while a job
runs asks first, naming it). :class:`JobRunner` relays every yielded event to the
GUI thread (:attr:`JobRunner.event`) and keeps one evented :class:`RunState`
(a :class:`JobState`: idle / running / stopping / stopped / done / failed; step,
total, message) that widgets and other widgets (the positions inspector following a
pretraining) watch instead of reading attributes scattered over a widget. A widget
hands its runner its callbacks once (``JobRunner(kind, self, on_event=...,
on_failed=self.fail, on_finished=...)``); every widget calls "a job is running"
``running`` and its failure handler ``fail``.

Stop
----
:meth:`JobRunner.stop` sets ``context.stop``, the flag :mod:`voco_core`'s trainers
and inference check before every step or window batch: a training ends at its next
step with a valid checkpoint (the core's stop-flag contract). napari's own *cancel*
(made when its window closes anyway, and when the application quits) and a widget
deleted during a run set the same flag, so a run is never abandoned half-written.

Failures and memory
-------------------
An exception raised in the job does not reach napari's generic error handler: it
is caught in the worker and delivered as :attr:`JobRunner.failed`; the widgets
show it as one notification (:func:`napari_voco._notify.notify_error`) and stay
usable. When the generator ends, whatever the outcome, its frames (model,
optimizer, data) are gone; the worker then runs ``gc.collect()`` and, on CUDA
machines, ``torch.cuda.empty_cache()``.

Responsiveness
--------------
While jobs run in this process, two things keep the GUI thread running (docs/gui.md):

* Full garbage collections hold the GIL for as long as they scan every tracked
  object: with napari, torch and MONAI loaded that is millions of objects, a visible
  stall each time. The objects that existed before the first job started are frozen
  (``gc.freeze``: left out of collections), so collections during a job and the one
  after it scan only what the job made. They are unfrozen when the last job ends.
* torch's intra-op thread pool leaves one core to the GUI thread (at least one
  thread): with every core busy, the GUI stalls and the job itself slows down.
"""

from __future__ import annotations

import enum
import functools
import gc
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from psygnal import Signal as PsygnalSignal
from psygnal import evented
from qtpy.QtCore import QObject, Signal


class JobState(enum.StrEnum):
    """What a job runner's job is doing (:attr:`RunState.status`). A ``StrEnum``: each
    state also equals (and prints as) its lower-case name, e.g. ``"done"``."""

    IDLE = "idle"
    """Never ran."""
    RUNNING = "running"
    STOPPING = "stopping"
    """Stop asked: the job ends at its next step."""
    STOPPED = "stopped"
    DONE = "done"
    FAILED = "failed"


@evented
@dataclass
class RunState:
    """What a widget's job is doing, as evented fields (``state.events.status`` etc.).

    ``status``: a :class:`JobState` (``IDLE``: never ran, ``RUNNING``, ``STOPPING``:
    stop asked, the job ends at its next step, ``STOPPED``, ``DONE`` or ``FAILED``).
    ``step`` / ``total``:
    optimizer steps of a training (0 for other jobs). ``run_dir``: the training's run
    folder, ``checkpoint``: the newest checkpoint it wrote ("" before the first).
    ``description`` names the job (napari's task list shows it).

    :attr:`checkpoint_written` fires with the path each time a checkpoint is written,
    also when the path is the same file again (``last.pt`` is rewritten in place);
    the positions inspector follows a pretraining through it.
    """

    kind: str = ""
    status: JobState = JobState.IDLE
    step: int = 0
    total: int = 0
    message: str = ""
    run_dir: str = ""
    checkpoint: str = ""
    description: str = ""

    checkpoint_written = PsygnalSignal(str)

    @property
    def active(self) -> bool:
        """True while a job runs (also while it is stopping)."""
        return self.status in (JobState.RUNNING, JobState.STOPPING)


@dataclass
class JobContext:
    """What a job body gets: the stop flag to check, and :meth:`emit` for events made
    inside callbacks (e.g. inference progress), where the body cannot ``yield``."""

    stop: threading.Event
    emit: Callable[[Any], None]


class JobFailed:
    """Yielded by the worker in place of raising: the job ended with ``error``."""

    def __init__(self, error: BaseException):
        self.error = error


def release_memory() -> None:
    """Collect garbage and, where CUDA is used, return cached GPU memory to the driver."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # never let clean-up hide the job's own outcome
        pass


# --------------------------------------------------------------------------- job accounting

_jobs_lock = threading.Lock()
_running_jobs = 0
_saved_threads: int | None = None


def available_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gui_job_threads(current: int, cpus: int) -> int:
    """torch intra-op threads for a job started from the GUI: ``current``, but leaving
    one of ``cpus`` cores to the GUI thread, and at least 1."""
    return max(1, min(int(current), int(cpus) - 1))


def _job_started() -> None:
    """Freeze the heap and size torch's thread pool for a starting job (module doc,
    "Responsiveness"). Nothing is preloaded for training: trainings run in their own
    process, so what torch loads lazily on a first training run (``torch._dynamo``
    and sympy, about 800 modules) never needs to be in napari's."""
    global _running_jobs, _saved_threads
    import torch

    with _jobs_lock:
        first = _running_jobs == 0
        _running_jobs += 1
        if first:
            gc.freeze()
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(gui_job_threads(_saved_threads, available_cpus()))


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


def _run_job(body: Callable[[JobContext], Iterator[Any]], context: JobContext) -> Iterator[Any]:
    """The worker's generator: ``body(context)``'s events, a :class:`JobFailed` instead of
    an exception, and memory released at the end whatever happened.

    After a training its model and optimizer are still reachable through reference
    cycles (frames kept by torch's optimizer set-up), so a full ``gc.collect()`` is
    what frees them (and their CUDA memory, before ``empty_cache``)."""
    _job_started()
    try:
        yield from body(context)
    except Exception as err:
        # Drop the finished frames' locals (model, optimizer...) but keep the traceback.
        traceback.clear_frames(err.__traceback__)
        yield JobFailed(err)
    finally:
        try:
            release_memory()
        finally:
            _job_ended()


class _NamedJob(functools.partial):
    """The worker's function, named for napari's task list (``str`` is the description
    napari shows when it asks before closing the window)."""

    description = "VoCo job"

    def __str__(self) -> str:
        return self.description


@functools.cache
def _worker_class() -> type:
    from napari.qt.threading import GeneratorWorker

    class StoppableWorker(GeneratorWorker):
        """napari's generator worker whose *quit* (napari cancels running tasks when its
        window closes or the application quits) sets the job's stop flag: a training
        ends at its next step with a checkpoint."""

        stop_event: threading.Event | None = None

        def quit(self) -> None:
            if self.stop_event is not None:
                self.stop_event.set()
            else:  # pragma: no cover - every worker made here has a flag
                super().quit()

    return StoppableWorker


def _set_flag(flag: threading.Event, *args: Any) -> None:
    flag.set()


class JobRunner(QObject):
    """Runs one job at a time in a napari thread worker and keeps its :attr:`state`.

    ``start(body, description)`` runs ``body(context)`` in a worker; every yielded or
    emitted event comes back as :attr:`event` (in order, in the GUI thread), an
    exception as :attr:`failed`, and :attr:`finished` follows in every case. The
    owner's callbacks for the three are given once, here: ``on_event(event)``,
    ``on_failed(error)`` (the widget's ``fail``) and ``on_finished()``.
    Events with ``step``/``total_steps``/``checkpoint`` (the trainers') update the
    state's step, total and checkpoint; a last event of kind ``stopped`` or ``done``
    sets the final status.
    """

    event = Signal(object)
    failed = Signal(object)
    finished = Signal()
    _relayed = Signal(object)  # context.emit: worker thread -> GUI thread, queued

    def __init__(self, kind: str = "", parent: QObject | None = None, *,
                 on_event: Callable[[Any], Any] | None = None,
                 on_failed: Callable[[BaseException], Any] | None = None,
                 on_finished: Callable[[], Any] | None = None):
        super().__init__(parent)
        for signal, callback in ((self.event, on_event), (self.failed, on_failed),
                                 (self.finished, on_finished)):
            if callback is not None:
                signal.connect(callback)
        self.state = RunState(kind=kind)
        self.worker = None
        self.stop_flag = threading.Event()
        self.last_error: BaseException | None = None
        self._last_kind = ""
        self._announced: tuple[str, int] | None = None  # the last checkpoint_written
        self._relayed.connect(self._on_yielded)
        # A widget deleted during a job stops it at the next step.
        self.destroyed.connect(functools.partial(_set_flag, self.stop_flag))

    @property
    def running(self) -> bool:
        """True while a job runs (also while it is stopping)."""
        return self.worker is not None

    @property
    def stopping(self) -> bool:
        return self.running and self.stop_flag.is_set()

    def start(self, body: Callable[[JobContext], Iterator[Any]], description: str, *,
              run_dir: str = "", message: str = "") -> None:
        """Start ``body`` in a worker (RuntimeError when a job is already running)."""
        if self.worker is not None:
            raise RuntimeError("a job is already running")
        from napari.qt.threading import create_worker

        self.stop_flag.clear()
        self.last_error = None
        self._last_kind = ""
        self._announced = None
        job = _NamedJob(_run_job, body, JobContext(self.stop_flag, self._relayed.emit))
        job.description = description
        worker = create_worker(job, _worker_class=_worker_class(), _ignore_errors=True)
        worker.stop_event = self.stop_flag
        worker.yielded.connect(self._on_yielded)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        with self.state.events.blocked():
            self.state.step = self.state.total = 0
            self.state.checkpoint = ""
        self.state.run_dir = run_dir
        self.state.description = description
        self.state.message = message
        self.state.status = JobState.RUNNING
        worker.start()

    def stop(self) -> None:
        """Ask the job to stop at its next step (no effect when none is running)."""
        if self.worker is not None and not self.stop_flag.is_set():
            self.stop_flag.set()
            self.state.status = JobState.STOPPING

    def _on_yielded(self, item: Any) -> None:
        if isinstance(item, JobFailed):
            self.last_error = item.error
            self.state.message = f"failed: {item.error}"
            self.failed.emit(item.error)
            return
        state = self.state
        if hasattr(item, "step") and hasattr(item, "total_steps"):
            state.total = int(item.total_steps)
            state.step = int(item.step)
        if getattr(item, "run_dir", ""):
            state.run_dir = str(item.run_dir)
        self._last_kind = str(getattr(item, "kind", ""))
        checkpoint = getattr(item, "checkpoint", None)
        self.event.emit(item)
        # A step's checkpoint may come again with the stopped/done event of that step.
        if checkpoint and self._announced != (str(checkpoint), state.step):
            self._announced = (str(checkpoint), state.step)
            state.checkpoint = str(checkpoint)
            state.checkpoint_written.emit(str(checkpoint))

    def _on_finished(self) -> None:
        self.worker = None
        if self.last_error is not None:
            self.state.status = JobState.FAILED
        elif self._last_kind == "stopped" or (self.stop_flag.is_set()
                                              and self._last_kind != "done"):
            self.state.status = JobState.STOPPED
        else:
            self.state.status = JobState.DONE
        self.finished.emit()
