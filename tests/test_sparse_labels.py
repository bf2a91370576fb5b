"""Sparse label maps (nnU-Net's ignore label): masked DiceCE, checks, crop centres, Dice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from voco_core.data.sparse import (
    AnnotatedCropIndicesd,
    annotated_mask,
    annotated_slices,
    check_sparse_label,
    class_values,
    holdout_count,
    holdout_slices,
    masked_dice,
    slices_missing_for_holdout,
    slices_to_sparse,
    split_sparse,
)
from voco_core.errors import VoCoConfigError, VoCoDataError
from voco_core.segmentation_loss import MaskedDiceCELoss

IGNORE = 255


def _logits_and_target(shape=(2, 3, 6, 5, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator, dtype=torch.float64).float()
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=generator).float()
    return logits.requires_grad_(True), target


def _value_and_grad(loss_fn, logits, target, *args):
    value = loss_fn(logits, target, *args)
    (grad,) = torch.autograd.grad(value, logits)
    return value.detach(), grad


def _ignore_half(target: torch.Tensor) -> torch.Tensor:
    """Ignore the first half of every crop along X (and a corner of the second)."""
    sparse = target.clone()
    sparse[:, :, : target.shape[2] // 2] = IGNORE
    sparse[:, :, -1, -1, -1] = IGNORE
    return sparse


# --- MaskedDiceCELoss -----------------------------------------------------------------


@pytest.mark.parametrize("ignore_label", [None, IGNORE])
@pytest.mark.parametrize("shape", [(2, 3, 6, 5, 4), (1, 2, 4, 4, 4), (3, 4, 5, 3, 2)])
def test_masked_dicece_equals_monai_when_nothing_is_ignored(shape, ignore_label):
    logits, target = _logits_and_target(shape)
    expected, expected_grad = _value_and_grad(DiceCELoss(to_onehot_y=True, softmax=True),
                                              logits, target)
    value, grad = _value_and_grad(MaskedDiceCELoss(), logits, target, ignore_label)
    assert value.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)


def test_class_balanced_ce_weighs_each_class_by_its_voxel_count():
    """ce_balance a: voxel weights n_c^-a, mean 1 over the annotated voxels; a = 1 makes
    every present class weigh the same in the CE, absent and ignored voxels count not."""
    from voco_core.segmentation_loss import class_balance_weights, masked_cross_entropy_term

    classes = torch.tensor([0] * 90 + [1] * 9 + [2] * 1).view(1, 1, 100, 1, 1)
    mask = torch.ones_like(classes, dtype=torch.float32)
    mask[0, 0, :10] = 0  # ten background voxels ignored
    weights = class_balance_weights(classes, mask, 4, 1.0)
    counts = torch.tensor([80.0, 9.0, 1.0, 0.0])
    assert weights[3] == 0  # absent class
    torch.testing.assert_close(weights[:3] * counts[:3], torch.full((3,), 30.0))  # equal share
    assert (weights * counts).sum() == pytest.approx(counts.sum())  # mean voxel weight 1
    half = class_balance_weights(classes, mask, 4, 0.5)
    assert half[2] / half[0] == pytest.approx((80 / 1) ** 0.5)
    logits = torch.randn(1, 4, 100, 1, 1, generator=torch.Generator().manual_seed(1))
    per_voxel = torch.nn.functional.cross_entropy(logits, classes[:, 0], reduction="none")
    voxel_weights = weights[classes[:, 0]] * mask[:, 0]
    expected = (per_voxel * voxel_weights).sum() / voxel_weights.sum()
    assert masked_cross_entropy_term(logits, classes, mask, 1.0).item() == pytest.approx(
        expected.item(), rel=1e-6)
    # ce_balance 0 and per-crop Dice: MONAI's DiceCE, as before
    plain, target = _logits_and_target()
    assert MaskedDiceCELoss(ce_balance=0.0)(plain, target).item() == pytest.approx(
        DiceCELoss(to_onehot_y=True, softmax=True)(plain, target).item(), abs=1e-6)
    batch = MaskedDiceCELoss(batch_dice=True)(plain, target)
    expected = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(plain, target)
    assert batch.item() == pytest.approx(expected.item(), abs=1e-6)


def test_masked_dicece_on_one_crop_equals_monai_on_its_annotated_voxels():
    """With one crop, the masked loss is MONAI's DiceCE over the annotated voxels alone."""
    logits, target = _logits_and_target((1, 3, 6, 5, 4), seed=3)
    sparse = _ignore_half(target)
    annotated = (sparse != IGNORE)[0, 0]
    kept_logits = logits[0][:, annotated][None, :, :, None, None]  # (1, C, N, 1, 1)
    kept_target = sparse[0][:, annotated][None, :, :, None, None]
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(kept_logits, kept_target)
    value = MaskedDiceCELoss()(logits, sparse, IGNORE)
    assert value.item() == pytest.approx(expected.item(), abs=1e-6)


