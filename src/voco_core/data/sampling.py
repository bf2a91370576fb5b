"""Pre-processing and one-pass VoCo crop sampling.

Pre-processing (MONAI transforms, once per volume, cacheable): orient to RAS,
intensity window (CT) or percentiles (MRI), crop the foreground, then either
resize the whole volume to ``target_size`` (v1 geometry) or resample it to
``target_spacing`` and pad it to at least ``target_size`` (v2 geometry).

Crop sampling (:class:`VoCoCropSampler`, per step, on the training device): for a
batch of pre-processed volumes, pick the sample region (v2: a random
``target_size`` window; v1: the whole volume), cut the ``K`` base crops as one
reshaped view of the region and the ``m`` random sub-volumes as slices, resize
*all* crops of the batch with one batched trilinear interpolation, then apply
the augmentation to the whole stack at once (flips, in-plane rot90, intensity
shift). This replaces ``K + m`` separate MONAI crop/resize pipelines per volume;
with augmentation off it equals them (``tests/test_sampling.py`` keeps the
per-crop MONAI version as the oracle).

Randomness: each volume of a step draws from its own ``numpy.random.Generator``,
which the trainer seeds from (seed, step, global volume index). A resumed run
therefore draws the same crops as an uninterrupted one without any sampler state
in the checkpoint, and a batch does not depend on how it is split over
gradient-accumulation micro-batches or DDP ranks. The order of volumes comes from
:class:`ResumableRandomSampler` (permutations seeded by (seed, epoch)).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai import transforms as mt
from monai.data import MetaTensor

from voco_core.config import DataConfig, PretrainConfig
from voco_core.data.datalists import DatalistEntry, is_channel_list
from voco_core.data.intensity import (
    FOREGROUND_KEY,
    INTENSITY_KEY,
    NormaliseIntensityd,
    measured_foreground_crop,
)
from voco_core.data.io import RAS_LABELS, read_volume
from voco_core.errors import VoCoDataError
from voco_core.geometry import (
    base_crop_grid,
    crop_boxes_from_centres,
    overlap_labels,
    sample_crop_centres,
)

# ---------------------------------------------------------------- pre-processing


class ForegroundSelector:
    """Voxels above ``threshold``; the whole volume when none is (nothing to crop to)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        mask = image > self.threshold
        return mask if bool(mask.any()) else torch.ones_like(mask)


class LoadVolumed(mt.MapTransform):
    """Read ``data[key]`` (a path, or a list of channel files) with :func:`read_volume`
    into a channel-first MetaTensor ``(C, I, J, K)``."""

    def __init__(self, keys: str | Sequence[str], min_shape: Sequence[int] | None = None):
        super().__init__(keys)
        self.min_shape = min_shape

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            record = read_volume(out[key], min_shape=self.min_shape)
            out[key] = MetaTensor(channels_first(record.array), affine=torch.as_tensor(
                record.affine), meta={"filename_or_obj": str(record.path)})
        return out


def channels_first(array: np.ndarray) -> torch.Tensor:
    """A record's array ``(I, J, K)`` or channels-last ``(I, J, K, C)`` as a float32
    ``(C, I, J, K)`` tensor (``C = 1`` for a 3-D array)."""
    array = np.asarray(array)
    array = array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)
    return torch.as_tensor(np.ascontiguousarray(array).astype(np.float32, copy=False))


def preprocess_transforms(data: DataConfig, min_shape: Sequence[int] | None = None,
                          *, load: bool = True, track_meta: bool = False) -> mt.Compose:
    """MONAI pipeline: file path (or channel files) under ``"image"`` -> ``(C, X, Y, Z)``
    float32 tensor in [0, 1], each channel normalised on its own.

    ``load=False``: the input is already a channel-first MetaTensor (see
    :func:`voco_core.data.segmentation.to_meta_tensor`). ``track_meta=True`` keeps the
    output a MetaTensor whose ``affine`` maps its voxels to world mm (the inspector's
    way back to image coordinates).
    """
    key = "image"
    steps: list = [LoadVolumed(key, min_shape)] if load else []
    steps.append(mt.Orientationd(key, axcodes="RAS", labels=RAS_LABELS))
    steps.append(NormaliseIntensityd(key, data))
    if data.foreground_threshold >= 0:
        # Multi-channel: the box of voxels above the threshold in *any* channel (MONAI's
        # select_fn sees all channels and ORs them). Co-registered MRI channels share
        # their background, so this is the first channel's box there; where they differ
        # (a lesion bright only in FLAIR, contrast only in T1c) no channel's content is
        # cut, which a first-channel-only rule would risk.
        steps.extend(measured_foreground_crop(key, mt.CropForegroundd(
            key, source_key=key, allow_smaller=True,
            select_fn=ForegroundSelector(data.foreground_threshold))))
    if data.resample == "resize":
        steps.append(mt.Resized(key, spatial_size=tuple(data.target_size), mode="trilinear"))
    else:
        steps.append(mt.Spacingd(key, pixdim=tuple(data.target_spacing), mode="bilinear"))
        steps.append(mt.SpatialPadd(key, spatial_size=tuple(data.target_size)))
    steps.append(mt.EnsureTyped(key, dtype=torch.float32, track_meta=track_meta))
    return mt.Compose(steps)


