"""VoCo geometry: base-crop grid, random sub-volume boxes, overlap labels.

Pure, vectorised numpy functions (no torch, no I/O). A *box* is an integer
array ``(..., 3, 2)``: per axis ``(x, y, z)`` the half-open voxel range
``[start, stop)`` in the training sample the grid covers.

The base crops tile the x-y plane with an ``n x n`` grid and span the full
depth; base crop ``k = i * n + j`` covers grid row ``i`` along x and column
``j`` along y (i-major: the label order). The overlap label of a sub-volume
with base crop ``k`` is their x-y intersection area divided by the
sub-volume's x-y area, so a sub-volume's labels sum to 1 and, when it is no
larger than a base crop, at most 4 are non-zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def base_crop_grid(volume_size: Sequence[int], grid_size: int) -> np.ndarray:
    """Boxes of the ``n x n`` base crops, shape ``(n*n, 3, 2)``, i-major order.

    Args:
        volume_size: ``(X, Y, Z)`` voxels of the sample; X and Y divisible by ``grid_size``.
        grid_size: n.
    """
    x, y, z = (int(s) for s in volume_size)
    n = int(grid_size)
    if n < 1 or x % n or y % n:
        raise ValueError(f"grid size {n} must divide the volume's x and y sizes ({x}, {y})")
    cell_x, cell_y = x // n, y // n
    i, j = np.divmod(np.arange(n * n), n)
    boxes = np.empty((n * n, 3, 2), dtype=np.int64)
    boxes[:, 0, 0], boxes[:, 0, 1] = i * cell_x, (i + 1) * cell_x
    boxes[:, 1, 0], boxes[:, 1, 1] = j * cell_y, (j + 1) * cell_y
    boxes[:, 2, 0], boxes[:, 2, 1] = 0, z
    return boxes


def sample_crop_centres(
    rng: np.random.Generator, volume_size: Sequence[int], crop_size: Sequence[int], m: int
) -> np.ndarray:
    """``m`` random x-y centres, shape ``(m, 2)``, keeping each crop inside the volume.

    As in the spec: ``cx`` is uniform over the integers ``c // 2 <= cx < X - c // 2``
    for a crop of x-size ``c`` (e.g. 48 <= cx < 336 for 96 in 384), and likewise for y.
    A crop as large as the volume has the single centre ``X // 2``.
    """
    sizes = np.array([int(volume_size[0]), int(volume_size[1])])
    crop = np.array([int(crop_size[0]), int(crop_size[1])])
    if np.any(crop > sizes) or np.any(crop < 1):
        raise ValueError(f"crop {tuple(crop)} does not fit the volume {tuple(sizes)}")
    low = crop // 2
    high = np.maximum(sizes - (crop - crop // 2), low + 1)  # exclusive
    return rng.integers(low, high, size=(m, 2))


def crop_boxes_from_centres(
    centres: np.ndarray, crop_size: Sequence[int], volume_size: Sequence[int]
) -> np.ndarray:
    """Boxes ``(..., 3, 2)`` of full-depth crops of x-y size ``crop_size[:2]`` at ``centres``."""
    centres = np.asarray(centres, dtype=np.int64)
    boxes = np.empty((*centres.shape[:-1], 3, 2), dtype=np.int64)
    for axis in (0, 1):
        start = centres[..., axis] - crop_size[axis] // 2
        boxes[..., axis, 0], boxes[..., axis, 1] = start, start + crop_size[axis]
    boxes[..., 2, 0], boxes[..., 2, 1] = 0, int(volume_size[2])
    return boxes


def overlap_labels(crop_boxes: np.ndarray, base_boxes: np.ndarray) -> np.ndarray:
    """Overlap of each crop with each base crop in the x-y plane, ``(..., m, K)`` float32.

    ``y[i, k] = area(crop_i ∩ base_k) / area(crop_i)`` (x-y areas).
    """
    crops = np.asarray(crop_boxes)[..., :, None, :2, :]  # (..., m, 1, 2, 2)
    bases = np.asarray(base_boxes)[None, :, :2, :]  # (1, K, 2, 2)
    lo = np.maximum(crops[..., 0], bases[..., 0])
    hi = np.minimum(crops[..., 1], bases[..., 1])
    inter = np.clip(hi - lo, 0, None).prod(axis=-1)  # (..., m, K)
    area = (crops[..., 1] - crops[..., 0]).prod(axis=-1)  # (..., m, 1)
    return (inter / area).astype(np.float32)
