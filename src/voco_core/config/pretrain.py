"""The pretraining config (:class:`PretrainConfig`): one source of truth for every
hyper-parameter of ``voco pretrain``.

Defaults are the authors'; presets (:data:`PRESETS`) change only what differs.
Sizes are voxels, ordered ``(x, y, z)`` after orientation to RAS.
"""

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
    merge,
    parse_override,
    read_config_file,
    resolve_device,
)


@dataclass
class DataConfig(ChannelCount):
    """Pre-processing of one training volume (spec: "Pre-processing")."""

    intensity: Literal["auto", "ct", "percentile"] = "auto"
    """``ct``: HU window ``ct_window`` -> [0, 1]; ``percentile``: the volume's own
    ``percentiles`` -> [0, 1] (MRI and others); ``auto``: per volume, CT when it holds
    air in Hounsfield units (see :mod:`voco_core.data.intensity`)."""
    ct_window: tuple[float, float] = (-175.0, 250.0)
    """HU mapped to 0 and 1 (clipped)."""
    percentiles: tuple[float, float] = (0.5, 99.5)
    """Intensity percentiles mapped to 0 and 1 (clipped), for ``percentile``."""
    foreground_threshold: float = 0.3
    """Crop to the bounding box of voxels above this (after normalisation); < 0: no crop."""
    resample: Literal["resize", "spacing"] = "resize"
    """``resize``: whole volume -> ``target_size`` (v1). ``spacing``: resample to
    ``target_spacing`` mm, then a random ``target_size`` region per sample (v2)."""
    target_size: Size3 = (384, 384, 96)
    """Voxels of one training sample (the volume the base-crop grid covers)."""
    target_spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    """mm, used when ``resample == "spacing"``."""
    cache: Literal["none", "memory", "disk", "compact"] = "none"
    """``memory``: MONAI CacheDataset (float32 in RAM); ``disk``: PersistentDataset in
    ``cache_dir`` (float32 .pt files); ``compact``: uint8 .npy files in ``cache_dir``,
    memory-mapped, 1/4 of the float32 bytes (max error 1/510 of the [0, 1] range)."""
    cache_dir: str | None = None
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""
    pin_memory: bool = True
    """Pinned host memory for faster copies (CUDA only)."""
    in_channels: int = 0
    """Image channels, from the data (see :class:`~voco_core.config.common.ChannelCount`)."""


@dataclass
class GeometryConfig:
    """Base crops and random sub-volumes (spec: "Base crops", "Random sub-volumes")."""

    grid_size: int = 4
    """n: the base-crop grid is n x n over the x-y plane, full depth; K = n^2 classes."""
    num_random_crops: int = 2
    """m: random sub-volumes per volume."""
    random_crop_size: tuple[int, int] | None = None
    """x-y size of a random sub-volume; ``None``: the base crop's x-y size. Depth is full."""
    input_size: int = 64
    """Network input edge ("roi"): every crop is resized to input_size^3."""
    resize_crops: bool = True
    """False (v2 geometry): crops are used at native size and must equal ``input_size``."""


@dataclass
class AugmentConfig:
    """Per-crop augmentation, drawn independently for every base and random crop
    (spec: "Augmentation"). Flips and rotations change orientation, not labels."""

    flip_prob: float = 0.2
    """Probability of a flip, for each axis separately."""
    rot90_prob: float = 0.2
    """Probability of an in-plane (x-y) rotation by k * 90 degrees, k uniform in 1..3."""
    shift_prob: float = 0.1
    """Probability of an intensity shift."""
    shift_max: float = 0.1
    """Shift drawn uniformly in [-shift_max, shift_max] (intensities are in [0, 1])."""
    enabled: bool = True