@dataclass(frozen=True)
class LoadedVolume:
    """A pre-processed volume ``(C, X, Y, Z)`` with its file name and what its
    pre-processing found: ``intensity`` (``ct``/``percentile``) and ``foreground_kept``
    (fraction of voxels the foreground crop kept); both ``None`` when read back from a
    compact cache (they were reported when it was written)."""

    image: torch.Tensor
    name: str
    intensity: str | None = None
    foreground_kept: float | None = None


@dataclass(frozen=True)
class LoadFailure:
    """A volume that could not be loaded; returned instead of raising inside workers,
    so the training process can stop with the one-line message."""

    message: str


def _typed_error_in(err: BaseException) -> VoCoDataError | None:
    """The :class:`VoCoDataError` in ``err``'s cause chain (MONAI wraps errors), if any."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, VoCoDataError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _explain(err: BaseException, path: str) -> str:
    """The typed error's message if one is in the chain, else a summary naming ``path``."""
    typed = _typed_error_in(err)
    if typed is not None:
        return str(typed)
    return f"{path}: pre-processing failed ({type(err).__name__}: {err})"


class CompactVolumeCache(torch.utils.data.Dataset):
    """Pre-processed volumes stored as uint8 ``.npy`` files, memory-mapped on read.

    Pre-processed intensities lie in [0, 1] (window or percentiles, clipped), so
    ``round(255 v)`` keeps them to within 1/510 (0.83 HU of the default CT window)
    at 1 byte per voxel: 1/4 of a float32 cache. A volume is quantised *before* it
    is first used, so every epoch sees the same values. Files are named by a hash of
    the source file (path, size, modification time) and the pre-processing settings:
    changing either makes a new entry; stale ones can be deleted at any time.
    """

    VERSION = 1

    def __init__(self, items: Sequence[dict], transform, cache_dir: str | Path, data: DataConfig):
        self.items, self.transform = list(items), transform
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # in_channels is read from the same files, so it adds nothing to the key (and
        # leaving it out keeps the caches of single-channel runs valid)
        self.settings = {k: v for k, v in asdict(data).items()
                         if k not in ("cache", "cache_dir", "num_workers", "pin_memory",
                                      "in_channels")}

    def cache_path(self, index: int) -> Path:
        """The ``.npy`` file of item ``index``: quantised ``(C, X, Y, Z)``, keyed by its
        source file(s) (all channel files of a listed image) and the settings."""
        image = self.items[index]["image"]
        sources = [Path(p).resolve() for p in (image if is_channel_list(image)
                                               else [image])]
        stats = [source.stat() for source in sources]
        files = [[str(source), stat.st_size, stat.st_mtime_ns]
                 for source, stat in zip(sources, stats, strict=True)]
        key = json.dumps([self.VERSION, *(files[0] if len(files) == 1 else [files]),
                          self.settings], sort_keys=True, default=list)
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{sources[0].name.split('.')[0]}-{digest}.npy"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path = self.cache_path(index)
        if path.is_file():
            quantised = np.load(path, mmap_mode="r")
        else:
            volume = self.transform(self.items[index])["image"]
            quantised = quantise_unit_range(np.asarray(volume))
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
            np.save(tmp, quantised)
            os.replace(tmp, path)
        return {"image": dequantise_unit_range(quantised)}


