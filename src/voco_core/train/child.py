"""Running a planned training: in this process (:func:`iter_plan`, what the CLI does), or
in a child process that may die alone (:func:`iter_plan_in_child`, what the napari
widgets do).

The child starts from a fresh interpreter (no Qt, no napari, no CUDA context
inherited; on Linux forked from a server that has imported the trainers once, see
:func:`_child_context`) and runs :func:`iter_plan` with every core, at a lower scheduling
priority than the GUI (:data:`CHILD_NICENESS`); its events come back
through a queue as the same :class:`~voco_core.train.events.TrainEvent` records, so a
caller iterates either function the same way. Stopping is the trainers' own
contract: the caller's stop flag is passed on to the child, which ends at its next
step with a checkpoint. A Python exception in the child is raised again in the
caller (a :class:`~voco_core.errors.VoCoError` as itself, anything else as a
:class:`~voco_core.errors.VoCoTrainingError` naming it); a child that ends without a
last event (``kill -9``, the out-of-memory killer, a crash in native code) raises
:class:`TrainerDied` naming the last checkpoint on disk, from which the run resumes.
The child is reaped before that error is raised, so the run folder's lock, which
names the dead child's pid, is taken over by the next run (:meth:`RunFolder.lock`).
"""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from voco_core.checkpoint import saved_step
from voco_core.errors import VoCoError, VoCoTrainingError
from voco_core.run_folder import RunFolder
from voco_core.train.common import StopFlag
from voco_core.train.events import TrainEvent

POLL_SECONDS = 0.2
"""How often the caller looks at its stop flag and at the child while no event comes."""
STOP_WAIT_SECONDS = 120.0
"""How long a stopped child may take to finish its step and save before it is sent
SIGTERM (which makes it stop the same way), then SIGKILL after as long again."""

CHILD_NICENESS = 5
"""Scheduling priority the child gives up (``os.nice``): it still uses every core the
GUI leaves idle, but when the GUI thread needs a core (drawing a plot, painting) the
kernel gives it about three times the child's share, so the window stays responsive
while the child trains with every core."""

_END = "end"


class TrainerDied(VoCoTrainingError):
    """The training process ended without finishing or reporting an error (killed,
    out of memory, a native crash). ``checkpoint``/``step``: the last checkpoint on disk
    (None/-1 when there is none yet)."""

    def __init__(self, message: str, checkpoint: Path | None = None, step: int = -1):
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step

    def __reduce__(self):  # picklable with its fields
        return (type(self), (str(self), self.checkpoint, self.step))


def iter_plan(plan: Any, data: Any, stop: StopFlag | None = None) -> Iterator[TrainEvent]:
    """Run a :class:`~voco_core.plan.RunPlan` in this process: the trainer's events."""
    from voco_core.train.finetune import iter_finetune
    from voco_core.train.pretrain import iter_pretrain

    if plan.kind == "pretrain":
        return iter_pretrain(plan.config, data, plan.run_dir, resume=plan.resume, stop=stop)
    return iter_finetune(plan.config, data, plan.run_dir, pretrained=plan.pretrained,
                         resume=plan.resume, stop=stop, initial=plan.initial)


def iter_plan_in_child(plan: Any, data: Any, stop: StopFlag | None = None, *,
                       threads: int | None = None) -> Iterator[TrainEvent]:
    """Run a plan in a child process (:func:`_child_context`); yields its events as they
    come (see the module doc). ``threads``: torch intra-op threads of the child
    (default: torch's own choice, every physical core). Closing the generator early
    stops the child (gracefully, then by signal after :data:`STOP_WAIT_SECONDS`)."""
    context = _child_context()
    events = context.Queue()
    child_stop = context.Event()
    process = context.Process(target=_child_main, name=f"voco-{plan.kind}",
                              args=(plan, data, events, child_stop, threads))
    with _main_script_hidden():
        process.start()
    stop_asked, timed_out = None, False
    try:
        while True:
            if stop is not None and stop.is_set():
                child_stop.set()
                stop_asked = stop_asked or time.monotonic()
                if time.monotonic() - stop_asked > STOP_WAIT_SECONDS:
                    timed_out = True  # a step that does not end: SIGTERM, then SIGKILL
                    return
            try:
                item = events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if process.is_alive():
                    continue
                try:  # it may have put its last items just before ending
                    item = events.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    process.join()  # reap it: its pid no longer holds the folder's lock
                    raise died(plan.run_dir, process.exitcode) from None
            if item == _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        _end_child(process, child_stop, graceful=not timed_out)
        events.close()
        events.join_thread()


