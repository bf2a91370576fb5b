"""Inference with trained networks.

- :mod:`voco_core.inference.segmentation`: a finetuned SwinUNETR's label map on the
  source voxel grid (:func:`segment`, :func:`load_segmenter`);
- :mod:`voco_core.inference.positions`: the pretrained network's overlap prediction
  for sub-volumes against the base-crop grid, beside the true overlap
  (:func:`positions`, :func:`load_position_model`; coordinates documented there);
- :mod:`voco_core.inference.uncertainty`: where to look next, the per-voxel
  entropy of a segmentation's softmax and the slices to review first
  (:func:`predictive_entropy`, :func:`rank_slices`, :func:`suggest_slices`).
"""

from voco_core.inference.positions import (
    PositionModel,
    PositionResult,
    PreparedVolume,
    base_crop_boxes,
    crops_for_network,
    load_position_model,
    plot_positions,
    position_report,
    positions,
    prepare_volume,
)
from voco_core.inference.segmentation import (
    InferenceCancelled,
    SegmentationResult,
    Segmenter,
    load_segmenter,
    segment,
)
from voco_core.inference.uncertainty import (
    REVIEW_STRATEGIES,
    REVIEW_STRATEGY,
    SliceScore,
    predictive_entropy,
    random_slices,
    rank_slices,
    slice_class_entropy,
    spread_slices,
    suggest_slices,
)

__all__ = [
    "REVIEW_STRATEGIES",
    "REVIEW_STRATEGY",
    "InferenceCancelled",
    "PositionModel",
    "PositionResult",
    "PreparedVolume",
    "SegmentationResult",
    "Segmenter",
    "SliceScore",
    "base_crop_boxes",
    "crops_for_network",
    "load_position_model",
    "load_segmenter",
    "plot_positions",
    "position_report",
    "positions",
    "predictive_entropy",
    "prepare_volume",
    "random_slices",
    "rank_slices",
    "segment",
    "slice_class_entropy",
    "spread_slices",
    "suggest_slices",
]
