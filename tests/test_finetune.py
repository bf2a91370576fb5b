"""Finetuning: label checks, class resolution, a tiny end-to-end run, stop and resume."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from voco_core.checkpoint import load_checkpoint, load_segmentation_checkpoint
from voco_core.data.datalists import DatalistEntry, load_datalist
from voco_core.errors import VoCoConfigError, VoCoDataError
from voco_core.train.finetune import (
    finetune_resume_config,
    iter_finetune,
)

from conftest import save_nifti, tiny_finetune_config


def test_finetune_config_validates_roi_and_classes():
    with pytest.raises(VoCoConfigError, match=r"train\.roi_size"):
        tiny_finetune_config({"train": {"roi_size": [48, 64, 64]}})
    with pytest.raises(VoCoConfigError, match=r"data\.class_names"):
        tiny_finetune_config({"data": {"num_classes": 3, "class_names": ["a", "b"]}})
    config = tiny_finetune_config({"data": {"class_names": "background,liver"}})
    assert config.data.class_names == ("background", "liver")


def test_end_to_end_finetune_writes_best_and_last(finetune_run):
    meta = json.loads((finetune_run / "meta.json").read_text())
    assert meta["step"] == 2 and meta["num_classes"] == 11
    assert meta["class_names"][:3] == ["background", "body", "spine"]  # from dataset.json
    assert 0 <= meta["best_dice"] <= 1 and set(meta["class_dice_at_best"]) == set(
        meta["class_names"][1:])
    best = load_checkpoint(finetune_run / "checkpoints" / "best.pt")  # weights_only=True
    last = load_checkpoint(finetune_run / "checkpoints" / "last.pt")
    assert best["kind"] == "best" and "optimizer" not in best
    assert last["kind"] == "last" and last["step"] == 2 and "optimizer" in last
    records = [json.loads(line) for line in (finetune_run / "log.jsonl").read_text().split("\n")
               if line]
    assert any("mean_dice" in r for r in records) and any("loss" in r for r in records)
    assert (finetune_run / "curves.png").stat().st_size > 0


def test_events_carry_dice_per_class(train_dataset, tmp_path):
    events = list(iter_finetune(tiny_finetune_config({"train": {"total_steps": 1,
                                                                "val_every": 1}}),
                                train_dataset, tmp_path / "run"))
    kinds = [e.kind for e in events]
    assert kinds == ["start", "step", "validation", "done"]
    validation = events[2]
    assert len(validation.class_dice) == 10 and np.isfinite(validation.mean_dice)
    assert validation.best_checkpoint and Path(validation.best_checkpoint).is_file()


def test_stop_then_resume_continues_the_step_count(train_dataset, tmp_path):
    run = tmp_path / "run"
    stop = threading.Event()
    config = tiny_finetune_config({"train": {"total_steps": 2, "val_every": 100}}, exact=True)
    events = iter_finetune(config, train_dataset, run, stop=stop)
    for event in events:
        if event.kind == "step" and event.step == 1:
            stop.set()
    assert event.kind == "stopped" and event.step == 1
    stopped_state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert stopped_state["step"] == 1

    with open(run / "log.jsonl", "a") as log:  # as if killed after logging step 2
        log.write(json.dumps({"step": 2, "loss": 99.0, "lr": 0.0}) + "\n")
    resumed_config = finetune_resume_config(run)
    assert resumed_config.train == config.train and resumed_config.model == config.model
    assert resumed_config.data.num_classes == 11  # filled in from the labels
    resumed = list(iter_finetune(resumed_config, train_dataset, run, resume=run))
    steps = [e.step for e in resumed if e.kind == "step"]
    assert resumed[0].message.startswith("resumed from") and steps == [2]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # no step twice
    assert all(r["loss"] != 99.0 for r in records if "loss" in r)

    # An uninterrupted run reaches the same weights (deterministic mode, same crops).
    straight = tmp_path / "straight"
    list(iter_finetune(config, train_dataset, straight))
    a = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_label_value_outside_declared_classes_names_file_and_value(train_dataset, tmp_path):
    config = tiny_finetune_config({"data": {"num_classes": 5}})
    with pytest.raises(VoCoDataError, match=r"labelsTr/phantom_000.nii.gz: label value 5 is "
                                            r"outside the declared classes 0..4"):
        list(iter_finetune(config, train_dataset, tmp_path / "run"))


def test_fractional_label_value_is_refused(train_dataset, tmp_path):
    entry = load_datalist(train_dataset, require_labels=True)[0]
    label = nib.load(entry.label)
    bad = save_nifti(tmp_path / "bad_label.nii.gz",
                     np.asarray(label.dataobj).astype(np.float32) + 0.5, label.affine)
    with pytest.raises(VoCoDataError, match=r"bad_label\.nii\.gz: label value 0\.5 is not a class"):
        list(iter_finetune(tiny_finetune_config(), [DatalistEntry(entry.image, bad)],
                           tmp_path / "run"))


def test_missing_label_and_mismatched_grid_are_refused(train_dataset, tmp_path):
    entry = load_datalist(train_dataset, require_labels=True)[0]
    with pytest.raises(VoCoDataError, match="has no label map"):
        list(iter_finetune(tiny_finetune_config(), [DatalistEntry(entry.image)], tmp_path / "a"))
    small = save_nifti(tmp_path / "small.nii.gz", np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(VoCoDataError, match=r"small\.nii\.gz: label map shape"):
        list(iter_finetune(tiny_finetune_config(), [DatalistEntry(entry.image, small)],
                           tmp_path / "b"))


def test_unwritable_output_folder_is_a_typed_error(train_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(VoCoDataError, match="output folder is not writable"):
        list(iter_finetune(tiny_finetune_config(), train_dataset, blocker / "run"))


def test_pretrained_backbone_is_loaded_and_reported(train_dataset, tmp_path):
    from monai.networks.nets import SwinUNETR

    donor = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, use_v2=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.state_dict().items()
                               if k.startswith("swinViT")}}, tmp_path / "released.pt")
    events = iter_finetune(tiny_finetune_config({"train": {"total_steps": 1, "val_every": 1}}),
                           train_dataset, tmp_path / "run", pretrained=tmp_path / "released.pt")
    start = next(events)
    assert "state dict under 'state_dict'" in start.message and "loaded" in start.message
    events.close()


def test_resume_refuses_a_best_checkpoint_and_other_formats(finetune_run, train_dataset,
                                                            tmp_path):
    config = finetune_resume_config(finetune_run)
    with pytest.raises(VoCoDataError, match="best-model checkpoint"):
        list(iter_finetune(config, train_dataset, tmp_path / "x",
                           resume=finetune_run / "checkpoints" / "best.pt"))
    torch.save({"format": "napari-voco/pretrain"}, tmp_path / "pre.pt")
    with pytest.raises(VoCoDataError, match="pretraining checkpoint"):
        load_segmentation_checkpoint(tmp_path / "pre.pt")


def test_closing_after_start_or_failing_set_up_restores_the_backend_flags(train_dataset,
                                                                         tmp_path):
    """Deterministic mode switches oneDNN off process-wide while training; a consumer
    that stops listening after "start" (a GUI) or a bad pretrained file must not leave
    it off."""
    assert torch.backends.mkldnn.enabled
    threads = torch.get_num_threads()
    events = iter_finetune(tiny_finetune_config(), train_dataset, tmp_path / "a")
    assert next(events).kind == "start"
    events.close()
    assert torch.backends.mkldnn.enabled and torch.get_num_threads() == threads
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(VoCoDataError, match=r"junk\.pt"):
        list(iter_finetune(tiny_finetune_config(), train_dataset, tmp_path / "b",
                           pretrained=tmp_path / "junk.pt"))
    assert torch.backends.mkldnn.enabled and torch.get_num_threads() == threads
