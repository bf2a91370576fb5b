"""The finetuning config (:class:`FinetuneConfig`) of ``voco finetune``: MONAI
SwinUNETR segmentation on image + label pairs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from voco_core.config.common import (
    ChannelCount,
    ConfigFile,
    RunConfig,
    Size3,
    _from_preset,
    _require,
    read_config_file,
    resolve_device,
)


@dataclass
class SegDataConfig(ChannelCount):
    """Pre-processing of an image + label pair for segmentation (MONAI transforms;
    inverted exactly by :func:`voco_core.inference.segment`)."""

    intensity: Literal["auto", "ct", "percentile"] = "auto"
    """As the pretraining ``data.intensity``: ``ct``, ``percentile`` or ``auto`` (per
    volume, see :mod:`voco_core.data.intensity`)."""
    ct_window: tuple[float, float] = (-175.0, 250.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    spacing: tuple[float, float, float] | None = (1.5, 1.5, 2.0)
    """mm after resampling (image trilinear, labels nearest); ``None``: keep the file's."""
    crop_foreground: bool = True
    """Crop to the bounding box of voxels above 0 after normalisation (air goes)."""
    num_classes: int = 0
    """Classes including background; 0: max label found in the training set + 1.
    A label value >= num_classes is an error naming the file."""
    class_names: tuple[str, ...] = ()
    """Optional names, ``num_classes`` of them (background first)."""
    ignore_label: int | None = None
    """Sparse label maps (nnU-Net's convention): voxels with this value carry no label.
    Not a class: it must be >= ``num_classes`` (e.g. 255); it is excluded from the
    network's outputs, the loss (no gradient) and Dice; crops centre on annotated
    voxels only. ``None``: every voxel is labelled (0 = background)."""
    val_fraction: float = 0.2
    """Share of labelled cases held out for validation when the datalist has no
    ``validation`` section (at least one case, when there are two or more)."""
    in_channels: int = 0
    """Image channels, from the data (see :class:`~voco_core.config.common.ChannelCount`)."""


@dataclass
class SegModelConfig:
    """MONAI SwinUNETR (its encoder is the VoCo backbone)."""

    feature_size: int = 48
    use_v2: bool = True
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)
    dropout_path_rate: float = 0.0
    gradient_checkpointing: bool = False


@dataclass
class SegTrainConfig:
    """Finetuning schedule, crops, augmentation and validation."""

    roi_size: Size3 = (96, 96, 96)
    """Training crop and sliding-window size (voxels); each a multiple of 32."""
    samples_per_volume: int = 2
    """``RandCropByPosNegLabeld`` crops per volume per step."""
    pos_neg_ratio: tuple[float, float] = (1.0, 1.0)
    """Crops centred on foreground : on background."""
    batch_volumes: int = 1
    """Volumes per step (each gives ``samples_per_volume`` crops)."""
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 1e-5
    warmup_steps: int = 50
    total_steps: int = 5000
    clip_norm: float = 1.0
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    encoder_lr_scale: float = 1.0
    """Encoder (backbone) lr = ``lr * encoder_lr_scale``; 0 freezes the encoder."""
    freeze_encoder_steps: int = 0
    """Keep the encoder frozen for the first N steps (decoder warm-up)."""
    flip_prob: float = 0.1
    rot90_prob: float = 0.1
    intensity_shift_prob: float = 0.5
    intensity_shift: float = 0.1
    intensity_scale_prob: float = 0.5
    intensity_scale: float = 0.1
    ce_balance: float = 0.0
    """Class-balanced cross-entropy: voxel weights ``n_c^-ce_balance`` for the ``n_c``
    voxels of each class in the step's crops (mean weight 1); 0: plain CE (MONAI's
    DiceCE), 0.5: the ``tiny`` preset (small organs learnt within ~100 steps)."""
    batch_dice: bool = False
    """Dice per class over all crops of a step rather than per crop."""
    val_every: int = 250
    """Steps between sliding-window validations (also one at the end)."""
    sw_overlap: float = 0.5
    sw_batch_size: int = 4


