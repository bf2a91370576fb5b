"""VoCo position predictions: which base crops a sub-volume overlaps, as the
pretrained network sees it (the pretext task), beside the true overlap.

Coordinates
-----------
*Image voxel coordinates* are the file's storage order (``VolumeRecord.array``).
A *box* ``(..., 3, 2)`` in image coordinates holds, per voxel axis, a continuous
interval ``[low, high)`` in which voxel ``i`` occupies ``[i, i + 1)`` (floats;
``[0, I)`` is the whole axis, ``[2, 5)`` voxels 2, 3, 4). napari puts voxel
``i``'s centre at data coordinate ``i``, so the box's rectangle in a layer's data
coordinates runs from ``low - 0.5`` to ``high - 0.5`` (then the layer's
scale/affine place it in the world, as for the image).

*Sample coordinates* are integer voxel indices in the pre-processed training
sample that the base-crop grid tiles (see :mod:`voco_core.geometry`);
:class:`PreparedVolume` maps between the two with the MetaTensor affines MONAI
tracks through orientation, crop and resize.

Predicted overlap
-----------------
The prediction is :func:`voco_core.losses.overlap_logits`, the function the
training loss uses: ``relu(cos(s(x), s(b_k)))`` (student vs student) for a v1
run, and for a v2 run the loss's own one-direction ``q = relu(cos(s(x), t(b_k)))``
(student sub-volume vs *teacher* base crop, the teacher stored in the checkpoint;
student vs student if the checkpoint holds no teacher). A pretraining checkpoint
(``napari-voco/pretrain``) loads with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voco_core.checkpoint import find_checkpoint, load_pretrain_checkpoint, saved_config
from voco_core.config import PretrainConfig, resolve_device
from voco_core.data.io import VolumeRecord
from voco_core.data.sampling import preprocess_transforms
from voco_core.data.segmentation import to_meta_tensor
from voco_core.errors import VoCoDataError
from voco_core.geometry import (
    base_crop_grid,
    crop_boxes_from_centres,
    overlap_labels,
    sample_crop_centres,
)
from voco_core.inference.common import (
    as_record,
    check_3d,
    check_channels,
    load_weights,
)
from voco_core.losses import overlap_logits
from voco_core.models import BackboneWithHead, ProjectionHead


@dataclass
class PositionModel:
    """A pretrained VoCo student (backbone + head) and its run's config.

    ``teacher``: for a v2 run, the EMA teacher the loss compared the student with
    (a :class:`ProjectionHead` fed the student's pooled features for
    ``model.teacher: head``, a whole :class:`BackboneWithHead` for ``full``); ``None`` for v1
    runs, whose inspector compares the student with itself.
    """

    net: BackboneWithHead
    config: PretrainConfig
    device: torch.device
    source: str
    step: int
    teacher: nn.Module | None = None


def load_position_model(checkpoint: str | Path, device: str = "auto") -> PositionModel:
    """Load a pretraining checkpoint (file or run folder) for :func:`positions`.

    Weights that do not fit the network the stored config describes (a missing key, a
    wrong shape) are one :class:`VoCoDataError` line naming the file."""
    path = find_checkpoint(checkpoint)
    state = load_pretrain_checkpoint(path)
    config = saved_config(state, "pretrain", path)
    channels = config.data.image_channels
    net = BackboneWithHead(config.model, channels)
    load_weights(net, state, "student", path)
    torch_device = resolve_device(device)
    teacher = None
    if config.loss.variant == "v2" and state.get("teacher") is not None:
        teacher = (ProjectionHead(net.backbone.out_dim, config.model.head_hidden_dim,
                                  config.model.head_out_dim)
                   if config.model.teacher == "head" else BackboneWithHead(config.model, channels))
        load_weights(teacher, state, "teacher", path)
        teacher = teacher.to(torch_device).eval()
    return PositionModel(net.to(torch_device).eval(), config, torch_device, str(checkpoint),
                         int(state.get("step", 0)), teacher)


def _config_of(source: PretrainConfig | PositionModel | str | Path) -> PretrainConfig:
    if isinstance(source, PretrainConfig):
        return source
    if isinstance(source, PositionModel):
        return source.config
    return saved_config(load_pretrain_checkpoint(source), "pretrain", source)


@dataclass
class PreparedVolume:
    """A volume pre-processed as in pretraining, and the way back to its voxels.

    ``sample``: ``(C, X, Y, Z)`` float32 in [0, 1], the region the base-crop grid
    tiles (v2 geometry: the central ``target_size`` window). ``sample_to_image``:
    ``(4, 4)``, continuous sample voxel coordinates -> image voxel coordinates.
    """

    sample: torch.Tensor
    sample_to_image: np.ndarray
    image_shape: tuple[int, int, int]

    def boxes_to_image(self, boxes: np.ndarray) -> np.ndarray:
        """Integer sample boxes ``(..., 3, 2)`` -> float image boxes (see module doc)."""
        boxes = np.asarray(boxes, dtype=np.float64)
        low, high = boxes[..., 0] - 0.5, boxes[..., 1] - 0.5  # voxel edges
        a, b = _apply(self.sample_to_image, low), _apply(self.sample_to_image, high)
        return np.stack([np.minimum(a, b) + 0.5, np.maximum(a, b) + 0.5], axis=-1)

    def boxes_to_sample(self, boxes: np.ndarray) -> np.ndarray:
        """Float image boxes -> integer sample boxes (rounded), clipped to the sample."""
        boxes = np.asarray(boxes, dtype=np.float64)
        inverse = np.linalg.inv(self.sample_to_image)
        a, b = _apply(inverse, boxes[..., 0] - 0.5), _apply(inverse, boxes[..., 1] - 0.5)
        low, high = np.rint(np.minimum(a, b) + 0.5), np.rint(np.maximum(a, b) + 0.5)
        size = np.array(self.sample.shape[1:])
        low = np.clip(low, 0, size - 1)
        high = np.clip(np.maximum(high, low + 1), 1, size)
        return np.stack([low, high], axis=-1).astype(np.int64)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def prepare_volume(volume: VolumeRecord | str | Path,
                   config: PretrainConfig | PositionModel | str | Path) -> PreparedVolume:
    """Pre-process ``volume`` exactly as pretraining does (without augmentation). Its
    channels must be the network's (``data.in_channels`` of the run)."""
    source = config.source if isinstance(config, PositionModel) else (
        "this config" if isinstance(config, PretrainConfig) else str(config))
    record = as_record(volume)
    check_3d(record)
    config = _config_of(config)
    check_channels(record, config.data.image_channels, source)
    pre = preprocess_transforms(config.data, load=False, track_meta=True)
    out = pre({"image": to_meta_tensor(record)})["image"]
    sample_affine = np.asarray(out.affine, dtype=np.float64)
    sample = out.as_tensor()
    target = np.array(config.data.target_size)
    offset = (np.array(sample.shape[1:]) - target) // 2  # v2: central window; v1: 0
    if np.any(offset < 0):
        raise VoCoDataError(f"pre-processed volume {tuple(sample.shape[1:])} is smaller than "
                            f"the sample size {tuple(target)}", record.path)
    x0, y0, z0 = (int(o) for o in offset)
    sample = sample[:, x0:x0 + target[0], y0:y0 + target[1], z0:z0 + target[2]].contiguous()
    shift = np.eye(4)
    shift[:3, 3] = offset
    to_image = np.linalg.inv(record.affine) @ sample_affine @ shift
    return PreparedVolume(sample, to_image, record.shape)


