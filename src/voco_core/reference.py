"""Slow, obviously-correct reference versions (oracles) of the fast code paths.

Written straight from the algorithm spec, one crop / one pair at a time. The
tests check the fast paths against them and the benchmarks time both; training
never uses them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai import transforms as mt

from voco_core.config import AugmentConfig


def per_crop_monai_crops(
    volume: torch.Tensor,
    boxes: np.ndarray,
    input_size: int,
    augment: AugmentConfig | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """One MONAI pipeline per box: SpatialCrop, Resize (trilinear) and, when
    ``augment`` is given, RandFlip per axis, RandRotate90 in-plane and
    RandShiftIntensity, as the authors' release does for each of its 16 + m crops.

    ``volume`` ``(1, X, Y, Z)``, ``boxes`` ``(N, 3, 2)`` -> ``(N, 1, S, S, S)``.
    """
    out = []
    for index, box in enumerate(boxes):
        steps = [mt.SpatialCrop(roi_start=box[:, 0].tolist(), roi_end=box[:, 1].tolist()),
                 mt.Resize((input_size,) * 3, mode="trilinear")]
        if augment is not None:
            steps += [mt.RandFlip(prob=augment.flip_prob, spatial_axis=axis) for axis in range(3)]
            steps += [mt.RandRotate90(prob=augment.rot90_prob, max_k=3, spatial_axes=(0, 1)),
                      mt.RandShiftIntensity(offsets=augment.shift_max, prob=augment.shift_prob)]
        pipeline = mt.Compose(steps)
        pipeline.set_random_state(seed + index)
        out.append(torch.as_tensor(pipeline(volume)))
    return torch.stack(out)


def per_crop_labels(crop_boxes: np.ndarray, base_boxes: np.ndarray) -> np.ndarray:
    """The spec's overlap label, one (sub-volume, base crop) pair at a time: ``(m, K)``."""
    labels = np.zeros((len(crop_boxes), len(base_boxes)), np.float32)
    for i, c in enumerate(crop_boxes):
        for k, b in enumerate(base_boxes):
            dx = max(0, min(c[0, 1], b[0, 1]) - max(c[0, 0], b[0, 0]))
            dy = max(0, min(c[1, 1], b[1, 1]) - max(c[1, 0], b[1, 0]))
            labels[i, k] = dx * dy / ((c[0, 1] - c[0, 0]) * (c[1, 1] - c[1, 0]))
    return labels


def voco_loss_loop(s_x, t_x, s_b, t_b, y, teacher: bool = True) -> dict[str, torch.Tensor]:
    """VoCo's loss with Python loops over volumes, crops and base crops (as the
    authors' release computes it). Shapes as :class:`voco_core.losses.VoCoLoss`."""
    batch, m, k = y.shape
    pos_terms, neg_terms, reg_terms = [], [], []
    for b in range(batch):
        p = [[None] * k for _ in range(m)]
        for i in range(m):
            for j in range(k):
                if teacher:
                    cs = F.cosine_similarity(s_x[b, i], t_b[b, j], dim=0)
                    ct = F.cosine_similarity(t_x[b, i], s_b[b, j], dim=0)
                    p[i][j] = 0.5 * (torch.relu(cs) + torch.relu(ct))
                else:
                    p[i][j] = torch.relu(F.cosine_similarity(s_x[b, i], s_b[b, j], dim=0))
        if teacher:
            num, den, neg, count = 0.0, 0.0, 0.0, 0
            for i in range(m):
                for j in range(k):
                    yij = y[b, i, j]
                    num = num + yij * torch.log(1 - torch.abs(yij - p[i][j]) + 1e-6)
                    den = den + yij
                    if yij == 0:
                        neg = neg + p[i][j] ** 2
                        count += 1
            pos_terms.append(-num / (den + 1e-6))
            neg_terms.append(neg / (count + 1e-6))
        else:
            total = 0.0
            for i in range(m):
                for j in range(k):
                    total = total - torch.log(1 - torch.abs(y[b, i, j] - p[i][j]) + 1e-6)
            pos_terms.append(total / (m * k))
            neg_terms.append(torch.zeros(()))
        pairs = [torch.relu(F.cosine_similarity(s_b[b, j], s_b[b, l].detach(), dim=0)) ** 2
                 for j in range(k) for l in range(j + 1, k)]
        reg_terms.append(sum(pairs) / len(pairs))
    pos, neg, reg = (sum(t) / batch for t in (pos_terms, neg_terms, reg_terms))
    return {"total": pos + neg + reg, "pos": pos, "neg": neg, "reg": reg}
