"""The evaluation's runs spread over worker processes (``--jobs N``).

On a CPU, N single-thread processes get more out of N cores than one N-thread
process: a two-thread step waits for its slower thread whenever one is descheduled,
and a finetuning step's small kernels do not split well (measured on the 2-core VM: a
full-finetuning run takes 219-256 s with 2 threads alone, 285-319 s with one thread
beside another process, so two processes finish about 1.5x the runs per hour). The
control runs (scratch, random init) and the plateau section's scratch arms never load
the pretrained checkpoint, so they run *while* the pretraining does; the VoCo runs
follow it.

``--jobs 1`` keeps everything in this process, one run at a time in the paired order
(seed s: control, then VoCo), with the results file rewritten after each.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from .runs import finetune_run, import_package


class Inline:
    """A call run in this process when its result is first asked for (``--jobs 1``)."""

    def __init__(self, fn: Callable, *args) -> None:
        self.fn, self.args = fn, args
        self.value, self.called = None, False

    def result(self):
        if not self.called:
            self.value, self.called = self.fn(*self.args), True
        return self.value


def _start_worker(threads: int) -> None:
    import_package("voco_core.inference", "voco_core.models", threads=threads)


class Jobs:
    """``submit`` calls, then ``finished`` hands them back as they end: in completion
    order over ``jobs`` worker processes (spawned, each with ``threads`` torch CPU
    threads), or one after the other in submission order with ``jobs == 1``."""

    def __init__(self, jobs: int, threads: int) -> None:
        self.pool = None
        if jobs > 1:
            self.pool = ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(threads,))

    @property
    def parallel(self) -> bool:
        return self.pool is not None

    def submit(self, fn: Callable, *args) -> Inline | Future:
        return self.pool.submit(fn, *args) if self.pool else Inline(fn, *args)

    def finished(self, handles: Iterable) -> Iterator:
        pending = list(handles)
        if not self.parallel:
            yield from pending
            return
        waiting = set(pending)
        while waiting:
            done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            # Several may end together: in submission order, so logs read naturally.
            yield from (h for h in pending if h in done)

    def __enter__(self) -> Jobs:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self.pool is None:
            return
        if error is None:
            self.pool.shutdown(wait=True)
            return
        # A failed run or Ctrl-C: drop the queue and stop the runs in flight rather
        # than wait minutes for them (their results would not be saved anyway).
        processes = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()


def add_job_arguments(parser, beside: str) -> None:
    """``--threads`` and ``--jobs`` of a benchmark whose runs go to :class:`Jobs`
    (``beside``: what runs beside the pretraining, for the help)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per process (default: torch's with --jobs 1, "
                             "else the cores / --jobs; 1 wastes less on a shared machine)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes for the pretraining and finetuning runs "
                             f"(default: 2 on a CPU with >= 2 cores, 1 on a GPU); {beside}")


def add_overwrite_argument(parser) -> None:
    """``--overwrite``: a new results file may replace one already at ``--out``."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a results file already at --out (default: refuse, "
                             "so a recorded result is never lost to a new run)")


def settle_jobs(parser, args) -> None:
    """Fill ``--jobs`` (:func:`default_jobs`) and, with several, ``--threads`` (the cores
    shared out, for the record too); refuse values below 1."""
    if args.jobs is None:
        args.jobs = default_jobs(args.device)
    for name in ("jobs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: expected >= 1")
    if args.jobs > 1 and args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)


def default_jobs(device: str) -> int:
    """Two single-thread workers on a CPU with >= 2 cores, one process on a GPU."""
    if not device.startswith("cpu"):
        return 1
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def finetune_job(key: str, config, entries: list, subjects: list[str], heldout: list,
                 checkpoint: str | None, run_dir: Path) -> tuple[str, dict]:
    """One paired run (picklable, for a worker): ``(key, row)`` for the results store."""
    row = finetune_run(config, entries, heldout, checkpoint, run_dir)
    row["subjects"] = subjects
    row["loadavg_1min"] = round(os.getloadavg()[0], 2)
    return key, row