def quantise_unit_range(volume: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 ``round(255 v)`` (values outside are clipped)."""
    return np.clip(np.rint(volume * 255.0), 0, 255).astype(np.uint8)


def dequantise_unit_range(quantised: np.ndarray) -> torch.Tensor:
    """uint8 -> float32 tensor ``q / 255``."""
    return torch.from_numpy(np.asarray(quantised, dtype=np.float32) * np.float32(1 / 255))


class PretrainDataset(torch.utils.data.Dataset):
    """Pre-processed volumes ``(C, X, Y, Z)`` for pretraining, optionally cached.

    ``cache``: ``none`` (plain ``monai.data.Dataset``), ``memory`` (``CacheDataset``:
    float32 volumes held in RAM, 4 bytes per voxel of ``target_size``), ``disk``
    (``PersistentDataset`` in ``cache_dir``: the same bytes as ``.pt`` files) or
    ``compact`` (:class:`CompactVolumeCache`: uint8, 1 byte per voxel, memory-mapped).
    """

    def __init__(self, entries: Sequence[DatalistEntry], config: PretrainConfig,
                 with_sources: bool = False):
        from monai.data import CacheDataset, Dataset, PersistentDataset

        self.with_sources = with_sources
        self.paths = [str(e.image_file) for e in entries]  # what messages and names say
        transform = preprocess_transforms(config.data, min_shape=min_raw_shape(config))
        items = [{"image": [str(p) for p in e.image] if is_channel_list(e.image)
                  else str(e.image)} for e in entries]
        if config.data.cache in ("disk", "compact"):
            _make_cache_folder(config.data.cache_dir)
        if config.data.cache == "memory":
            try:
                self.inner = CacheDataset(items, transform, num_workers=0, progress=False)
            except Exception as err:  # MONAI wraps the typed error: unwrap it
                typed = _typed_error_in(err)
                if typed is not None:
                    raise typed from err
                raise VoCoDataError(f"pre-processing failed ({type(err).__name__}: {err})"
                                    ) from err
        elif config.data.cache == "disk":
            self.inner = PersistentDataset(items, transform, cache_dir=config.data.cache_dir)
        elif config.data.cache == "compact":
            self.inner = CompactVolumeCache(items, transform, config.data.cache_dir, config.data)
        else:
            self.inner = Dataset(items, transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | LoadedVolume | LoadFailure:
        """The volume (a :class:`LoadedVolume` with ``with_sources``), or the failure."""
        try:
            item = self.inner[index]
        except Exception as err:
            return LoadFailure(_explain(err, self.paths[index]))
        if not self.with_sources:
            return item["image"]
        return LoadedVolume(item["image"], Path(self.paths[index]).name,
                            item.get(INTENSITY_KEY), item.get(FOREGROUND_KEY))


def _make_cache_folder(folder: str | Path) -> None:
    """Create ``data.cache_dir`` up front: a one-line error instead of a traceback from
    inside MONAI or a data-loader worker when it cannot be."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VoCoDataError(
            f"data.cache_dir cannot be created ({err.strerror or err}); expected a writable folder",
            folder,
        ) from err


def min_raw_shape(config: PretrainConfig) -> tuple[int, int, int]:
    """Smallest raw volume accepted: the network input along each axis (a smaller one
    would only be seen up-sampled)."""
    return (config.geometry.input_size,) * 3


