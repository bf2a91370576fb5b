"""Training failure paths through the ``voco`` command: signals, resume targets, damaged
checkpoints, a busy output folder, a full disk, leftovers, declared classes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from voco_core.checkpoint import load_checkpoint
from voco_core.cli import main
from voco_core.errors import VoCoDataError
from voco_core.run_folder import RunFolder

from conftest import one_line_error, tiny_config


def signal_after_first_step(command: list[str], run: Path, number: int
                            ) -> subprocess.CompletedProcess:
    """Start ``command``, send signal ``number`` once step 1 is in ``run/log.jsonl``."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not ((run / "log.jsonl").is_file() and (run / "log.jsonl").read_text().strip()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no step logged in time"
        time.sleep(0.2)
    process.send_signal(number)
    stdout, stderr = process.communicate(timeout=240)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_sigterm_stops_pretraining_with_a_checkpoint_and_exit_143(tmp_path, train_dataset):
    config = tiny_config({"optim": {"total_steps": 50}}).save(tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    result = signal_after_first_step(
        [sys.executable, "-m", "voco_core.cli", "pretrain", "--data", str(train_dataset),
         "--config", str(config), "--out", str(run)], run, signal.SIGTERM)
    assert result.returncode == 143, result.stderr
    assert "finished" not in result.stdout and "Traceback" not in result.stderr
    step = load_checkpoint(run)["step"]
    assert 1 <= step < 50
    assert f"stopped at step {step}/50" in result.stdout
    assert f"(resume with --resume {run})" in result.stdout
    assert not RunFolder(run).lock_file.exists()  # released


def test_ctrl_c_stops_the_demo_with_exit_130(tmp_path, train_dataset):
    run = tmp_path / "demo"
    result = signal_after_first_step(
        [sys.executable, "-m", "voco_core.cli", "demo", "--data", str(train_dataset),
         "--out", str(run), "--steps", "50"], run, signal.SIGINT)
    assert result.returncode == 130, result.stderr
    assert "stopped at step" in result.stdout and "finished" not in result.stdout
    assert load_checkpoint(run)["step"] >= 1


def test_finetune_resume_from_a_checkpoint_file_continues_in_its_folder(finetune_run, tmp_path,
                                                                        train_dataset, capsys):
    run = tmp_path / "run"
    shutil.copytree(finetune_run, run)
    assert main(["finetune", "--data", str(train_dataset), "--steps", "3",
                 "--resume", str(run / "checkpoints" / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert f"run folder {run}" in out and "finished at step 3/3" in out
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in records if "loss" in r]
    assert loss_steps == sorted(set(loss_steps))  # no step logged twice


@pytest.mark.parametrize("damage", ["missing_entry", "wrong_shape"])
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_resume_from_a_damaged_checkpoint_is_one_line(pretrain_run, finetune_run, tmp_path,
                                                      train_dataset, capsys, kind, damage):
    run = tmp_path / "run"
    shutil.copytree(pretrain_run if kind == "pretrain" else finetune_run, run)
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    weights = "student" if kind == "pretrain" else "model"
    if damage == "missing_entry":
        del state["optimizer"]
        fragments = ["last.pt", "entry 'optimizer' is missing"]
    else:
        name = next(iter(state[weights]))
        state[weights][name] = torch.zeros(3)
        fragments = ["last.pt", f"entry '{weights}'", f"weight '{name}' has shape (3,)"]
    torch.save(state, last)
    assert main([kind, "--data", str(train_dataset), "--resume", str(last), "--steps", "9"]) == 1
    one_line_error(capsys, *fragments)


def test_a_second_run_on_a_busy_folder_is_refused(tmp_path, train_dataset, capsys):
    config = tiny_config({"optim": {"total_steps": 1}}).save(tmp_path / "tiny.yaml")
    folder = RunFolder(tmp_path / "run")
    with folder.lock():  # another run (in this process, like a second napari widget)
        assert main(["pretrain", "--data", str(train_dataset), "--config", str(config),
                     "--out", str(folder.root)]) == 1
    one_line_error(capsys, str(folder.root), "another run is writing to this folder")
    assert not folder.last.exists()


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(
        tmp_path, train_dataset, capsys, monkeypatch):
    config = tiny_config({"optim": {"total_steps": 2}, "run": {"checkpoint_every": 1}})
    config_file = config.save(tmp_path / "tiny.yaml")
    real_save, calls = torch.save, []

    def disk_full_on_the_second_save(obj, file, *args, **kwargs):
        calls.append(file)
        if len(calls) >= 2:  # what a full disk does to the open file torch writes into
            file.write(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_the_second_save)
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(train_dataset), "--config", str(config_file),
                 "--out", str(run)]) == 1
    err = capsys.readouterr().err  # the progress bar, then the error as its last line
    assert "Traceback" not in err and err.endswith("\n")
    assert err.splitlines()[-1].startswith("voco: error: ")
    assert "last.pt: cannot write checkpoint (No space left on device)" in err.splitlines()[-1]
    monkeypatch.undo()
    assert load_checkpoint(run)["step"] == 1
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert json.loads((run / "meta.json").read_text())["step"] == 1


def test_full_disk_while_plotting_leaves_no_empty_figure(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from voco_core.train.run_log import plot_loss_curve

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5, "terms": {"pos": 0.2}}\n')

    def no_space(self, file, **kwargs):
        Path(file).write_bytes(b"")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", no_space)
    with pytest.raises(VoCoDataError, match=r"loss\.png: cannot write figure \(No space"):
        plot_loss_curve(log, tmp_path / "loss.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_a_new_run_removes_temporaries_of_a_killed_write(tmp_path, train_dataset):
    from voco_core.train import iter_pretrain

    folder = RunFolder(tmp_path / "run")
    folder.create()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    leftovers = [folder.checkpoints / f".last.pt.{dead}.tmp",
                 folder.root / f".meta.json.{dead}.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"cut short")
    events = iter_pretrain(tiny_config(), train_dataset, folder.root)
    assert next(events).kind == "start"
    events.close()
    assert not any(leftover.exists() for leftover in leftovers)


def test_label_values_beyond_the_declared_classes_are_refused(train_dataset, tmp_path):
    from voco_core.train import iter_finetune

    from conftest import tiny_finetune_config

    data = tmp_path / "data"
    shutil.copytree(train_dataset, data)
    spec = json.loads((data / "dataset.json").read_text())
    spec["labels"] = {"0": "background", "1": "body", "2": "spine"}
    (data / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(VoCoDataError, match=r"phantom_00\d\.nii\.gz: label value \d+ is outside "
                                            r"the classes 0\.\.2 that .*dataset\.json declares "
                                            r"\(background, body, spine\)"):
        list(iter_finetune(tiny_finetune_config(), data, tmp_path / "run"))
