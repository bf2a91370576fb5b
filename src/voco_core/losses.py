"""VoCo loss, vectorised over volumes, sub-volumes and base crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6


class VoCoLoss(nn.Module):
    r"""Position, negative and base-crop regulariser terms of VoCo.

    Shapes: ``B`` volumes, ``m`` random sub-volumes and ``K`` base crops per volume,
    ``D`` feature channels. ``s`` is the student, ``t`` the teacher, ``x_i`` the
    sub-volumes, ``b_k`` the base crops, ``y`` the overlap labels ``(B, m, K)``.

    With a teacher (``full`` or ``head``), per volume:

    .. math::
        p_{ik} &= \tfrac12\big(\mathrm{relu}(\cos(s(x_i), t(b_k)))
                             + \mathrm{relu}(\cos(t(x_i), s(b_k)))\big) \\
        L_{pos} &= -\frac{\sum_{ik} y_{ik}\,\log(1 - |y_{ik} - p_{ik}| + 10^{-6})}
                        {\sum_{ik} y_{ik} + 10^{-6}} \\
        L_{neg} &= \frac{\sum_{y_{ik}=0} p_{ik}^2}{\#\{y_{ik}=0\} + 10^{-6}} \\
        L_{reg} &= \operatorname{mean}_{k<l}\ \mathrm{relu}(\cos(s(b_k), \mathrm{sg}(s(b_l))))^2

    Without a teacher (``none``, the CVPR text): ``p_ik = relu(cos(s(x_i), s(b_k)))``,
    ``L_pos = -mean_{ik} log(1 - |y_ik - p_ik| + 1e-6)`` (the paper's L_pred) and
    ``L_neg = 0``.

    Each term is averaged over the ``B`` volumes; the total is
    ``w_pos L_pos + w_neg L_neg + w_reg L_reg``. The logits are a cosine matmul
    ``(B, m, D) x (B, D, K)`` and the regulariser the upper triangle of a ``(B, K, K)``
    Gram matrix; computed in float32 whatever the autocast dtype.
    """

    def __init__(self, pos_weight: float = 1.0, neg_weight: float = 1.0, reg_weight: float = 1.0):
        super().__init__()
        self.pos_weight, self.neg_weight, self.reg_weight = pos_weight, neg_weight, reg_weight

    def forward(
        self,
        student_crops: torch.Tensor,
        teacher_crops: torch.Tensor | None,
        student_bases: torch.Tensor,
        teacher_bases: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Returns ``total``, ``pos``, ``neg``, ``reg`` (scalars) and ``logits`` ``(B, m, K)``."""
        with torch.autocast(device_type=student_crops.device.type, enabled=False):
            s_x, s_b = _normalized(student_crops), _normalized(student_bases)
            y = labels.to(s_x.dtype)
            if teacher_crops is None or teacher_bases is None:
                logits = F.relu(s_x @ s_b.transpose(1, 2))
                pos = -torch.log(1 - (y - logits).abs() + _EPS).mean(dim=(1, 2))
                neg = torch.zeros_like(pos)
            else:
                t_x, t_b = _normalized(teacher_crops), _normalized(teacher_bases)
                logits = 0.5 * (F.relu(s_x @ t_b.transpose(1, 2))
                                + F.relu(t_x @ s_b.transpose(1, 2)))
                pos = -(y * torch.log(1 - (y - logits).abs() + _EPS)).sum(dim=(1, 2)) / (
                    y.sum(dim=(1, 2)) + _EPS
                )
                negative = (y == 0).float()
                neg = (negative * logits**2).sum(dim=(1, 2)) / (negative.sum(dim=(1, 2)) + _EPS)

            k = s_b.shape[1]
            gram = F.relu(s_b @ s_b.detach().transpose(1, 2)) ** 2  # (B, K, K)
            upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=gram.device), diagonal=1)
            reg = gram[:, upper].mean(dim=1) if k > 1 else torch.zeros_like(pos)

            pos, neg, reg = pos.mean(), neg.mean(), reg.mean()
            total = self.pos_weight * pos + self.neg_weight * neg + self.reg_weight * reg
        return {"total": total, "pos": pos, "neg": neg, "reg": reg, "logits": logits}


def _normalized(features: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last axis, in at least float32 (bf16/fp16 features are upcast)."""
    return F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)