def iter_plan_torchrun(plan: Any, data: str | Path, processes: int,
                       stop: StopFlag | None = None, *,
                       poll_seconds: float = POLL_SECONDS) -> Iterator[TrainEvent]:
    """Run a pretraining plan as ``torchrun --standalone --nproc_per_node N`` (the CLI's
    DDP path: NCCL on CUDA, gloo on a CPU) and yield its events by following its run
    folder (:func:`voco_core.run_follow.follow_run`). ``data``: a folder or datalist
    JSON (ranks read it themselves). A new run's config goes to the ranks as a file
    beside the run folder (removed at the end); a resume passes ``--resume``. ``stop``
    sends SIGTERM to torchrun, which passes it to the ranks: they stop at their next
    step with a checkpoint, as from a terminal. A failed run raises the ranks' own
    ``voco: error:`` line (or :class:`TrainerDied` when they died without one)."""
    import subprocess
    import sys
    import tempfile

    from voco_core.run_follow import follow_run

    if plan.kind != "pretrain":
        raise VoCoTrainingError("several processes (torchrun) are for pretraining only")
    folder = RunFolder(plan.run_dir)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(int(processes)), "-m", "voco_core.cli", "pretrain",
               "--data", str(data)]
    config_file = None
    if plan.resume is not None:
        command += ["--resume", str(plan.resume), "--steps",
                    str(plan.config.optim.total_steps), "--device", plan.config.run.device]
    else:
        folder.root.parent.mkdir(parents=True, exist_ok=True)
        config_file = folder.root.with_name(f".{folder.root.name}.torchrun.yaml")
        plan.config.save(config_file)
        command += ["--config", str(config_file), "--out", str(folder.root)]
    output = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    stopping = False

    def pass_stop_on() -> None:
        nonlocal stopping
        if stop is not None and stop.is_set() and not stopping and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # torchrun passes it to every rank
            stopping = True

    try:
        while not folder.config_file.is_file() or not folder.held():  # ranks starting
            if process.poll() is not None:
                break
            pass_stop_on()
            time.sleep(poll_seconds)
        if folder.config_file.is_file():
            # follow_run asks its stop flag at every poll: the asking passes a stop on
            # to the ranks; following itself goes on until they have saved and ended.
            watch = _EveryPoll(pass_stop_on)
            for event in follow_run(folder.root, watch, poll_seconds=poll_seconds):
                pass_stop_on()
                yield event
        process.wait()
        if process.returncode != 0 and not stopping:
            output.seek(0)
            errors = [line.strip() for line in output if line.startswith("voco: error:")]
            if errors:
                raise VoCoTrainingError(errors[-1].removeprefix("voco: error:").strip())
            raise died(folder.root, process.returncode)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        output.close()
        if config_file is not None:
            config_file.unlink(missing_ok=True)


class _EveryPoll:
    """A stop flag that is never set but calls ``action`` each time it is asked."""

    def __init__(self, action) -> None:
        self.action = action

    def is_set(self) -> bool:
        self.action()
        return False


@contextmanager
def _main_script_hidden() -> Iterator[None]:
    """Start a child without running the parent's main script again.

    ``spawn`` imports the parent's ``__main__`` file in the child (to find objects
    defined there), and so does the fork server when it starts. The child needs nothing
    from it: it runs voco_core code on voco_core objects. A user's napari script
    without an ``if __name__ == "__main__":`` guard would, imported again, open a
    second napari in the child; so the main module's ``__file__`` and ``__spec__`` are
    out of sight while the child is started."""
    main = sys.modules.get("__main__")
    saved = {key: getattr(main, key) for key in ("__file__", "__spec__")
             if main is not None and hasattr(main, key)}
    try:
        if main is not None:
            main.__spec__ = None  # read as "no module name" by multiprocessing
            if "__file__" in saved:
                del main.__file__
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