def base_crop_boxes(volume: VolumeRecord | str | Path | PreparedVolume,
                    config: PretrainConfig | PositionModel | str | Path) -> np.ndarray:
    """The ``K = n^2`` base crops as image boxes ``(K, 3, 2)`` (i-major order, the
    order of the overlap vectors). ``config``: a config, model or pretraining checkpoint."""
    config = _config_of(config)
    prepared = volume if isinstance(volume, PreparedVolume) else prepare_volume(volume, config)
    grid = base_crop_grid(prepared.sample.shape[1:], config.geometry.grid_size)
    return prepared.boxes_to_image(grid)


@dataclass
class PositionResult:
    """Position predictions for ``m`` sub-volumes against ``K`` base crops.

    ``predicted`` ``(m, K)``: the trained network's overlap prediction (see the module
    doc: v1 student vs student, v2 student vs teacher), each sub-volume's row computed
    beside the base crops alone, so it does not depend on the other sub-volumes of
    the call; ``true`` ``(m, K)``: x-y overlap fractions from the geometry. Boxes:
    image coordinates (see module doc) and sample voxels.
    """

    predicted: np.ndarray
    true: np.ndarray
    boxes: np.ndarray
    sample_boxes: np.ndarray
    base_boxes: np.ndarray
    grid_size: int

    @property
    def top1_correct(self) -> np.ndarray:
        """``(m,)`` bool: the predicted argmax is the true argmax."""
        return self.predicted.argmax(axis=1) == self.true.argmax(axis=1)

    @property
    def abs_error(self) -> np.ndarray:
        """``(m,)`` mean absolute error of each overlap vector."""
        return np.abs(self.predicted - self.true).mean(axis=1)