def test_labels_under_ignored_voxels_change_nothing_and_get_zero_gradient():
    logits, target = _logits_and_target()
    sparse = _ignore_half(target)
    value, grad = _value_and_grad(MaskedDiceCELoss(), logits, sparse, IGNORE)
    ignored = (sparse == IGNORE).expand_as(logits)
    assert ignored.any() and (~ignored).any()
    assert torch.all(grad[ignored] == 0), "ignored voxels' logits must get exactly zero gradient"
    assert grad[~ignored].abs().sum() > 0

    # Other values under the ignored voxels (another ignore code, 7): the same loss
    # and gradients, bit for bit.
    recoded = sparse.masked_fill(sparse == IGNORE, 7)
    recoded_value, recoded_grad = _value_and_grad(MaskedDiceCELoss(), logits, recoded, 7)
    assert recoded_value.item() == value.item()
    assert torch.equal(recoded_grad, grad)

    # Logits under ignored voxels do not matter either.
    scrambled = logits.detach().clone()
    scrambled[ignored] = torch.randn(int(ignored.sum()))
    assert MaskedDiceCELoss()(scrambled, sparse, IGNORE).item() == pytest.approx(value.item(),
                                                                                 abs=1e-6)


def test_a_crop_with_no_annotated_voxel_is_finite_and_gets_no_gradient():
    logits, target = _logits_and_target((2, 3, 6, 5, 4))
    sparse = target.clone()
    sparse[0] = IGNORE
    value, grad = _value_and_grad(MaskedDiceCELoss(), logits, sparse, IGNORE)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert torch.all(grad[0] == 0) and grad[1].abs().sum() > 0

    all_ignored = torch.full_like(target, IGNORE)
    value, grad = _value_and_grad(MaskedDiceCELoss(), logits, all_ignored, IGNORE)
    assert value.item() == 0.0 and torch.all(grad == 0)


def test_masked_dicece_takes_integer_targets_and_bf16_logits():
    logits, target = _logits_and_target()
    sparse = _ignore_half(target)
    as_float = MaskedDiceCELoss()(logits, sparse, IGNORE)
    as_int = MaskedDiceCELoss()(logits, sparse.to(torch.int16), IGNORE)
    assert as_int.item() == as_float.item()
    low = MaskedDiceCELoss()(logits.detach().bfloat16(), sparse, IGNORE)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(as_float.item(), abs=2e-2)


def test_masked_dicece_refuses_a_target_of_the_wrong_shape():
    logits, target = _logits_and_target()
    with pytest.raises(ValueError, match=r"target must be \(B, 1, \*spatial\)"):
        MaskedDiceCELoss()(logits, target[:, :, :-1], None)


# --- annotated_mask, slices_to_sparse ----------------------------------------------------


