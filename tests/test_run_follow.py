"""voco_core.run_follow: a run folder written by someone else, read back as the
trainers' events: a live run (partial last line, checkpoints after their log line),
a resume that rewrites the log, the end (done, or stopped/killed), a finished run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from voco_core.errors import VoCoDataError
from voco_core.run_folder import RunFolder
from voco_core.run_follow import follow_run, run_kind

from conftest import tiny_config, tiny_finetune_config


def fake_run(root, steps: int = 6, finetune: bool = False) -> RunFolder:
    """A run folder with only its config (``steps`` in total), as a trainer starts it."""
    folder = RunFolder(root)
    folder.create()
    make = tiny_finetune_config if finetune else tiny_config
    make({"train" if finetune else "optim": {"total_steps": steps}}).save(folder.config_file)
    return folder


def hold(folder: RunFolder, pid: int | None = None) -> None:
    folder.lock_file.write_text(json.dumps({"pid": pid or os.getpid(),
                                            "host": socket.gethostname()}))


def log(folder: RunFolder, *records: dict, partial: str = "") -> None:
    with open(folder.log, "a") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
        file.write(partial)


def save(folder: RunFolder, step: int) -> None:
    folder.last.write_bytes(b"checkpoint")
    folder.meta.write_text(json.dumps({"step": step}))


def collect(events, until, timeout: float = 10.0) -> list:
    """Events from a follower in a thread until ``until(events)`` (or the timeout)."""
    seen: list = []

    def run():
        for event in events:
            seen.append(event)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    end = time.monotonic() + timeout
    while time.monotonic() < end and not until(seen):
        time.sleep(0.05)
    return seen


def test_a_live_run_is_followed_step_by_step_to_its_end(tmp_path):
    folder = fake_run(tmp_path / "run", steps=3)
    hold(folder)
    stop = threading.Event()
    events = follow_run(folder.root, stop, poll_seconds=0.05)
    seen = collect(events, lambda seen: len(seen) >= 1)
    assert seen[0].kind == "start" and seen[0].total_steps == 3

    # a step whose line is still being written is not shown until it is complete
    log(folder, {"step": 1, "loss": 0.9, "terms": {"intra": 0.5}, "lr": 1e-4},
        partial='{"step": 2, "lo')
    time.sleep(0.3)
    assert [e.step for e in seen if e.kind == "step"] == [1]
    assert seen[-1].terms == {"intra": 0.5}
    started = time.monotonic()
    with open(folder.log, "a") as file:
        file.write('ss": 0.8}\n')
    while len([e for e in seen if e.kind == "step"]) < 2 and time.monotonic() - started < 5:
        time.sleep(0.01)
    assert time.monotonic() - started < 2.0  # within 2 s of being logged
    save(folder, 2)  # the checkpoint of step 2, written after its log line
    while not any(e.checkpoint for e in seen) and time.monotonic() - started < 5:
        time.sleep(0.01)
    checkpointed = [e for e in seen if e.checkpoint]
    assert checkpointed and checkpointed[0].step == 2
    assert checkpointed[0].checkpoint == str(folder.last)

    log(folder, {"step": 3, "loss": 0.7})
    save(folder, 3)
    folder.lock_file.unlink()  # the run ends
    while seen[-1].kind not in ("done", "stopped") and time.monotonic() - started < 5:
        time.sleep(0.01)
    assert seen[-1].kind == "done" and seen[-1].step == 3
    assert [e.loss for e in seen if e.kind == "step" and not e.checkpoint] == [0.9, 0.8]


def test_a_resume_rewriting_the_log_starts_the_curves_again(tmp_path):
    folder = fake_run(tmp_path / "run", steps=10)
    hold(folder)
    log(folder, *({"step": s, "loss": 1.0 / s} for s in range(1, 5)))
    save(folder, 2)
    stop = threading.Event()
    seen = collect(follow_run(folder.root, stop, poll_seconds=0.05),
                   lambda seen: sum(e.kind == "step" for e in seen) >= 4)
    # a resume from step 2 keeps the records up to 2 (a new file, atomically)
    tmp = folder.root / "log.tmp"
    tmp.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    os.replace(tmp, folder.log)
    log(folder, {"step": 3, "loss": 0.25})
    end = time.monotonic() + 5
    while sum(e.kind == "start" for e in seen) < 2 and time.monotonic() < end:
        time.sleep(0.02)
    stop.set()
    restart = max(i for i, e in enumerate(seen) if e.kind == "start")
    assert restart > 0 and seen[restart].message == "the run was resumed"
    time.sleep(0.3)
    assert [e.step for e in seen[restart + 1:] if e.kind == "step"][:3] == [1, 2, 3]


def test_a_killed_run_ends_as_stopped_at_its_last_checkpoint(tmp_path):
    folder = fake_run(tmp_path / "run", steps=10)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    hold(folder, int(dead))  # a stale lock: the writer is gone
    log(folder, *({"step": s, "loss": 0.5} for s in range(1, 5)))
    save(folder, 3)
    events = list(follow_run(folder.root, poll_seconds=0.05))
    assert [e.kind for e in events] == ["start", "step", "step", "step", "step", "stopped"]
    assert events[-1].step == 3 and events[-1].checkpoint == str(folder.last)
    assert events[3].checkpoint == str(folder.last)  # step 3's event names its checkpoint


def test_a_finished_finetuning_reads_back_its_steps_and_validations(finetune_run):
    events = list(follow_run(finetune_run, poll_seconds=0.05))
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "validation" in kinds
    validation = next(e for e in events if e.kind == "validation")
    assert 0 <= validation.mean_dice <= 1 and validation.class_dice
    assert run_kind(RunFolder(finetune_run)) == "finetune"


def test_a_folder_without_a_run_is_one_line(tmp_path):
    with pytest.raises(VoCoDataError, match="no run here yet"):
        next(follow_run(tmp_path))