@dataclass
class FinetuneConfig(ConfigFile):
    preset: str = "base"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/finetune",
                                                             checkpoint_every=250))

    def validate(self, check_device: bool = True) -> FinetuneConfig:
        d, m, t = self.data, self.model, self.train
        lo, hi = d.ct_window
        _require(lo < hi, "data.ct_window", d.ct_window, "a lower HU below the upper")
        plo, phi = d.percentiles
        _require(0 <= plo < phi <= 100, "data.percentiles", d.percentiles, "0 <= low < high <= 100")
        _require(d.spacing is None or min(d.spacing) > 0, "data.spacing", d.spacing,
                 "positive mm or null")
        _require(d.num_classes == 0 or d.num_classes >= 2, "data.num_classes", d.num_classes,
                 "0 (from the labels) or >= 2 (background + classes)")
        _require(not d.class_names or not d.num_classes or len(d.class_names) == d.num_classes,
                 "data.class_names", d.class_names, f"{d.num_classes} names (background first)")
        _require(0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "in [0, 1)")
        _require(d.in_channels >= 0, "data.in_channels", d.in_channels,
                 "0 (read from the data) or the data's channel count")
        _require(d.ignore_label is None or (
            not isinstance(d.ignore_label, bool) and d.ignore_label >= max(d.num_classes, 1)),
            "data.ignore_label", d.ignore_label,
            "null or an integer label value above the classes (>= data.num_classes, e.g. 255)")
        _require(m.feature_size > 0 and m.feature_size % 12 == 0, "model.feature_size",
                 m.feature_size, "a positive multiple of 12")
        _require(all(s >= 64 and s % 32 == 0 for s in t.roi_size), "train.roi_size",
                 t.roi_size, "multiples of 32, at least 64 (SwinUNETR halves the size 5 times; "
                 "instance norm needs more than one voxel at the bottom)")
        _require(t.samples_per_volume >= 1, "train.samples_per_volume", t.samples_per_volume,
                 ">= 1")
        _require(min(t.pos_neg_ratio) >= 0 and max(t.pos_neg_ratio) > 0, "train.pos_neg_ratio",
                 t.pos_neg_ratio, "non-negative, not both 0")
        _require(t.batch_volumes >= 1, "train.batch_volumes", t.batch_volumes, ">= 1")
        _require(0 < t.lr < 1, "train.lr", t.lr, "a learning rate in (0, 1), e.g. 1e-4")
        _require(0 <= t.min_lr <= t.lr, "train.min_lr", t.min_lr, "in [0, train.lr]")
        _require(t.total_steps >= 1, "train.total_steps", t.total_steps, ">= 1")
        _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, ">= 0")
        _require(t.encoder_lr_scale >= 0, "train.encoder_lr_scale", t.encoder_lr_scale, ">= 0")
        _require(t.freeze_encoder_steps >= 0, "train.freeze_encoder_steps",
                 t.freeze_encoder_steps, ">= 0")
        for name in ("flip_prob", "rot90_prob", "intensity_shift_prob", "intensity_scale_prob"):
            _require(0 <= getattr(t, name) <= 1, f"train.{name}", getattr(t, name), "in [0, 1]")
        _require(0 <= t.ce_balance <= 1, "train.ce_balance", t.ce_balance, "in [0, 1]")
        _require(t.val_every >= 1, "train.val_every", t.val_every, ">= 1")
        _require(0 <= t.sw_overlap < 1, "train.sw_overlap", t.sw_overlap, "in [0, 1)")
        _require(t.sw_batch_size >= 1, "train.sw_batch_size", t.sw_batch_size, ">= 1")
        _require(self.run.checkpoint_every >= 1, "run.checkpoint_every",
                 self.run.checkpoint_every, ">= 1")
        if check_device:
            resolve_device(self.run.device)
        return self



FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: feature size 12, 64^3 crops on a 4 mm grid (a crop spans 256 mm:
    # anatomy-sized context, and a CT is predicted on ~100x fewer voxels than at 0.8 mm).
    # Class-balanced CE and batch Dice: without them small organs stayed at Dice 0 for
    # 400 steps on the phantoms; with this recipe every class passed 0.7 held-out Dice
    # by step 150 (docs/benchmarks.md). No flips/rot90: they swap left and right, and
    # the labels say which kidney is which.
    "tiny": {
        "data": {"spacing": [4.0, 4.0, 4.0]},
        "model": {"feature_size": 12},
        "train": {"roi_size": [64, 64, 64], "total_steps": 400, "warmup_steps": 10,
                  "lr": 2e-3, "val_every": 50, "amp": "off", "sw_batch_size": 2,
                  "ce_balance": 0.5, "batch_dice": True, "flip_prob": 0.0,
                  "rot90_prob": 0.0},
        "run": {"checkpoint_every": 50, "log_every": 1, "output_dir": "runs/finetune-tiny"},
    },
    # The authors' BTCV set-up: feature size 48, 96^3 crops at 1.5 x 1.5 x 2 mm.
    "base": {},
    "large": {"model": {"feature_size": 96, "gradient_checkpointing": True}},
    "huge": {"model": {"feature_size": 192, "gradient_checkpointing": True}},
}


def make_finetune_config(preset: str = "base", overrides: dict[str, Any] | None = None,
                         check_device: bool = True) -> FinetuneConfig:
    """Defaults, then a finetuning preset, then nested ``overrides``; validated."""
    return _from_preset(FinetuneConfig, FINETUNE_PRESETS, preset, overrides, check_device)


def finetune_config_from_dict(values: dict[str, Any],
                              check_device: bool = True) -> FinetuneConfig:
    return make_finetune_config(values.get("preset", "base"), values, check_device)


def load_finetune_config(path: str | Path, check_device: bool = True) -> FinetuneConfig:
    """Read a YAML or JSON finetuning config file (a partial one is completed from its
    preset); errors are one line naming the file."""
    return read_config_file(path, lambda values: finetune_config_from_dict(values, check_device))
