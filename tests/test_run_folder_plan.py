"""Run folder layout and lock, run planning, event records, atomic writes."""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from voco_core.checkpoint import atomic_torch_save, load_checkpoint
from voco_core.errors import VoCoConfigError, VoCoDataError
from voco_core.outputs import write_json
from voco_core.plan import plan_finetune, plan_pretrain
from voco_core.run_folder import RunFolder, read_log
from voco_core.train.events import FinetuneEvent, PretrainEvent, TrainEvent

from conftest import tiny_config


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


def test_events_share_a_base_and_serialise():
    event = PretrainEvent("step", 3, 10, loss=0.5, terms={"pos": 0.1, "neg": 0.2, "reg": 0.3})
    assert isinstance(event, TrainEvent) and event.to_dict()["terms"]["neg"] == 0.2
    fine = FinetuneEvent("validation", 2, 4, mean_dice=0.7, class_dice={"liver": 0.7})
    assert isinstance(fine, TrainEvent) and fine.to_dict()["class_dice"] == {"liver": 0.7}
    assert math.isnan(fine.loss) and fine.best_step == -1 and fine.message == ""


def test_plan_pretrain_from_preset_file_and_default(tmp_path):
    plan = plan_pretrain(preset="tiny", overrides={"optim": {"total_steps": 7}},
                         out=tmp_path / "a")
    assert plan.kind == "pretrain" and plan.run_dir == tmp_path / "a"
    assert plan.config.run.output_dir == str(tmp_path / "a")
    assert plan.config.optim.total_steps == 7 and plan.resume is None and plan.notes == ()

    config_file = tiny_config().save(tmp_path / "tiny.yaml")
    plan = plan_pretrain(config_file=config_file, overrides={"optim": {"lr": 1e-4}})
    assert plan.config.optim.lr == 1e-4 and plan.config.model.feature_size == 12
    assert plan.run_dir == Path(plan.config.run.output_dir)

    if not torch.cuda.is_available():
        plan = plan_pretrain(out=tmp_path / "b")
        assert plan.config.preset == "tiny" and plan.notes == (
            "preset: tiny (no preset given; no CUDA)",)


def test_plan_errors_name_the_parameter(tmp_path):
    with pytest.raises(VoCoConfigError, match=r"optim\.lr"):
        plan_pretrain(preset="tiny", overrides={"optim": {"lr": -1}})
    with pytest.raises(VoCoConfigError, match="preset 'nope' is unknown"):
        plan_finetune(preset="nope")
    with pytest.raises(VoCoConfigError, match="give one"):
        plan_pretrain(preset="tiny", config_file=tiny_config().save(tmp_path / "t.yaml"))
    with pytest.raises(VoCoDataError, match="absent"):
        plan_pretrain(resume=tmp_path / "absent")
    with pytest.raises(VoCoDataError, match="pretrained checkpoint not found"):
        plan_finetune(preset="tiny", pretrained=tmp_path / "none.pt")


def test_plan_resume_uses_the_run_folder_of_a_checkpoint(pretrain_run, finetune_run):
    plan = plan_pretrain(resume=pretrain_run / "checkpoints" / "last.pt",
                         overrides={"optim": {"total_steps": 5}})
    assert plan.run_dir == pretrain_run and plan.resume == pretrain_run / "checkpoints" / "last.pt"
    assert plan.config.optim.total_steps == 5 and plan.config.model.feature_size == 12
    assert plan.config.run.output_dir == str(pretrain_run)

    plan = plan_finetune(resume=finetune_run / "checkpoints" / "last.pt")
    assert plan.kind == "finetune" and plan.run_dir == finetune_run
    assert plan.config.data.num_classes == 11  # the run's own config, classes filled in
    plan = plan_finetune(resume=finetune_run)  # a folder: its last.pt, never best.pt
    assert plan.resume == finetune_run / "checkpoints" / "last.pt"
    with pytest.raises(VoCoDataError, match="best-model checkpoint"):
        plan_finetune(resume=finetune_run / "checkpoints" / "best.pt")
    with pytest.raises(VoCoConfigError, match="continues with its own config"):
        plan_finetune(resume=finetune_run, preset="tiny")


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = atomic_torch_save({"step": 1}, tmp_path / "last.pt")

    def disk_full(obj, file, *args, **kwargs):
        file.write(b"partial")  # torch writes into the open temporary file
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter "
                           "failed writing file data/3: file write failed")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(VoCoDataError, match=r"last\.pt: cannot write checkpoint \(.*"
                                            r"PytorchStreamWriter failed writing file"):
        atomic_torch_save({"step": 2}, path)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary left


def test_full_disk_while_writing_json_keeps_the_previous_file(tmp_path, monkeypatch):
    path = write_json(tmp_path / "meta.json", {"step": 1, "loss": math.nan})
    assert json.loads(path.read_text()) == {"step": 1, "loss": None}  # no NaN in JSON

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(VoCoDataError, match=r"meta\.json: cannot write file \(No space left"):
        write_json(path, {"step": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text())["step"] == 1