def test_annotated_mask_for_arrays_and_tensors():
    label = np.array([[0, 1, IGNORE], [2, IGNORE, 0]], dtype=np.uint8)
    assert annotated_mask(label, IGNORE).tolist() == [[True, True, False], [True, False, True]]
    assert annotated_mask(label, None).all() and annotated_mask(label, None).dtype == bool
    tensor = annotated_mask(torch.as_tensor(label), IGNORE)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.bool
    assert tensor.tolist() == annotated_mask(label, IGNORE).tolist()
    assert annotated_mask(torch.as_tensor(label), None).all()
    assert class_values(np.array([0, 1, 2, IGNORE]), IGNORE).tolist() == [0, 1, 2]
    assert class_values(np.array([0, 1, IGNORE]), None).tolist() == [0, 1, IGNORE]


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_slices_to_sparse_keeps_painted_slices_and_ignores_the_rest(axis):
    labels = np.zeros((5, 6, 7), dtype=np.uint8)
    painted = [1, 3]
    for index, value in zip(painted, (1, 2), strict=True):
        slab = [slice(None)] * 3
        slab[axis] = index
        labels[tuple(slab)][0, 0] = value  # one painted voxel makes the whole slice count
    before = labels.copy()
    sparse = slices_to_sparse(labels, axis, IGNORE)

    assert np.array_equal(labels, before), "the input must not change"
    assert sparse.shape == labels.shape and sparse.dtype == np.uint8
    expected_slices = np.zeros(labels.shape[axis], dtype=bool)
    expected_slices[painted] = True
    assert annotated_slices(labels, axis).tolist() == expected_slices.tolist()
    moved, source = np.moveaxis(sparse, axis, 0), np.moveaxis(labels, axis, 0)
    for index in range(labels.shape[axis]):
        if index in painted:
            assert np.array_equal(moved[index], source[index])  # zeros stay background
            assert (moved[index] == 0).sum() == moved[index].size - 1
        else:
            assert np.all(moved[index] == IGNORE)


def test_slices_to_sparse_widens_the_dtype_and_refuses_bad_ignore_values():
    labels = np.zeros((3, 4, 4), dtype=np.uint8)
    labels[1, 2, 2] = 3
    sparse = slices_to_sparse(labels, 0, 300)
    assert sparse.dtype == np.uint16
    assert sparse[0].tolist() == np.full((4, 4), 300).tolist() and sparse[1, 2, 2] == 3
    assert np.all(slices_to_sparse(np.zeros((2, 2, 2), np.uint8), 1, IGNORE) == IGNORE)
    with pytest.raises(VoCoConfigError, match="ignore_label 3 is a painted value"):
        slices_to_sparse(labels, 0, 3)
    with pytest.raises(VoCoConfigError, match="ignore_label must be a whole number >= 0"):
        slices_to_sparse(labels, 0, -1)
    with pytest.raises(VoCoConfigError, match=r"axis must be one of 0\.\.2"):
        slices_to_sparse(labels, 3, IGNORE)


def test_slices_to_sparse_takes_the_annotated_slices_when_given():
    labels = np.zeros((5, 4, 4), dtype=np.uint8)
    labels[1, 0, 0] = labels[3, 1, 1] = 2  # painted: 1 and 3
    # reviewed: 1 and 4 (4 accepted as all background); 3 holds an unreviewed copy
    for annotated in ([1, 4], np.array([False, True, False, False, True])):
        sparse = slices_to_sparse(labels, 0, IGNORE, annotated)
        np.testing.assert_array_equal(sparse[1], labels[1])
        assert (sparse[4] == 0).all() and (sparse[[0, 2, 3]] == IGNORE).all()
    with pytest.raises(VoCoConfigError, match=r"0\.\.4"):
        slices_to_sparse(labels, 0, IGNORE, [5])
    with pytest.raises(VoCoConfigError, match="5 entries"):
        slices_to_sparse(labels, 0, IGNORE, np.ones(4, bool))


# --- holding out annotated slices for validation --------------------------------------------


