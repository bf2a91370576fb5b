"""Typed configuration: one source of truth for every hyper-parameter.

Defaults are the authors' (see the algorithm spec); presets (:data:`PRESETS`)
change only what differs. A config round-trips through YAML/JSON
(:func:`load_config`, :meth:`VoCoConfig.save`) and takes ``section.field=value``
overrides (:func:`apply_overrides`, the CLI's ``--set``). :meth:`VoCoConfig.validate`
runs on every load and raises :class:`~voco_core.errors.VoCoConfigError` naming
the field.

Sizes are voxels, ordered ``(x, y, z)`` after orientation to RAS.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from voco_core.errors import VoCoConfigError

Size3 = tuple[int, int, int]


@dataclass
class DataConfig:
    """Pre-processing of one training volume (spec: "Pre-processing")."""

    intensity: Literal["ct", "percentile"] = "ct"
    """``ct``: HU window ``ct_window`` -> [0, 1]; ``percentile``: MRI and others."""
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
    gradient_checkpointing: bool = False
    """Recompute Swin activations in backward (saves memory, costs time)."""


@dataclass
class LossConfig:
    """Weights of L = w_pos L_pos + w_neg L_neg + w_reg L_reg."""

    pos_weight: float = 1.0
    neg_weight: float = 1.0
    reg_weight: float = 1.0


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, counted in optimizer steps."""

    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 1e-5
    amsgrad: bool = True
    warmup_steps: int = 5000
    total_steps: int = 250_000
    batch_size: int = 2
    """Volumes per micro-batch (each gives K + m crops)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    clip_norm: float = 1.0
    """Max gradient norm (after un-scaling under AMP); 0 disables clipping."""
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on CUDA when supported, else fp16 with GradScaler; off on CPU."""


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``."""
    output_dir: str = "runs/voco"
    checkpoint_every: int = 1000
    """Optimizer steps between checkpoints (one is also written at the end and on stop)."""
    log_every: int = 10
    """Optimizer steps between JSON-lines/TensorBoard records (progress events: every step)."""
    tensorboard: bool = True
    deterministic: bool = False
    """Bit-reproducible runs. On CPU: no oneDNN (its multi-threaded convolution backward
    sums in a varying order) and one intra-op thread (other threaded reductions vary
    when the machine is busy), so steps are about 2x slower on 2 cores. On CUDA:
    deterministic cuDNN, no autotuning. Without it, repeated runs agree to float
    rounding (~1e-4 in the loss after a few steps), and so does a resumed run with
    the uninterrupted one."""
    cpu_allocator: Literal["retain", "system"] = "retain"
    """On CPU, ``retain``: glibc keeps freed memory for reuse during training
    (about 2x faster steps, higher peak memory; see voco_core.memory). ``system``:
    leave malloc as it is (e.g. when preloading jemalloc)."""


@dataclass
class VoCoConfig:
    preset: str = "base"
    data: DataConfig = field(default_factory=DataConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ------------------------------------------------------------ derived
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

    # ------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, numbers, strings): JSON/YAML and ``weights_only`` safe."""
        return json.loads(json.dumps(asdict(self)))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        text = (json.dumps(self.to_dict(), indent=2) if path.suffix == ".json"
                else yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    # ------------------------------------------------------------ checks
    def validate(self, check_device: bool = True) -> VoCoConfig:
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

        _require(o.lr > 0, "optim.lr", o.lr, "> 0")
        _require(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, "in [0, optim.lr]")
        _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
        _require(o.total_steps >= 1, "optim.total_steps", o.total_steps, ">= 1")
        _require(0 <= o.warmup_steps, "optim.warmup_steps", o.warmup_steps, ">= 0")
        _require(o.batch_size >= 1, "optim.batch_size", o.batch_size, ">= 1")
        _require(o.grad_accum >= 1, "optim.grad_accum", o.grad_accum, ">= 1")
        _require(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, ">= 0")
        _require(r.checkpoint_every >= 1, "run.checkpoint_every", r.checkpoint_every, ">= 1")
        _require(r.log_every >= 1, "run.log_every", r.log_every, ">= 1")
        if check_device:
            resolve_device(r.device)
        return self


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise VoCoConfigError(f"{name} = {value!r} is invalid: expected {expected}")


_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(spec: str):
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a :class:`torch.device`, or raise.

    ``auto`` picks CUDA when available, else CPU. Asking for CUDA/MPS on a machine
    without it is a :class:`VoCoConfigError`, not a crash later.
    """
    import torch

    spec = str(spec).strip().lower()
    if not _DEVICE_PATTERN.match(spec):
        raise VoCoConfigError(
            f"run.device = {spec!r} is invalid: expected auto, cpu, cuda, cuda:N or mps")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VoCoConfigError(
                f"run.device = {spec!r}, but CUDA is not available on this machine "
                "(no NVIDIA GPU or a CPU-only torch build); use --device cpu or auto")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise VoCoConfigError(
                f"run.device = {spec!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise VoCoConfigError("run.device = 'mps', but Apple MPS is not available here")
    return torch.device(spec)


# ---------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: feature_size 12, 40^3 crops used at native size (no resize), a
    # 3 x 3 grid over a 120 x 120 x 40 sample, a 512-wide head. One volume per
    # step with m = 4 sub-volumes: as many sub-volumes per step as the authors'
    # 2 volumes x m = 2, which keeps the position loss's step-to-step noise down.
    # Measured on 2 cores: ~3.8 s per step (13 crops through student + teacher).
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
}


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML/JSON/CLI value to the dataclass field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is Literal:
        if value not in args:
            raise VoCoConfigError(f"{name} = {value!r} is invalid: expected one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value.strip("()[] ")) if v]
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, list | tuple):
            return tuple(_coerce(v, args[0], name) for v in value)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise VoCoConfigError(f"{name} = {value!r} is invalid: expected {len(args)} values")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError):
        raise VoCoConfigError(
            f"{name} = {value!r} is invalid: expected {getattr(annotation, '__name__', annotation)}"
        ) from None
    return value


def _update(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    known = {f.name for f in fields(section)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise VoCoConfigError(f"unknown config field {name!r}; known: {sorted(known)}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise VoCoConfigError(f"{name} must be a mapping of fields, got {value!r}")
            _update(current, value, f"{name}.")
        else:
            setattr(section, key, _coerce(value, hints[key], name))


def make_config(preset: str = "base", overrides: dict[str, Any] | None = None,
                check_device: bool = True) -> VoCoConfig:
    """Defaults, then a preset, then nested ``overrides``; validated."""
    return _from_preset(VoCoConfig, PRESETS, preset, overrides, check_device)


def _from_preset(cls, presets: dict, preset: str, overrides: dict[str, Any] | None,
                 check_device: bool):
    """``cls`` defaults, then ``presets[preset]``, then nested ``overrides``; validated."""
    if preset not in presets:
        raise VoCoConfigError(f"preset {preset!r} is unknown: expected one of {sorted(presets)}")
    config = cls(preset=preset)
    _update(config, copy.deepcopy(presets[preset]), "")
    if overrides:
        overrides = dict(overrides)
        overrides.pop("preset", None)
        _update(config, overrides, "")
    return config.validate(check_device=check_device)


def config_from_dict(values: dict[str, Any], check_device: bool = True) -> VoCoConfig:
    """A saved config (``to_dict``) back into a :class:`VoCoConfig`: its preset, then its values."""
    return make_config(values.get("preset", "base"), values, check_device=check_device)


def load_config(path: str | Path, check_device: bool = True) -> VoCoConfig:
    """Read a YAML or JSON config file (a partial one is completed from its preset)."""
    path = Path(path)
    if not path.is_file():
        raise VoCoConfigError(f"{path}: config file not found")
    try:
        values = (json.loads(path.read_text()) if path.suffix == ".json"
                  else yaml.safe_load(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise VoCoConfigError(f"{path}: not a readable YAML/JSON config ({err})") from err
    if not isinstance(values, dict):
        raise VoCoConfigError(f"{path}: expected a mapping of config sections")
    try:
        return config_from_dict(values, check_device=check_device)
    except VoCoConfigError as err:
        raise VoCoConfigError(f"{path}: {err}") from err


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=3e-4"`` -> ``{"optim": {"lr": 3e-4}}`` (value parsed as JSON, else YAML)."""
    if "=" not in text:
        raise VoCoConfigError(f"--set {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    try:  # JSON first: YAML 1.1 reads "3e-4" as a string
        value = json.loads(raw)
    except json.JSONDecodeError:
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``extra`` wins); returns a new dict."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(config: VoCoConfig, overrides: list[str] | dict[str, Any],
                    check_device: bool = True) -> VoCoConfig:
    """A new config with ``section.field=value`` strings (or a nested dict) applied."""
    values = config.to_dict()
    if isinstance(overrides, dict):
        values = merge(values, overrides)
    else:
        for text in overrides:
            values = merge(values, parse_override(text))
    return config_from_dict(values, check_device=check_device)


