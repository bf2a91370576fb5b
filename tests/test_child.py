"""voco_core.train.child: a planned training in a child process gives the same events,
stops gracefully, passes its errors on as one line, and its death (kill -9) leaves a
resumable run whose lock the next run takes over."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import pytest

from voco_core.checkpoint import load_checkpoint
from voco_core.errors import VoCoDataError
from voco_core.plan import plan_finetune, plan_pretrain
from voco_core.run_folder import RunFolder
from voco_core.train.child import TrainerDied, iter_plan_in_child

from conftest import tiny_config, tiny_finetune_config


def pretrain_plan(out, steps: int, **run):
    overrides = tiny_config().to_dict()
    overrides["optim"]["total_steps"] = steps
    overrides["run"].update(checkpoint_every=1, **run)
    return plan_pretrain(preset="tiny", overrides=overrides, out=out)


def test_a_child_pretraining_yields_the_trainers_events_to_the_end(tmp_path, train_dataset):
    plan = pretrain_plan(tmp_path / "run", steps=2)
    events = list(iter_plan_in_child(plan, train_dataset, threads=1))
    assert [e.kind for e in events] == ["start", "step", "step", "done"]
    assert events[-1].checkpoint == str(RunFolder(plan.run_dir).last)
    assert load_checkpoint(plan.run_dir)["step"] == 2
    assert not multiprocessing.active_children()


def test_stop_reaches_the_child_which_saves_and_ends(tmp_path, train_dataset):
    plan = pretrain_plan(tmp_path / "run", steps=50)
    stop = threading.Event()
    kinds = []
    for event in iter_plan_in_child(plan, train_dataset, stop, threads=1):
        kinds.append(event.kind)
        if event.kind == "step":
            stop.set()
    assert kinds[-1] == "stopped" and kinds.count("step") < 50
    assert load_checkpoint(plan.run_dir)["step"] == kinds.count("step")


def test_an_error_in_the_child_arrives_as_the_same_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    plan = pretrain_plan(tmp_path / "run", steps=2)
    with pytest.raises(VoCoDataError, match="empty"):
        list(iter_plan_in_child(plan, empty, threads=1))


def test_a_killed_child_names_its_last_checkpoint_and_the_run_resumes(tmp_path,
                                                                      train_dataset):
    plan = pretrain_plan(tmp_path / "run", steps=50)
    folder = RunFolder(plan.run_dir)
    with pytest.raises(TrainerDied) as caught:
        for event in iter_plan_in_child(plan, train_dataset, threads=1):
            if event.kind == "step" and event.step == 2:
                (child,) = multiprocessing.active_children()
                os.kill(child.pid, signal.SIGKILL)
    message = str(caught.value)
    assert "killed by SIGKILL" in message and str(folder.last) in message
    assert caught.value.checkpoint == folder.last and caught.value.step >= 2
    assert folder.lock_file.exists()  # left by the dead child: stale, taken over below
    resumed = plan_pretrain(resume=folder.root, overrides={"optim": {"total_steps": 4}})
    events = list(iter_plan_in_child(resumed, train_dataset, threads=1))
    assert events[0].step == caught.value.step and events[-1].kind == "done"
    assert load_checkpoint(folder.root)["step"] == 4
    assert not folder.lock_file.exists()


def test_a_child_finetuning_reports_validation(tmp_path, train_dataset):
    overrides = tiny_finetune_config().to_dict()
    plan = plan_finetune(preset="tiny", overrides=overrides, out=tmp_path / "run")
    kinds = [e.kind for e in iter_plan_in_child(plan, train_dataset, threads=1)]
    assert kinds[0] == "start" and "validation" in kinds and kinds[-1] == "done"


def test_torchrun_with_two_gloo_processes_is_followed_to_its_end(tmp_path, train_dataset,
                                                                  monkeypatch):
    from voco_core.train.child import iter_plan_torchrun

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = pretrain_plan(tmp_path / "run", steps=2, device="cpu")
    events = list(iter_plan_torchrun(plan, train_dataset, 2, poll_seconds=0.1))
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert sorted({e.step for e in events if e.kind == "step"}) == [1, 2]
    assert events[-2].checkpoint == str(RunFolder(plan.run_dir).last)
    state = load_checkpoint(plan.run_dir)
    assert state["step"] == 2 and state["world_size"] == 2
    assert not list(tmp_path.glob(".*.torchrun.yaml"))  # the ranks' config file is gone


ORPHAN_SCRIPT = """
import multiprocessing, sys
from pathlib import Path
from voco_core.plan import plan_pretrain
from voco_core.train.child import iter_plan_in_child
overrides = {overrides!r}
plan = plan_pretrain(preset="tiny", overrides=overrides, out=Path({out!r}))
for event in iter_plan_in_child(plan, Path({data!r}), threads=1):
    if event.kind == "step":
        print(multiprocessing.active_children()[0].pid, flush=True)
        break
import os, signal
os.kill(os.getpid(), signal.SIGKILL)  # die abruptly, the child still running
"""


def test_a_child_whose_parent_dies_stops_with_a_checkpoint(tmp_path, train_dataset):
    """napari killed or crashed: its trainer does not train on unseen, it saves and
    ends, releasing the run folder."""
    import subprocess
    import sys
    import time

    overrides = tiny_config().to_dict()
    overrides["optim"]["total_steps"] = 500
    overrides["run"]["checkpoint_every"] = 1000
    out = tmp_path / "run"
    script = ORPHAN_SCRIPT.format(overrides=overrides, out=str(out), data=str(train_dataset))
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert parent.returncode == -signal.SIGKILL, parent.stderr[-2000:]
    folder = RunFolder(out)
    end = time.monotonic() + 120
    while folder.lock_file.exists() and time.monotonic() < end:
        time.sleep(0.2)
    assert not folder.lock_file.exists()
    state = load_checkpoint(folder.root)
    assert 1 <= state["step"] < 500  # stopped early, with a checkpoint
