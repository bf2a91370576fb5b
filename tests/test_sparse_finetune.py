"""Sparse-label finetuning end to end: a few annotated slices, the rest ignored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from voco_core.checkpoint import load_checkpoint
from voco_core.data.sparse import slices_to_sparse
from voco_core.errors import VoCoConfigError, VoCoDataError
from voco_core.train.finetune import finetune

from conftest import tiny_finetune_config

ANNOTATED_Z = (12, 24, 36)


def _sparse_copy(source: Path, out: Path, ignore_label: int, keep_z=ANNOTATED_Z,
                 first_only_ignored: bool = False) -> Path:
    """``source``'s Decathlon folder with label maps annotated on ``keep_z`` slices only."""
    shutil.copytree(source, out)
    for i, path in enumerate(sorted((out / "labelsTr").glob("*.nii.gz"))):
        image = nib.load(path)
        dense = np.asarray(image.dataobj).astype(np.int32)
        sparse = np.full_like(dense, ignore_label)
        if not (first_only_ignored and i == 0):
            sparse[:, :, list(keep_z)] = dense[:, :, list(keep_z)]
        nib.save(nib.Nifti1Image(sparse.astype(np.int16), image.affine), path)
    return out


def _run(data: Path, run_dir: Path, ignore_label: int | None, exact: bool = False,
         steps: int = 2):
    config = tiny_finetune_config({"data": {"ignore_label": ignore_label, "val_fraction": 0.0},
                                   "train": {"total_steps": steps, "val_every": steps}},
                                  exact=exact)
    return finetune(config, data, run_dir)


def test_the_ignore_value_itself_changes_nothing_in_a_deterministic_run(train_dataset,
                                                                          tmp_path):
    # The same annotation stored with two different ignore values: bit-identical training
    # (the value never leaks into the loss, the crop centres, the padding or the classes):
    # one step (crop, loss, update) and a validation on the sparse maps.
    runs = {}
    for ignore in (255, 40):
        data = _sparse_copy(train_dataset, tmp_path / f"data{ignore}", ignore)
        result = _run(data, tmp_path / f"run{ignore}", ignore, exact=True, steps=1)
        meta = json.loads((result.run_dir / "meta.json").read_text())
        assert meta["num_classes"] == 11  # the ignore value is not a class
        runs[ignore] = (result, load_checkpoint(result.last_checkpoint)["model"])
    (a, weights_a), (b, weights_b) = runs[255], runs[40]
    losses_a = [e.loss for e in a.history if e.kind == "step"]
    losses_b = [e.loss for e in b.history if e.kind == "step"]
    assert losses_a == losses_b and all(np.isfinite(losses_a))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert a.best_dice == b.best_dice and np.isfinite(a.best_dice)


def test_bad_sparse_input_is_one_line_naming_file_and_value(train_dataset, tmp_path):
    # An ignore value in data whose config declares none: outside the declared classes.
    data = _sparse_copy(train_dataset, tmp_path / "undeclared", 255)
    with pytest.raises(VoCoDataError, match=r"labelsTr.*label value 255") as err:
        _run(data, tmp_path / "r1", None)
    assert "\n" not in str(err.value)
    # A map with no annotated voxel.
    data = _sparse_copy(train_dataset, tmp_path / "empty", 255, first_only_ignored=True)
    with pytest.raises(VoCoDataError, match=r"no annotated voxel") as err:
        _run(data, tmp_path / "r2", 255)
    assert "phantom_000" in str(err.value) and "\n" not in str(err.value)


def test_slices_to_sparse_keeps_painted_slices_whole():
    painted = np.zeros((4, 5, 6), dtype=np.uint8)
    painted[1, 2, 3] = 2
    sparse = slices_to_sparse(painted, axis=2, ignore_label=255)
    assert (sparse[:, :, 3] == painted[:, :, 3]).all()  # the whole slice, zeros included
    assert (np.delete(sparse, 3, axis=2) == 255).all()


def test_continue_starts_from_the_parent_network_in_a_new_folder(train_dataset, tmp_path):
    import threading

    from voco_core.plan import plan_continue
    from voco_core.train.finetune import iter_finetune

    data = _sparse_copy(train_dataset, tmp_path / "data", 255)
    parent = _run(data, tmp_path / "round", 255)
    # More labels painted (a corrected round): one more annotated slice.
    data2 = _sparse_copy(train_dataset, tmp_path / "data2", 255, keep_z=(*ANNOTATED_Z, 30))
    plan = plan_continue(parent.run_dir, overrides={"train": {"total_steps": 1}})
    assert plan.run_dir == tmp_path / "round_r2" and plan.initial == parent.best_checkpoint
    assert plan.config.data.ignore_label == 255 and plan.config.data.num_classes == 11
    # Stopped before its first step, the new run's checkpoint is the parent's network,
    # decoder included (not the backbone only).
    stop = threading.Event()
    stop.set()
    events = list(iter_finetune(plan.config, data2, plan.run_dir, initial=plan.initial,
                                stop=stop))
    assert [e.kind for e in events] == ["start", "stopped"]
    assert "continuing from" in events[0].message
    start = load_checkpoint(parent.best_checkpoint)["model"]
    child = load_checkpoint(plan.run_dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(start[k], child[k]) for k in start)
    meta = json.loads((plan.run_dir / "meta.json").read_text())
    assert meta["parent"]["checkpoint"] == str(parent.best_checkpoint)
    assert meta["parent"]["run"] == str(parent.run_dir)
    assert plan_continue(plan.run_dir).run_dir == tmp_path / "round_r3"
    # Continuing needs the parent's classes: another model or class count is refused.
    other = tiny_finetune_config({"data": {"num_classes": 12, "ignore_label": 255}})
    with pytest.raises(VoCoConfigError, match=r"classes \(11\) differ"):
        list(iter_finetune(other, data2, tmp_path / "bad", initial=plan.initial))


def test_continue_from_refuses_other_starts_and_wrong_checkpoints(finetune_run, pretrain_run,
                                                                   train_dataset, capsys):
    from voco_core.cli import main

    status = main(["finetune", "--data", str(train_dataset), "--continue-from",
                   str(finetune_run), "--resume", str(finetune_run)])
    err = capsys.readouterr().err.strip()
    assert status == 1 and err.startswith("voco: error:") and "\n" not in err
    assert "--resume and --continue-from" in err
    status = main(["finetune", "--data", str(train_dataset), "--continue-from",
                   str(pretrain_run)])
    err = capsys.readouterr().err.strip()
    assert status == 1 and "not a napari-voco segmentation checkpoint" in err
    assert "\n" not in err
