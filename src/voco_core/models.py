"""VoCo networks: Swin backbone with SwinUNETR-named encoders, projection head, teacher.

The backbone is MONAI's ``SwinTransformer`` plus the residual ``UnetrBasicBlock``
encoders of ``monai.networks.nets.SwinUNETR``, under SwinUNETR's own parameter
names (``swinViT.*``, ``encoder1``, ``encoder2``, ``encoder3``, ``encoder4``,
``encoder10``), so :func:`backbone_state_dict` loads into SwinUNETR for
finetuning. Its feature is the global average pool of the five encoder outputs,
concatenated: ``24 * feature_size`` channels (1152 for feature size 48).
"""

from __future__ import annotations

import copy

import torch
from monai.networks.blocks import UnetrBasicBlock
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from voco_core.attention import swap_window_attention
from voco_core.config import ModelConfig

BACKBONE_PREFIXES = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")

INPUT_LAYER_WEIGHTS = ("swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight",
                       "encoder1.layer.conv3.conv.weight")
"""The convolution kernels ``(out, C, ...)`` that see the raw image: the only tensors
whose shape depends on the number of input channels (SwinUNETR names; ``encoder1``'s
residual block convolves the image in ``conv1`` and projects it in ``conv3``)."""


class VoCoBackbone(nn.Module):
    """Swin transformer + SwinUNETR encoder blocks -> pooled multi-scale feature.

    Input ``(N, C, S, S, S)`` (``C = in_channels`` image channels) with ``S >= 40``
    (the deepest Swin map must exceed one voxel for instance norm); output
    ``(N, 24 * feature_size)``. The input channels enter only the patch embedding
    (``swinViT.patch_embed.proj``) and ``encoder1`` (see :data:`INPUT_LAYER_WEIGHTS`).
    """

    def __init__(self, config: ModelConfig, in_channels: int = 1):
        super().__init__()
        fs = config.feature_size
        self.swinViT = SwinTransformer(
            in_chans=in_channels,
            embed_dim=fs,
            window_size=(config.window_size,) * 3,
            patch_size=(config.patch_size,) * 3,
            depths=tuple(config.depths),
            num_heads=tuple(config.num_heads),
            use_checkpoint=config.gradient_checkpointing,
            spatial_dims=3,
            use_v2=config.use_v2,
        )
        swap_window_attention(self.swinViT)  # same maths; tiny step saves 0.66 not 3.56 GiB

        def encoder(channels_in: int, channels_out: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(spatial_dims=3, in_channels=channels_in,
                                   out_channels=channels_out, kernel_size=3, stride=1,
                                   norm_name="instance", res_block=True)

        self.encoder1 = encoder(in_channels, fs)  # on the input
        self.encoder2 = encoder(fs, fs)  # Swin hidden state 0
        self.encoder3 = encoder(2 * fs, 2 * fs)  # hidden state 1
        self.encoder4 = encoder(4 * fs, 4 * fs)  # hidden state 2
        self.encoder10 = encoder(16 * fs, 16 * fs)  # hidden state 4
        self.out_dim = 24 * fs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.swinViT(x, True)  # normalize=True, as SwinUNETR calls it
        maps = (
            self.encoder1(x),
            self.encoder2(hidden[0]),
            self.encoder3(hidden[1]),
            self.encoder4(hidden[2]),
            self.encoder10(hidden[4]),
        )
        return torch.cat([m.mean(dim=(2, 3, 4)) for m in maps], dim=1)


class ProjectionHead(nn.Module):
    """MLP ``in -> hidden -> hidden -> out``; BatchNorm1d (no affine, no running
    statistics) and ReLU after the first two layers, as in the authors' release."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()

        def norm() -> nn.BatchNorm1d:
            return nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False)

        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), norm(), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim), norm(), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class BackboneWithHead(nn.Module):
    """Backbone + projection head: crops ``(N, C, S, S, S)`` -> features ``(N, D)``."""

    def __init__(self, config: ModelConfig, in_channels: int = 1):
        super().__init__()
        self.backbone = VoCoBackbone(config, in_channels)
        self.head = ProjectionHead(self.backbone.out_dim, config.head_hidden_dim,
                                   config.head_out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class StudentTeacher(nn.Module):
    """Student and (optional) EMA teacher for one teacher variant.

    - ``full``: the teacher is a whole copy of backbone + head.
    - ``head``: one backbone (the student's); only the head has an EMA twin, so the
      teacher branch costs no second backbone pass.
    - ``none``: no teacher (the CVPR text).

    The teacher starts as a copy of the student and never requires gradients.

    ``feature_dropout`` (``model.feature_dropout``, VoCo v2: 0.2) drops elements of the
    student's pooled backbone features ``(N, 24 * feature_size)`` before its head, in
    training mode only; the teacher is fed the clean features. This is ordinary
    element-wise ``nn.Dropout``, not the authors' release's ``Dropout1d`` on a 2-D
    input (which PyTorch reads as one unbatched sample and so zeroes whole crops'
    feature vectors) and not active in eval mode: :class:`BackboneWithHead` used at inference
    has no dropout at all.
    """

    def __init__(self, config: ModelConfig, in_channels: int = 1):
        super().__init__()
        self.variant = config.teacher
        self.momentum = config.ema_momentum
        self.student = BackboneWithHead(config, in_channels)
        self.feature_dropout = nn.Dropout(config.feature_dropout)
        self.teacher: nn.Module | None = None
        if self.variant == "full":
            self.teacher = copy.deepcopy(self.student)
        elif self.variant == "head":
            self.teacher = copy.deepcopy(self.student.head)
        if self.teacher is not None:
            self.teacher.requires_grad_(False)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of ``crops`` ``(N, C, S, S, S)``: student ``(N, D)``, teacher ``(N, D)``
        (``None`` without a teacher)."""
        pooled = self.student.backbone(crops)
        student = self.student.head(self.feature_dropout(pooled))
        if self.variant == "head":
            with torch.no_grad():
                teacher = self.teacher(pooled.detach())
            return student, teacher
        if self.teacher is None:
            return student, None
        with torch.no_grad():
            return student, self.teacher(crops)

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA step: ``teacher = m * teacher + (1 - m) * student``."""
        if self.teacher is not None:
            source = self.student if self.variant == "full" else self.student.head
            ema_update(self.teacher, source, self.momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t <- m t + (1 - m) s`` for every parameter pair (in place)."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - momentum)


def backbone_state_dict(model: StudentTeacher | BackboneWithHead | VoCoBackbone,
                        ) -> dict[str, torch.Tensor]:
    """The student backbone's weights under SwinUNETR's names (``swinViT.*``, ``encoder*``).

    ``SwinUNETR(...).load_state_dict(this, strict=False)`` reports no unexpected keys;
    the missing ones are exactly the decoder's.
    """
    if isinstance(model, StudentTeacher):
        model = model.student
    if isinstance(model, BackboneWithHead):
        model = model.backbone
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.startswith(BACKBONE_PREFIXES)}


def build_swin_unetr(config, num_classes: int, in_channels: int = 1) -> nn.Module:
    """MONAI's SwinUNETR for ``num_classes`` output channels (background included).

    ``config`` is a :class:`~voco_core.config.SegModelConfig`. Its encoder tensors
    (``swinViT.*``, ``encoder1..4``, ``encoder10``) are what VoCo pretrains.
    Input ``(N, in_channels, X, Y, Z)``; sizes must be multiples of 32.
    """
    from monai.networks.nets import SwinUNETR

    return swap_window_attention(SwinUNETR(
        in_channels=in_channels, out_channels=num_classes, feature_size=config.feature_size,
        depths=tuple(config.depths), num_heads=tuple(config.num_heads),
        dropout_path_rate=config.dropout_path_rate, use_checkpoint=config.gradient_checkpointing,
        spatial_dims=3, use_v2=config.use_v2,
    ))
