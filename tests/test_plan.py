"""Run planning (plan_pretrain / plan_finetune): presets, config files, resume, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from voco_core.errors import VoCoConfigError, VoCoDataError
from voco_core.plan import plan_finetune, plan_pretrain

from conftest import tiny_config


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
