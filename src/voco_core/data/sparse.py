"""Sparse label maps: nnU-Net's ignore label, checks, crop centres and Dice.

Nobody labels a whole 3D volume by hand: people paint a few slices, run the
model, correct it and train again. A sparse label map says which voxels carry a
label with one extra value, the **ignore label** (nnU-Net's convention): an
integer above the classes, e.g. 255 or ``num_classes``, set as the finetune
config's ``data.ignore_label``. Everywhere else the map is as usual (0 =
background, 1.. = classes). The ignore value is not a class: it is not among the
declared classes, the network has no output for it, and it takes no part in the
loss (:class:`voco_core.segmentation_loss.MaskedDiceCELoss`), in the crop centres
(:class:`AnnotatedCropIndicesd`) or in Dice (:func:`masked_dice`).

"Annotated slices only" (:func:`slices_to_sparse`) turns a painted volume into a
sparse map: along one axis, a slice with any painted (non-zero) voxel is taken
as fully annotated, so its zeros are real background; every other slice is
ignored. A caller that knows which slices were reviewed (the napari widget tracks
the slices the user painted on or accepted) passes them as ``annotated`` instead.

Validation from one sparse volume (:func:`holdout_slices`, :func:`split_sparse`):
some annotated slices are held out, so that the validation Dice measures slices the
network never trained on. The rule (:data:`HOLDOUT_EVERY`,
:data:`MIN_ANNOTATED_FOR_HOLDOUT`): with ``n`` annotated slices, none is held out
while ``n < 3`` (two to train on and one to validate is the least); otherwise
``max(1, n // 4)``: every 4th, at least one, spread evenly over the annotated slices
in index order and never the first or the last of them (the held-out slices lie
between trained ones). Slices with a painted structure are preferred, since a slice
of background alone has no Dice. Across rounds of correct-and-retrain the choice is
sticky: slices held out before stay held out (``keep``), and slices a previous
round trained on are not held out later (``exclude``: the continued network has
seen them). :func:`split_sparse` then makes two maps of one volume: the training map
(the other annotated slices; held-out and unannotated slices ignored) and the
validation map (the held-out slices only).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform
from monai.transforms.utils import map_binary_to_indices
from monai.utils import convert_to_tensor

from voco_core.errors import VoCoConfigError, VoCoDataError

ArrayOrTensor = np.ndarray | torch.Tensor


def annotated_mask(label: ArrayOrTensor, ignore_label: int | None) -> ArrayOrTensor:
    """Where ``label`` carries a label: ``label != ignore_label`` (all True when ``None``).

    Same shape as ``label``; a bool ``np.ndarray`` or ``torch.Tensor`` like the input.
    """
    if ignore_label is None:
        return torch.ones_like(label, dtype=torch.bool) if isinstance(label, torch.Tensor) else (
            np.ones(np.shape(label), dtype=bool))
    return label != ignore_label


def class_values(values: np.ndarray, ignore_label: int | None) -> np.ndarray:
    """The label values that are classes: ``values`` without ``ignore_label``.

    Use it wherever the number of classes is inferred from the data (``max + 1``),
    so that an ignore value of 255 does not declare 256 classes.
    """
    values = np.asarray(values)
    return values if ignore_label is None else values[values != ignore_label]


def _check_ignore_label(ignore_label: int, where: str = "ignore_label") -> int:
    if isinstance(ignore_label, bool) or not isinstance(ignore_label, int | np.integer) or (
            ignore_label < 0):
        raise VoCoConfigError(f"{where} must be a whole number >= 0 above the classes "
                              f"(e.g. 255), got {ignore_label!r}")
    return int(ignore_label)


def annotated_slices(labels: np.ndarray, axis: int) -> np.ndarray:
    """Which slices along ``axis`` hold a painted (non-zero) voxel: bool ``(shape[axis],)``."""
    labels = np.asarray(labels)
    if not -labels.ndim <= axis < labels.ndim:
        raise VoCoConfigError(f"axis must be one of 0..{labels.ndim - 1} for a "
                              f"{labels.ndim}-D label map, got {axis}")
    others = tuple(a for a in range(labels.ndim) if a != axis % labels.ndim)
    return np.any(labels != 0, axis=others)


def slices_to_sparse(labels: np.ndarray, axis: int, ignore_label: int,
                     annotated: np.ndarray | None = None) -> np.ndarray:
    """The "annotated slices only" rule: a sparse label map from painted slices.

    Along ``axis``, a slice of ``labels`` holding any non-zero voxel stays as it is
    (fully annotated: its zeros are background); every other slice becomes
    ``ignore_label``. ``annotated`` (a bool per slice, or slice indices) names the
    annotated slices instead (e.g. the slices a user painted on or accepted: one of
    them may be all background). Returns a new array of ``labels``' shape, in a dtype wide
    enough for ``ignore_label`` (``uint8`` painting with 300 becomes ``uint16``);
    ``labels`` is not changed. A volume with nothing painted comes back all
    ignored (:func:`check_sparse_label` refuses it for training).

    Raises :class:`VoCoConfigError` when ``ignore_label`` is not a whole number >= 0
    or is one of the painted values (it must lie above the classes).
    """
    labels = np.asarray(labels)
    ignore_label = _check_ignore_label(ignore_label)
    painted = annotated_slices(labels, axis)  # checks the axis
    if annotated is not None:
        painted = slice_mask(annotated, labels.shape[axis])
    if np.any(labels == ignore_label):
        raise VoCoConfigError(f"ignore_label {ignore_label} is a painted value in the labels; "
                              "choose a value above every class (e.g. 255)")
    dtype = np.result_type(labels.dtype, np.min_scalar_type(ignore_label))
    shape = [1] * labels.ndim
    shape[axis] = labels.shape[axis]
    return np.where(painted.reshape(shape), labels.astype(dtype), dtype.type(ignore_label))


HOLDOUT_EVERY = 4
"""Every 4th annotated slice of a volume is held out for validation (at least one)."""
MIN_ANNOTATED_FOR_HOLDOUT = 3
"""Annotated slices a volume needs before one is held out: two to train on, one to
validate."""


def slice_mask(slices, size: int) -> np.ndarray:
    """A bool ``(size,)`` mask from a bool mask of that length or slice indices
    (:class:`VoCoConfigError` for an index outside ``0..size - 1``)."""
    array = np.asarray(slices if slices is not None else [], dtype=None)
    if array.dtype == bool:
        if array.shape != (size,):
            raise VoCoConfigError(f"a slice mask needs {size} entries, got shape {array.shape}")
        return array.copy()
    mask = np.zeros(size, dtype=bool)
    indices = array.astype(np.int64).ravel()
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise VoCoConfigError(f"slice indices must lie in 0..{size - 1}, got "
                              f"{sorted(set(indices.tolist()))}")
    mask[indices] = True
    return mask


def holdout_count(annotated: int, every: int = HOLDOUT_EVERY,
                  minimum: int = MIN_ANNOTATED_FOR_HOLDOUT) -> int:
    """How many of ``annotated`` slices are held out: 0 below ``minimum``, else
    ``max(1, annotated // every)`` (the module's rule)."""
    if every < 2 or minimum < 2:
        raise VoCoConfigError(f"hold out every k-th slice with k >= 2 and a minimum >= 2, "
                              f"got every={every}, minimum={minimum}")
    return 0 if annotated < minimum else max(1, annotated // every)


def slices_missing_for_holdout(annotated: int,
                               minimum: int = MIN_ANNOTATED_FOR_HOLDOUT) -> int:
    """Annotated slices still needed before one can be held out (0: enough)."""
    return max(0, int(minimum) - int(annotated))


def _spread(candidates: np.ndarray, count: int) -> list[int]:
    """``count`` of the sorted ``candidates``, evenly spread: positions
    ``floor((j + 1/2) n / count)``, ``j = 0 .. count - 1``. With the default rule
    (``n / count >= 3``) that is never the first or the last candidate."""
    n = len(candidates)
    if count <= 0 or n == 0:
        return []
    if count >= n:
        return candidates.tolist()
    return [int(candidates[int((j + 0.5) * n / count)]) for j in range(count)]


def holdout_slices(annotated, size: int | None = None, *, foreground=None, keep=None,
                   exclude=None, every: int = HOLDOUT_EVERY,
                   minimum: int = MIN_ANNOTATED_FOR_HOLDOUT) -> np.ndarray:
    """Which annotated slices of one volume to hold out for validation: bool ``(size,)``.

    ``annotated``: a bool mask per slice (then ``size`` may be left out) or indices.
    The rule is the module's: :func:`holdout_count` slices, spread evenly over the
    annotated slices in index order (:func:`_spread`: never the first or the last of
    them), over those in ``foreground`` (slices holding a structure, mask or
    indices) when there are enough of them. ``keep``:
    slices held out in an earlier round; those still annotated stay held out (the
    count may then exceed the rule's while at least two slices remain to train on).
    ``exclude``: slices an earlier round trained on; never newly held out (fewer are
    held out when only those are left).
    """
    if size is None:
        size = int(np.asarray(annotated).shape[0])
    annotated = slice_mask(annotated, size)
    n = int(annotated.sum())
    held = annotated & (slice_mask(keep, size) if keep is not None else False)
    kept = np.flatnonzero(held)
    if n - len(kept) < 2:  # at least two slices train
        held[:] = False
        held[kept[:max(0, n - 2)]] = True
    need = holdout_count(n, every, minimum) - int(held.sum())
    if need <= 0:
        return held
    order = np.flatnonzero(annotated)  # the annotated slices in index order
    allowed = ~held & (~slice_mask(exclude, size) if exclude is not None else True)
    if foreground is not None:
        preferred = order[allowed[order] & slice_mask(foreground, size)[order]]
    else:
        preferred = order[allowed[order]]
    if len(preferred) < need:
        preferred = order[allowed[order]]
    held[_spread(preferred, need)] = True
    return held


def split_sparse(labels: np.ndarray, axis: int, ignore_label: int, annotated=None,
                 held_out=None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(training map, validation map or None)`` of one volume's labels.

    The training map is :func:`slices_to_sparse` of the ``annotated`` slices (default:
    the painted ones) without the ``held_out`` ones (a mask or indices along ``axis``,
    e.g. from :func:`holdout_slices`); the validation map keeps only the held-out
    slices, everything else ``ignore_label``; None when nothing is held out. Every
    held-out slice must be annotated (:class:`VoCoConfigError`)."""
    labels = np.asarray(labels)
    size = labels.shape[axis] if -labels.ndim <= axis < labels.ndim else 0
    annotated = (annotated_slices(labels, axis) if annotated is None
                 else slice_mask(annotated, size))
    held = slice_mask(held_out, size) if held_out is not None else np.zeros(size, bool)
    if np.any(held & ~annotated):
        raise VoCoConfigError(f"held-out slices {np.flatnonzero(held & ~annotated).tolist()} "
                              "are not annotated")
    train = slices_to_sparse(labels, axis, ignore_label, annotated & ~held)
    if not held.any():
        return train, None
    return train, slices_to_sparse(labels, axis, ignore_label, held)


def check_label_range(path, values: np.ndarray, num_classes: int) -> None:
    """A label value >= ``num_classes`` is an error naming the file and the value."""
    outside = values[values >= num_classes]
    if outside.size:
        raise VoCoDataError(
            f"label value {int(outside[0])} is outside the declared classes 0..{num_classes - 1} "
            f"(data.num_classes = {num_classes})", path)


def check_sparse_label(path: str | Path | None, values: np.ndarray, num_classes: int,
                       ignore_label: int | None) -> None:
    """Check a label map's distinct ``values`` against the classes and the ignore label.

    - ``ignore_label`` ``None``: the dense rule (no change): a value ``>= num_classes``
      is an error (:func:`check_label_range`).
    - ``ignore_label`` set: it must not be a class (``ignore_label >= num_classes``);
      a value that is neither a class ``0..num_classes - 1`` nor ``ignore_label`` is
      an error; a map whose only value is ``ignore_label`` has no annotated voxel
      and is an error.

    Every error is a one-line :class:`VoCoDataError` naming ``path`` and the value.
    (A dense map using the ignore value as a class cannot be told apart from a
    sparse one; the class-range check is what catches it when none is declared.)
    """
    values = np.asarray(values)
    if ignore_label is None:
        check_label_range(path, values, num_classes)
        return
    ignore_label = _check_ignore_label(ignore_label, "data.ignore_label")
    if ignore_label < num_classes:
        raise VoCoDataError(
            f"data.ignore_label {ignore_label} is one of the declared classes "
            f"0..{num_classes - 1}; the ignore value must be >= {num_classes} (e.g. 255)", path)
    outside = values[(values >= num_classes) & (values != ignore_label)]
    if outside.size:
        raise VoCoDataError(
            f"label value {int(outside[0])} is neither a declared class 0..{num_classes - 1} "
            f"(data.num_classes = {num_classes}) nor data.ignore_label {ignore_label}", path)
    if not np.any(values != ignore_label):
        raise VoCoDataError(f"sparse label map has no annotated voxel (every voxel is "
                            f"data.ignore_label {ignore_label})", path)


class AnnotatedCropIndicesd(MapTransform):
    """Crop-centre candidates over annotated voxels, for ``RandCropByPosNegLabeld``.

    Writes ``d[fg_key]``: flat indices of foreground voxels (``label > 0`` and not
    ``ignore_label``) and ``d[bg_key]``: flat indices of background voxels
    (``label == 0``, and ``image > image_threshold`` when ``image_key`` is given, as
    MONAI's ``image_threshold`` does). Ignored voxels are in neither, so
    ``RandCropByPosNegLabeld(..., fg_indices_key=fg_key, bg_indices_key=bg_key)``
    centres its crops on annotated voxels only, with its ``pos``/``neg`` ratio over
    them. Indices are over the label's spatial shape ``(X, Y, Z)``: run it after any
    padding and right before the crop. Both are int64 on the CPU (MONAI's own
    :func:`~monai.transforms.utils.map_binary_to_indices`).
    """

    def __init__(self, label_key: Hashable, ignore_label: int | None,
                 fg_key: Hashable = "fg_indices", bg_key: Hashable = "bg_indices",
                 image_key: Hashable | None = None, image_threshold: float = 0.0):
        super().__init__(label_key)
        self.label_key, self.fg_key, self.bg_key = label_key, fg_key, bg_key
        self.ignore_label = None if ignore_label is None else _check_ignore_label(ignore_label)
        self.image_key, self.image_threshold = image_key, image_threshold

    def __call__(self, data):
        d = dict(data)
        label = convert_to_tensor(d[self.label_key], track_meta=False)[:1]  # (1, X, Y, Z)
        annotated = annotated_mask(label, self.ignore_label)
        foreground = (label != 0) & annotated
        if self.image_key is not None:
            image = convert_to_tensor(d[self.image_key], track_meta=False)
            annotated = annotated & (image > self.image_threshold).any(dim=0, keepdim=True)
        # MONAI: foreground = the label's non-zeros, background = image mask & ~foreground;
        # the annotated mask plays the image mask, so ignored voxels are neither.
        d[self.fg_key], d[self.bg_key] = map_binary_to_indices(foreground, annotated, 0)
        return d


def masked_dice(prediction: torch.Tensor, truth: torch.Tensor, num_classes: int,
                ignore_label: int | None) -> torch.Tensor:
    """Per-class Dice over annotated voxels: ``(B, 1, X, Y, Z)`` x 2 -> ``(B, C - 1)``.

    ``prediction`` and ``truth`` hold class indices (``truth`` may hold
    ``ignore_label``); background is left out; voxels whose ``truth`` is ignored
    count neither way. NaN where a class is absent from the annotated truth (MONAI's
    ``ignore_empty``); with nothing ignored it is exactly
    ``monai.metrics.compute_dice(one_hot(prediction), one_hot(truth),
    include_background=False, ignore_empty=True)``.

    Counted from a ``(C, C)`` confusion matrix per case rather than one-hot maps: the
    one-hot pair would take ``2 x 4 x C`` bytes per voxel (6.6 GB for a 117-class
    atlas on a 181 x 217 x 181 brain), the counts 8 bytes per voxel.
    """
    truth = truth.round().long() if truth.is_floating_point() else truth.long()
    annotated = annotated_mask(truth, ignore_label)
    dice = torch.full((truth.shape[0], num_classes - 1), math.nan, device=truth.device)
    for case in range(truth.shape[0]):
        keep = annotated[case]
        pairs = truth[case][keep] * num_classes + prediction[case].long()[keep]
        confusion = torch.bincount(pairs, minlength=num_classes ** 2).view(
            num_classes, num_classes)  # [truth, prediction]
        overlap = confusion.diagonal()[1:].float()
        in_truth = confusion.sum(dim=1)[1:].float()
        in_prediction = confusion.sum(dim=0)[1:].float()
        dice[case] = torch.where(in_truth > 0, 2.0 * overlap / (in_truth + in_prediction),
                                 torch.tensor(math.nan, device=truth.device))
    return dice