def died(run_dir: str | Path, exitcode: int | None) -> TrainerDied:
    """The error for a training process that ended with ``exitcode`` and no last event:
    how it ended and the checkpoint the run can resume from."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        how = f"was killed by {name}" + (" (out of memory?)" if -exitcode == signal.SIGKILL
                                         else "")
    else:
        how = f"ended with exit status {exitcode}"
    folder = RunFolder(run_dir)
    step = saved_step(folder)
    if folder.last.is_file():
        where = (f"the last checkpoint is {folder.last} (step {step}); resume the run "
                 "from it")
        return TrainerDied(f"the training process {how}; {where}", folder.last, step)
    return TrainerDied(f"the training process {how} before its first checkpoint; nothing "
                       f"of it was saved in {folder.root}")


def _end_child(process, child_stop, graceful: bool) -> None:
    """Wait for the child; a child still running (the caller stopped iterating) is asked
    to stop, then sent SIGTERM, then SIGKILL, each after :data:`STOP_WAIT_SECONDS`
    (the first wait is 10 s when it was already asked that long: ``graceful`` False)."""
    if not process.is_alive():
        process.join()
        return
    child_stop.set()
    process.join(STOP_WAIT_SECONDS if graceful else 10.0)
    for send in (process.terminate, process.kill):
        if not process.is_alive():
            break
        send()
        process.join(STOP_WAIT_SECONDS)


def _child_main(plan: Any, data: Any, events, stop, threads: int | None) -> None:
    """The child: run the plan, put each event on ``events``, then ``"end"`` or the
    exception. SIGTERM sets the stop flag (as in the CLI); Ctrl-C in the terminal the
    GUI was started from is the GUI's to handle, not the child's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda number, frame: stop.set())
    _stop_when_orphaned(stop)
    _give_way()
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    try:
        for event in iter_plan(plan, data, stop):
            events.put(event)
        events.put(_END)
    except BaseException as err:
        events.put(_transferable(err))


CHILD_PRELOAD = ["voco_core.train.pretrain", "voco_core.train.finetune", "torch._dynamo"]
"""What the Linux fork server imports once (torch, MONAI, the trainers; the optimizers
import ``torch._dynamo``): each child then starts in well under a second instead of
spending about 4 s of CPU importing them again."""


def _child_context():
    """``forkserver`` on Linux, ``spawn`` elsewhere. Both start children from a fresh
    interpreter, never from the GUI's process (no Qt, no napari, no CUDA context). The
    fork server is that interpreter, started at the first training with
    :data:`CHILD_PRELOAD` imported and nothing run; every child is a fork of it. It ends
    when the process that started it ends. Elsewhere (macOS forbids forking a process
    that has loaded some system frameworks; Windows cannot fork) each child is spawned."""
    if sys.platform != "linux":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(CHILD_PRELOAD)
    return context


def _give_way() -> None:
    """Lower this process's priority by :data:`CHILD_NICENESS` (where the OS allows)."""
    import os

    try:
        os.nice(CHILD_NICENESS)
    except (AttributeError, OSError):  # no os.nice (Windows), or not permitted
        pass


ORPHAN_CHECK_SECONDS = 1.0
"""How often the child looks whether the process that started it still exists."""


def _stop_when_orphaned(stop) -> None:
    """Set ``stop`` when the parent goes (napari killed or crashed): the run then ends at
    its next step with a checkpoint instead of training on unseen."""
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while not stop.is_set():
            if os.getppid() != parent:  # re-parented: the parent is gone
                stop.set()
                return
            time.sleep(ORPHAN_CHECK_SECONDS)

    threading.Thread(target=watch, name="voco-orphan-watch", daemon=True).start()


def _transferable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling (the project's errors do), else a
    :class:`VoCoTrainingError` with its type and first line."""
    if isinstance(err, VoCoError):
        try:
            pickle.loads(pickle.dumps(err))
            return err
        except Exception:
            pass
    text = str(err).splitlines()[0] if str(err) else ""
    return VoCoTrainingError(f"the training process failed: {type(err).__name__}"
                             + (f": {text}" if text else ""))


__all__: Sequence[str] = ("STOP_WAIT_SECONDS", "TrainerDied", "died", "iter_plan",
                          "iter_plan_in_child", "iter_plan_torchrun")
