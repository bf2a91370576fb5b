r"""VoCo losses (v1 and v2), vectorised over volumes, sub-volumes and base crops.

Both losses are built from the small term functions below, each a matrix
expression over a batch of volumes. Shapes: ``B`` volumes, ``m`` random
sub-volumes and ``K`` base crops per volume, ``D`` feature channels; ``y`` are the
overlap labels ``(B, m, K)`` in [0, 1] (each row sums to 1). ``s`` is the student,
``t`` the teacher, ``x_a`` the sub-volumes, ``b_k`` the base crops. Every term is
computed in float32 whatever the autocast dtype, and returns one value per volume
``(B,)``; the losses average over volumes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6


def _normalized(features: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last axis, in at least float32 (bf16/fp16 features are upcast)."""
    return F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)


def overlap_logits(crops: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Predicted overlap ``relu(cos(crops_a, bases_k))``: ``(B, m, D), (B, K, D) -> (B, m, K)``.

    Values in [0, 1]; a cosine matmul of unit vectors, in at least float32.
    """
    return F.relu(_normalized(crops) @ _normalized(bases).transpose(1, 2))


def position_term(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pull the logits towards the overlap where there is some: ``(B, m, K) x 2 -> (B,)``.

    ``-sum_ak y_ak log(1 - |y_ak - p_ak| + 1e-6) / (sum_ak y_ak + 1e-6)``. ``labels``
    may be soft targets (v2's inter-volume term); they are not differentiated.
    """
    y = labels.to(logits.dtype)
    return -(y * torch.log(1 - (y - logits).abs() + _EPS)).sum(dim=(1, 2)) / (
        y.sum(dim=(1, 2)) + _EPS)


def negative_term(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """v1: push the logits to 0 where there is no overlap: ``(B, m, K) x 2 -> (B,)``.

    ``sum_{y_ak = 0} p_ak^2 / (#{y_ak = 0} + 1e-6)``.
    """
    negative = (labels == 0).to(logits.dtype)
    return (negative * logits**2).sum(dim=(1, 2)) / (negative.sum(dim=(1, 2)) + _EPS)


def negative_log_term(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """v2: the negative part as a log-loss: ``(B, m, K) x 2 -> (B,)``.

    ``-sum_{y_ak = 0} log(1 - p_ak + 1e-6) / (#{y_ak = 0} + 1e-6)``; unlike v1's
    ``p^2`` its gradient grows as ``p`` approaches 1.
    """
    negative = (labels == 0).to(logits.dtype)
    return -(negative * torch.log(1 - logits + _EPS)).sum(dim=(1, 2)) / (
        negative.sum(dim=(1, 2)) + _EPS)


def overlap_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """v2's ``CE(y, q)``: :func:`position_term` + :func:`negative_log_term`, ``(B,)``."""
    return position_term(logits, labels) + negative_log_term(logits, labels)


def paper_position_term(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The CVPR text's L_pred over all pairs: ``-mean_ak log(1 - |y_ak - p_ak| + 1e-6)``,
    ``(B, m, K) x 2 -> (B,)``."""
    y = labels.to(logits.dtype)
    return -torch.log(1 - (y - logits).abs() + _EPS).mean(dim=(1, 2))


def base_regulariser(bases: torch.Tensor) -> torch.Tensor:
    """Keep the base crops' features apart: ``(B, K, D) -> (B,)``.

    ``mean_{k < l} relu(cos(b_k, sg(b_l)))^2``: the upper triangle of a ``(B, K, K)``
    Gram matrix with one side detached. ``K = 1``: zeros.
    """
    unit = _normalized(bases)
    k = unit.shape[1]
    if k < 2:
        return unit.new_zeros(unit.shape[0])
    gram = F.relu(unit @ unit.detach().transpose(1, 2)) ** 2
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=gram.device), diagonal=1)
    return gram[:, upper].mean(dim=1)


def neighbour_volumes(features: torch.Tensor) -> torch.Tensor:
    """Volume ``j = (i + 1) mod B``'s rows at index ``i``: ``(B, ...) -> (B, ...)``
    (``B = 1``: the volume itself)."""
    return features.roll(-1, dims=0)


class _OverlapLoss(nn.Module, ABC):
    """The call both VoCo losses share: features in, per-volume terms from
    :meth:`terms` averaged over the volumes, and their weighted sum as ``total``.

    ``forward(student_crops, teacher_crops, student_bases, teacher_bases, labels)``
    takes features ``(B, m, D)``, ``(B, m, D)``, ``(B, K, D)``, ``(B, K, D)`` (teacher
    ones ``None`` without a teacher) and labels ``(B, m, K)``; it returns ``total``,
    one scalar per term and ``logits``, the predicted overlap ``(B, m, K)``. Computed
    in float32 whatever the autocast dtype.
    """

    def __init__(self, **weights: float):
        super().__init__()
        self.weights = weights
        """Weight of each term, by the term's name (also the order of the terms)."""

    @abstractmethod
    def terms(self, student_crops, teacher_crops, student_bases, teacher_bases, labels
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each term per volume ``(B,)``, by name, and the logits ``(B, m, K)``."""

    def forward(
        self,
        student_crops: torch.Tensor,
        teacher_crops: torch.Tensor | None,
        student_bases: torch.Tensor,
        teacher_bases: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type=student_crops.device.type, enabled=False):
            per_volume, logits = self.terms(student_crops, teacher_crops, student_bases,
                                            teacher_bases, labels)
            means = {name: value.mean() for name, value in per_volume.items()}
            total = sum(self.weights[name] * value for name, value in means.items())
        return {"total": total, **means, "logits": logits}


class VoCoLoss(_OverlapLoss):
    r"""The VoCo v1 loss: position, negative and base-crop regulariser terms.

    With a teacher (``full`` or ``head``), per volume:

    .. math::
        p_{ak} &= \tfrac12\big(\mathrm{relu}(\cos(s(x_a), t(b_k)))
                             + \mathrm{relu}(\cos(t(x_a), s(b_k)))\big) \\
        L_{pos} &= -\frac{\sum_{ak} y_{ak}\,\log(1 - |y_{ak} - p_{ak}| + 10^{-6})}
                        {\sum_{ak} y_{ak} + 10^{-6}} \\
        L_{neg} &= \frac{\sum_{y_{ak}=0} p_{ak}^2}{\#\{y_{ak}=0\} + 10^{-6}} \\
        L_{reg} &= \operatorname{mean}_{k<l}\ \mathrm{relu}(\cos(s(b_k), \mathrm{sg}(s(b_l))))^2

    Without a teacher (``none``, the CVPR text): ``p_ak = relu(cos(s(x_a), s(b_k)))``,
    ``L_pos = -mean_ak log(1 - |y_ak - p_ak| + 1e-6)`` (the paper's L_pred) and
    ``L_neg = 0``.

    Returns ``total = w_pos L_pos + w_neg L_neg + w_reg L_reg``, ``pos``, ``neg``,
    ``reg`` (each averaged over the ``B`` volumes) and ``logits`` = ``p`` ``(B, m, K)``.
    """

    def __init__(self, pos_weight: float = 1.0, neg_weight: float = 1.0, reg_weight: float = 1.0):
        super().__init__(pos=pos_weight, neg=neg_weight, reg=reg_weight)

    def terms(self, student_crops, teacher_crops, student_bases, teacher_bases, labels):
        if teacher_crops is None or teacher_bases is None:
            logits = overlap_logits(student_crops, student_bases)
            pos = paper_position_term(logits, labels)
            neg = torch.zeros_like(pos)
        else:
            logits = 0.5 * (overlap_logits(student_crops, teacher_bases)
                            + overlap_logits(teacher_crops, student_bases))
            pos = position_term(logits, labels)
            neg = negative_term(logits, labels)
        return {"pos": pos, "neg": neg, "reg": base_regulariser(student_bases)}, logits


class VoCoV2Loss(_OverlapLoss):
    r"""The VoCo v2 loss: intra-volume, inter-volume and base-crop regulariser terms.

    For volume ``i`` of the batch, with ``j = (i + 1) mod B`` its neighbour
    (``B = 1``: ``j = i``) and ``CE`` = :func:`overlap_cross_entropy`:

    .. math::
        q_{ak} &= \mathrm{relu}(\cos(s(x^i_a), t(b^i_k)))
            \quad\text{(one direction: student sub-volume, teacher base crop)} \\
        L_{intra} &= \mathrm{CE}(y^i, q) \\
        r_{ak} &= \mathrm{relu}(\cos(t(x^i_a), t(b^j_k))), \quad
        u_{ak} = \mathrm{relu}(\cos(s(x^i_a), s(b^j_k))) \\
        L_{inter} &= \mathrm{CE}(\mathrm{sg}(r), u)
            \quad\text{(negatives where } r = 0\text{)} \\
        L_{reg} &= \operatorname{mean}_{k<l}\ \mathrm{relu}(\cos(s(b^i_k),
                   \mathrm{sg}(s(b^i_l))))^2

    with ``CE(y, p) = -sum y log(1 - |y - p| + 1e-6) / (sum y + 1e-6)
    - sum_{y=0} log(1 - p + 1e-6) / (#{y = 0} + 1e-6)``. The inter-volume term makes
    the teacher's soft assignment of volume i's sub-volumes to volume j's base crops
    the target of the student's.

    Returns ``total`` (the mean over volumes of
    ``w_intra L_intra + w_inter L_inter + w_reg L_reg``), ``intra``, ``inter``, ``reg``
    and ``logits`` = ``q`` ``(B, m, K)``. Needs teacher features.
    """

    def __init__(self, intra_weight: float = 1.0, inter_weight: float = 1.0,
                 reg_weight: float = 1.0):
        super().__init__(intra=intra_weight, inter=inter_weight, reg=reg_weight)

    def terms(self, student_crops, teacher_crops, student_bases, teacher_bases, labels):
        if teacher_crops is None or teacher_bases is None:
            raise ValueError("VoCoV2Loss needs teacher features (model.teacher head or full)")
        q = overlap_logits(student_crops, teacher_bases)
        target = overlap_logits(teacher_crops, neighbour_volumes(teacher_bases)).detach()
        prediction = overlap_logits(student_crops, neighbour_volumes(student_bases))
        return {"intra": overlap_cross_entropy(q, labels),
                "inter": overlap_cross_entropy(prediction, target),
                "reg": base_regulariser(student_bases)}, q


def build_loss(config) -> nn.Module:
    """The pretraining loss a :class:`~voco_core.config.PretrainConfig` asks for
    (``loss.variant``), called as ``loss(student_crops, teacher_crops, student_bases,
    teacher_bases, labels)`` and returning a dict with ``total``, its terms and
    ``logits``."""
    c = config.loss
    if c.variant == "v2":
        return VoCoV2Loss(c.intra_weight, c.inter_weight, c.reg_weight)
    return VoCoLoss(c.pos_weight, c.neg_weight, c.reg_weight)
