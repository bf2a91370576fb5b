"""Helpers shared by segmentation and position inference: volume input and
checkpoint weights checked key by key."""

from __future__ import annotations

from pathlib import Path

import torch

from voco_core.data.io import VolumeRecord, read_volume
from voco_core.errors import VoCoConfigError, VoCoDataError


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


def config_in_checkpoint(state: dict, from_dict, path: str | Path):
    """The run config stored in a checkpoint (``state["config"]``), built with
    ``from_dict``; a missing or invalid one is a :class:`VoCoDataError` naming ``path``."""
    if not isinstance(state.get("config"), dict):
        raise VoCoDataError("missing key 'config' (the run's configuration)", path)
    try:
        return from_dict(state["config"], check_device=False)
    except VoCoConfigError as err:
        raise VoCoDataError(f"the configuration stored in it is invalid: {err}", path) from err


def load_weights(module: torch.nn.Module, state: dict, key: str, path: str | Path) -> None:
    """Load ``state[key]`` into ``module``, strictly, with one-line errors naming ``path``.

    A missing key or a tensor of the wrong shape (a damaged file, or one whose config
    does not describe its weights) says which, e.g. ``missing key 'student.head.mlp.0.weight'``
    or ``shape of 'model.out.conv.weight' is (3, 48) in the file, (2, 48) expected``,
    instead of PyTorch's multi-line report.
    """
    weights = state.get(key)
    if not isinstance(weights, dict):
        raise VoCoDataError(f"missing key {key!r} (the network's weights)", path)
    expected = module.state_dict()
    for name, tensor in expected.items():
        if name not in weights:
            raise VoCoDataError(f"missing key '{key}.{name}'", path)
        found = weights[name]
        if not isinstance(found, torch.Tensor) or found.shape != tensor.shape:
            shape = tuple(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
            raise VoCoDataError(f"shape of '{key}.{name}' is {shape} in the file, "
                                f"{tuple(tensor.shape)} expected", path)
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise VoCoDataError(f"unexpected key '{key}.{unexpected[0]}' (the config stored in "
                            "the checkpoint does not describe these weights)", path)
    module.load_state_dict(weights)
