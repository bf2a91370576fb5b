"""Inference: label maps back on the source grid, positions vs geometry, the CLI."""

from __future__ import annotations

import copy
import json
import re
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from voco_core.cli import main
from voco_core.data.io import VolumeRecord, read_volume
from voco_core.data.segmentation import seg_transforms, to_meta_tensor
from voco_core.errors import VoCoDataError
from voco_core.geometry import base_crop_grid, overlap_labels
from voco_core.inference import (
    InferenceCancelled,
    base_crop_boxes,
    load_position_model,
    load_segmenter,
    positions,
    prepare_volume,
    segment,
)

from conftest import TEST_SWIN_SETS, save_nifti, tiny_finetune_config


def _reoriented(record: VolumeRecord) -> VolumeRecord:
    """The same volume stored as S-L-A (axis 0 flipped, then axes permuted): a non-RAS,
    anisotropic file of the same anatomy in the same world position."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, record.shape[0] - 1
    permute = np.zeros((4, 4))
    permute[0, 1] = permute[1, 2] = permute[2, 0] = permute[3, 3] = 1
    affine = record.affine @ flip @ permute
    array = np.ascontiguousarray(record.array[::-1].transpose(2, 0, 1))
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return VolumeRecord(array, affine, spacing)


@pytest.fixture(scope="module")
def anisotropic_pair(train_dataset, tmp_path_factory):
    """A phantom image + label pair with 2.5 x 2.0 x 3.5 mm voxels, stored non-RAS."""
    from voco_core.data.phantoms import make_phantom

    out = tmp_path_factory.mktemp("aniso")
    phantom = make_phantom(seed=3, shape=(56, 64, 40), spacing=(2.5, 2.0, 3.5))
    image = VolumeRecord(phantom.image, phantom.affine, (2.5, 2.0, 3.5))
    label = VolumeRecord(phantom.label, phantom.affine, (2.5, 2.0, 3.5))
    image, label = _reoriented(image), _reoriented(label)
    assert "".join(nib.aff2axcodes(image.affine)) != "RAS"
    save_nifti(out / "image.nii.gz", image.array, image.affine)
    save_nifti(out / "label.nii.gz", label.array, label.affine)
    return read_volume(out / "image.nii.gz"), read_volume(out / "label.nii.gz")


@pytest.mark.parametrize("spacing", [None, (1.25, 1.0, 1.75), (1.0, 1.0, 1.0)])
def test_label_map_comes_back_voxel_identical_through_preprocess_and_inverse(
        anisotropic_pair, spacing):
    image, label = anisotropic_pair
    config = tiny_finetune_config({"data": {"spacing": spacing}})
    pre = seg_transforms(config.data)
    out = pre({"image": to_meta_tensor(image), "label": to_meta_tensor(label)})
    assert out["label"].shape[1:] != label.shape  # really re-oriented / resampled / cropped
    prediction = MetaTensor(out["label"].as_tensor().clone(), meta=copy.deepcopy(out["label"].meta))
    prediction.applied_operations = copy.deepcopy(out["label"].applied_operations)
    inverted = mt.Invertd("pred", transform=pre, orig_keys="label", nearest_interp=True)(
        {**out, "pred": prediction})["pred"]
    np.testing.assert_array_equal(np.asarray(inverted[0]).astype(label.array.dtype), label.array)


def test_segment_returns_the_source_grid_whatever_the_storage_order(finetune_run, train_dataset):
    record = read_volume(train_dataset / "imagesTr" / "phantom_000.nii.gz")
    segmenter = load_segmenter(finetune_run, device="cpu")
    fractions: list[float] = []
    result = segment(record, segmenter, progress=fractions.append)
    assert result.labels.shape == record.shape and result.labels.dtype == np.uint8
    assert fractions[-1] == 1.0 and all(np.diff(fractions) >= 0)
    assert result.class_names[1] == "body"
    # The same anatomy stored S-L-A gives the same labels, stored S-L-A.
    stored_sla = segment(_reoriented(record), segmenter)
    np.testing.assert_array_equal(stored_sla.labels.transpose(1, 2, 0)[::-1], result.labels)
    with_probabilities = segment(record, segmenter, probabilities=True)
    probabilities = with_probabilities.probabilities
    assert probabilities.shape == (11, *record.shape)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-3)


def test_segment_can_be_cancelled(finetune_run, train_dataset):
    stop = threading.Event()
    stop.set()
    with pytest.raises(InferenceCancelled):
        segment(train_dataset / "imagesTr" / "phantom_000.nii.gz", finetune_run, device="cpu",
                stop=stop)


def test_checkpoints_of_the_other_kind_are_refused(finetune_run, pretrain_run):
    with pytest.raises(VoCoDataError, match="pretraining checkpoint"):
        load_segmenter(pretrain_run, device="cpu")
    with pytest.raises(VoCoDataError, match="not a napari-voco pretraining checkpoint"):
        load_position_model(finetune_run, device="cpu")


def test_positions_true_overlap_equals_the_geometry_labels(pretrain_run, train_dataset):
    model = load_position_model(pretrain_run, device="cpu")
    image = read_volume(train_dataset / "imagesTr" / "phantom_001.nii.gz")
    result = positions(image, model, n=6, seed=4)
    grid = base_crop_grid(model.config.data.target_size, model.config.geometry.grid_size)
    np.testing.assert_array_equal(result.true, overlap_labels(result.sample_boxes, grid))
    np.testing.assert_allclose(result.true.sum(axis=1), 1.0, atol=1e-6)
    assert result.predicted.shape == (6, 4) and (result.predicted >= 0).all()
    assert (result.predicted <= 1 + 1e-6).all()
    # A box's prediction does not depend on the other boxes of the call (the head's
    # BatchNorm sees the base crops and that one sub-volume).
    alone = positions(image, model, boxes=result.boxes[:1])
    np.testing.assert_allclose(alone.predicted[0], result.predicted[0], atol=1e-5)
    # Boxes given back in image coordinates select the same sub-volumes and predictions.
    again = positions(image, model, boxes=result.boxes)
    np.testing.assert_array_equal(again.sample_boxes, result.sample_boxes)
    np.testing.assert_allclose(again.predicted, result.predicted, atol=1e-5)


def test_base_crop_boxes_tile_the_foreground_in_image_coordinates(pretrain_run, train_dataset):
    model = load_position_model(pretrain_run, device="cpu")
    image = read_volume(train_dataset / "imagesTr" / "phantom_001.nii.gz")
    prepared = prepare_volume(image, model)
    boxes = base_crop_boxes(prepared, model)
    assert boxes.shape == (4, 3, 2)
    # The sample is the foreground box resized: the base crops' union is that box.
    low, high = boxes[..., 0].min(axis=0), boxes[..., 1].max(axis=0)
    assert (low >= 0).all() and (high <= np.array(image.shape)).all()
    np.testing.assert_allclose(boxes[:, 2], [[low[2], high[2]]] * 4)  # full depth
    # 2 x 2 grid: two distinct x intervals meeting in the middle, same for y.
    xs, ys = np.unique(boxes[:, 0], axis=0), np.unique(boxes[:, 1], axis=0)
    assert len(xs) == len(ys) == 2 and xs[0, 1] == pytest.approx(xs[1, 0])
    # Mapping back gives exactly the grid.
    grid = base_crop_grid(model.config.data.target_size, 2)
    np.testing.assert_array_equal(prepared.boxes_to_sample(boxes), grid)


def test_cross_volume_positions_take_base_crops_from_another_subject(pretrain_run,
                                                                      train_dataset):
    model = load_position_model(pretrain_run, device="cpu")
    a = read_volume(train_dataset / "imagesTr" / "phantom_000.nii.gz")
    b = read_volume(train_dataset / "imagesTr" / "phantom_002.nii.gz")
    same = positions(a, model, n=4, seed=1)
    cross = positions(a, model, n=4, seed=1, base_volume=b)
    np.testing.assert_array_equal(cross.true, same.true)  # labels from grid coordinates
    assert not np.allclose(cross.predicted, same.predicted)


def test_cli_finetune_predict_positions_end_to_end(train_dataset, pretrain_run, tmp_path,
                                                    capsys):
    run = tmp_path / "ft"
    assert main(["finetune", "--data", str(train_dataset), "--out", str(run), "--preset", "tiny",
                 "--steps", "1", "--device", "cpu", "--pretrained", str(pretrain_run),
                 "--set", "train.val_every=1", "--set", "train.samples_per_volume=1",
                 *TEST_SWIN_SETS]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "napari-voco pretraining checkpoint (student)): loaded" in printed
    assert "finished at step 1/1" in printed
    # the progress bar shows the validation Dice once it is known, never "nan"
    assert "val_dice=" in captured.err and "best_dice=nan" not in captured.err

    source = train_dataset / "imagesTr" / "phantom_002.nii.gz"
    assert main(["predict", "--checkpoint", str(run), "--input", str(source), "--out",
                 str(tmp_path / "pred"), "--device", "cpu"]) == 0
    assert "% of windows" in capsys.readouterr().err  # progress while it runs
    written = nib.load(tmp_path / "pred" / "phantom_002_seg.nii.gz")
    np.testing.assert_allclose(written.affine, nib.load(source).affine)
    assert written.shape == nib.load(source).shape and written.get_data_dtype() == np.uint8

    assert main(["positions", "--checkpoint", str(pretrain_run), "--input", str(source),
                 "--n", "5", "--out", str(tmp_path / "pos"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "pos" / "phantom_002_positions.json").read_text())
    assert len(report["sub_volumes"]) == 5 and report["chance_top1"] == 0.25
    assert (tmp_path / "pos" / "phantom_002_positions.png").stat().st_size > 0


def test_cli_errors_are_one_line(finetune_run, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(finetune_run), "--input",
                 str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "no NIfTI files" in capsys.readouterr().err
    image = save_nifti(tmp_path / "image.nii.gz", np.zeros((8, 8, 8), np.int16))
    assert main(["predict", "--checkpoint", str(tmp_path / "missing"), "--input",
                 str(image), "--out", str(tmp_path / "o")]) == 1
    assert "checkpoint or run folder not found" in capsys.readouterr().err
    assert main(["positions", "--checkpoint", str(finetune_run), "--input",
                 str(tmp_path / "x.nii.gz"), "--out", str(tmp_path / "o")]) == 1
    assert "voco: error:" in capsys.readouterr().err


def _damaged_copy(run: Path, out: Path, name: str, key: str, damage) -> Path:
    """The run's checkpoint ``name`` with ``damage(state[key])`` applied, saved to ``out``."""
    state = torch.load(run / "checkpoints" / name, weights_only=True)
    damage(state[key])
    torch.save(state, out)
    return out