def _held(annotated, size=48, **kwargs) -> list[int]:
    mask = np.zeros(size, bool)
    mask[list(annotated)] = True
    return np.flatnonzero(holdout_slices(mask, **kwargs)).tolist()


def test_holdout_rule_every_4th_at_least_one_from_3_annotated_slices():
    assert [holdout_count(n) for n in range(13)] == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert [slices_missing_for_holdout(n) for n in range(5)] == [3, 2, 1, 0, 0]
    assert _held([]) == [] and _held([20]) == [] and _held([20, 40]) == []
    assert _held([20, 30, 40]) == [30]  # never the first or the last annotated slice
    assert _held([10, 20, 30, 40]) == [30]
    assert _held([10, 20, 30, 40, 45]) == [30]
    assert _held(range(0, 48, 6)) == [12, 36]  # 8 annotated: 2, evenly spread
    assert _held(range(0, 48, 4)) == [8, 24, 40]  # 12 annotated: 3
    # indices work as well as masks; the result is a mask of the slices
    assert np.flatnonzero(holdout_slices([20, 30, 40], 48)).tolist() == [30]
    with pytest.raises(VoCoConfigError, match="k >= 2"):
        holdout_slices([1, 2, 3], 8, every=1)


def test_holdout_prefers_slices_with_a_structure_and_is_sticky_across_rounds():
    # an accepted background-only slice has no Dice: a slice with a structure is preferred
    assert _held([10, 20, 30], foreground=[10, 20]) == [20]
    assert _held([10, 20, 30], foreground=[10, 30]) == [30]  # spread over [10, 30]
    assert _held([10, 20, 30], foreground=[]) == [20]  # none with a structure: the rule
    # round 2: the slice held out before stays held out as new slices come
    assert _held([10, 20, 30, 40], keep=[20]) == [20]
    assert _held(range(0, 48, 6), keep=[18]) == [18, 24]
    # slices a previous round trained on are not held out later (the network saw them)
    assert _held([10, 20, 30], exclude=[10, 20]) == [30]
    assert _held([10, 20, 30], exclude=[10, 20, 30]) == []
    # a kept slice that is no longer annotated is dropped; two slices always train
    assert _held([10, 20, 30], keep=[5]) == [20]
    assert _held([10, 20], keep=[10]) == []


def test_split_sparse_makes_disjoint_training_and_validation_maps():
    labels = np.zeros((6, 3, 3), dtype=np.uint8)
    labels[[1, 2, 4], 1, 1] = [1, 2, 1]
    train, val = split_sparse(labels, 0, IGNORE, annotated=[1, 2, 3, 4], held_out=[2])
    np.testing.assert_array_equal(train[[1, 3, 4]], labels[[1, 3, 4]])  # 3: all background
    assert (train[[0, 2, 5]] == IGNORE).all()
    np.testing.assert_array_equal(val[2], labels[2])
    assert (np.delete(val, 2, axis=0) == IGNORE).all()
    assert not ((train != IGNORE) & (val != IGNORE)).any()  # no voxel in both
    train, val = split_sparse(labels, 0, IGNORE)  # default: painted slices, none held out
    assert val is None
    np.testing.assert_array_equal(train, slices_to_sparse(labels, 0, IGNORE))
    along_2, _ = split_sparse(np.moveaxis(labels, 0, 2), 2, IGNORE, [1, 2, 3, 4], [2])
    np.testing.assert_array_equal(np.moveaxis(along_2, 2, 0), split_sparse(
        labels, 0, IGNORE, [1, 2, 3, 4], [2])[0])
    with pytest.raises(VoCoConfigError, match="not annotated"):
        split_sparse(labels, 0, IGNORE, annotated=[1, 2], held_out=[3])


# --- check_sparse_label --------------------------------------------------------------------


def _error(path, values, num_classes, ignore_label) -> str:
    with pytest.raises(VoCoDataError) as caught:
        check_sparse_label(path, np.array(values), num_classes, ignore_label)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    assert caught.value.path == path
    return message


