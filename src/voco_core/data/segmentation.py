"""Image + label pairs for segmentation: checks, invertible pre-processing, training crops.

Pre-processing (:func:`seg_transforms`, MONAI, deterministic, invertible): orient to
RAS, intensity window (CT) or percentiles (MRI) on the image, resample to
``spacing`` (image trilinear, labels nearest), crop to the foreground bounding
box. Every spatial step is recorded in the MetaTensor's ``applied_operations``,
so :func:`voco_core.inference.segment` maps predictions back onto the source
voxel grid with MONAI's own inverse.

Training crops (:func:`seg_train_transforms`): pad to the ROI, then
``RandCropByPosNegLabeld`` (``samples_per_volume`` crops per volume), flips,
in-plane rot90 and intensity scale/shift. The finetuning loop re-seeds their
random state from (seed, step, volume slot) before each draw, so a resumed run
crops what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from voco_core.config import SegDataConfig, SegTrainConfig
from voco_core.data.datalists import DatalistEntry
from voco_core.data.intensity import NormaliseIntensityd, measured_foreground_crop
from voco_core.data.io import RAS_LABELS, VolumeRecord, check_pair, read_volume
from voco_core.data.sampling import channels_first
from voco_core.data.sparse import AnnotatedCropIndicesd
from voco_core.data.sparse import check_label_range as check_label_range  # re-export
from voco_core.errors import VoCoDataError


def to_meta_tensor(record: VolumeRecord, dtype: torch.dtype = torch.float32) -> MetaTensor:
    """``(C, I, J, K)`` channel-first MetaTensor carrying the record's affine (``C = 1``
    for an ``(I, J, K)`` array, else the channels of ``(I, J, K, C)``)."""
    return MetaTensor(channels_first(record.array).to(dtype), affine=torch.as_tensor(
        record.affine), meta={"filename_or_obj": str(record.path or "volume")})


def label_values(label: VolumeRecord) -> np.ndarray:
    """Sorted distinct label values; raises when they are not whole numbers >= 0."""
    values = np.unique(label.array)
    if np.issubdtype(values.dtype, np.floating):
        bad = values[(values != np.round(values)) | (values < 0)]
    else:
        bad = values[values < 0]
    if bad.size:
        raise VoCoDataError(f"label value {bad[0].item()!r} is not a class index (expected whole "
                            "numbers 0, 1, 2, ...)", label.path)
    return values.astype(np.int64)


@dataclass
class LabelledCase:
    """One checked pair, as channel-first MetaTensors on the source grid: ``image``
    ``(C, I, J, K)``, ``label`` ``(1, I, J, K)``."""

    entry: DatalistEntry
    image: MetaTensor
    label: MetaTensor
    values: np.ndarray


def load_labelled_cases(entries: Sequence[DatalistEntry],
                        kind: str = "training") -> list[LabelledCase]:
    """Read and check every pair: label present, same grid as its image, whole-number
    values. (Class range is checked once the number of classes is known; the channel
    count, the same for every image, by :func:`voco_core.data.datalists.resolve_in_channels`.)"""
    cases = []
    for entry in entries:
        if entry.label is None:
            raise VoCoDataError(f"{kind} case has no label map, but finetuning needs one",
                                entry.image_file)
        image = read_volume(entry.image)
        label = read_volume(entry.label, kind="label map")
        check_pair(image, label)
        values = label_values(label)
        cases.append(LabelledCase(entry, to_meta_tensor(image), to_meta_tensor(label), values))
    return cases


class _AboveZero:
    """Foreground for cropping: voxels above 0 after normalisation (all when none)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        mask = image > 0
        return mask if bool(mask.any()) else torch.ones_like(mask)


def seg_transforms(data: SegDataConfig, keys: Sequence[str] = ("image", "label")) -> mt.Compose:
    """Deterministic, invertible pre-processing of ``{"image": MetaTensor, "label": ...}``
    (``keys`` may be just ``("image",)`` for inference)."""
    keys = tuple(keys)
    interp = tuple("bilinear" if k == "image" else "nearest" for k in keys)
    steps: list = [mt.Orientationd(keys, axcodes="RAS", labels=RAS_LABELS)]
    steps.append(NormaliseIntensityd("image", data))
    if data.spacing is not None:
        steps.append(mt.Spacingd(keys, pixdim=tuple(data.spacing), mode=interp))
    if data.crop_foreground:
        steps.extend(measured_foreground_crop("image", mt.CropForegroundd(
            keys, source_key="image", select_fn=_AboveZero(), allow_smaller=True)))
    return mt.Compose(steps)


def seg_train_transforms(train: SegTrainConfig, ignore_label: int | None = None) -> mt.Compose:
    """Random training crops and augmentation of a pre-processed pair (a list of
    ``samples_per_volume`` dicts comes out).

    Crop centres are drawn from annotated voxels only (:class:`AnnotatedCropIndicesd`:
    foreground = a class > 0, background = 0 inside the image's foreground); with
    ``ignore_label`` set, padding is ignored too rather than labelled background.
    Without it the crops equal MONAI's own ``RandCropByPosNegLabeld`` bit for bit.
    """
    keys = ("image", "label")
    pos, neg = train.pos_neg_ratio
    roi = tuple(train.roi_size)
    steps = [
        mt.SpatialPadd("image", spatial_size=roi),
        mt.SpatialPadd("label", spatial_size=roi,
                       value=ignore_label if ignore_label is not None else 0),
        AnnotatedCropIndicesd("label", ignore_label, "fg_indices", "bg_indices",
                              image_key="image", image_threshold=0),
        mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=roi, pos=pos, neg=neg,
                                  num_samples=train.samples_per_volume,
                                  fg_indices_key="fg_indices", bg_indices_key="bg_indices"),
    ]
    if train.flip_prob > 0:
        steps += [mt.RandFlipd(keys, prob=train.flip_prob, spatial_axis=a) for a in (0, 1, 2)]
    if train.rot90_prob > 0:
        steps.append(mt.RandRotate90d(keys, prob=train.rot90_prob, max_k=3, spatial_axes=(0, 1)))
    if train.intensity_scale_prob > 0:
        steps.append(mt.RandScaleIntensityd("image", factors=train.intensity_scale,
                                            prob=train.intensity_scale_prob))
    if train.intensity_shift_prob > 0:
        steps.append(mt.RandShiftIntensityd("image", offsets=train.intensity_shift,
                                            prob=train.intensity_shift_prob))
    steps.append(mt.EnsureTyped(keys, dtype=torch.float32, track_meta=False))
    return mt.Compose(steps)


def split_validation(cases: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``round(fraction * n)`` cases (at least 1 when ``n >= 2`` and
    ``fraction > 0``), chosen by ``seed``; returns (train, validation)."""
    n = len(cases)
    n_val = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    held = set(order[:n_val].tolist())
    return ([c for i, c in enumerate(cases) if i not in held],
            [c for i, c in enumerate(cases) if i in held])
