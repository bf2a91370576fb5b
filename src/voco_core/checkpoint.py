"""Checkpoint files: atomic writes, safe loads.

Checkpoints hold only tensors and plain types (dicts, lists, numbers, strings),
so they load with ``torch.load(..., weights_only=True)``: a file that would need
arbitrary pickle code to load is refused, never executed (checkpoints are
downloaded files, i.e. untrusted).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from voco_core.errors import VoCoDataError

CHECKPOINT_NAME = "last.pt"
PRETRAIN_FORMAT = "napari-voco/pretrain"
SEGMENTATION_FORMAT = "napari-voco/segmentation"
BEST_NAME = "best.pt"


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``:
    a crash or a full disk never leaves a half-written checkpoint under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise VoCoDataError(f"cannot write checkpoint ({err.strerror or err})", path) from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder holding ``checkpoints/last.pt``."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / CHECKPOINT_NAME
        if not candidate.is_file():
            raise VoCoDataError(f"no checkpoint in this run folder (expected {candidate})", path)
        return candidate
    if not path.is_file():
        raise VoCoDataError("checkpoint or run folder not found", path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``); typed errors name the file."""
    path = find_checkpoint(path)
    with open(path, "rb") as file:
        head = file.read(2)
    # torch.save writes a zip archive; very old torch wrote a bare pickle (b"\x80").
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise VoCoDataError("not a readable PyTorch checkpoint (not torch.save's format)", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise VoCoDataError(
            "refused: loading it would execute arbitrary pickled code; only checkpoints made "
            "of tensors and plain values (dicts, lists, numbers, strings) are accepted",
            path,
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise VoCoDataError(
            f"not a readable PyTorch checkpoint (truncated or corrupt: {type(err).__name__})", path
        ) from err
    if not isinstance(state, dict):
        raise VoCoDataError(f"checkpoint holds a {type(state).__name__}, expected a dict", path)
    return state


def load_pretrain_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """:func:`load_checkpoint`, refusing files that are not this project's pretraining runs."""
    state = load_checkpoint(path, map_location=map_location)
    if state.get("format") != PRETRAIN_FORMAT:
        hint = (" (a finetuned segmentation model: use it with 'voco predict')"
                if state.get("format") == SEGMENTATION_FORMAT else "")
        raise VoCoDataError(f"not a napari-voco pretraining checkpoint (format "
                            f"{state.get('format')!r}){hint}", path)
    return state


def load_segmentation_checkpoint(path: str | Path,
                                 map_location: str | torch.device = "cpu") -> dict:
    """A finetuning checkpoint: a run folder (its ``best.pt``, else ``last.pt``) or a file."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST_NAME, CHECKPOINT_NAME):
            if (path / "checkpoints" / name).is_file():
                path = path / "checkpoints" / name
                break
    state = load_checkpoint(path, map_location=map_location)
    if state.get("format") != SEGMENTATION_FORMAT:
        hint = (" (a pretraining checkpoint: pass it as the pretrained backbone to "
                "'voco finetune --pretrained')"
                if state.get("format") == PRETRAIN_FORMAT else "")
        raise VoCoDataError(f"not a napari-voco segmentation checkpoint (format "
                            f"{state.get('format')!r}){hint}", path)
    return state