# ---------------------------------------------------------------- finetuning


@dataclass
class SegDataConfig:
    """Pre-processing of an image + label pair for segmentation (MONAI transforms;
    inverted exactly by :func:`voco_core.inference.segment`)."""

    intensity: Literal["ct", "percentile"] = "ct"
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
    val_fraction: float = 0.2
    """Share of labelled cases held out for validation when the datalist has no
    ``validation`` section (at least one case, when there are two or more)."""


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
    val_every: int = 250
    """Steps between sliding-window validations (also one at the end)."""
    sw_overlap: float = 0.5
    sw_batch_size: int = 4


@dataclass
class FinetuneConfig:
    preset: str = "base"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/finetune",
                                                             checkpoint_every=250))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    save = VoCoConfig.save

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
        _require(t.lr > 0, "train.lr", t.lr, "> 0")
        _require(0 <= t.min_lr <= t.lr, "train.min_lr", t.min_lr, "in [0, train.lr]")
        _require(t.total_steps >= 1, "train.total_steps", t.total_steps, ">= 1")
        _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, ">= 0")
        _require(t.encoder_lr_scale >= 0, "train.encoder_lr_scale", t.encoder_lr_scale, ">= 0")
        _require(t.freeze_encoder_steps >= 0, "train.freeze_encoder_steps",
                 t.freeze_encoder_steps, ">= 0")
        for name in ("flip_prob", "rot90_prob", "intensity_shift_prob", "intensity_scale_prob"):
            _require(0 <= getattr(t, name) <= 1, f"train.{name}", getattr(t, name), "in [0, 1]")
        _require(t.val_every >= 1, "train.val_every", t.val_every, ">= 1")
        _require(0 <= t.sw_overlap < 1, "train.sw_overlap", t.sw_overlap, "in [0, 1)")
        _require(t.sw_batch_size >= 1, "train.sw_batch_size", t.sw_batch_size, ">= 1")
        _require(self.run.checkpoint_every >= 1, "run.checkpoint_every",
                 self.run.checkpoint_every, ">= 1")
        if check_device:
            resolve_device(self.run.device)
        return self


FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: feature size 12, 64^3 crops at the file's spacing.
    "tiny": {
        "data": {"spacing": None},
        "model": {"feature_size": 12},
        "train": {"roi_size": [64, 64, 64], "total_steps": 100, "warmup_steps": 10,
                  "lr": 1e-3, "val_every": 25, "amp": "off", "sw_batch_size": 2},
        "run": {"checkpoint_every": 25, "log_every": 1, "output_dir": "runs/finetune-tiny"},
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
