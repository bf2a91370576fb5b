"""RunFolder: the run folder's file names, its lock, stale temporaries, and its log."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from voco_core.errors import VoCoDataError
from voco_core.run_folder import RunFolder, read_log


def test_run_folder_names_and_of(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.last == tmp_path / "run" / "checkpoints" / "last.pt"
    assert folder.best.name == "best.pt" and folder.log.name == "log.jsonl"
    assert folder.meta.name == "meta.json" and folder.config_file.name == "config.yaml"
    assert folder.loss_figure.name == "loss.png" and folder.curves_figure.name == "curves.png"
    assert folder.tensorboard.name == "tensorboard"
    folder.create()
    assert RunFolder.of(folder.root) == folder
    assert RunFolder.of(folder.last) == folder  # need not exist yet
    assert RunFolder.of(tmp_path / "loose.pt") is None


def test_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        holder = json.loads(folder.lock_file.read_text())
        assert holder == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(VoCoDataError, match="another run is writing to this folder"):
            with folder.lock():
                pass
    assert not folder.lock_file.exists()  # released

    # A live process of this host holds it: refused, naming its pid.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        folder.lock_file.write_text(json.dumps({"pid": sleeper.pid,
                                                "host": socket.gethostname()}))
        with pytest.raises(VoCoDataError, match=f"pid {sleeper.pid}"):
            with folder.lock():
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    # Another host's lock cannot be checked: refused, saying how to clear it.
    folder.lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(VoCoDataError, match=r"on elsewhere\).*if that run is gone, delete"):
        with folder.lock():
            pass
    # The pid of the live process above, now dead: the lock is stale and taken over.
    folder.lock_file.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
    with folder.lock():
        assert json.loads(folder.lock_file.read_text())["pid"] == os.getpid()
    assert not folder.lock_file.exists()


def test_stale_temporaries_are_removed(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.create()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = folder.checkpoints / f".last.pt.{dead.stdout.strip()}.tmp"
    stale.write_bytes(b"half a checkpoint")
    (folder.root / ".meta.json.123.tmp.x").write_text("not ours")  # not a .tmp name
    assert folder.remove_stale_temporaries() == [stale]
    assert not stale.exists() and (folder.root / ".meta.json.123.tmp.x").exists()


def test_read_log_keeps_one_record_per_step(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 2, "loss": 1}\n'
                   '{"step": 2, "mean_dice": 0.5}\n')
    assert read_log(log) == [{"step": 1, "loss": 3},
                             {"step": 2, "loss": 1, "mean_dice": 0.5}]
