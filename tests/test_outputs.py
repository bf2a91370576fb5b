"""Atomic writes of checkpoints and JSON files: a failed write keeps the previous file."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch

from voco_core.checkpoint import atomic_torch_save, load_checkpoint
from voco_core.errors import VoCoDataError
from voco_core.outputs import write_json


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