def _first_weight(weights: dict) -> str:
    return next(name for name, value in weights.items() if value.ndim == 2)


@pytest.mark.parametrize("fault", ["missing", "shape"])
def test_damaged_checkpoint_weights_are_one_line_errors(finetune_run, pretrain_run, tmp_path,
                                                         capsys, fault):
    def damage(weights: dict) -> None:
        name = _first_weight(weights)
        if fault == "missing":
            del weights[name]
        else:
            weights[name] = weights[name][:, :-1].clone()

    seg = _damaged_copy(finetune_run, tmp_path / "seg.pt", "best.pt", "model", damage)
    pre = _damaged_copy(pretrain_run, tmp_path / "pre.pt", "last.pt", "student", damage)
    seg_name = _first_weight(torch.load(finetune_run / "checkpoints" / "best.pt",
                                        weights_only=True)["model"])
    pre_name = _first_weight(torch.load(pretrain_run / "checkpoints" / "last.pt",
                                        weights_only=True)["student"])
    shape = r"has shape \(\d+, \d+\), expected \(\d+, \d+\)"
    expected = {
        "missing": (re.escape(f"{seg}: entry 'model': weight '{seg_name}' is missing"),
                    re.escape(f"{pre}: entry 'student': weight '{pre_name}' is missing")),
        "shape": (re.escape(f"{seg}: entry 'model': weight '{seg_name}' ") + shape,
                  re.escape(f"{pre}: entry 'student': weight '{pre_name}' ") + shape),
    }[fault]
    with pytest.raises(VoCoDataError, match=expected[0]):
        load_segmenter(seg, device="cpu")
    with pytest.raises(VoCoDataError, match=expected[1]):
        load_position_model(pre, device="cpu")

    image = save_nifti(tmp_path / "image.nii.gz", np.zeros((48, 48, 32), np.int16))
    for command, checkpoint, pattern in (("predict", seg, expected[0]),
                                         ("positions", pre, expected[1])):
        assert main([command, "--checkpoint", str(checkpoint), "--input", str(image),
                     "--out", str(tmp_path / "o"), "--device", "cpu"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("voco: error: "), err
        assert re.search(pattern, err), err


def test_checkpoint_without_config_or_weights_is_one_line(pretrain_run, tmp_path):
    state = torch.load(pretrain_run / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**state, "student": None}, tmp_path / "no_student.pt")
    with pytest.raises(VoCoDataError, match="missing key 'student'"):
        load_position_model(tmp_path / "no_student.pt", device="cpu")
    torch.save({**state, "config": {**state["config"], "optim": {"lr": -1}}},
               tmp_path / "bad_config.pt")
    with pytest.raises(VoCoDataError, match=r"bad_config.pt: the configuration stored in it "
                                            r"is invalid: optim.lr = -1"):
        load_position_model(tmp_path / "bad_config.pt", device="cpu")