@dataclass
class ModelConfig:
    """Swin backbone + projection head + teacher (spec: "Network")."""

    feature_size: int = 48
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 2
    use_v2: bool = True
    head_hidden_dim: int = 2048
    head_out_dim: int = 2048
    teacher: Literal["full", "head", "none"] = "full"
    """``full``: EMA copy of backbone + head; ``head``: only the head has an EMA twin;
    ``none``: no teacher (the CVPR text)."""
    ema_momentum: float = 0.9
    feature_dropout: float = 0.0
    """Dropout probability on the student's pooled backbone features before its head
    (v2: 0.2). Element-wise (``nn.Dropout`` on the ``(N, C)`` features), active in
    training only; the teacher and inference always see the clean features."""
    gradient_checkpointing: bool = False
    """Recompute Swin activations in backward (saves memory, costs time)."""


@dataclass
class LossConfig:
    """Which VoCo loss, and the weights of its terms.

    v1: ``L = pos_weight L_pos + neg_weight L_neg + reg_weight L_reg``;
    v2: ``L = intra_weight L_intra + inter_weight L_inter + reg_weight L_reg``.
    Each weight belongs to one term; the base-crop regulariser is the same term in both.
    """

    variant: Literal["v1", "v2"] = "v1"
    """``v1``: the CVPR 2024 loss (:class:`voco_core.losses.VoCoLoss`); ``v2``: the
    intra/inter-volume loss of VoCo v2 (:class:`voco_core.losses.VoCoV2Loss`; needs a
    teacher)."""
    pos_weight: float = 1.0
    """v1 only: the position term."""
    neg_weight: float = 1.0
    """v1 only: the negative term."""
    reg_weight: float = 1.0
    """v1 and v2: the base-crop regulariser."""
    intra_weight: float = 1.0
    """v2 only: student sub-volumes vs teacher base crops of the same volume."""
    inter_weight: float = 1.0
    """v2 only: student vs student against the neighbour volume's base crops."""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, counted in optimizer steps."""

    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 1e-5
    amsgrad: bool = True
    warmup_steps: int = 5000
    total_steps: int = 250_000
    batch_size: int | Literal["auto"] = 2
    """Volumes per micro-batch (each gives K + m crops). ``auto``: the preset's volumes
    per optimizer step (its ``batch_size x grad_accum``), split into micro-batches and
    gradient checkpointing chosen from the device's free memory and a probe step
    (:mod:`voco_core.train.batch_size`); the run's saved config holds the numbers
    chosen. On a CPU, auto is the preset's own split."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (chosen too when ``batch_size`` is auto)."""
    clip_norm: float = 1.0
    """Max gradient norm (after un-scaling under AMP); 0 disables clipping."""
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on CUDA when supported, else fp16 with GradScaler; off on CPU."""

@dataclass
class PretrainConfig(ConfigFile):
    preset: str = "base"
    data: DataConfig = field(default_factory=DataConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ------------------------------------------------------------ derived
    def preset_split(self) -> tuple[int, int]:
        """The preset's ``(batch_size, grad_accum)``: the volumes per optimizer step
        that ``optim.batch_size: auto`` keeps and splits its own way."""
        optim = make_pretrain_config(self.preset, check_device=False).optim
        return int(optim.batch_size), int(optim.grad_accum)

    @property
    def num_base_crops(self) -> int:
        """K = n^2."""
        return self.geometry.grid_size**2

    @property
    def base_crop_size(self) -> Size3:
        """Voxels of one base crop in the training sample (before resizing)."""
        x, y, z = self.data.target_size
        n = self.geometry.grid_size
        return (x // n, y // n, z)

    @property
    def random_crop_size(self) -> Size3:
        """Voxels of one random sub-volume (before resizing); full depth."""
        xy = self.geometry.random_crop_size or self.base_crop_size[:2]
        return (int(xy[0]), int(xy[1]), self.data.target_size[2])

    # ------------------------------------------------------------ checks
    def validate(self, check_device: bool = True) -> PretrainConfig:
        """Raise :class:`VoCoConfigError` on the first invalid field; return self."""
        d, g, m, o, r = self.data, self.geometry, self.model, self.optim, self.run
        _require(len(d.target_size) == 3 and min(d.target_size) > 0, "data.target_size",
                 d.target_size, "3 positive sizes")
        lo, hi = d.ct_window
        _require(lo < hi, "data.ct_window", d.ct_window, "a lower HU below the upper")
        plo, phi = d.percentiles
        _require(0 <= plo < phi <= 100, "data.percentiles", d.percentiles, "0 <= low < high <= 100")
        _require(min(d.target_spacing) > 0, "data.target_spacing", d.target_spacing, "> 0 mm")
        _require(d.num_workers >= 0, "data.num_workers", d.num_workers, ">= 0")
        _require(d.in_channels >= 0, "data.in_channels", d.in_channels,
                 "0 (read from the data) or the data's channel count")
        _require(d.cache not in ("disk", "compact") or bool(d.cache_dir), "data.cache_dir",
                 d.cache_dir, f'a folder when data.cache is "{d.cache}"')

        n = g.grid_size
        _require(n >= 1, "geometry.grid_size", n, ">= 1")
        x, y = d.target_size[:2]
        _require(x % n == 0 and y % n == 0, "geometry.grid_size", n,
                 f"a divisor of data.target_size x and y ({x}, {y})")
        _require(g.num_random_crops >= 1, "geometry.num_random_crops", g.num_random_crops, ">= 1")
        cx, cy, _ = self.random_crop_size
        _require(0 < cx <= x and 0 < cy <= y, "geometry.random_crop_size", g.random_crop_size,
                 f"at most the volume's x-y size ({x}, {y})")
        _require(g.input_size >= 40, "geometry.input_size", g.input_size,
                 ">= 40 voxels (the Swin's deepest map must be over 1 voxel for instance norm)")
        if not g.resize_crops:
            for name, size in (("base crop", self.base_crop_size),
                               ("random crop", self.random_crop_size)):
                _require(size == (g.input_size,) * 3, "geometry.resize_crops", False,
                         f"crops equal to input_size^3 when not resizing; the {name} is {size}")

        a = self.augment
        for name in ("flip_prob", "rot90_prob", "shift_prob"):
            _require(0.0 <= getattr(a, name) <= 1.0, f"augment.{name}", getattr(a, name),
                     "a probability in [0, 1]")
        _require(a.shift_max >= 0, "augment.shift_max", a.shift_max, ">= 0")

        _require(m.feature_size > 0 and m.feature_size % 12 == 0, "model.feature_size",
                 m.feature_size, "a positive multiple of 12")
        _require(len(m.depths) == 4 and len(m.num_heads) == 4, "model.depths/num_heads",
                 (m.depths, m.num_heads), "4 stages each")
        _require(0.0 <= m.ema_momentum <= 1.0, "model.ema_momentum", m.ema_momentum, "in [0, 1]")
        _require(m.head_hidden_dim > 0 and m.head_out_dim > 0, "model.head_*_dim",
                 (m.head_hidden_dim, m.head_out_dim), "> 0")
        _require(0.0 <= m.feature_dropout < 1.0, "model.feature_dropout", m.feature_dropout,
                 "a probability in [0, 1)")

        loss = self.loss
        for name in ("pos_weight", "neg_weight", "reg_weight", "intra_weight", "inter_weight"):
            _require(getattr(loss, name) >= 0, f"loss.{name}", getattr(loss, name), ">= 0")
        _require(loss.variant != "v2" or m.teacher != "none", "model.teacher", m.teacher,
                 "head or full with loss.variant v2 (its intra-volume term compares the "
                 "student with the teacher)")

        _require(0 < o.lr < 1, "optim.lr", o.lr, "a learning rate in (0, 1), e.g. 1e-4")
        _require(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, "in [0, optim.lr]")
        _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
        _require(o.total_steps >= 1, "optim.total_steps", o.total_steps, ">= 1")
        _require(0 <= o.warmup_steps, "optim.warmup_steps", o.warmup_steps, ">= 0")
        _require(o.batch_size == "auto" or o.batch_size >= 1, "optim.batch_size",
                 o.batch_size, ">= 1 or auto")
        _require(o.grad_accum >= 1, "optim.grad_accum", o.grad_accum, ">= 1")
        _require(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, ">= 0")
        _require(r.checkpoint_every >= 1, "run.checkpoint_every", r.checkpoint_every, ">= 1")
        _require(r.log_every >= 1, "run.log_every", r.log_every, ">= 1")
        if check_device:
            resolve_device(r.device)
        return self



PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: feature_size 12, 40^3 crops used at native size (no resize), a
    # 3 x 3 grid over a 120 x 120 x 40 sample, a 512-wide head. One volume per
    # step with m = 4 sub-volumes: as many sub-volumes per step as the authors'
    # 2 volumes x m = 2, which keeps the position loss's step-to-step noise down.
    "tiny": {
        "data": {"target_size": [120, 120, 40]},
        "geometry": {"grid_size": 3, "num_random_crops": 4, "input_size": 40,
                     "resize_crops": False},
        "model": {"feature_size": 12, "head_hidden_dim": 512, "head_out_dim": 512},
        "optim": {"lr": 3e-4, "warmup_steps": 5, "total_steps": 40, "batch_size": 1,
                  "amp": "off"},
        "run": {"checkpoint_every": 10, "log_every": 1, "output_dir": "runs/voco-tiny"},
    },
    # The authors' B setup (10k release): 384 x 384 x 96, 4 x 4 grid of 96^3 -> 64^3.
    "base": {
        "model": {"feature_size": 48, "gradient_checkpointing": True},
    },
    "large": {
        "model": {"feature_size": 96, "gradient_checkpointing": True},
    },
    "huge": {
        "model": {"feature_size": 192, "gradient_checkpointing": True},
        "optim": {"batch_size": 1, "grad_accum": 2},
    },
    # VoCo v2 (the "Large-Scale-Medical" release) at size B: 1.5 mm spacing, a random
    # 192 x 192 x 64 region, 3 x 3 grid of 64^3 base crops at native size, one backbone
    # with an EMA teacher head (1024 wide), feature dropout 0.2, the intra/inter loss.
    "v2": {
        "data": {"resample": "spacing", "target_spacing": [1.5, 1.5, 1.5],
                 "target_size": [192, 192, 64]},
        "geometry": {"grid_size": 3, "input_size": 64, "resize_crops": False},
        "model": {"feature_size": 48, "gradient_checkpointing": True, "teacher": "head",
                  "head_hidden_dim": 1024, "head_out_dim": 1024, "feature_dropout": 0.2},
        "loss": {"variant": "v2"},
    },
}



def make_pretrain_config(preset: str = "base", overrides: dict[str, Any] | None = None,
                check_device: bool = True) -> PretrainConfig:
    """Defaults, then a preset, then nested ``overrides``; validated."""
    return _from_preset(PretrainConfig, PRESETS, preset, overrides, check_device)



def pretrain_config_from_dict(values: dict[str, Any], check_device: bool = True) -> PretrainConfig:
    """A saved config (``to_dict``) back into a :class:`PretrainConfig`: its preset,
    then its values."""
    return make_pretrain_config(values.get("preset", "base"), values, check_device=check_device)



def load_pretrain_config(path: str | Path, check_device: bool = True) -> PretrainConfig:
    """Read a YAML or JSON pretraining config file (a partial one is completed from its
    preset); errors are one line naming the file."""
    return read_config_file(path, lambda values: pretrain_config_from_dict(values, check_device))


def apply_overrides(config: PretrainConfig, overrides: list[str] | dict[str, Any],
                    check_device: bool = True) -> PretrainConfig:
    """A new config with ``section.field=value`` strings (or a nested dict) applied."""
    values = config.to_dict()
    if isinstance(overrides, dict):
        values = merge(values, overrides)
    else:
        for text in overrides:
            values = merge(values, parse_override(text))
    return pretrain_config_from_dict(values, check_device=check_device)