def crops_for_network(sample: torch.Tensor, boxes: np.ndarray, input_size: int) -> torch.Tensor:
    """Cut integer sample boxes ``(N, 3, 2)`` from ``(C, X, Y, Z)`` and resize each to
    ``(N, C, S, S, S)`` (trilinear, as the training sampler does)."""
    crops = []
    for (a0, a1), (b0, b1), (c0, c1) in np.asarray(boxes, dtype=np.int64):
        crop = sample[None, :, a0:a1, b0:b1, c0:c1]
        if crop.shape[2:] != (input_size,) * 3:
            crop = F.interpolate(crop, size=(input_size,) * 3, mode="trilinear",
                                 align_corners=False)
        crops.append(crop)
    return torch.cat(crops)


def positions(
    volume: VolumeRecord | str | Path | PreparedVolume,
    checkpoint: str | Path | PositionModel,
    boxes: np.ndarray | None = None,
    *,
    n: int = 16,
    seed: int = 0,
    full_depth: bool = True,
    base_volume: VolumeRecord | str | Path | PreparedVolume | None = None,
    device: str = "auto",
) -> PositionResult:
    """Predicted vs true overlap of sub-volumes with the base crops (VoCo's pretext task).

    Args:
        volume: the image the sub-volumes come from.
        checkpoint: a pretraining checkpoint/run folder or a loaded :class:`PositionModel`.
        boxes: ``(m, 3, 2)`` image boxes (see module doc); default: ``n``
            random sub-volumes drawn as in training (``seed``).
        full_depth: use the sample's whole depth for given boxes (as VoCo's crops do);
            the overlap is measured in the x-y plane either way.
        base_volume: take the base crops from another volume (the cross-volume
            protocol: the true overlap comes from grid coordinates alone). The
            result's ``base_boxes`` stay in ``volume``'s image coordinates.
    """
    model = checkpoint if isinstance(checkpoint, PositionModel) else load_position_model(
        checkpoint, device)
    config = model.config
    prepared = volume if isinstance(volume, PreparedVolume) else prepare_volume(volume, config)
    base = prepared if base_volume is None else (
        base_volume if isinstance(base_volume, PreparedVolume)
        else prepare_volume(base_volume, config))
    size = tuple(prepared.sample.shape[1:])
    grid = base_crop_grid(size, config.geometry.grid_size)
    if boxes is None:
        rng = np.random.default_rng(seed)
        centres = sample_crop_centres(rng, size, config.random_crop_size, n)
        sample_boxes = crop_boxes_from_centres(centres, config.random_crop_size, size)
    else:
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 3 or boxes.shape[1:] != (3, 2):
            raise VoCoDataError(f"boxes have shape {boxes.shape}, expected (m, 3, 2)")
        sample_boxes = prepared.boxes_to_sample(boxes)
        if full_depth:
            sample_boxes[:, 2] = (0, size[2])
    s = config.geometry.input_size
    crops = torch.cat([crops_for_network(base.sample, grid, s),
                       crops_for_network(prepared.sample, sample_boxes, s)])
    crops, k = crops.to(model.device), grid.shape[0]
    with torch.no_grad():
        pooled = model.net.backbone(crops)  # per crop (instance norm)
        teacher_pooled, teacher_head = pooled, model.teacher
        if isinstance(model.teacher, BackboneWithHead):
            teacher_pooled = model.teacher.backbone(crops)
            teacher_head = model.teacher.head
        # The heads' BatchNorm normalises with the statistics of its batch, so each
        # sub-volume goes through it beside the K base crops alone: its prediction
        # then does not depend on which other boxes share the call.
        rows = []
        for i in range(k, pooled.shape[0]):
            student = model.net.head(torch.cat([pooled[:k], pooled[i:i + 1]]))
            bases = student[:k] if teacher_head is None else teacher_head(
                torch.cat([teacher_pooled[:k], teacher_pooled[i:i + 1]]))[:k]
            rows.append(overlap_logits(student[None, k:], bases[None])[0])
    predicted = torch.cat(rows).cpu().numpy()
    return PositionResult(
        predicted=predicted,
        true=overlap_labels(sample_boxes, grid),
        boxes=prepared.boxes_to_image(sample_boxes),
        sample_boxes=sample_boxes,
        base_boxes=prepared.boxes_to_image(grid),
        grid_size=config.geometry.grid_size,
    )


