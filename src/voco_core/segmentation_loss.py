r"""DiceCE over annotated voxels only: the finetuning loss for sparse label maps.

Sparse labels follow nnU-Net's ignore-label convention: one integer above the
classes (``data.ignore_label``, e.g. 255 or ``num_classes``) marks voxels that
carry no label; everywhere else the label map is as usual (0 = background). The
ignore value is not a class: the network has no output for it and it takes no
part in either term below.

Shapes: ``B`` crops, ``C`` classes (background included), ``V`` voxels per crop
(``X * Y * Z``); ``z`` the logits ``(B, C, X, Y, Z)``, ``p = softmax_C(z)``, ``g``
the one-hot target, ``m`` the annotated mask ``(B, 1, X, Y, Z)`` (1 = labelled,
0 = ignored). With nothing ignored (``m = 1``) the loss is exactly MONAI's
``DiceCELoss(to_onehot_y=True, softmax=True)`` with its defaults::

    dice_bc = 1 - (2 sum_v m p g + 1e-5) / (sum_v m p + sum_v m g + 1e-5)
    L_dice  = mean_{b,c} dice_bc
    L_ce    = - sum_{b,v} m log p_{target} / sum_{b,v} m
    L       = L_dice + L_ce

Class balance (``ce_balance = a > 0``, the ``tiny`` preset's default): the CE voxel
weights become ``w_c = n_c^-a`` for the ``n_c`` annotated voxels of class ``c`` in
the batch, rescaled so that the mean voxel weight is 1 (``a = 0``: plain CE above;
``a = 1``: every class present weighs the same). ``batch_dice``: each class's sums
run over the whole batch before the ratio (one Dice per class, not per crop).
Without them, small organs (0.1-0.5% of the voxels) carry ~20x less gradient than
the liver and stayed at Dice 0 for hundreds of steps on the phantoms.

Ignored voxels are multiplied out of every sum, so changing the label under
them changes nothing, and their logits get exactly zero gradient. A crop with
no annotated voxel gives ``dice_bc = 0`` for every class (the smoothing terms
alone) and no gradient; a batch with no annotated voxel at all gives 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from monai.networks.utils import one_hot
from torch import nn


def annotated_target(target: torch.Tensor, ignore_label: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a sparse label map into (class indices, annotated mask).

    ``target`` ``(B, 1, X, Y, Z)``, whole numbers in any dtype. Returns the class
    indices ``(B, 1, X, Y, Z)`` int64 with ignored voxels set to 0 (any valid class
    would do: the mask removes them), and the mask ``(B, 1, X, Y, Z)`` in the
    target's floating dtype (float32 for integer targets), 1 where annotated.
    """
    labels = target.round().long() if target.is_floating_point() else target.long()
    dtype = target.dtype if target.is_floating_point() else torch.float32
    if ignore_label is None:
        return labels, torch.ones_like(labels, dtype=dtype)
    annotated = labels != ignore_label
    return labels.where(annotated, 0), annotated.to(dtype)


def masked_dice_term(logits: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor,
                     dice: MaskedDiceLoss) -> torch.Tensor:
    """``L_dice``: soft Dice of ``softmax(logits)`` against the one-hot ``classes``,
    each class's intersection and sums taken over annotated voxels only.

    ``logits (B, C, X, Y, Z)``, ``classes``/``mask`` ``(B, 1, X, Y, Z)``; returns a
    scalar. MONAI's :class:`~monai.losses.MaskedDiceLoss` applies the softmax and
    then multiplies probabilities and target by the mask; the target is one-hot
    encoded here, before masking, so an ignored voxel is all-zero in every channel
    (letting MONAI one-hot a masked label map would make it background).
    """
    return dice(logits, one_hot(classes, logits.shape[1], dtype=logits.dtype), mask)


def class_balance_weights(classes: torch.Tensor, mask: torch.Tensor, num_classes: int,
                          power: float) -> torch.Tensor:
    """``(C,)`` CE weights ``n_c^-power`` over the batch's annotated voxels (0 for an
    absent class), scaled so that the mean weight of an annotated voxel is 1."""
    counts = torch.bincount(classes[mask > 0], minlength=num_classes).to(mask.dtype)
    weights = torch.where(counts > 0, counts.clamp_min(1.0) ** -power, torch.zeros_like(counts))
    return weights * counts.sum() / (weights * counts).sum().clamp_min(1e-12)


def masked_cross_entropy_term(logits: torch.Tensor, classes: torch.Tensor,
                              mask: torch.Tensor, balance: float = 0.0) -> torch.Tensor:
    """``L_ce``: cross-entropy averaged over the annotated voxels of the whole batch,
    each voxel weighted by its class's :func:`class_balance_weights` when
    ``balance > 0``.

    ``logits (B, C, X, Y, Z)``, ``classes``/``mask`` ``(B, 1, X, Y, Z)``; returns a
    scalar, 0 when no voxel is annotated (the sum is empty, not undefined).
    """
    per_voxel = F.cross_entropy(logits, classes[:, 0], reduction="none")  # (B, X, Y, Z)
    weight = mask[:, 0].to(per_voxel.dtype)
    if balance > 0:
        weight = weight * class_balance_weights(classes, mask, logits.shape[1],
                                                balance)[classes[:, 0]].to(per_voxel.dtype)
    return (per_voxel * weight).sum() / weight.sum().clamp_min(1.0)


class MaskedDiceCELoss(nn.Module):
    """DiceCE (softmax, one-hot target) over annotated voxels; see the module docstring.

    ``loss(logits (B, C, X, Y, Z), target (B, 1, X, Y, Z), ignore_label)`` -> scalar.
    ``ignore_label`` ``None``: every voxel is annotated, and the value equals
    ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``. Computed in
    float32 whatever the autocast dtype (the sums run over ~10^6 voxels).
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, ce_balance: float = 0.0,
                 batch_dice: bool = False):
        super().__init__()
        self.lambda_dice, self.lambda_ce, self.ce_balance = lambda_dice, lambda_ce, ce_balance
        self.dice = MaskedDiceLoss(include_background=True, softmax=True, smooth_nr=smooth_nr,
                                   smooth_dr=smooth_dr, batch=batch_dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                ignore_label: int | None = None) -> torch.Tensor:
        if target.shape[1] != 1 or target.shape[0] != logits.shape[0] or (
                target.shape[2:] != logits.shape[2:]):
            raise ValueError(f"target must be (B, 1, *spatial) matching logits "
                             f"{tuple(logits.shape)}, got {tuple(target.shape)}")
        logits = logits.float()
        classes, mask = annotated_target(target, ignore_label)
        mask = mask.to(logits.dtype)
        return (self.lambda_dice * masked_dice_term(logits, classes, mask, self.dice)
                + self.lambda_ce * masked_cross_entropy_term(logits, classes, mask,
                                                             self.ce_balance))
