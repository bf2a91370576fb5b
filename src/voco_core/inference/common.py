"""Helpers shared by segmentation and position inference: volume input and
checkpoint weights checked key by key."""

from __future__ import annotations

from pathlib import Path

import torch

from voco_core.checkpoint import check_weights
from voco_core.data.io import VolumeRecord, read_volume
from voco_core.errors import VoCoDataError


def as_record(volume: VolumeRecord | str | Path) -> VolumeRecord:
    """A loaded volume, or the file it is read from."""
    return volume if isinstance(volume, VolumeRecord) else read_volume(volume)


def check_3d(record: VolumeRecord) -> None:
    """Refuse an array that is neither ``(I, J, K)`` nor channels-last ``(I, J, K, C)``."""
    if record.array.ndim not in (3, 4):
        raise VoCoDataError(f"expected a 3-D volume (I, J, K) or one with channels last "
                            f"(I, J, K, C), got shape {record.array.shape}", record.path)


def check_channels(record: VolumeRecord, expected: int, source: str | Path) -> None:
    """Refuse an image whose channel count differs from the network's (``expected``,
    the ``data.in_channels`` recorded in the checkpoint ``source``)."""
    if record.channels != expected:
        raise VoCoDataError(f"image has {record.channels} channel(s), but the network of "
                            f"{source} takes {expected} (data.in_channels of its run)",
                            record.path)


def load_weights(module: torch.nn.Module, state: dict, key: str, path: str | Path) -> None:
    """Load ``state[key]`` into ``module``, strictly, after the key-by-key check of
    :func:`voco_core.checkpoint.check_weights` (one line naming ``path``, the entry and
    the first missing, unexpected or mis-shaped weight)."""
    weights = state.get(key)
    if not isinstance(weights, dict):
        raise VoCoDataError(f"missing key {key!r} (the network's weights)", path)
    check_weights(weights, module.state_dict(), path, key)
    module.load_state_dict(weights)