def position_report(result: PositionResult) -> dict:
    """Plain-JSON summary of a :class:`PositionResult` (what ``voco positions`` writes)."""
    return {
        "grid_size": result.grid_size,
        "top1_accuracy": float(result.top1_correct.mean()),
        "mean_abs_error": float(result.abs_error.mean()),
        "chance_top1": 1.0 / result.grid_size**2,
        "base_boxes": result.base_boxes.round(3).tolist(),
        "sub_volumes": [
            {"box": box.round(3).tolist(), "sample_box": sample_box.tolist(),
             "predicted": predicted.round(4).tolist(), "true": true.round(4).tolist()}
            for box, sample_box, predicted, true in zip(
                result.boxes, result.sample_boxes, result.predicted, result.true, strict=True)
        ],
    }


def plot_positions(result: PositionResult, out_png: str | Path, max_rows: int = 8) -> Path:
    """For each sub-volume (up to ``max_rows``): predicted and true overlap as two
    ``n x n`` heat maps over the base-crop grid (row i = x, column j = y), with numbers."""
    from matplotlib.figure import Figure

    n, rows = result.grid_size, min(max_rows, len(result.predicted))
    fig = Figure(figsize=(4.2, 2.0 * rows + 0.4), constrained_layout=True)
    axes = fig.subplots(rows, 2, squeeze=False)
    for r in range(rows):
        for c, (title, values) in enumerate((("predicted", result.predicted[r]),
                                             ("true overlap", result.true[r]))):
            ax = axes[r, c]
            grid = values.reshape(n, n)
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if v < 0.6 else "k")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        mark = "ok" if result.top1_correct[r] else "miss"
        axes[r, 0].set_ylabel(f"#{r} ({mark})", fontsize=8)
    from voco_core.outputs import atomic_write

    return atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=90), "figure")