def test_check_sparse_label_accepts_classes_and_the_ignore_value(tmp_path):
    check_sparse_label(tmp_path / "a.nii.gz", np.array([0, 1, 2, IGNORE]), 3, IGNORE)
    check_sparse_label(tmp_path / "a.nii.gz", np.array([0, IGNORE]), 3, IGNORE)  # background only
    check_sparse_label(tmp_path / "a.nii.gz", np.array([0, 1, 2]), 3, IGNORE)  # dense is fine
    check_sparse_label(tmp_path / "a.nii.gz", np.array([0, 1, 2]), 3, None)
    check_sparse_label(tmp_path / "a.nii.gz", np.array([0, 3]), 3, 3)  # ignore = num_classes


def test_check_sparse_label_errors_name_the_file_and_the_value(tmp_path):
    path = tmp_path / "case_007.nii.gz"
    message = _error(path, [IGNORE], 3, IGNORE)
    assert "no annotated voxel" in message and str(IGNORE) in message
    message = _error(path, [0, 1, 2], 3, 2)
    assert "data.ignore_label 2 is one of the declared classes 0..2" in message
    message = _error(path, [0, 1, 7, IGNORE], 3, IGNORE)
    assert "label value 7" in message and "ignore_label 255" in message
    # No ignore label declared: the dense class-range rule, unchanged.
    message = _error(path, [0, 1, IGNORE], 3, None)
    assert f"label value {IGNORE} is outside the declared classes 0..2" in message


# --- AnnotatedCropIndicesd -----------------------------------------------------------------


def _slab_volume(shape=(24, 24, 24), slab=(10, 14)):
    """Image = voxel coordinates (3 channels); label annotated in one Z slab only."""
    coordinates = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape],
                                             indexing="ij")).float()
    label = torch.full((1, *shape), float(IGNORE))
    label[0, :, :, slab[0]:slab[1]] = 0
    label[0, 5:12, 5:12, slab[0]:slab[1]] = 1
    return {"image": coordinates, "label": label}


def _crop_centres(crop, volume, roi=8) -> np.ndarray:
    """Voxel coordinates of each crop's centre (MONAI starts a crop at centre - roi // 2)."""
    crop.set_random_state(0)
    return np.array([c["image"][:, roi // 2, roi // 2, roi // 2].numpy() for c in crop(volume)]
                    ).astype(int)


def test_annotated_crop_indices_centre_crops_on_annotated_voxels_only():
    volume = _slab_volume()
    label = volume["label"][0]
    indexed = AnnotatedCropIndicesd("label", IGNORE, "fg", "bg")(volume)
    flat = label.flatten()
    assert set(flat[indexed["fg"]].tolist()) == {1.0}
    assert set(flat[indexed["bg"]].tolist()) == {0.0}
    assert len(indexed["fg"]) + len(indexed["bg"]) == int((label != IGNORE).sum())

    keys = ("image", "label")
    crop = mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=(8, 8, 8), pos=1,
                                     neg=1, num_samples=100, fg_indices_key="fg",
                                     bg_indices_key="bg")
    centres = _crop_centres(crop, indexed)
    centre_labels = label[tuple(centres.T)]
    assert torch.all(centre_labels != IGNORE), "a crop centred on an ignored voxel"
    assert {0.0, 1.0} <= set(centre_labels.tolist())  # both positive and negative centres

    # Without the indices, MONAI takes the ignore value for foreground: the test has teeth.
    plain = mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=(8, 8, 8), pos=1,
                                      neg=1, num_samples=100)
    assert torch.any(label[tuple(_crop_centres(plain, volume).T)] == IGNORE)