class ResumableRandomSampler(torch.utils.data.Sampler[int]):
    """Endless stream of shuffled indices, reproducible and resumable.

    The global stream is the concatenation of permutations ``rng([seed, epoch])``;
    rank ``r`` of ``world_size`` takes every ``world_size``-th element starting at
    ``r``. ``start`` skips that many of this rank's elements (for resuming).
    """

    def __init__(self, num_items: int, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        if num_items < 1:
            raise ValueError("num_items must be >= 1")
        self.num_items, self.seed, self.start = num_items, seed, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[int]:
        position = self.start * self.world_size + self.rank  # in the global stream
        epoch, offset = divmod(position, self.num_items)
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            while offset < self.num_items:
                yield int(order[offset])
                offset += self.world_size
            epoch, offset = epoch + offset // self.num_items, offset % self.num_items

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2**62


def collate_list(batch: list) -> list:
    """Keep volumes as a list (v2 volumes differ in size; failures stay visible)."""
    return batch


# ---------------------------------------------------------------- crop sampling


@dataclass
class VoCoBatch:
    """Crops and labels of one micro-batch (``B`` volumes).

    Attributes:
        base_crops: ``(B, K, C, S, S, S)`` network inputs (``C`` image channels),
            i-major grid order.
        random_crops: ``(B, m, C, S, S, S)``.
        labels: ``(B, m, K)`` float32 overlap of each random crop with each base crop.
        base_boxes: ``(B, K, 3, 2)`` voxel boxes in the pre-processed volume.
        crop_boxes: ``(B, m, 3, 2)`` voxel boxes in the pre-processed volume.
    """

    base_crops: torch.Tensor
    random_crops: torch.Tensor
    labels: torch.Tensor
    base_boxes: np.ndarray
    crop_boxes: np.ndarray


class VoCoCropSampler:
    """Draws base crops, random sub-volumes and labels for a batch in one pass.

    Each volume's random choices (region offset, crop centres, augmentation of its
    ``K + m`` crops) come from its own generator when ``rngs`` are given; the
    trainer seeds them from (seed, step, global volume index), so a batch is the same
    whether its volumes are drawn in one process, over gradient-accumulation
    micro-batches or over DDP ranks, and resuming needs no sampler state.

    Args:
        config: geometry, sizes and ``config.augment``.
        seed: seeds the default generator (used when ``rngs`` is not given).
        augment: overrides ``config.augment.enabled`` when given (False: no augmentation).
    """

    def __init__(self, config: PretrainConfig, seed: int = 0, augment: bool | None = None):
        self.region_size = tuple(config.data.target_size)
        self.base_size = config.base_crop_size
        self.crop_size = config.random_crop_size
        self.input_size = config.geometry.input_size
        self.resize = config.geometry.resize_crops
        self.m = config.geometry.num_random_crops
        self.grid_size = config.geometry.grid_size
        self.grid = base_crop_grid(self.region_size, config.geometry.grid_size)
        enabled = config.augment.enabled if augment is None else augment
        self.augmentation = config.augment if enabled else None
        self.rng = np.random.default_rng(seed)

    def draw_boxes(self, volume_shape: Sequence[int], rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Draw one volume's sample region and random crops.

        Returns the region's offset ``(3,)`` in the volume and the random crop boxes
        ``(m, 3, 2)`` relative to the region (the base boxes are ``self.grid``).
        """
        spare = np.array(volume_shape[:3]) - np.array(self.region_size)
        if np.any(spare < 0):
            raise ValueError(f"volume {tuple(volume_shape)} smaller than region {self.region_size}")
        offset = np.array([rng.integers(0, s + 1) for s in spare])
        centres = sample_crop_centres(rng, self.region_size, self.crop_size, self.m)
        return offset, crop_boxes_from_centres(centres, self.crop_size, self.region_size)

    def __call__(self, volumes: Sequence[torch.Tensor] | torch.Tensor,
                 rngs: Sequence[np.random.Generator] | None = None) -> VoCoBatch:
        """``volumes``: ``B`` tensors ``(C, X, Y, Z)`` (on any device; the same ``C`` for
        all) -> :class:`VoCoBatch`. Every crop keeps all ``C`` channels; augmentation
        draws once per crop and moves its channels together."""
        n, m, s = self.grid_size, self.m, self.input_size
        k, b, c = n * n, len(volumes), int(volumes[0].shape[0])
        if any(int(v.shape[0]) != c for v in volumes):
            raise ValueError(f"volumes of one batch have {[int(v.shape[0]) for v in volumes]} "
                             "channels; expected the same number")
        rngs = rngs if rngs is not None else [self.rng] * b
        # All crops of the batch in one stack: B * K base crops, then B * m sub-volumes.
        crops = torch.empty((b * (k + m), c, s, s, s), dtype=volumes[0].dtype,
                            device=volumes[0].device)
        offsets, region_boxes, draws = [], [], []
        rx, ry, rz = self.region_size
        for index, (volume, rng) in enumerate(zip(volumes, rngs, strict=True)):
            offset, boxes = self.draw_boxes(volume.shape[1:], rng)
            offsets.append(offset)
            region_boxes.append(boxes)
            if self.augmentation is not None:
                draws.append(_draw_augmentation(rng, k + m, self.augmentation))
            x0, y0, z0 = (int(o) for o in offset)
            region = volume[:, x0 : x0 + rx, y0 : y0 + ry, z0 : z0 + rz]
            crops[index * k : (index + 1) * k] = self._base_crops(region)
            sub_volumes = torch.stack([region[:, a0:a1, b0:b1, c0:c1]
                                       for (a0, a1), (b0, b1), (c0, c1) in boxes])
            start = b * k + index * m
            crops[start : start + m] = self._to_input(sub_volumes)
        if draws:  # reorder per-volume draws to the stack: all base crops, then all sub-volumes
            stacked = {key: np.concatenate([d[key][..., :k] for d in draws]
                                           + [d[key][..., k:] for d in draws], axis=-1)
                       for key in draws[0]}
            crops = _apply_augmentation(crops, **stacked)
        region_boxes = np.stack(region_boxes)  # (B, m, 3, 2)
        shifts = np.stack(offsets)[:, None, :, None]  # (B, 1, 3, 1)
        return VoCoBatch(
            base_crops=crops[: b * k].view(b, k, c, s, s, s),
            random_crops=crops[b * k :].view(b, m, c, s, s, s),
            labels=torch.as_tensor(overlap_labels(region_boxes, self.grid), device=crops.device),
            base_boxes=self.grid[None] + shifts,
            crop_boxes=region_boxes + shifts,
        )

    def _base_crops(self, region: torch.Tensor) -> torch.Tensor:
        """The ``n x n`` base crops of a ``(C, X, Y, Z)`` region as ``(K, C, S, S, S)``.

        When every crop is shrunk (or kept) along every axis, resizing the whole region
        once to ``(n S, n S, S)`` and cutting it into tiles gives the same voxels as
        resizing each tile: with ``align_corners=False`` a shrinking trilinear resize
        samples each output voxel from inside its own tile. (Growing crops would sample
        across tile borders, so they are resized tile by tile.)
        """
        n, s = self.grid_size, self.input_size
        bx, by, bz = self.base_size
        if self.resize and min(self.base_size) >= s and self.base_size != (s, s, s):
            region = F.interpolate(region[None], size=(n * s, n * s, s), mode="trilinear",
                                   align_corners=False)[0]
            bx = by = bz = s
        c = region.shape[0]
        tiles = region.reshape(c, n, bx, n, by, bz).permute(1, 3, 0, 2, 4, 5)
        return self._to_input(tiles.reshape(n * n, c, bx, by, bz))

    def _to_input(self, crops: torch.Tensor) -> torch.Tensor:
        """``(N, C, a, b, c)`` -> ``(N, C, S, S, S)``: one batched trilinear resize."""
        target = (self.input_size,) * 3
        if tuple(crops.shape[2:]) == target:
            return crops
        if not self.resize:
            raise ValueError(f"crops of {tuple(crops.shape[2:])} need resizing to {target}")
        return F.interpolate(crops, size=target, mode="trilinear", align_corners=False)


def _draw_augmentation(rng: np.random.Generator, n: int, aug) -> dict[str, np.ndarray]:
    """Per-crop parameters for ``n`` crops: ``flips (3, n)`` bool, ``turns (n,)`` in
    0..3 (0: no rotation), ``shifts (n,)`` intensity offsets."""
    flips = rng.random((3, n)) < aug.flip_prob
    turns = np.where(rng.random(n) < aug.rot90_prob, rng.integers(1, 4, size=n), 0)
    shifts = (rng.random(n) < aug.shift_prob) * rng.uniform(-aug.shift_max, aug.shift_max, n)
    return {"flips": flips, "turns": turns, "shifts": shifts}


def _apply_augmentation(crops: torch.Tensor, flips: np.ndarray, turns: np.ndarray,
                        shifts: np.ndarray) -> torch.Tensor:
    """Flip / rotate / shift a ``(N, C, S, S, S)`` stack in place, one indexed op per
    parameter value (the sampler's own fresh stack, so nothing else sees the change);
    a crop's channels share its draw (one shift for all of them, as for one image)."""
    device = crops.device
    for axis, chosen in zip((2, 3, 4), flips, strict=True):
        if chosen.any():
            index = torch.as_tensor(np.flatnonzero(chosen), device=device)
            crops[index] = crops[index].flip(axis)
    for k in (1, 2, 3):
        if (turns == k).any():
            index = torch.as_tensor(np.flatnonzero(turns == k), device=device)
            crops[index] = torch.rot90(crops[index], k, dims=(2, 3))
    if shifts.any():
        offsets = torch.as_tensor(shifts, dtype=crops.dtype, device=device)
        crops += offsets.view(-1, 1, 1, 1, 1)
    return crops
