"""``voco pretrain``: end to end on phantoms, resume, and every bad input as one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from voco_core.cli import main

from conftest import one_line_error, save_nifti, tiny_config


@pytest.fixture
def config_file(tmp_path) -> Path:
    return tiny_config({"optim": {"total_steps": 1}}).save(tmp_path / "tiny.yaml")


def test_pretrain_then_resume_for_more_steps(tmp_path, train_dataset, config_file, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(train_dataset), "--out", str(run),
                 "--config", str(config_file)]) == 0
    assert "finished at step 1/1" in capsys.readouterr().out
    assert main(["pretrain", "--data", str(train_dataset), "--resume", str(run),
                 "--steps", "2"]) == 0
    assert "finished at step 2/2" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def _bad_folder(tmp_path: Path, name: str, data: np.ndarray | bytes) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    if isinstance(data, bytes):
        (folder / name).write_bytes(data)
    else:
        save_nifti(folder / name, data)
    return folder


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("flat.nii.gz", np.zeros((64, 64), np.float32), "2-D"),
        ("multi.nii.gz", np.zeros((64, 64, 64, 2, 2), np.float32), "5-D"),  # 4-D: channels
        ("small.nii.gz", np.zeros((30, 30, 30), np.float32), "smaller than the crop size"),
        ("nan.nii.gz", np.full((48, 48, 48), np.nan, np.float32), "NaN"),
        ("junk.nii.gz", b"\x1f\x8b" + b"\x00" * 500, "junk.nii.gz"),
    ],
)
def test_bad_volumes_are_refused_naming_the_file(tmp_path, config_file, capsys, name, data,
                                                 fragment):
    folder = _bad_folder(tmp_path, name, data)
    code = main(["pretrain", "--data", str(folder), "--out", str(tmp_path / "run"),
                 "--config", str(config_file)])
    assert code == 1
    one_line_error(capsys, name, fragment)


def test_truncated_volume_is_refused(tmp_path, train_dataset, config_file, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    source = (train_dataset / "imagesTr" / "phantom_000.nii.gz").read_bytes()
    (folder / "cut.nii.gz").write_bytes(source[: len(source) // 3])
    assert main(["pretrain", "--data", str(folder), "--out", str(tmp_path / "run"),
                 "--config", str(config_file)]) == 1
    one_line_error(capsys, "cut.nii.gz")


def test_empty_folder_and_missing_data(tmp_path, config_file, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", "--data", str(tmp_path / "empty"), "--config",
                 str(config_file)]) == 1
    one_line_error(capsys, "empty", "no NIfTI files")
    assert main(["pretrain", "--data", str(tmp_path / "absent"), "--config",
                 str(config_file)]) == 1
    one_line_error(capsys, "absent", "not found")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path, train_dataset, capsys):
    assert main(["pretrain", "--data", str(train_dataset), "--preset", "tiny",
                 "--device", "cuda"]) == 1
    one_line_error(capsys, "CUDA is not available")


def test_bad_flags_and_unwritable_output(tmp_path, train_dataset, config_file, capsys):
    assert main(["pretrain", "--data", str(train_dataset), "--preset", "tiny",
                 "--set", "optim.lr=-1"]) == 1
    one_line_error(capsys, "optim.lr")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["pretrain", "--data", str(train_dataset), "--out", str(blocker / "run"),
                 "--config", str(config_file)]) == 1
    one_line_error(capsys, "not writable")
    assert main(["pretrain", "--data", str(train_dataset), "--resume",
                 str(tmp_path / "nothing")]) == 1
    one_line_error(capsys, "nothing")


def test_resume_refuses_a_non_checkpoint(tmp_path, train_dataset, capsys):
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"not a checkpoint")
    assert main(["pretrain", "--data", str(train_dataset), "--resume", str(fake)]) == 1
    one_line_error(capsys, "fake.pt", "not a readable PyTorch checkpoint")


def test_resume_refuses_a_pickle_that_needs_code(tmp_path, train_dataset, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": shutil.rmtree}, evil)  # needs arbitrary pickle globals
    assert main(["pretrain", "--data", str(train_dataset), "--resume", str(evil)]) == 1
    one_line_error(capsys, "evil.pt", "refused")