def test_annotated_crop_indices_respect_the_image_threshold_and_dense_maps():
    volume = _slab_volume()
    volume["image"] = volume["image"][2:3] - 11.5  # one channel, > 0 from Z = 12 on
    indexed = AnnotatedCropIndicesd("label", IGNORE, "fg", "bg", image_key="image")(volume)
    z = lambda indices: np.unravel_index(indices.numpy(), (24, 24, 24))[2]  # noqa: E731
    assert set(z(indexed["bg"]).tolist()) == {12, 13}
    assert set(z(indexed["fg"]).tolist()) == {10, 11, 12, 13}  # like MONAI: fg not thresholded

    dense = {"label": MetaTensor(torch.randint(0, 3, (1, 6, 6, 6)).float())}  # as pre-processed
    indexed = AnnotatedCropIndicesd("label", None)(dense)
    assert len(indexed["fg_indices"]) == int((dense["label"] > 0).sum())
    assert len(indexed["bg_indices"]) == int((dense["label"] == 0).sum())


# --- masked_dice ---------------------------------------------------------------------------


def test_masked_dice_equals_monai_compute_dice_when_nothing_is_ignored():
    generator = torch.Generator().manual_seed(1)
    truth = torch.randint(0, 4, (2, 1, 6, 6, 6), generator=generator)
    truth[1][truth[1] == 3] = 0  # class 3 absent from the second case: NaN
    prediction = torch.randint(0, 4, (2, 1, 6, 6, 6), generator=generator)
    expected = compute_dice(one_hot(prediction, 4), one_hot(truth, 4), include_background=False,
                            ignore_empty=True)
    for ignore_label in (None, IGNORE):
        dice = masked_dice(prediction, truth.float(), 4, ignore_label)
        assert dice.shape == (2, 3)
        torch.testing.assert_close(dice, expected, equal_nan=True, atol=0, rtol=0)
    assert torch.isnan(expected[1, 2])


def test_masked_dice_counts_annotated_voxels_only():
    truth = torch.zeros(1, 1, 4, 4, 4)
    truth[0, 0, :2, :2] = 1  # class 1 in the annotated half
    truth[0, 0, 2:] = IGNORE
    prediction = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    prediction[0, 0, :2, :2] = 1
    prediction[0, 0, 2:] = 2  # anything under ignored voxels is not counted
    dice = masked_dice(prediction, truth, 3, IGNORE)
    assert dice[0, 0].item() == 1.0
    assert torch.isnan(dice[0, 1])  # class 2 predicted only where nothing is annotated

    prediction[0, 0, 0, 0, :2] = 0  # miss 2 of the 16 annotated class-1 voxels
    assert masked_dice(prediction, truth, 3, IGNORE)[0, 0].item() == pytest.approx(2 * 14 / 30)


def test_annotated_crop_indices_without_ignore_label_crop_exactly_like_monai():
    """Dense maps: the same crops as MONAI's own indices, so the transform can always run."""
    generator = torch.Generator().manual_seed(2)
    volume = {"image": MetaTensor(torch.rand(1, 20, 20, 12, generator=generator) - 0.3),
              "label": MetaTensor((torch.rand(1, 20, 20, 12, generator=generator) > 0.9).float())}
    keys, roi = ("image", "label"), (8, 8, 8)
    plain = mt.Compose([mt.RandCropByPosNegLabeld(keys, label_key="label", image_key="image",
                                                  spatial_size=roi, pos=1, neg=1,
                                                  num_samples=6, image_threshold=0)])
    indexed = mt.Compose([
        AnnotatedCropIndicesd("label", None, image_key="image", image_threshold=0),
        mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=roi, pos=1, neg=1,
                                  num_samples=6, fg_indices_key="fg_indices",
                                  bg_indices_key="bg_indices")])
    plain.set_random_state(5)  # a Compose seeds only its random steps: the same seeds
    indexed.set_random_state(5)
    for expected, crop in zip(plain(volume), indexed(volume), strict=True):
        assert torch.equal(crop["image"], expected["image"])
        assert torch.equal(crop["label"], expected["label"])
