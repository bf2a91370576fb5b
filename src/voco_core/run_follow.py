"""Following a run folder that someone else writes: a terminal, ``torchrun`` on several
GPUs, a SLURM job writing to a shared file system, or a child process of napari.

:func:`follow_run` turns what the trainers write into the folder (``config.yaml``,
``log.jsonl``, ``meta.json``, the ``.lock``) back into the trainers' own event records
(:class:`~voco_core.train.events.PretrainEvent` /
:class:`~voco_core.train.events.FinetuneEvent`), so a caller shows a followed run
exactly as one it started. It polls (every ``poll_seconds``, no busy loop: fit for
slow network file systems) and copes with what a live folder goes through:

- a last line still being written (a partial JSON line is left for the next poll);
- a resume, which rewrites ``log.jsonl`` without the steps after its checkpoint (the
  file shrinks or is replaced: it is read again from the start, with a new ``start``);
- the end: the lock file is gone (or names a dead process on this host), then
  ``done`` when the last checkpoint is at the run's last step, else ``stopped``
  (stopped, failed or killed: the checkpoint on disk is what is left either way).

Each new checkpoint (``meta.json`` names its step) is reported on the step event of
that step, as the trainers do, so a position inspector can refresh on it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from voco_core.checkpoint import saved_step
from voco_core.errors import VoCoDataError
from voco_core.run_folder import RunFolder
from voco_core.train.common import StopFlag
from voco_core.train.events import FinetuneEvent, PretrainEvent, TrainEvent

POLL_SECONDS = 0.5
"""Between two looks at the folder: updates appear within a second of being logged."""


def run_kind(folder: RunFolder) -> str:
    """``"pretrain"`` or ``"finetune"`` from the run's ``config.yaml`` (its ``optim`` or
    ``train`` section); :class:`VoCoDataError` when the folder holds no run config."""
    config = read_run_config(folder)
    if isinstance(config.get("optim"), dict):
        return "pretrain"
    if isinstance(config.get("train"), dict):
        return "finetune"
    raise VoCoDataError("config.yaml is not a napari-voco pretraining or finetuning config",
                        folder.config_file)


def read_run_config(folder: RunFolder) -> dict[str, Any]:
    try:
        config = yaml.safe_load(folder.config_file.read_text())
    except FileNotFoundError:
        raise VoCoDataError("no run here yet (no config.yaml): choose a run folder, or wait "
                            "until the run has started", folder.root) from None
    except (OSError, yaml.YAMLError) as err:
        raise VoCoDataError(f"config.yaml cannot be read ({err})", folder.config_file) from err
    if not isinstance(config, dict):
        raise VoCoDataError("config.yaml holds no config", folder.config_file)
    return config


@dataclass
class _LogTail:
    """The complete lines added to a growing file since the last read."""

    path: Path
    offset: int = 0
    identity: tuple[int, int] | None = None
    pending: bytes = b""
    restarted: bool = field(default=False, init=False)

    def read(self) -> list[dict]:
        """New records; :attr:`restarted` says the file was rewritten (read anew)."""
        self.restarted = False
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return []
        identity = (stat.st_ino, stat.st_dev)
        if identity != self.identity or stat.st_size < self.offset:
            self.restarted = self.identity is not None
            self.identity, self.offset, self.pending = identity, 0, b""
        if stat.st_size == self.offset:
            return []
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            chunk = file.read(stat.st_size - self.offset)
        self.offset += len(chunk)
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # a torn line of a killed writer: skipped
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
        return records


def follow_run(run_dir: str | Path, stop: StopFlag | None = None, *,
               poll_seconds: float = POLL_SECONDS) -> Iterator[TrainEvent]:
    """Events of the run in ``run_dir`` as it is written (see the module doc): a
    ``start``, the logged ``step``s (and finetuning's ``validation``s), then ``done``
    or ``stopped`` when the run ends; or until ``stop`` is set (following ends, the
    run goes on)."""
    folder = RunFolder(run_dir)
    kind = run_kind(folder)
    event_type = PretrainEvent if kind == "pretrain" else FinetuneEvent
    tail = _LogTail(folder.log)
    total = _total_steps(folder, kind)
    last: TrainEvent = event_type("start", 0, total, run_dir=str(folder.root),
                                  message=f"following {folder.root}")
    yield last
    announced = -1  # the step of the last checkpoint reported
    while True:
        records = tail.read()
        if tail.restarted:  # a resume rewrote the log: show it from its start again
            total = _total_steps(folder, kind)
            last = event_type("start", 0, total, run_dir=str(folder.root),
                              message="the run was resumed")
            yield last
        saved = saved_step(folder)
        for record in records:
            last = _event(event_type, record, total, folder, last)
            if last.kind == "step" and last.step == saved > announced:
                last, announced = _replace(last, checkpoint=str(folder.last)), saved
            yield last
        if saved > announced and saved == last.step and last.kind != "start":
            # the checkpoint of a step already shown, written after its log line
            announced = saved
            last = _replace(last, checkpoint=str(folder.last))
            yield last
        if not folder.held() and not records:
            total = _total_steps(folder, kind)
            done = saved >= total and saved >= 0
            yield _replace(last, kind="done" if done else "stopped",
                           step=max(saved, 0) if not done else total, total_steps=total,
                           checkpoint=str(folder.last) if folder.last.is_file() else None)
            return
        if stop is not None and stop.is_set():
            return
        _sleep(poll_seconds, stop)


def _event(event_type, record: dict, total: int, folder: RunFolder,
           previous: TrainEvent) -> TrainEvent:
    """A log record as the trainer's event (validation records as ``validation``)."""
    common = {"step": int(record["step"]), "total_steps": int(record.get("total_steps") or
                                                              total),
              "run_dir": str(folder.root)}
    if "mean_dice" in record:
        return _replace(previous, kind="validation", **common,
                        mean_dice=_number(record.get("mean_dice")),
                        class_dice=dict(record.get("class_dice") or {}), checkpoint=None)
    values = {"loss": _number(record.get("loss")), "lr": _number(record.get("lr")),
              "seconds_per_step": _number(record.get("seconds_per_step")),
              "eta_seconds": _number(record.get("eta_seconds")),
              "peak_memory_bytes": int(record.get("peak_memory_bytes") or 0)}
    if event_type is PretrainEvent:
        values.update(terms={k: _number(v) for k, v in (record.get("terms") or {}).items()},
                      crops_per_second=_number(record.get("crops_per_second")))
    if not math.isfinite(values["eta_seconds"]) and math.isfinite(values["seconds_per_step"]):
        values["eta_seconds"] = values["seconds_per_step"] * (common["total_steps"]
                                                              - common["step"])
    return _replace(previous, kind="step", **common, **values, checkpoint=None, message="")


def _replace(event: TrainEvent, **changes: Any) -> TrainEvent:
    fields = {**event.__dict__, **changes}
    return type(event)(**fields)


def _number(value: Any) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _total_steps(folder: RunFolder, kind: str) -> int:
    section = read_run_config(folder).get("optim" if kind == "pretrain" else "train") or {}
    try:
        return int(section.get("total_steps", 0))
    except (TypeError, ValueError):
        return 0


def _sleep(seconds: float, stop: StopFlag | None) -> None:
    wait = getattr(stop, "wait", None)
    if callable(wait):
        wait(seconds)  # wakes at once when following is stopped
    else:
        time.sleep(seconds)
