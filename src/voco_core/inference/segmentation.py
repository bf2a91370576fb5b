"""Segmentation with a finetuned SwinUNETR, on the source voxel grid.

:func:`segment` takes a finetuning checkpoint (``napari-voco/segmentation``,
loaded with ``weights_only=True``) or a loaded :class:`Segmenter`, runs MONAI's
sliding-window inference, and maps the labels back through MONAI's inverse
transforms onto the volume's own voxels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from voco_core.checkpoint import load_segmentation_checkpoint, saved_config
from voco_core.config import FinetuneConfig, resolve_device
from voco_core.data.intensity import INTENSITY_KEY, describe_intensity
from voco_core.data.io import VolumeRecord
from voco_core.data.segmentation import seg_transforms, to_meta_tensor
from voco_core.errors import VoCoDataError, VoCoError
from voco_core.inference.common import (
    as_record,
    check_3d,
    check_channels,
    load_weights,
)
from voco_core.models import build_swin_unetr


class InferenceCancelled(VoCoError):
    """The caller's stop flag was set during inference (nothing was returned)."""



@dataclass
class Segmenter:
    """A finetuned SwinUNETR ready for :func:`segment` (load once, segment many)."""

    model: torch.nn.Module
    config: FinetuneConfig
    device: torch.device
    source: str

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.config.data.class_names)

    def release(self) -> None:
        """Drop the weights (and empty the CUDA cache): the GUI calls this when done."""
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load_segmenter(checkpoint: str | Path, device: str = "auto") -> Segmenter:
    """Load a finetuning checkpoint (file or run folder: ``best.pt``, else ``last.pt``).

    A file whose weights do not fit the SwinUNETR its stored config describes (a
    missing key, a wrong shape) is one :class:`VoCoDataError` line naming it."""
    state = load_segmentation_checkpoint(checkpoint)
    config = saved_config(state, "finetune", checkpoint)
    torch_device = resolve_device(device)
    model = build_swin_unetr(config.model, config.data.num_classes, config.data.image_channels)
    load_weights(model, state, "model", checkpoint)
    model.to(torch_device).eval()
    return Segmenter(model, config, torch_device, str(checkpoint))


@dataclass
class SegmentationResult:
    """``labels``: ``(I, J, K)`` class indices on the *source* voxel grid (uint8 when
    fewer than 256 classes); ``probabilities``: ``(C, I, J, K)`` float32 or None;
    ``intensity``: how the image was normalised, e.g. ``"CT window -175..250 HU"``
    (``data.intensity: auto`` decides per volume)."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    class_names: tuple[str, ...]
    intensity: str = ""


def _window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Sliding windows MONAI will run over ``shape`` (for progress fractions)."""
    count = 1
    for size, window in zip(shape, roi, strict=True):
        size = max(size, window)
        interval = max(int(window * (1 - overlap)), 1)
        count *= 1 if size <= window else -(-(size - window) // interval) + 1
    return count


def segment(
    volume: VolumeRecord | str | Path,
    checkpoint: str | Path | Segmenter,
    *,
    device: str = "auto",
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    probabilities: bool = False,
    progress: Callable[[float], None] | None = None,
    stop=None,
) -> SegmentationResult:
    """Segment one volume with sliding windows; the label map comes back on the
    volume's own voxel grid (orientation, resampling and foreground crop undone with
    MONAI's inverse transforms, nearest-neighbour for labels), so writing it with the
    source affine overlays exactly.

    ``progress`` receives the fraction of windows done (0..1); ``stop`` (anything with
    ``is_set()``) is checked before every window batch and raises
    :class:`InferenceCancelled`.
    """
    record = as_record(volume)
    check_3d(record)
    segmenter = checkpoint if isinstance(checkpoint, Segmenter) else load_segmenter(
        checkpoint, device)
    check_channels(record, segmenter.config.data.image_channels, segmenter.source)
    config, model, torch_device = segmenter.config, segmenter.model, segmenter.device
    t = config.train
    overlap = t.sw_overlap if overlap is None else float(overlap)
    if not 0 <= overlap < 1:
        raise VoCoDataError(f"overlap = {overlap} is invalid: expected a fraction in [0, 1)")
    pre = seg_transforms(config.data, keys=("image",))
    prepared = pre({"image": to_meta_tensor(record)})
    image = prepared["image"]
    total = _window_count(image.shape[1:], t.roi_size, overlap)
    done = 0

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if stop is not None and stop.is_set():
            raise InferenceCancelled("segmentation cancelled")
        out = model(windows)
        done += windows.shape[0]
        if progress is not None:
            progress(min(done / total, 1.0))
        return out

    with torch.no_grad():
        logits = sliding_window_inference(
            image.as_tensor()[None].to(torch_device), tuple(t.roi_size),
            sw_batch_size or t.sw_batch_size, predictor, overlap=overlap, mode="gaussian")[0]
    logits = logits.float().cpu()
    invert = mt.Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)

    def to_source_grid(values: torch.Tensor) -> np.ndarray:
        pred = MetaTensor(values, meta=copy.deepcopy(image.meta))
        pred.applied_operations = copy.deepcopy(image.applied_operations)
        return np.asarray(invert({"image": image, "pred": pred})["pred"].as_tensor())

    labels = to_source_grid(logits.argmax(dim=0, keepdim=True).float())[0]
    num_classes = config.data.num_classes
    labels = np.rint(labels).astype(np.uint8 if num_classes < 256 else np.int32)
    probs = None
    if probabilities:
        invert = mt.Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)
        probs = to_source_grid(torch.softmax(logits, dim=0)).astype(np.float32)
        # Voxels outside the foreground crop come back as zeros in every channel: they
        # are background (as in the label map), so background takes what is missing.
        probs[0] += np.clip(1.0 - probs.sum(axis=0), 0.0, 1.0)
    if labels.shape != record.shape:  # MONAI's inverse must land on the source grid exactly
        raise VoCoError(f"internal error: inverted label map {labels.shape} != {record.shape}")
    if progress is not None:
        progress(1.0)
    return SegmentationResult(labels, probs, segmenter.class_names,
                              describe_intensity(prepared[INTENSITY_KEY], config.data))

