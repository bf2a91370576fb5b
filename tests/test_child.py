"""voco_core.train.child: a planned training in a child process gives the same events,
passes its errors on as one line, and its death (kill -9) leaves a
resumable run whose lock the next run takes over."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from voco_core.checkpoint import load_checkpoint
from voco_core.errors import VoCoDataError
from voco_core.plan import plan_pretrain
from voco_core.run_folder import RunFolder
from voco_core.train.child import CHILD_NICENESS, TrainerDied, iter_plan_in_child

from conftest import tiny_config


def pretrain_plan(out, steps: int, **run):
    overrides = tiny_config().to_dict()
    overrides["optim"]["total_steps"] = steps
    overrides["run"].update(checkpoint_every=1, **run)
    return plan_pretrain(preset="tiny", overrides=overrides, out=out)


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
                # it trains at a lower priority than its parent (the GUI)
                assert os.getpriority(os.PRIO_PROCESS, child.pid) == min(
                    19, os.getpriority(os.PRIO_PROCESS, 0) + CHILD_NICENESS)
                os.kill(child.pid, signal.SIGKILL)
    message = str(caught.value)
    assert "killed by SIGKILL" in message and str(folder.last) in message
    assert caught.value.checkpoint == folder.last and caught.value.step >= 2
    assert folder.lock_file.exists()  # left by the dead child: stale, taken over below
    resumed = plan_pretrain(resume=folder.root, overrides={"optim": {"total_steps": 4}})
    events = list(iter_plan_in_child(resumed, train_dataset, threads=1))
    # the trainer's own events, to the end (stop: the widgets' tests; torchrun: the
    # pretrain widget's test)
    assert [e.kind for e in events] == ["start", *["step"] * (4 - caught.value.step), "done"]
    assert events[0].step == caught.value.step and events[-1].checkpoint == str(folder.last)
    assert load_checkpoint(folder.root)["step"] == 4
    assert not folder.lock_file.exists() and not multiprocessing.active_children()


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


UNGUARDED_SCRIPT = """
print("main script ran", flush=True)
from pathlib import Path
from voco_core.plan import plan_pretrain
from voco_core.train.child import iter_plan_in_child
plan = plan_pretrain(preset="tiny", overrides={{"run": {{"device": "cpu"}}}}, out=Path({out!r}))
try:
    list(iter_plan_in_child(plan, Path({data!r}), threads=1))
except Exception as err:
    print("child said:", err, flush=True)
"""


def test_a_script_without_a_main_guard_is_not_run_again_in_the_child(tmp_path):
    """A napari script written without ``if __name__ == "__main__":`` (the usual
    notebook-style script) must not be started a second time by the spawned child."""
    import subprocess
    import sys

    empty = tmp_path / "empty"
    empty.mkdir()
    script = tmp_path / "my_napari_script.py"
    script.write_text(UNGUARDED_SCRIPT.format(out=str(tmp_path / "run"), data=str(empty)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.count("main script ran") == 1, done.stdout + done.stderr[-2000:]
    assert "child said:" in done.stdout and "empty" in done.stdout
